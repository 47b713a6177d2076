#!/usr/bin/env bash
# Starts a program of the project on all workers of $NAME, in the background.
#
#   launch/launch.sh MODULE [ARGS...]
#   launch/launch.sh rlhf_jax.train_policy --config configs/sentiment.py:model=774M \
#       --workdir "gs://$BUCKET/runs/sentiment-774m"
#
# Each worker runs launch/run_tpu.sh MODULE ARGS under nohup and setsid, so the run
# survives the ssh connection dropping and this returns as soon as it has started. Sync
# the code first (launch/sync_code.sh). Follow the run with launch/logs.sh, check it
# with launch/status.sh, stop it with launch/stop.sh. To relaunch it automatically after
# preemption, start it with launch/babysit.sh instead.
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

if (($# < 1)); then
  die "usage: launch/launch.sh MODULE [ARGS...], e.g. rlhf_jax.train_policy --config configs/sentiment.py:model=774M --workdir gs://BUCKET/runs/NAME"
fi
workdir="$(find_workdir "$@")"
if [[ -n "$workdir" && "$workdir" != gs://* ]]; then
  # Every host must see the same checkpoints, and a local disk is lost with the VM.
  info "warning: --workdir $workdir is not in GCS; checkpoints will not survive the VM or be shared between hosts"
fi
run_id="$(run_id_for "$@")"

# The braces keep `cd` in the foreground, so a missing checkout fails this ssh call
# instead of failing unseen in the background.
remote="cd $(quote_word "$REMOTE_DIR") && { $(worker_env) $(quote_cmd "RLHF_JAX_RUN_ID=$run_id")"
if [[ -n "$WORKER_ENV" ]]; then
  remote+=" $WORKER_ENV"
fi
remote+=" nohup setsid bash launch/run_tpu.sh $(quote_cmd "$@") >/dev/null 2>&1 </dev/null & }"
tpu_ssh all "$remote"
info "started run $run_id on all workers of $NAME; follow it with launch/logs.sh"
