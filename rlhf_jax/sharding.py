"""Device mesh, logical-axis rules and shardings: data parallelism plus FSDP with `jax.jit`.

There is no `jax.pmap` here. Parameters and optimizer state are sharded over the `fsdp` mesh
axis along their `embed` dimension (ZeRO-3), batches are sharded over every device, and each
jitted step states its in/out shardings. The rules that map logical names (set on parameters and
activations in `rlhf_jax/models`) to mesh axes live in config, so a run can change the layout
without touching model code.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from rlhf_jax import models

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")

# Logical name -> mesh axes. Activation names (act_*, cache_*) are kept apart from parameter
# names so the `embed -> fsdp` rule never tries to shard an activation on the batch's axis.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("act_batch", BATCH_AXES),
    ("cache_batch", BATCH_AXES),
    ("act_len", None),
    ("act_embed", None),
    ("act_mlp", None),
    ("embed", "fsdp"),
    ("vocab", None),
    ("position", None),
    ("qkv", None),
    ("joined_heads", None),
    ("mlp", None),
    ("norm", None),
    ("scalar", None),
)


def make_mesh(data: int = 1, fsdp: int = -1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the ("data", "fsdp") mesh; -1 takes every remaining device.

    Raises:
        ValueError: if the axis sizes do not multiply to the device count.
    """
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    sizes = [data, fsdp]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got data={data}, fsdp={fsdp}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n % known:
            raise ValueError(f"mesh: {n} devices are not divisible by data*fsdp={known}")
        sizes[sizes.index(-1)] = n // known
    if math.prod(sizes) != n:
        raise ValueError(
            f"mesh: data={sizes[0]} x fsdp={sizes[1]} = {math.prod(sizes)} but there are {n} devices"
        )
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def rules_from_config(rules) -> tuple[tuple[str, Any], ...]:
    """Normalises rules from a config (lists of [name, axes]) into tuples."""
    out = []
    for name, axes in rules:
        if isinstance(axes, list):
            axes = tuple(axes)
        out.append((str(name), axes))
    return tuple(out)


def logical_to_mesh_spec(logical: P, rules) -> P:
    """Maps a PartitionSpec of logical names to mesh axes by `rules` (unknown names replicate)."""
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name in logical:
        axes = table.get(name) if name is not None else None
        flat = (axes,) if isinstance(axes, str) else tuple(axes or ())
        # A mesh axis may shard only one dimension of an array.
        if any(a in used for a in flat):
            axes = None
        else:
            used.update(flat)
        out.append(axes)
    return P(*out)


def param_shardings(config: models.GPT2Config, heads: Sequence[str], mesh: Mesh, rules):
    """NamedShardings for `models.init_params(config, heads=heads)`."""
    logical = models.logical_axes(config, heads)
    return jax.tree.map(
        lambda spec: NamedSharding(mesh, logical_to_mesh_spec(spec, rules)),
        logical,
        is_leaf=lambda x: isinstance(x, P),
    )


def opt_state_shardings(tx, abstract_params, shardings, mesh: Mesh):
    """Shardings for `tx.init(params)`: Adam slots shard like their params, scalars replicate."""
    import optax

    abstract_state = jax.eval_shape(tx.init, abstract_params)
    return optax.tree_map_params(
        tx,
        lambda _, sharding: sharding,
        abstract_state,
        shardings,
        transform_non_params=lambda _: replicated(mesh),
        is_leaf=lambda x: isinstance(x, NamedSharding),
    )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis over every device, the rest replicated; valid for any rank >= 1."""
    return NamedSharding(mesh, P(BATCH_AXES))


def batch_size_per_device(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def check_batch_divisible(name: str, batch_size: int, mesh: Mesh) -> None:
    """Raises ValueError naming the config field if a batch does not divide over the devices."""
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % n:
        raise ValueError(
            f"{name}={batch_size} is not divisible by the {n} devices of the mesh "
            f"(data={mesh.shape['data']}, fsdp={mesh.shape['fsdp']})"
        )


def unsharded_fraction(shardings, abstract_params) -> float:
    """Fraction of parameter elements that are fully replicated."""
    total = unsharded = 0
    for s, a in zip(jax.tree.leaves(shardings), jax.tree.leaves(abstract_params)):
        size = math.prod(a.shape)
        total += size
        if all(axis is None for axis in s.spec):
            unsharded += size
    return unsharded / max(total, 1)


def assert_sufficiently_sharded(shardings, abstract_params, max_unsharded: float = 0.02):
    """Fails fast when too many parameters would be replicated on every device."""
    mesh = jax.tree.leaves(shardings)[0].mesh
    if mesh.shape["fsdp"] == 1:
        return
    frac = unsharded_fraction(shardings, abstract_params)
    if frac > max_unsharded:
        raise ValueError(
            f"{100 * frac:.1f}% of parameters are replicated on every device (limit "
            f"{100 * max_unsharded:.1f}%): check config.sharding_rules maps 'embed' to 'fsdp'"
        )


@contextlib.contextmanager
def mesh_context(mesh: Mesh, rules):
    """Sets the mesh and the logical-axis rules for tracing jitted steps."""
    with jax.set_mesh(mesh), models.axis_rules(rules):
        yield


def host_batch_to_global(local: np.ndarray, mesh: Mesh) -> jax.Array:
    """Builds a global batch-sharded array from this process's slice of the batch."""
    sharding = batch_sharding(mesh)
    return jax.make_array_from_process_local_data(sharding, local)
