#!/usr/bin/env bash
# ON EACH TPU WORKER: sets up the venv if needed, then runs one program of the project
# with the distributed runtime on. Every worker runs the identical command.
#
#   bash launch/run_tpu.sh MODULE [ARGS...]
#   bash launch/run_tpu.sh rlhf_jax.train_policy --config configs/sentiment.py:model=774M \
#       --workdir gs://BUCKET/runs/NAME
#
# From a workstation, start it with launch/launch.sh, which runs it on all workers in
# the background. Output goes to the console and is appended to $LOG_DIR/run.log. The
# run.* files next to it say what is running and how it ended; launch/worker_ctl.sh reads
# them for babysit.sh and stop.sh. The exit status is the program's: 0 when the run
# finished, non-zero when it failed or was preempted (relaunch the same command to
# resume from the last checkpoint in --workdir).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=SCRIPTDIR/defaults.sh
source "$here/defaults.sh"
repo_root="$(dirname "$here")"

if (($# < 1)); then
  echo "usage: bash launch/run_tpu.sh MODULE [ARGS...]   e.g. rlhf_jax.train_policy --config ... --workdir gs://..." >&2
  exit 2
fi

log_dir="$(worker_path "$LOG_DIR")"
mkdir -p "$log_dir"

# One run per worker at a time: two programs would fight over the TPU, and a second
# launch must not overwrite the status files of the first. The lock is inherited by the
# program, so it is held until the program itself exits.
exec 9>"$log_dir/run.lock"
if ! flock -n 9; then
  echo "run_tpu: another run holds $log_dir/run.lock on $(hostname); stop it first (launch/stop.sh)" >&2
  exit 75
fi

# Everything from here goes to the console and to the log. The log is appended to, so
# the attempts of a relaunched run stay in one file.
exec > >(tee -a "$log_dir/run.log") 2>&1

# Status for worker_ctl.sh. The boot id tells a run that is still going from one whose
# VM rebooted under it (the pid alone could have been reused since).
echo "$$" >"$log_dir/run.pid"
cat /proc/sys/kernel/random/boot_id >"$log_dir/run.boot"
rm -f "$log_dir/run.exit" "$log_dir/run.child"
echo "${RLHF_JAX_RUN_ID:-manual}" >"$log_dir/run.id"
trap 'rc=$?; echo "$rc" >"$log_dir/run.exit"; echo "=== run_tpu: exit $rc at $(date -u +%FT%TZ)"' EXIT

commit="$(cat "$repo_root/.rlhf_jax_commit" 2>/dev/null ||
  git -C "$repo_root" rev-parse HEAD 2>/dev/null || echo unknown)"
echo "=== run_tpu: $(date -u +%FT%TZ) host=$(hostname) run=${RLHF_JAX_RUN_ID:-manual} commit=$commit"
echo "=== run_tpu: python -m $*"

# A signal to this script (stop.sh, or a dropped foreground ssh) is passed on to the
# program, which saves a checkpoint on SIGTERM through orbax's preemption handling.
child=""
# shellcheck disable=SC2317  # only reached through the trap
forward_signal() {
  if [[ -n "$child" ]]; then
    kill -TERM "$child" 2>/dev/null || true
  else
    exit 143
  fi
}
trap forward_signal TERM INT HUP

bash "$here/install_worker.sh"

cd "$repo_root"
# The program calls jax.distributed.initialize() when this is set. TPU VMs need it even
# on a single host: it is what lets orbax notice a preemption and save in time.
export RLHF_JAX_DISTRIBUTED=1
"$(worker_path "$VENV")/bin/python" -m "$@" &
child=$!
echo "$child" >"$log_dir/run.child"
rc=0
wait "$child" || rc=$?
# A trapped signal ends `wait` early while the program is still saving; wait again for
# its real exit status.
while kill -0 "$child" 2>/dev/null; do
  rc=0
  wait "$child" || rc=$?
done
exit "$rc"
