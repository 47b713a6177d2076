"""Start-up checks of a run's files and storage locations, before any model is built.

Flags and output locations (`--workdir`, `--output`), and remote (gs://) inputs and workdirs,
checked in a second instead of failing after minutes of compilation (spec §6.2 step 4: the
original validated before launching too). Used through `rlhf_jax.runs.validation`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import ml_collections

from rlhf_jax import paths
from rlhf_jax.runs.errors import ConfigError
from rlhf_jax.runs.errors import config_value as _get

ConfigDict = ml_collections.ConfigDict


# --- Flags and output locations -----------------------------------------------------------------


def check_flag_count(flag: str, value: int, minimum: int = 0) -> None:
    """A command-line count (e.g. `--num_labels`) must be an integer >= `minimum`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"--{flag}={value!r}: must be an integer >= {minimum}")


def _nearest_existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def check_workdir(workdir: str, flag: str = "workdir") -> None:
    """A run directory must be a writable directory, or creatable under a writable one.

    Raises:
        ConfigError: naming the flag, the path and what is wrong.
    """
    if not workdir:
        raise ConfigError(f"--{flag} is empty")
    if paths.is_remote(workdir):  # a probe object: bucket, credentials and permission
        paths.check_writable(workdir, f"--{flag}")
        return
    existing = _nearest_existing(workdir)
    if not os.path.isdir(existing):
        raise ConfigError(f"--{flag}={workdir!r}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--{flag}={workdir!r}: {existing} is not writable")


def check_output_file(path: str, flag: str = "output") -> None:
    """An output file's directory must exist and be writable; the file must not be a directory.

    Raises:
        ConfigError: naming the flag, the path and what is wrong.
    """
    if not path:
        raise ConfigError(f"--{flag} is empty")
    if paths.is_remote(path):  # a probe object beside it: bucket, credentials and permission
        paths.check_writable(path.rstrip("/").rsplit("/", 1)[0], f"--{flag}")
        return
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ConfigError(f"--{flag}={path!r} is a directory, not a file")
    if not os.path.isdir(parent):
        raise ConfigError(f"--{flag}={path!r}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--{flag}={path!r}: directory {parent} is not writable")


# --- Remote (gs://) locations -------------------------------------------------------------------

# Config fields that name an input a trainer reads; `check_storage` checks the remote ones.
MODEL_INPUTS = ("model.checkpoint", "model.tokenizer", "task.query_dataset", "task.query_data_dir")


def _remote_input(value: Any) -> str | None:
    """The URL an input field names, if remote: `jsonl:gs://b/x_{split}.jsonl` -> `gs://b`-side
    directory `gs://b` (a `{split}` template is checked up to its directory)."""
    if not isinstance(value, str) or "://" not in value:
        return None
    scheme_at = value.index("://")
    kind_end = value.rfind(":", 0, scheme_at)  # "jsonl:gs://..." -> strip "jsonl:"
    url = value[kind_end + 1:] if kind_end >= 0 else value
    if "{" in url:
        url = url[: url.index("{")].rsplit("/", 1)[0]
    return url if url.startswith("gs://") else None


def check_storage(config: ConfigDict, workdir: str | None, inputs: Iterable[str]) -> None:
    """Remote locations, before any compute: the workdir writable, every remote input readable.

    Local paths are left to their readers (they fail at once with the file named); a `gs://`
    path would otherwise fail only when first used, after minutes of compilation, or (a missing
    bucket) be created by gcsfs.

    Args:
        config: the run config.
        workdir: the run directory, or None.
        inputs: dotted config fields naming inputs (e.g. "labels.path"); empty values skipped.

    Raises:
        paths.StorageAccessError: naming `--workdir` or the `--config.` field, the path and why.
    """
    if workdir and paths.is_remote(workdir):
        paths.check_writable(workdir, "--workdir")
    for field in inputs:
        try:
            value = _get(config, field)
        except (KeyError, AttributeError):
            continue
        url = _remote_input(value)
        if url:
            paths.check_readable(url, f"--config.{field}")
