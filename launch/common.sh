# shellcheck shell=bash
# Shared set-up for the workstation-side scripts in launch/. Sourced, never executed.
#
# It loads the settings (launch/env.sh, or the file named by ENV_FILE), fills in the
# defaults, and provides:
#   run CMD...          print "+ CMD" on stderr, then execute it unless DRY_RUN=1
#   require_vars V...   fail with a message naming the first unset variable
#   tpu_state           READY/ACTIVE/..., NOT_FOUND, or UNKNOWN for the VM in $NAME
#   tpu_ssh W CMD       run a shell command on worker W (0, 1, ... or all)
#
# The workstation is often a Mac, whose bash is 3.2, so these scripts avoid bash 4
# features: no mapfile, no associative arrays, no ${x,,}.

LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(dirname "$LAUNCH_DIR")"

die() {
  printf 'error: %s\n' "$*" >&2
  exit 1
}

info() {
  printf 'launch: %s\n' "$*" >&2
}

# --- settings ----------------------------------------------------------------------

# ENV_FILE wins; otherwise launch/env.sh if the user made one. The path is exported as
# an absolute path so that scripts started by other scripts (babysit.sh -> create_tpu.sh)
# read the same file.
if [[ -n "${ENV_FILE:-}" ]]; then
  [[ -f "$ENV_FILE" ]] || die "ENV_FILE=$ENV_FILE does not exist"
  ENV_FILE="$(cd "$(dirname "$ENV_FILE")" && pwd)/$(basename "$ENV_FILE")"
elif [[ -f "$LAUNCH_DIR/env.sh" ]]; then
  ENV_FILE="$LAUNCH_DIR/env.sh"
fi
if [[ -n "${ENV_FILE:-}" ]]; then
  export ENV_FILE
  # shellcheck source=/dev/null
  source "$ENV_FILE"
fi

# shellcheck source=SCRIPTDIR/defaults.sh
source "$LAUNCH_DIR/defaults.sh"

: "${DRY_RUN:=0}"
: "${SPOT:=0}"
: "${QUEUED:=0}"
: "${REPO_URL:=}"          # empty: ship a tarball of COMMIT with scp
: "${COMMIT:=}"            # empty: the local git HEAD
: "${CREATE_FLAGS:=}"      # extra flags for the create command, split on spaces
: "${QUEUED_VALID_FOR:=}"  # queued only: give up waiting after this long, e.g. 6h
: "${CREATE_RETRIES:=5}"   # attempts of the create command before giving up
: "${RETRY_SECONDS:=60}"   # pause between create attempts
: "${POLL_SECONDS:=300}"   # how often waits and babysit.sh look at the VM
: "${MAX_RETRIES:=10}"     # babysit.sh: relaunches allowed after the first launch
: "${WORKER_ENV:=}"        # extra KEY=VALUE words put in front of the run on every worker

env_hint() {
  if [[ -n "${ENV_FILE:-}" ]]; then
    printf 'set it in %s' "$ENV_FILE"
  else
    printf 'copy launch/env.example.sh to launch/env.sh and fill it in, or set ENV_FILE'
  fi
}

require_vars() {
  local var
  for var in "$@"; do
    if [[ -z "${!var:-}" ]]; then
      die "$var is not set ($(env_hint))"
    fi
  done
}

require_flag() {
  local var=$1
  case "${!var}" in
    0 | 1) ;;
    *) die "$var must be 0 or 1, got '${!var}'" ;;
  esac
}

require_count() {
  local var=$1
  case "${!var}" in
    '' | *[!0-9]*) die "$var must be a whole number, got '${!var}'" ;;
  esac
}

# Seconds for sleep(1): whole or decimal (the tests poll every fraction of a second).
require_seconds() {
  local var=$1
  if [[ ! "${!var}" =~ ^[0-9]+(\.[0-9]+)?$ ]]; then
    die "$var must be a number of seconds, got '${!var}'"
  fi
}

# The settings every script needs, checked once here so that a typo fails before the
# first gcloud call rather than halfway through a relaunch.
require_vars NAME ZONE PROJECT
require_flag DRY_RUN
require_flag SPOT
require_flag QUEUED
require_count CREATE_RETRIES
require_count MAX_RETRIES
require_seconds RETRY_SECONDS
require_seconds POLL_SECONDS
# TPU node names follow the Compute Engine rule; checking here gives a clearer message
# than the API error, which only arrives after the create request was sent.
if [[ ! "$NAME" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]]; then
  die "NAME='$NAME' must be lowercase letters, digits and hyphens, starting with a letter"
fi

# The worker paths go into remote commands quoted, so a leading ~ would not expand;
# REMOTE_DIR is also replaced wholesale by sync_code.sh, so it must name a directory of
# its own and never the home directory or anything above it.
for _var in REMOTE_DIR VENV LOG_DIR; do
  case "${!_var}" in
    [~] | [~]/*) die "$_var='${!_var}': write paths under the worker's home without ~/ (they are relative to it)" ;;
    '' | . | ./ | .. | ../* | */.. | */../* | /) die "$_var='${!_var}' must name a directory of its own" ;;
  esac
done
unset _var

# Flags that place every gcloud call; --project is always explicit so a run never lands
# in whatever project the local gcloud config happens to point at.
GCLOUD_LOC=("--zone=$ZONE" "--project=$PROJECT")

# --- printing and running ----------------------------------------------------------

is_dry_run() {
  [[ "$DRY_RUN" == 1 ]]
}

# Quotes one word for a POSIX shell, leaving plain words bare so that the printed
# commands stay readable and can be pasted into a terminal.
quote_word() {
  local word=$1
  if [[ -n "$word" && "$word" != *[!A-Za-z0-9_./:=@%+,-]* ]]; then
    printf '%s' "$word"
  else
    printf "'%s'" "${word//\'/\'\\\'\'}"
  fi
}

quote_cmd() {
  local out="" word
  for word in "$@"; do
    out+="${out:+ }$(quote_word "$word")"
  done
  printf '%s' "$out"
}

print_cmd() {
  printf '+ %s\n' "$(quote_cmd "$@")" >&2
}

run() {
  print_cmd "$@"
  if is_dry_run; then
    return 0
  fi
  "$@"
}

# --- the TPU VM ----------------------------------------------------------------------

# Prints the state of the VM (tpu-vm: READY, CREATING, PREEMPTED, ...) or of the queued
# resource (ACTIVE, WAITING_FOR_RESOURCES, SUSPENDED, FAILED, ...). NOT_FOUND means it
# does not exist; UNKNOWN means gcloud failed for another reason (network, auth), which
# callers treat as "look again later" rather than as a reason to recreate anything.
# In a dry run the answer is $DRY_RUN_STATE, NOT_FOUND unless set.
tpu_state() {
  local cmd err out
  if [[ "$QUEUED" == 1 ]]; then
    cmd=(gcloud compute tpus queued-resources describe "$NAME" "${GCLOUD_LOC[@]}"
      "--format=value(state.state)")
  else
    cmd=(gcloud compute tpus tpu-vm describe "$NAME" "${GCLOUD_LOC[@]}"
      "--format=value(state)")
  fi
  print_cmd "${cmd[@]}"
  if is_dry_run; then
    printf '%s\n' "${DRY_RUN_STATE:-NOT_FOUND}"
    return 0
  fi
  err="$(mktemp)"
  if out="$("${cmd[@]}" 2>"$err")"; then
    rm -f "$err"
    out="$(printf '%s' "$out" | tr -d '[:space:]')"
    printf '%s\n' "${out:-UNKNOWN}"
    return 0
  fi
  if grep -qiE 'NOT_FOUND|not found' "$err"; then
    printf 'NOT_FOUND\n'
  else
    cat "$err" >&2
    printf 'UNKNOWN\n'
  fi
  rm -f "$err"
}

# Sorts a state into what the scripts do about it:
#   ready    READY (tpu-vm) or ACTIVE (queued resource): use it
#   pending  on its way somewhere (creating, queued, being deleted): wait
#   missing  NOT_FOUND: create it
#   unknown  gcloud failed: look again later
#   broken   anything else (PREEMPTED, TERMINATED, FAILED, SUSPENDED...): delete and
#            create again; an unfamiliar state lands here, which costs a recreate at worst
state_kind() {
  case "$1" in
    READY | ACTIVE) echo ready ;;
    CREATING | STARTING | RESTARTING | REPAIRING | DELETING | ACCEPTED | PROVISIONING | \
      WAITING_FOR_RESOURCES | SUSPENDING) echo pending ;;
    NOT_FOUND) echo missing ;;
    UNKNOWN) echo unknown ;;
    *) echo broken ;;
  esac
}

# Polls until the VM is ready (returns 0) or can no longer become ready on its own
# (returns 1). The last state seen is left in $TPU_STATE. A dry run looks once.
wait_until_ready() {
  local kind
  while true; do
    TPU_STATE="$(tpu_state)"
    if is_dry_run; then
      info "dry run: not waiting for $NAME to become ready"
      return 0
    fi
    kind="$(state_kind "$TPU_STATE")"
    case "$kind" in
      ready) return 0 ;;
      missing | broken) return 1 ;;
    esac
    info "$NAME is $TPU_STATE; next look in ${POLL_SECONDS}s"
    sleep "$POLL_SECONDS"
  done
}

# Runs one shell command line on worker $1 (a number, or "all").
tpu_ssh() {
  run gcloud compute tpus tpu-vm ssh "$NAME" "${GCLOUD_LOC[@]}" "--worker=$1" "--command=$2"
}

# The KEY=VALUE words that carry the worker settings into a remote command, so that an
# override in env.sh reaches the workers without any file being copied there.
worker_env() {
  quote_cmd "VENV=$VENV" "LOG_DIR=$LOG_DIR" "PYTHON=$PYTHON" "EXTRAS=$EXTRAS" \
    "PIP_EXTRA_ARGS=$PIP_EXTRA_ARGS"
}

# The commit to put on the workers: $COMMIT if set, else the local HEAD.
resolve_commit() {
  if [[ -n "$COMMIT" ]]; then
    printf '%s\n' "$COMMIT"
    return 0
  fi
  git -C "$REPO_ROOT" rev-parse --verify --quiet 'HEAD^{commit}' ||
    die "no git commit to sync in $REPO_ROOT: commit your work, or set COMMIT"
}

# --- the run -----------------------------------------------------------------------

# Prints the value of --workdir in a program's arguments (either spelling), or nothing.
find_workdir() {
  local prev=""
  for arg in "$@"; do
    case "$arg" in
      --workdir=*) printf '%s\n' "${arg#--workdir=}" && return 0 ;;
    esac
    if [[ "$prev" == --workdir ]]; then
      printf '%s\n' "$arg"
      return 0
    fi
    prev="$arg"
  done
}

# A short id for a program command line. run_tpu.sh records it on the workers, so that
# babysit.sh can tell its own run from another one, and a finished run from a run of a
# different command that happened to finish on the same VM. Set RUN_ID to choose one.
run_id_for() {
  if [[ -n "${RUN_ID:-}" ]]; then
    printf '%s\n' "$RUN_ID"
  else
    quote_cmd "$@" | cksum | cut -d' ' -f1
  fi
}

# The remote command line that runs launch/worker_ctl.sh ACTION on a worker.
worker_ctl_cmd() {
  printf '%s' "cd $(quote_word "$REMOTE_DIR") && $(quote_cmd "LOG_DIR=$LOG_DIR") bash launch/worker_ctl.sh $1"
}

# The same for "status", answering "none" on a worker that has no code yet (a fresh
# VM), where the script itself is missing.
worker_status_cmd() {
  local dir
  dir="$(quote_word "$REMOTE_DIR")"
  printf '%s' "if [ -f $dir/launch/worker_ctl.sh ]; then $(worker_ctl_cmd status); else echo RLHF_JAX_STATUS host=\$(hostname) run=- state=none; fi"
}

# Prints the RLHF_JAX_STATUS lines of all workers (see worker_ctl.sh); returns non-zero
# if gcloud fails. A dry run prints $DRY_RUN_WORKER_STATUS instead, by default one
# worker on which nothing ran yet.
worker_status_lines() {
  local cmd=(gcloud compute tpus tpu-vm ssh "$NAME" "${GCLOUD_LOC[@]}" --worker=all
    "--command=$(worker_status_cmd)")
  print_cmd "${cmd[@]}"
  if is_dry_run; then
    printf '%s\n' "${DRY_RUN_WORKER_STATUS:-RLHF_JAX_STATUS host=dry-run run=- state=none}"
    return 0
  fi
  "${cmd[@]}" | grep '^RLHF_JAX_STATUS '
}
