#!/usr/bin/env bash
# Creates the TPU VM named $NAME and returns once it is usable.
#
#   launch/create_tpu.sh
#
# QUEUED=0: `tpu-vm create` (with --spot if SPOT=1). The request fails at once when the
#   zone has no capacity, which is common, so it is retried CREATE_RETRIES times,
#   RETRY_SECONDS apart.
# QUEUED=1: `queued-resources create`, then wait until the request is ACTIVE. A capacity
#   shortage then means waiting in the queue instead of failing. A request that ends
#   FAILED or SUSPENDED is deleted and made again, up to CREATE_RETRIES times.
# A VM that already exists and is ready is left alone, so the script is safe to rerun.
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
require_vars ACCELERATOR RUNTIME_VERSION

create_cmd() {
  local extra=()
  if [[ -n "$CREATE_FLAGS" ]]; then
    read -r -a extra <<<"$CREATE_FLAGS"
  fi
  if [[ "$SPOT" == 1 ]]; then
    extra+=(--spot)
  fi
  if [[ "$QUEUED" == 1 ]]; then
    if [[ -n "$QUEUED_VALID_FOR" ]]; then
      extra+=("--valid-until-duration=$QUEUED_VALID_FOR")
    fi
    # The node gets the same id as the request, so every other script can address it
    # as a plain TPU VM named $NAME.
    run gcloud compute tpus queued-resources create "$NAME" "--node-id=$NAME" \
      "${GCLOUD_LOC[@]}" "--accelerator-type=$ACCELERATOR" \
      "--runtime-version=$RUNTIME_VERSION" ${extra[@]+"${extra[@]}"}
  else
    run gcloud compute tpus tpu-vm create "$NAME" "${GCLOUD_LOC[@]}" \
      "--accelerator-type=$ACCELERATOR" "--version=$RUNTIME_VERSION" \
      ${extra[@]+"${extra[@]}"}
  fi
}

state="$(tpu_state)"
case "$(state_kind "$state")" in
  ready)
    info "$NAME already exists and is $state; nothing to do"
    exit 0
    ;;
  pending)
    if wait_until_ready; then
      info "$NAME is $TPU_STATE"
      exit 0
    fi
    state="$TPU_STATE"
    ;;
esac
if [[ "$(state_kind "$state")" == broken ]]; then
  die "$NAME exists in state $state; delete it first (launch/delete_tpu.sh), or let launch/babysit.sh recreate it"
fi

attempt=1
while true; do
  if create_cmd && wait_until_ready; then
    info "$NAME is ready ($ACCELERATOR in $ZONE)"
    exit 0
  fi
  if ((attempt >= CREATE_RETRIES)); then
    die "could not create $NAME after $attempt attempts; try another zone, SPOT=1 or QUEUED=1"
  fi
  # gcloud can fail while the node is still being made (a timed-out wait), so look
  # again before deciding. A failed request can also leave a broken node or a FAILED
  # queued request behind, and the next create would fail with "already exists".
  if wait_until_ready; then
    info "$NAME is $TPU_STATE after all"
    exit 0
  fi
  if [[ "$(state_kind "$TPU_STATE")" == broken ]]; then
    "$LAUNCH_DIR/delete_tpu.sh" || true
  fi
  info "create attempt $attempt/$CREATE_RETRIES failed; retrying in ${RETRY_SECONDS}s"
  attempt=$((attempt + 1))
  sleep "$RETRY_SECONDS"
done
