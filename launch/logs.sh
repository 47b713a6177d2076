#!/usr/bin/env bash
# Shows the log of the run on one worker, or on all of them, and follows it.
#
#   launch/logs.sh          # worker 0, where process 0 logs the metrics
#   launch/logs.sh 3        # worker 3
#   launch/logs.sh all      # every worker, lines interleaved
#   FOLLOW=0 LOG_LINES=500 launch/logs.sh    # print the last 500 lines and return
#
# Ctrl-C stops following; the run goes on. The log accumulates every attempt of the
# run, each starting with a "=== run_tpu:" line.
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
: "${FOLLOW:=1}"
: "${LOG_LINES:=100}"
require_flag FOLLOW
require_count LOG_LINES

worker="${1:-0}"
case "$worker" in
  all | [0-9] | [0-9][0-9] | [0-9][0-9][0-9]) ;;
  *) die "usage: launch/logs.sh [WORKER], where WORKER is a number or 'all'" ;;
esac
# -F rather than -f: it waits for a log that does not exist yet (a run still starting).
follow=""
if [[ "$FOLLOW" == 1 ]]; then
  follow=" -F"
fi
tpu_ssh "$worker" "tail -n $LOG_LINES$follow $(quote_word "$LOG_DIR")/run.log"
