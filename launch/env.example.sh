# shellcheck shell=bash
# shellcheck disable=SC2034  # the scripts that source this file use the variables
# Example settings for the launch/ scripts. Copy it and edit the copy:
#
#   cp launch/env.example.sh launch/env.sh      # launch/env.sh is git-ignored
#
# The scripts read launch/env.sh, or the file named by ENV_FILE (one file per VM works
# well: ENV_FILE=launch/env.v5e.sh launch/create_tpu.sh). Every line uses the
# ${VAR:-default} form, so a value in the environment wins, e.g. for one call:
#   SPOT=1 launch/create_tpu.sh
# Nothing here is exported: `source launch/env.sh` in your shell (to use $BUCKET in
# commands) therefore never hides a later edit of the file from the scripts.

# --- where ------------------------------------------------------------------------
PROJECT="${PROJECT:-my-gcp-project}"   # gcloud projects list
NAME="${NAME:-rlhf-v5e-8}"             # TPU VM name (also the queued-resource id)
# The zone must offer the accelerator; TPU generations live in few zones. Check
# https://cloud.google.com/tpu/docs/regions-zones. Examples: v5litepod in us-west4-a,
# us-central1-a, europe-west4-b; v4 in us-central2-b; v3 in europe-west4-a.
ZONE="${ZONE:-us-west4-a}"

# --- what -------------------------------------------------------------------------
# <generation>-<cores or chips>: v5litepod-8 (8 chips, 8 devices x 16 GiB),
# v3-8 (4 chips, 8 devices x 16 GiB), v4-8 (4 chips, 4 devices x 32 GiB).
ACCELERATOR="${ACCELERATOR:-v5litepod-8}"
# The OS image. It must match the generation (Cloud TPU docs, "TPU software versions";
# list what a zone offers with `gcloud compute tpus tpu-vm versions list --zone=$ZONE`):
#   v5e (v5litepod-*)  v2-alpha-tpuv5-lite
#   v5p                v2-alpha-tpuv5
#   v6e (Trillium)     v2-alpha-tpuv6e
#   v4, v3, v2         tpu-ubuntu2204-base
# JAX itself comes from pip (the [tpu] extra), not from the image.
RUNTIME_VERSION="${RUNTIME_VERSION:-v2-alpha-tpuv5-lite}"

# --- how --------------------------------------------------------------------------
# SPOT=1: spot capacity, much cheaper, but the VM can be preempted at any time; use
# launch/babysit.sh so the run is relaunched and resumes from its last checkpoint.
SPOT="${SPOT:-0}"
# QUEUED=1: ask through the queued-resources API, which waits in a queue for capacity
# instead of failing at once when the zone is full (the Cloud TPU docs recommend it).
QUEUED="${QUEUED:-0}"
# Queued only, optional: stop waiting for capacity after this long (e.g. 6h).
QUEUED_VALID_FOR="${QUEUED_VALID_FOR:-}"

# --- data -------------------------------------------------------------------------
# Bucket for workdirs (checkpoints, metrics.jsonl) and staged inputs (GPT-2 weights,
# label files). Use the same region as ZONE: cross-region reads cost time and money.
# Name only, without gs://. Used in the commands of launch/README.md.
BUCKET="${BUCKET:-my-rlhf-bucket}"

# --- code on the workers ------------------------------------------------------------
# Empty REPO_URL: sync_code.sh ships a tarball of COMMIT with scp (works for private
# repos and for commits that were never pushed). Set it to clone on every worker instead.
REPO_URL="${REPO_URL:-}"
# Commit to run; empty means the local HEAD. Uncommitted changes are never shipped.
COMMIT="${COMMIT:-}"
# Paths on the workers; relative ones are under the worker's home directory.
REMOTE_DIR="${REMOTE_DIR:-rlhf_jax}"
VENV="${VENV:-rlhf_jax_venv}"
LOG_DIR="${LOG_DIR:-rlhf_jax_logs}"
# Interpreter for the venv. jax needs 3.11+, and the TPU images (Ubuntu 22.04) have 3.10:
# with python3, install_worker.sh falls back to python3.11 and installs it if missing.
PYTHON="${PYTHON:-python3}"
# Extra environment for the program on every worker, as KEY=VALUE words.
WORKER_ENV="${WORKER_ENV:-}"

# --- babysit.sh -------------------------------------------------------------------
MAX_RETRIES="${MAX_RETRIES:-10}"     # relaunches after the first launch
POLL_SECONDS="${POLL_SECONDS:-300}"  # how often to look at the VM and the run
