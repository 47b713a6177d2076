#!/usr/bin/env bash
# Installs the project on every worker: creates $VENV if needed and runs
# `pip install -e ".[$EXTRAS]"` in the synced checkout (launch/install_worker.sh).
#
#   launch/sync_code.sh && launch/setup_workers.sh
#
# run_tpu.sh does the same before every run, so this step is optional. Doing it once in
# the foreground shows install problems (a Python too old, a missing wheel) right
# away, instead of in the log of a run that was started in the background.
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

tpu_ssh all "cd $(quote_word "$REMOTE_DIR") && $(worker_env) bash launch/install_worker.sh"
