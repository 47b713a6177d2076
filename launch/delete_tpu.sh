#!/usr/bin/env bash
# Deletes the TPU VM named $NAME (QUEUED=1: the queued request and, with --force, its
# node). Run it when you are done: an idle READY VM is billed like a busy one. A
# preempted VM cannot be restarted either; it has to be deleted and created again.
#
#   launch/delete_tpu.sh
#
# Checkpoints and metrics live in the bucket and are not touched.
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# --quiet skips gcloud's confirmation prompt: running this script is the confirmation,
# and babysit.sh calls it unattended.
if [[ "$QUEUED" == 1 ]]; then
  run gcloud compute tpus queued-resources delete "$NAME" "${GCLOUD_LOC[@]}" --force --quiet
else
  run gcloud compute tpus tpu-vm delete "$NAME" "${GCLOUD_LOC[@]}" --quiet
fi
