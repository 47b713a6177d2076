"""Orbax checkpoints of train state plus JSON metadata, saved on an interval and on preemption.

One `Checkpointer` per run, at `{workdir}/ckpt`. Each step directory holds two items:
`state` (a pytree of arrays, `StandardSave`) and `meta` (a small JSON dict: step, KL
coefficient, config hash, ...). Orbax commits a step atomically (a temporary directory renamed
on completion locally, a commit marker file on GCS), so a crash mid-save leaves the previous
step as the latest one.

Every process calls `save` on every step: the save policy decides whether this step is saved,
and the preemption sync point only fires if it is polled each step.

Integrity: each saved state carries per-leaf checksums (`checkpoint_integrity`) in its meta,
verified after every restore. `restore_latest` walks back from the newest step: a step that does
not restore (a truncated data file, a broken `_METADATA`, a checksum mismatch) is logged with the
file that failed and, once an older step restores, moved aside to `corrupt/<step>-<time>` (never
deleted). When no step restores, one error lists every step and why.

Readers (`sample`, `load_reward_model`) open checkpoints with `read_only=True`: nothing is
created, cleaned up or moved, so a live run's in-progress save survives them.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from orbax.checkpoint import checkpoint_managers as ocm

from rlhf_jax import checkpoint_integrity as integrity
from rlhf_jax import runtime
from rlhf_jax.checkpoint_integrity import (  # noqa: F401 - part of this module's API
    CheckpointCorruptError,
    NoRestorableCheckpointError,
)

STATE = "state"
META = "meta"
CHECKSUMS_KEY = "_checksums"  # meta key holding the state's per-leaf digests
_MISSING = "<missing>"


def _jsonable(obj: Any) -> Any:
    """Round-trips through JSON so tuples become lists and numpy scalars become Python ones.

    Both the saved meta and the values compared against it go through this, so a config tuple
    compares equal to the list read back from disk.
    """

    def default(x: Any) -> Any:
        if hasattr(x, "__array__"):
            return np.asarray(x).tolist()
        raise TypeError(f"not JSON serializable: {type(x).__name__}")

    return json.loads(json.dumps(obj, default=default))


def _as_path(path: str | os.PathLike) -> epath.Path:
    # Orbax accepts a relative local path at construction but fails deep inside tensorstore
    # at save time ("Checkpoint path should be absolute"), so resolve it up front.
    path = os.fspath(path)
    return epath.Path(path if "://" in path else os.path.abspath(path))


def abstract_state(tree: Any, shardings: Any = None) -> Any:
    """Builds the restore target: a tree of `jax.ShapeDtypeStruct` with target shardings.

    Args:
        tree: Pytree of arrays or ShapeDtypeStructs (e.g. from `jax.eval_shape(init)`).
        shardings: One `jax.sharding.Sharding` for every leaf, a pytree of them with the
            structure of `tree`, or None to keep each leaf's own `.sharding`.

    Returns:
        A pytree like `tree` whose leaves are ShapeDtypeStructs carrying `.sharding`.
    """

    def leaf(x: Any, sharding: Any) -> jax.ShapeDtypeStruct:
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            x = np.asarray(x)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    if shardings is None:
        return jax.tree.map(lambda x: leaf(x, getattr(x, "sharding", None)), tree)
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x: leaf(x, shardings), tree)
    return jax.tree.map(leaf, tree, shardings)


def check_compatible(meta: Mapping[str, Any], expected: Mapping[str, Any], keys: Iterable[str]):
    """Refuses to resume from a checkpoint written under an incompatible config.

    Args:
        meta: The checkpoint's metadata (from `Checkpointer.restore`).
        expected: The same fields computed for the current run.
        keys: Fields that must agree (e.g. "config_hash", "model", "query_length").

    Raises:
        ValueError: Naming the first key that differs, with both values.
    """
    meta, expected = _jsonable(dict(meta)), _jsonable(dict(expected))
    for key in keys:
        have, want = meta.get(key, _MISSING), expected.get(key, _MISSING)
        if have != want:
            raise ValueError(
                f"checkpoint is incompatible with this run: {key!r} is {have!r} in the "
                f"checkpoint but {want!r} in this run's config; use a new workdir or the "
                "original config"
            )


class Checkpointer:
    """Saves and restores `(state, meta)` with orbax's `CheckpointManager`.

    A step is saved when `step % save_every == 0`, when JAX's preemption service reports that
    all hosts reached the preemption sync point, or when `force=True`. The latest `keep` steps
    are kept, plus every `keep_period`-th step if given.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        save_every: int,
        keep: int = 3,
        async_save: bool = True,
        keep_period: int | None = None,
        read_only: bool = False,
    ):
        """Opens (creating if needed) the checkpoint directory.

        Args:
            directory: Checkpoint root, local or `gs://` (normally `{workdir}/ckpt`).
            save_every: Save interval in steps.
            keep: Number of most recent steps to keep.
            async_save: Write in a background thread after copying arrays to host, so the
                next steps run while the checkpoint is written.
            keep_period: If set, also keep every step divisible by it (a sparse permanent
                series for later evaluation).
            read_only: Open for reading only: create nothing, clean up no temporary directory
                of a save in progress, move nothing aside. `save_every` is then ignored.
        """
        if save_every <= 0:
            raise ValueError(f"save_every (the config's ckpt_every) must be >= 1, got {save_every}")
        self.directory = _as_path(directory)
        self.read_only = read_only
        self._closed = False
        if read_only:
            if not self.directory.exists():
                raise FileNotFoundError(f"{self.directory}: no checkpoint directory")
            options = ocp.CheckpointManagerOptions(read_only=True, create=False,
                                                   cleanup_tmp_directories=False,
                                                   save_interval_steps=0)
            with integrity.quiet_read_only_notice():
                self._manager = ocp.CheckpointManager(self.directory, item_names=(STATE, META),
                                                      options=options)
            return
        preserve: ocm.PreservationPolicy = ocm.LatestN(keep)
        if keep_period:
            preserve = ocm.AnyPreservationPolicy([preserve, ocm.EveryNSteps(keep_period)])
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=ocm.AnySavePolicy(
                [ocm.FixedIntervalPolicy(save_every), ocm.PreemptionCheckpointingPolicy()]
            ),
            preservation_policy=preserve,
            enable_async_checkpointing=async_save,
            # Removes temporary directories left by a save that crashed, on start-up.
            cleanup_tmp_directories=True,
            create=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, item_names=(STATE, META), options=options
        )

    def latest_step(self) -> int | None:
        """The newest committed step, or None if there is none."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Committed steps, oldest first."""
        return sorted(self._manager.all_steps())

    def reached_preemption(self, step: int) -> bool:
        """True at the step where all hosts agreed to save because of a preemption notice.

        Needs the JAX distributed runtime (`runtime.maybe_initialize_distributed`); without
        it this is always False. Repeated calls for the same step give the same answer.
        """
        return self._manager.reached_preemption(step)

    def should_save(self, step: int) -> bool:
        """Whether the policy saves `step` (interval or preemption); polls the preemption point."""
        return self._manager.should_save(step)

    def save(self, step: int, state: Any, meta: Mapping[str, Any], *, force: bool = False,
             before_write: Callable[[], None] | None = None) -> bool:
        """Saves `state` and `meta` at `step` if the policy (or `force`) says so.

        Call it on every process after every step. With `async_save` it returns once arrays
        are copied to host memory; the write continues in the background. At the preemption
        sync step it also sets every open `runtime.StopSignal` (reason "preemption").

        Args:
            step: Training step the state belongs to.
            state: Pytree of (sharded) jax arrays; donated buffers must not be passed.
            meta: JSON-serializable dict (numpy scalars are converted).
            force: Save even off the interval (final step, SIGTERM). A step that is already
                saved is not written again.
            before_write: Called only when this step is written, before anything is: the
                trainers' non-finite check, which raises to keep a bad state off disk.

        Returns:
            Whether a save was started.
        """
        if self.read_only:
            raise RuntimeError(f"{self.directory} is opened read-only")
        if force and step in self._manager.all_steps():
            return False  # Already saved by the interval; orbax would raise on a duplicate.
        if not force and not self.should_save(step):
            return False
        if before_write is not None:
            before_write()
        meta = _jsonable(dict(meta)) | {CHECKSUMS_KEY: integrity.tree_checksums(state)}
        args = ocp.args.Composite(
            **{STATE: ocp.args.StandardSave(state), META: ocp.args.JsonSave(meta)}
        )
        # The decision is made above; orbax must not second-guess it (it would poll again).
        saved = self._manager.save(step, args=args, force=True)
        if saved:
            logging.info("checkpoint: saving step %d to %s", step, self.directory)
        if self.reached_preemption(step):
            # Orbax saved this step because of a preemption notice; make the loop's stop
            # check fire too, so it waits for the write and exits before the VM goes away.
            runtime.request_stop("preemption")
        return saved

    def restore(self, step: int | None = None, abstract_state: Any = None) -> tuple[Any, dict]:
        """Loads and verifies `(state, meta)` from `step` (default: the latest).

        Args:
            step: Step to load; None for the latest.
            abstract_state: Target tree of ShapeDtypeStructs with `.sharding` (see
                `abstract_state()`); arrays are read straight into those shardings, which may
                differ from the ones they were saved with, and the tree's types (NamedTuples,
                dataclasses) and dtypes are kept. None returns the raw saved structure (dicts
                and lists), for inspection only.

        Returns:
            The restored state and meta dict.

        Raises:
            FileNotFoundError: If there is no checkpoint (at `step`).
            CheckpointCorruptError: If the step's files do not restore or its arrays do not
                match their saved checksums; the message names the step and the file.
        """
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"no checkpoint in {self.directory}")
        elif step not in self._manager.all_steps():
            raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}")
        step_dir = self.directory / str(step)
        integrity.check_json_files(step, step_dir, (STATE + "/_METADATA", META + "/metadata"))
        integrity.quiet_orbax_leftovers()
        args = ocp.args.Composite(
            **{STATE: ocp.args.StandardRestore(abstract_state), META: ocp.args.JsonRestore()}
        )
        try:
            restored = self._manager.restore(step, args=args)
        except Exception as err:  # noqa: BLE001 - orbax and tensorstore raise many types
            gc.collect()  # the abandoned reads' coroutines go now, not at interpreter exit
            why = integrity.describe_error(err, step_dir)
            raise CheckpointCorruptError(f"step {step}: {why}") from err
        state, meta = restored[STATE], dict(restored[META])
        saved = meta.pop(CHECKSUMS_KEY, None)
        if not saved:
            logging.warning("checkpoint: step %d in %s has no checksums (written by an older "
                            "version); its arrays are not verified", step, self.directory)
        else:
            bad = integrity.mismatches(state, saved)
            if bad:
                raise CheckpointCorruptError(
                    f"step {step}: {step_dir / STATE}: {len(bad)} arrays differ from what was "
                    f"saved (checksum mismatch): {'; '.join(bad[:3])}")
        logging.info("checkpoint: restored step %d from %s", step, self.directory)
        return state, meta

    def restore_latest(self, abstract_state: Any = None) -> tuple[int, Any, dict] | None:
        """Restores the newest step that restores and verifies, walking back past broken ones.

        Each step that fails is logged with its file. Once an older step restores, the newer
        broken ones are moved to `{directory}/corrupt/<step>-<UTC time>` (unless read-only), so
        the run continues from the good step and saves over none of them.

        Args:
            abstract_state: As in `restore`.

        Returns:
            (step, state, meta), or None when there is no checkpoint at all.

        Raises:
            NoRestorableCheckpointError: When steps exist but none restores; it lists every
                step with its error, and nothing is moved.
        """
        return integrity.restore_latest(self, abstract_state)

    def reload(self) -> None:
        """Re-reads the list of steps (after steps were moved aside)."""
        self._manager.reload()

    def wait_until_finished(self) -> None:
        """Blocks until background saves are committed; call before exiting."""
        self._manager.wait_until_finished()

    @contextlib.contextmanager
    def commit_on_error(self) -> Iterator[Checkpointer]:
        """Wraps a training loop: if it raises (a non-finite loss, Ctrl-C, an OOM), the saves
        already started are committed and the manager is closed before the error propagates,
        so the run directory keeps its last good step and no orbax thread outlives the error.
        The manager stays open on normal exit and on SystemExit (a requested stop closes it
        itself).
        """
        try:
            yield self
        except SystemExit:
            self.wait_until_finished()
            raise
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Waits for pending saves and releases the manager. Calling it again does nothing."""
        if self._closed:
            return
        self._closed = True
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def save_params(path: str | os.PathLike, params: Any) -> dict[str, str]:
    """Writes one pytree (e.g. a finished model's params) as a standalone checkpoint.

    Blocks until the write is committed. An existing checkpoint at `path` is replaced, so a
    rerun that repeats the final export does not fail. Call it on every process.

    Args:
        path: Checkpoint directory, local or `gs://`.
        params: Pytree of (sharded) jax arrays.

    Returns:
        The per-leaf checksums of `params`, to store beside it and pass to `load_params`.
    """
    digests = integrity.tree_checksums(params)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(_as_path(path), params, force=True)
        checkpointer.wait_until_finished()
    return digests


def load_params(path: str | os.PathLike, abstract_params: Any = None,
                checksums: Mapping[str, str] | None = None) -> Any:
    """Reads a checkpoint written by `save_params`, straight into the target shardings.

    Reading creates and removes nothing.

    Args:
        path: Checkpoint directory.
        abstract_params: Target tree of ShapeDtypeStructs with `.sharding` (see
            `abstract_state`); None returns the saved structure as is.
        checksums: What `save_params` returned; the restored arrays must match it.

    Returns:
        The restored pytree.

    Raises:
        CheckpointCorruptError: naming the file when the checkpoint does not restore or
            does not match `checksums`.
    """
    path = _as_path(path)
    integrity.check_json_files(None, path, ("_METADATA",))
    integrity.quiet_orbax_leftovers()
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            params = checkpointer.restore(path, abstract_params)
    except Exception as err:  # noqa: BLE001 - orbax and tensorstore raise many types
        gc.collect()
        raise CheckpointCorruptError(f"{integrity.describe_error(err, path)}") from err
    bad = integrity.mismatches(params, checksums) if checksums else []
    if bad:
        raise CheckpointCorruptError(f"{path}: {len(bad)} arrays differ from what was saved "
                                     f"(checksum mismatch): {'; '.join(bad[:3])}")
    return params
