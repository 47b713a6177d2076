"""Checkpoint integrity: content checksums of array pytrees (computed on device), errors that
name the step and the file a restore failed on, and the walk back to the newest good step.

Orbax and TensorStore check the structure of a checkpoint (the shard index carries a crc32c)
but not the array bytes: a flipped bit inside a zstd-compressed chunk can decode to other,
finite-looking values without any error (measured with orbax-checkpoint 0.12.8). So every
saved state carries a digest per leaf, computed at save time from the arrays in memory and
compared after a restore.

The digest of a leaf is a sum, modulo 2**32, over its elements of a mixed hash of (element bits,
flat index), in two lanes with different seeds (64 bits in all). A sum is independent of the
order of reduction, so the digest of a sharded array is the same on any mesh, and a restore onto
another mesh (cross-mesh resume) verifies against the digest taken at save time. Changing one
element always changes the sum: the mix (the murmur3 finaliser) is a bijection of 32-bit words.
The cost at a save is one jitted pass over the state on device plus a host transfer of two
words per leaf (and one compilation per state layout and process).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import re
import sys
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax import lax
from jax.experimental import multihost_utils

CORRUPT_DIR = "corrupt"  # broken steps are moved here, under the checkpoint directory

_SEEDS = (0x9E3779B9, 0x7F4A7C15)


class CheckpointCorruptError(RuntimeError):
    """A checkpoint step cannot be restored; the message names the step and the file."""


class NoRestorableCheckpointError(RuntimeError):
    """Checkpoints exist but none restores; the message lists every step and why."""


def _fmix32(h: jax.Array) -> jax.Array:
    """The murmur3 32-bit finaliser: a bijection on uint32 that spreads every input bit."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _as_words(x: jax.Array) -> jax.Array:
    """The element bits of `x` as uint32 (64-bit types as a trailing pair of words)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    size = np.dtype(x.dtype).itemsize
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[size]
    return lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _flat_index(shape: tuple[int, ...]) -> jax.Array:
    """Row-major element index (mod 2**32) without reshaping, so no sharded array moves."""
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for dim in reversed(range(len(shape))):
        index = index + lax.broadcasted_iota(jnp.uint32, shape, dim) * jnp.uint32(stride % 2**32)
        stride *= shape[dim]
    return index


def _leaf_digest(x: jax.Array) -> jax.Array:
    words = _as_words(jnp.asarray(x))
    index = _flat_index(words.shape)
    return jnp.stack([jnp.sum(_fmix32(words ^ _fmix32(index + jnp.uint32(seed))),
                              dtype=jnp.uint32) for seed in _SEEDS])


# One program for many leaves, not one per leaf: many small multi-device programs in flight
# at once deadlock XLA:CPU's collectives on a machine with few cores (measured: 8 fake devices,
# 2 cores, "Expected 8 threads to join the rendezvous"), and one program is one dispatch.
_tree_digest = jax.jit(lambda tree: jax.tree.map(_leaf_digest, tree))


def leaf_name(path) -> str:
    """A leaf's path as "params/transformer/wte": the same for a typed tree (NamedTuples,
    dataclasses) and for the raw dicts and lists orbax restores without a target."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


def tree_checksums(tree: Any) -> dict[str, str]:
    """Digests of every array leaf of `tree` (None leaves are skipped).

    Call it on every process (a collective on multi-host meshes).

    Args:
        tree: Pytree of jax or numpy arrays (sharded or not).

    Returns:
        {leaf name: 16 hex digits}.
    """
    # One program per set of devices the leaves live on (a train state's arrays share the
    # mesh, but a step counter may sit on one device, and numpy leaves on none).
    groups: dict[Any, list] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        devices = getattr(getattr(leaf, "sharding", None), "device_set", None)
        key = None if devices is None else tuple(sorted(d.id for d in devices))
        groups.setdefault(key, []).append((path, leaf))
    out = {}
    for items in groups.values():
        digests = jax.device_get(_tree_digest([leaf for _, leaf in items]))  # blocks: one at a time
        for (path, _), digest in zip(items, digests):
            out[leaf_name(path)] = "".join(f"{int(w):08x}" for w in np.asarray(digest))
    return out


def mismatches(tree: Any, expected: dict[str, str]) -> list[str]:
    """The leaves of `tree` whose digest differs from `expected`, or that are missing.

    Args:
        tree: A restored pytree.
        expected: `tree_checksums` of the tree that was saved.

    Returns:
        Leaf names, each with what is wrong ("params/wte: digest 01.. != saved 9f..").
    """
    got = tree_checksums(tree)
    out = [f"{name}: digest {got[name]} != saved {want}"
           for name, want in expected.items() if name in got and got[name] != want]
    out += [f"{name}: saved but not restored" for name in expected if name not in got]
    out += [f"{name}: restored but has no saved digest" for name in got if name not in expected]
    return out


def check_json_files(step: int | None, step_dir, names: tuple[str, ...]) -> None:
    """Names a step's missing or broken JSON metadata file, which orbax reports without its path.

    Args:
        step: the step, for the message (None for a standalone params checkpoint).
        step_dir: its directory (an `epath.Path`).
        names: JSON files relative to `step_dir` ("state/_METADATA", ...).

    Raises:
        CheckpointCorruptError: naming the step and the file.
    """
    prefix = "" if step is None else f"step {step}: "
    for path in (step_dir / name for name in names):
        if not path.exists():
            raise CheckpointCorruptError(f"{prefix}{path}: missing file")
        try:
            json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as err:
            raise CheckpointCorruptError(f"{prefix}{path}: not valid JSON ({err})") from None


_PATH_IN_MESSAGE = re.compile(r'(?:local file|file) "([^"]+)"')


_previous_hooks: dict[str, Any] = {}


def _is_orbax_leftover(exc: BaseException | None, obj: Any = None) -> bool:
    """An abandoned read of a failed orbax restore (see `quiet_orbax_leftovers`)."""
    if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
        return True
    code = getattr(obj, "cr_code", None)
    return code is not None and "orbax" in code.co_filename


def _unraisablehook(unraisable) -> None:
    if not _is_orbax_leftover(unraisable.exc_value, unraisable.object):
        _previous_hooks["unraisablehook"](unraisable)


def _excepthook(exc_type, exc, tb) -> None:
    if not _is_orbax_leftover(exc):
        _previous_hooks["excepthook"](exc_type, exc, tb)


def quiet_orbax_leftovers() -> None:
    """Keeps the leftovers of a failed orbax restore off stderr (installed once per process).

    A restore that fails on one array leaves orbax's other reads pending in an event loop that
    orbax then closes. When TensorStore finishes them, their callbacks raise "Event loop is
    closed" (printed through `sys.excepthook`, from TensorStore's threads), and the abandoned
    coroutines raise again when collected (`sys.unraisablehook`; at exit: "sys.meta_path is
    None"). Nothing can be done about them and they bury the real error; only these two kinds
    are dropped, everything else reaches the hooks that were installed before.
    """
    if not _previous_hooks:
        _previous_hooks.update(unraisablehook=sys.unraisablehook, excepthook=sys.excepthook)
        sys.unraisablehook, sys.excepthook = _unraisablehook, _excepthook


@contextlib.contextmanager
def quiet_read_only_notice() -> Iterator[None]:
    """Drops orbax's warning that a read-only manager's directory "is read only" (asked for)."""

    def keep(record) -> bool:
        return "is read only" not in record.getMessage()

    logger = logging.get_absl_logger()
    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def describe_error(err: BaseException, step_dir) -> str:
    """The most specific line of an orbax/tensorstore error chain, with the file it concerns.

    TensorStore's innermost error names the array and the file ('Error reading
    "params.w/0.0" in OCDBT database at local file ".../state/": ...'); the outer ones are
    pages of JSON spec. Falls back to the step directory when no file is named.
    """
    chain, seen = [], set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        chain.append(err)
        err = err.__cause__ or err.__context__
    for exc in reversed(chain):
        text = str(exc).strip().split("\n")[0]
        if text:
            break
    else:
        exc, text = chain[0], ""
    where = "" if _PATH_IN_MESSAGE.search(text) or str(step_dir) in text else f"{step_dir}: "
    return f"{where}{type(exc).__name__}: {text[:500]}"


def restore_latest(ckpt, abstract_state: Any = None) -> tuple[int, Any, dict] | None:
    """`Checkpointer.restore_latest`: the newest step that restores, broken newer ones set aside.

    Args:
        ckpt: a `checkpointing.Checkpointer`.
        abstract_state: the restore target (see `Checkpointer.restore`).

    Returns:
        (step, state, meta), or None when there is no checkpoint at all.

    Raises:
        NoRestorableCheckpointError: listing every step and its error; nothing is moved.
    """
    steps = sorted(ckpt.all_steps(), reverse=True)
    failures: list[tuple[int, str]] = []
    for step in steps:
        try:
            state, meta = ckpt.restore(step, abstract_state)
        except CheckpointCorruptError as err:
            logging.error("checkpoint: cannot restore %s", err)
            failures.append((step, str(err)))
            continue
        if failures:
            _set_aside(ckpt, [s for s, _ in failures])
            logging.warning("checkpoint: resuming from step %d, the newest step that restores",
                            step)
        return step, state, meta
    if not steps:
        return None
    listed = "\n  ".join(msg for _, msg in failures)
    raise NoRestorableCheckpointError(
        f"none of the {len(steps)} checkpoints in {ckpt.directory} restores:\n  {listed}\n"
        "Nothing was moved or deleted. Remove the broken steps (or the whole directory, to "
        "start over) once you have looked at them.")


def _set_aside(ckpt, steps: list[int]) -> None:
    """Moves broken steps to `corrupt/<step>-<time>` (process 0): kept, but no longer used."""
    if ckpt.read_only:
        logging.warning("checkpoint: read-only, leaving broken steps %s in place", steps)
        return
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    if jax.process_index() == 0:
        for step in steps:
            dest = ckpt.directory / CORRUPT_DIR / f"{step}-{stamp}"
            try:
                dest.parent.mkdir(parents=True, exist_ok=True)
                (ckpt.directory / str(step)).rename(dest)
            except OSError as err:
                raise CheckpointCorruptError(
                    f"step {step} in {ckpt.directory} is broken and could not be moved aside "
                    f"({err}); move or delete it by hand, then rerun") from err
            logging.warning("checkpoint: moved broken step %d to %s", step, dest)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("checkpoint_set_aside")
    ckpt.reload()
