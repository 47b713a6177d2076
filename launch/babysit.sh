#!/usr/bin/env bash
# Keeps one run going until it finishes, through preemptions: the loop for spot VMs.
#
#   launch/babysit.sh MODULE [ARGS...] --workdir gs://...
#   launch/babysit.sh rlhf_jax.train_policy --config configs/sentiment.py:model=774M \
#       --workdir "gs://$BUCKET/runs/sentiment-774m"
#
# Every POLL_SECONDS it looks at the VM and at the run:
#   VM missing or broken (PREEMPTED, ...)  delete it, create it, sync the code, launch
#   VM coming up or queued                 wait
#   run finished (exit 0 on all workers)   stop, with status 0
#   run running                            wait
#   run failed, died, or never started     sync the code and launch again
# Every launch runs the same command with the same --workdir, so the program resumes from
# its latest checkpoint there. After the first launch at most MAX_RETRIES more are made;
# then the script gives up with status 1 (a run that crashes on start should not burn
# VM hours forever). The commit is fixed when the script starts, so a relaunch runs the
# same code even if the local checkout moves on. Run it where it can stay up for the
# whole run (tmux, screen, or a small always-on VM); stopping it leaves the run going.
# DRY_RUN=1 prints the commands of one round and stops.
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

if (($# < 1)); then
  die "usage: launch/babysit.sh MODULE [ARGS...] --workdir gs://BUCKET/runs/NAME"
fi
workdir="$(find_workdir "$@")"
if [[ -z "$workdir" ]]; then
  die "babysit.sh needs --workdir: a relaunch resumes from the checkpoint there"
fi
if [[ "$workdir" != gs://* ]]; then
  die "--workdir $workdir must be in GCS (gs://...): a recreated VM starts with an empty disk"
fi

# Fixed for all rounds: the code, and the id that marks this run on the workers.
COMMIT="$(resolve_commit)"
RUN_ID="$(run_id_for "$@")"
export COMMIT RUN_ID
launches=0

# Fails (exits) if the retry budget is spent; called before anything is recreated, so
# giving up never leaves a fresh VM behind.
check_budget() {
  if ((launches > MAX_RETRIES)); then
    die "giving up: launched $launches times (the first launch plus" \
      "MAX_RETRIES=$MAX_RETRIES) and the run has not finished; last: $1." \
      "See launch/logs.sh; the VM $NAME is left as it is."
  fi
}

# start_run WHY MODULE [ARGS...]: syncs the pinned commit and launches the command.
start_run() {
  local why=$1
  shift
  check_budget "$why"
  launches=$((launches + 1))
  info "launch $launches of at most $((MAX_RETRIES + 1)): $why"
  if ! { "$LAUNCH_DIR/sync_code.sh" && "$LAUNCH_DIR/launch.sh" "$@"; }; then
    info "the launch failed; looking again in ${POLL_SECONDS}s"
  fi
}

# Folds the workers' status lines into one word for the loop below:
#   finished, running, failed:<why>, none, other:<run id>, or unreachable.
run_status() {
  local lines tag host id state n=0 running=0 none=0 failed="" other=""
  if ! lines="$(worker_status_lines)"; then
    echo unreachable
    return 0
  fi
  while read -r tag host id state; do
    [[ "$tag" == RLHF_JAX_STATUS ]] || continue
    n=$((n + 1))
    id="${id#run=}"
    state="${state#state=}"
    if [[ "$id" != "$RUN_ID" ]]; then
      # Another command's run: only in the way while it is still going.
      if [[ "$state" == running ]]; then
        other="$id on ${host#host=}"
      else
        none=$((none + 1))
      fi
      continue
    fi
    case "$state" in
      running) running=$((running + 1)) ;;
      exit=0) ;;
      none) none=$((none + 1)) ;;
      *) failed="$state on ${host#host=}" ;;
    esac
  done <<<"$lines"
  if ((n == 0)); then
    echo unreachable
  elif [[ -n "$other" ]]; then
    echo "other:$other"
  elif ((running > 0)); then
    # If some workers failed, the others stop too once JAX's coordination service
    # misses them; until then the run counts as running.
    echo running
  elif [[ -n "$failed" ]]; then
    echo "failed:$failed"
  elif ((none > 0)); then
    echo none
  else
    echo finished
  fi
}

info "babysitting run $RUN_ID of commit $COMMIT on $NAME (workdir $workdir)"
while true; do
  state="$(tpu_state)"
  case "$(state_kind "$state")" in
    ready)
      status="$(run_status)"
      case "$status" in
        finished)
          info "run $RUN_ID finished on all workers; results are in $workdir"
          info "delete the VM when done: launch/delete_tpu.sh"
          exit 0
          ;;
        running) info "run $RUN_ID is running on $NAME" ;;
        unreachable) info "could not read the run status from $NAME; trying again later" ;;
        other:*) die "another run (${status#other:}) is active on $NAME; stop it with launch/stop.sh first" ;;
        none) start_run "run $RUN_ID has not been started on $NAME" "$@" ;;
        failed:*) start_run "run $RUN_ID ended with ${status#failed:}" "$@" ;;
      esac
      ;;
    pending) info "$NAME is $state; waiting" ;;
    unknown) info "could not read the state of $NAME; trying again later" ;;
    missing | broken)
      check_budget "$NAME was $state"
      info "$NAME is $state: recreating it"
      if [[ "$state" != NOT_FOUND ]]; then
        "$LAUNCH_DIR/delete_tpu.sh" || info "delete failed; trying create anyway"
      fi
      # In a dry run nothing was deleted, so tell the dry-run create that the VM is gone,
      # as it would be.
      if DRY_RUN_STATE=NOT_FOUND "$LAUNCH_DIR/create_tpu.sh"; then
        start_run "$NAME was $state and has been recreated" "$@"
      else
        info "could not create $NAME; trying again in ${POLL_SECONDS}s"
      fi
      ;;
  esac
  if is_dry_run; then
    info "dry run: stopping after one round"
    exit 0
  fi
  sleep "$POLL_SECONDS"
done
