#!/usr/bin/env bash
# ON A TPU WORKER: reports on, or stops, the run that run_tpu.sh started on this worker.
#
#   bash launch/worker_ctl.sh status   # one line: RLHF_JAX_STATUS host=H run=ID state=S
#   bash launch/worker_ctl.sh stop     # SIGTERM the program: it checkpoints, then exits
#
# state is one of
#   none      no run was ever started here (a fresh VM)
#   running   the run is going (this includes its venv set-up)
#   exit=N    the run ended with status N (0: finished)
#   gone      the run died without an exit status: killed hard, or the VM rebooted
# The fixed RLHF_JAX_STATUS prefix lets babysit.sh pick these lines out of the ssh
# output of all workers, whatever else gcloud prints.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=SCRIPTDIR/defaults.sh
source "$here/defaults.sh"
log_dir="$(worker_path "$LOG_DIR")"

alive() {
  local pid_file=$1 pid
  pid="$(cat "$pid_file" 2>/dev/null)" || return 1
  [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null &&
    [[ "$(cat "$log_dir/run.boot" 2>/dev/null)" == "$(cat /proc/sys/kernel/random/boot_id)" ]]
}

run_state() {
  if [[ ! -f "$log_dir/run.id" ]]; then
    echo none
  elif [[ -f "$log_dir/run.exit" ]]; then
    echo "exit=$(cat "$log_dir/run.exit")"
  elif alive "$log_dir/run.pid"; then
    echo running
  else
    echo gone
  fi
}

case "${1:-}" in
  status)
    echo "RLHF_JAX_STATUS host=$(hostname) run=$(cat "$log_dir/run.id" 2>/dev/null || echo -) state=$(run_state)"
    ;;
  stop)
    # The program gets the signal, not run_tpu.sh, so that orbax's preemption handler
    # in the program sees it; run_tpu.sh then records the exit status as usual.
    if alive "$log_dir/run.child"; then
      kill -TERM "$(cat "$log_dir/run.child")"
      echo "worker_ctl: $(hostname): sent SIGTERM to the program; it saves a checkpoint and exits"
    elif alive "$log_dir/run.pid"; then
      kill -TERM "$(cat "$log_dir/run.pid")"
      echo "worker_ctl: $(hostname): stopped run_tpu.sh before the program started"
    else
      echo "worker_ctl: $(hostname): nothing is running"
    fi
    ;;
  *)
    echo "usage: bash launch/worker_ctl.sh status|stop" >&2
    exit 2
    ;;
esac
