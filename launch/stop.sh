#!/usr/bin/env bash
# Stops the run on all workers of $NAME. The program gets SIGTERM, the signal a
# preemption sends, so it saves a checkpoint before it exits and a later launch of the
# same command resumes. The VM keeps running (and billing): delete it with delete_tpu.sh.
#
#   launch/stop.sh
#
# Stop launch/babysit.sh first (Ctrl-C), or it relaunches the run it sees has ended.
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

tpu_ssh all "$(worker_ctl_cmd stop)"
