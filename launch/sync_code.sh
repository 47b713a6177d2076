#!/usr/bin/env bash
# Puts one commit of the project on every worker, in $REMOTE_DIR.
#
#   launch/sync_code.sh
#
# REPO_URL empty (default): `git archive` the commit into a tarball, scp it to all
#   workers and unpack it in place of the old copy. Needs no credentials on the workers
#   and works for commits that were never pushed.
# REPO_URL set: every worker clones the repository (or fetches, if it already has it)
#   and checks out the commit. The commit must be pushed, and a private repository
#   needs credentials on the workers.
# The commit is $COMMIT, or the local HEAD. Only committed files are shipped, so what
# runs is always a commit you can name later. Do not sync under a run that is going:
# the program imports from this checkout (babysit.sh syncs only before a launch).
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

commit="$(resolve_commit)"
dir="$(quote_word "$REMOTE_DIR")"

if [[ -n "$REPO_URL" ]]; then
  tpu_ssh all "if [ -d $dir/.git ]; then git -C $dir fetch --quiet origin; else rm -rf $dir && git clone --quiet $(quote_word "$REPO_URL") $dir; fi && git -C $dir checkout --quiet --force $(quote_word "$commit")"
  exit 0
fi

if [[ -z "$COMMIT" && -n "$(git -C "$REPO_ROOT" status --porcelain --untracked-files=no 2>/dev/null)" ]]; then
  info "warning: uncommitted changes in $REPO_ROOT are not shipped; only $commit is"
fi
tarball="${TMPDIR:-/tmp}/rlhf_jax-${commit//[^A-Za-z0-9._-]/_}.tar.gz"
remote_tarball=rlhf_jax_code.tar.gz
run git -C "$REPO_ROOT" archive --format=tar.gz "--output=$tarball" "$commit"
run gcloud compute tpus tpu-vm scp "$tarball" "$NAME:$remote_tarball" "${GCLOUD_LOC[@]}" --worker=all
# Unpack next to the old copy and swap, so a failed unpack leaves the old code intact.
# .rlhf_jax_commit records what was shipped, because a tarball has no .git to ask.
tpu_ssh all "rm -rf $dir.new && mkdir -p $dir.new && tar -xzf $remote_tarball -C $dir.new && echo $(quote_word "$commit") > $dir.new/.rlhf_jax_commit && rm -rf $dir && mv $dir.new $dir && rm -f $remote_tarball"
if ! is_dry_run; then
  rm -f "$tarball"
fi
