#!/usr/bin/env bash
# Runs a shell command on every worker of $NAME (or on the one in WORKER), in the
# foreground, starting in the home directory.
#
#   launch/ssh_all.sh 'df -h ~; ls rlhf_jax_logs'
#   WORKER=0 launch/ssh_all.sh 'rlhf_jax_venv/bin/python -c "import jax; print(jax.devices())"'
#
# For the programs of the project use launch/launch.sh, which keeps them running when
# the ssh connection drops. Note that on a multi-host slice a JAX program only starts
# when it runs on all workers at once.
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

if (($# < 1)); then
  die "usage: launch/ssh_all.sh 'COMMAND'"
fi
tpu_ssh "${WORKER:-all}" "$*"
