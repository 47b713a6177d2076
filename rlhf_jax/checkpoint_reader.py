"""Read-only access to a run's orbax checkpoints, for export and inspection (no training).

`checkpointing.Checkpointer` opens its directory to write: it creates it and removes the
temporary directories of crashed saves. Reading a run that may still be training (or that
belongs to someone else) must change nothing, so this module opens orbax's `CheckpointManager`
with `read_only=True` (no create, no cleanup, no save or delete) and restores only the sub-tree
asked for, as host numpy arrays, whatever mesh the run was saved from.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from rlhf_jax.checkpointing import META, STATE


def _path(directory: str | os.PathLike) -> epath.Path:
    directory = os.fspath(directory)
    return epath.Path(directory if "://" in directory else os.path.abspath(directory))


def _manager(directory: epath.Path) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0,
                                           max_to_keep=None, cleanup_tmp_directories=False)
    handlers = {STATE: ocp.PyTreeCheckpointHandler(), META: ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(directory, item_names=(STATE, META), options=options,
                                 item_handlers=handlers)


def committed_steps(directory: str | os.PathLike) -> list[int]:
    """Committed checkpoint steps under `directory` (oldest first); [] if there is none."""
    path = _path(directory)
    if not path.is_dir():
        return []
    with _manager(path) as manager:
        return sorted(manager.all_steps())


def _host_target(metadata_tree: Any) -> tuple[Any, Any]:
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), metadata_tree)
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata_tree)
    return target, args


def read_state(directory: str | os.PathLike, step: int | None = None,
               key: str = "params") -> tuple[Any, dict, int]:
    """Reads `state[key]` and the meta of one step, as numpy arrays, changing nothing on disk.

    Args:
        directory: a `Checkpointer` directory (`{workdir}/checkpoints`), local or `gs://`.
        step: the step to read; None for the latest committed one.
        key: the top-level entry of the saved state to restore (the rest, e.g. the optimizer
            state, is not read).

    Returns:
        (sub-tree of numpy arrays, meta dict, step).

    Raises:
        FileNotFoundError: no committed checkpoint (at `step`) in `directory`.
        KeyError: the saved state has no `key`.
    """
    path = _path(directory)
    steps = committed_steps(path)
    if not steps:
        raise FileNotFoundError(f"{path}: no committed checkpoint")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise FileNotFoundError(f"{path}: no checkpoint for step {step} (steps: {steps})")
    with _manager(path) as manager:
        tree = manager.item_metadata(step)[STATE].tree
        if key not in tree:
            raise KeyError(f"{path}/{step}: the saved state has no {key!r} (has {sorted(tree)})")
        target, args = _host_target(tree[key])
        restored = manager.restore(step, args=ocp.args.Composite(**{
            STATE: ocp.args.PyTreeRestore(item={key: target}, restore_args={key: args},
                                          partial_restore=True),
            META: ocp.args.JsonRestore()}))
    return restored[STATE][key], dict(restored[META]), step


def read_params(path: str | os.PathLike) -> Any:
    """Reads a standalone params checkpoint (`checkpointing.save_params`) as numpy arrays.

    Args:
        path: the checkpoint directory (e.g. a train_reward workdir's `reward_model/`).

    Returns:
        The saved tree, numpy arrays.
    """
    path = _path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such checkpoint directory")
    with ocp.PyTreeCheckpointer() as checkpointer:
        target, args = _host_target(checkpointer.metadata(path).item_metadata.tree)
        return checkpointer.restore(path, args=ocp.args.PyTreeRestore(item=target,
                                                                      restore_args=args))
