# shellcheck shell=bash
# Settings that both sides need: the workstation scripts (through common.sh) and the
# scripts that run on the TPU workers. Keeping the defaults in one file means the
# workstation and the workers can never disagree about where the code, the venv or the
# logs live. Sourced, never executed. Every value can be overridden from the environment
# or from launch/env.sh.

# Paths on the workers. Relative paths are taken relative to the worker's home directory,
# which is where `gcloud ... ssh --command` starts.
: "${REMOTE_DIR:=rlhf_jax}"     # the project checkout
: "${VENV:=rlhf_jax_venv}"      # outside REMOTE_DIR, so re-syncing the code keeps the venv
: "${LOG_DIR:=rlhf_jax_logs}"   # run.log plus the run.* status files babysit.sh reads

# How the worker venv is built.
: "${PYTHON:=python3}"          # interpreter that creates the venv
: "${EXTRAS:=tpu}"              # pip extras: `pip install -e ".[$EXTRAS]"`
: "${PIP_EXTRA_ARGS:=}"         # e.g. "-f <find-links url>"; split on spaces

# Resolves a worker path: absolute paths stay, relative ones go under $HOME.
worker_path() {
  case "$1" in
    /*) printf '%s\n' "$1" ;;
    *) printf '%s\n' "$HOME/$1" ;;
  esac
}
