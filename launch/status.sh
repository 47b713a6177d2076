#!/usr/bin/env bash
# Shows the state of the VM and, when it is up, of the run on every worker.
#
#   launch/status.sh
#
# One RLHF_JAX_STATUS line per worker: state=running, exit=N (0: finished), gone (died
# without an exit status) or none (nothing started); run= is the id launch.sh printed.
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

state="$(tpu_state)"
echo "$NAME: $state"
if [[ "$(state_kind "$state")" == ready ]]; then
  worker_status_lines || die "could not reach the workers of $NAME"
fi
