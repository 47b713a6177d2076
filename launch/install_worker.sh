#!/usr/bin/env bash
# ON A TPU WORKER: makes sure $VENV exists and has the project installed from this
# checkout with `pip install -e ".[$EXTRAS]"` (the tpu extra pulls jax[tpu]).
#
#   bash launch/install_worker.sh       # from the checkout on the worker
#
# Idempotent and quick when nothing changed: the install is skipped while a stamp in the
# venv matches the packaging files, so run_tpu.sh can call it before every run, and a
# relaunch after preemption does not reinstall. The install is editable, so new code
# from sync_code.sh needs no reinstall; only changed dependencies do.
#
# jax needs Python 3.11 or newer, and the TPU images (Ubuntu 22.04) come with 3.10. With
# the default PYTHON=python3 the script then uses python3.11, installing it from the
# deadsnakes PPA if it is missing.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=SCRIPTDIR/defaults.sh
source "$here/defaults.sh"
repo_root="$(dirname "$here")"
venv="$(worker_path "$VENV")"
stamp_file="$venv/.rlhf_jax_install_stamp"
requested_python="$PYTHON"

# What the install depends on: the packaging files plus the options used.
install_stamp() {
  local f
  for f in pyproject.toml setup.py setup.cfg constraints.txt; do
    if [[ -f "$repo_root/$f" ]]; then
      sha256sum "$repo_root/$f" | cut -d' ' -f1
    fi
  done
  printf 'python=%s extras=%s pip=%s\n' "$requested_python" "$EXTRAS" "$PIP_EXTRA_ARGS"
}

python_ok() {
  command -v "$1" >/dev/null 2>&1 &&
    "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null
}

apt_install() {
  sudo apt-get -o DPkg::Lock::Timeout=300 update -qq
  sudo apt-get -o DPkg::Lock::Timeout=300 install -y -qq "$@"
}

# Sets PYTHON to an interpreter that is new enough, installing python3.11 if needed.
find_python() {
  if python_ok "$PYTHON"; then
    return 0
  fi
  if [[ "$PYTHON" != python3 && "$PYTHON" != python3.11 ]]; then
    echo "install_worker: PYTHON=$PYTHON is missing or older than 3.11, which jax needs" >&2
    exit 1
  fi
  PYTHON=python3.11
  if ! python_ok "$PYTHON"; then
    echo "install_worker: the system python is older than 3.11; installing python3.11 (deadsnakes PPA)"
    sudo add-apt-repository -y ppa:deadsnakes/ppa
    apt_install python3.11 python3.11-venv
  fi
}

if [[ -f "$stamp_file" && "$(cat "$stamp_file")" == "$(install_stamp)" ]] &&
  (cd / && "$venv/bin/python" -c 'import rlhf_jax') 2>/dev/null; then
  echo "install_worker: $venv is up to date"
  exit 0
fi

if ! python_ok "$venv/bin/python" || ! "$venv/bin/python" -m pip --version >/dev/null 2>&1; then
  find_python
  # Ubuntu's pythons come without ensurepip until python3.X-venv is installed, and
  # `python -m venv` then fails half-way.
  if ! "$PYTHON" -c 'import ensurepip' 2>/dev/null; then
    echo "install_worker: installing $(basename "$PYTHON")-venv with apt"
    apt_install "$(basename "$PYTHON")-venv"
  fi
  # --clear: a venv left half-made by an interrupted attempt, or made with a Python that
  # is too old, is rebuilt.
  "$PYTHON" -m venv --clear "$venv"
fi

pip_args=()
if [[ -n "$PIP_EXTRA_ARGS" ]]; then
  read -r -a pip_args <<<"$PIP_EXTRA_ARGS"
fi
# The project's pins, when it has them, so the workers run the versions the tests ran.
if [[ -f "$repo_root/constraints.txt" ]]; then
  pip_args+=(-c "$repo_root/constraints.txt")
fi
rm -f "$stamp_file"
"$venv/bin/python" -m pip install --quiet --upgrade pip
cd "$repo_root"
"$venv/bin/python" -m pip install ${pip_args[@]+"${pip_args[@]}"} -e ".[$EXTRAS]"
install_stamp >"$stamp_file"
echo "install_worker: installed ${repo_root}[$EXTRAS] into $venv"
