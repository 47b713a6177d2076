"""Micro-batching: running a batch through a program in equal chunks, and gradient accumulation.

A program's memory grows with the rows it processes at once (activations kept for the backward
pass, logits over the vocabulary, the KV cache). Splitting a batch of B rows into n chunks of
B / n rows and running them one after another (`jax.lax.map` / `jax.lax.scan`) bounds that
memory without changing the maths: forward passes are row-wise, and the gradient of a mean over
n equal chunks is the mean of the chunks' gradients (`accumulate_gradients`).

Chunks are strided, not contiguous: chunk i holds rows i, i + n, i + 2n, ... A global batch is
sharded over the devices in contiguous blocks, so when B / n is divisible by the device count,
every device already holds its share of every chunk and splitting moves no data.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

Array = jax.Array


def num_chunks(batch: int, micro_batch_size: int) -> int:
    """Chunks of `micro_batch_size` rows in `batch` (0 or >= batch means one chunk).

    Raises:
        ValueError: when `micro_batch_size` does not divide `batch`.
    """
    if micro_batch_size <= 0 or micro_batch_size >= batch:
        return 1
    if batch % micro_batch_size:
        raise ValueError(f"micro-batch {micro_batch_size} does not divide the batch of {batch}")
    return batch // micro_batch_size


def chunk_sharding(sharding: NamedSharding) -> NamedSharding:
    """The sharding of split leaves `[n, rows, ...]` whose unsplit leaves had `sharding`."""
    return NamedSharding(sharding.mesh, P(None, *sharding.spec))


def split(tree: Any, n: int, sharding: NamedSharding | None = None) -> Any:
    """`[B, ...]` leaves -> `[n, B / n, ...]`, chunk i holding rows i, i + n, ... (strided).

    Args:
        tree: arrays with a leading batch axis B divisible by n.
        n: number of chunks (1 returns `tree` unchanged).
        sharding: the batch sharding of the leaves; the chunks keep it on their row axis.
    """
    if n == 1:
        return tree

    def one(x):
        b = x.shape[0]
        y = jnp.swapaxes(x.reshape((b // n, n) + x.shape[1:]), 0, 1)
        if sharding is None:
            return y
        return jax.lax.with_sharding_constraint(y, chunk_sharding(sharding))

    return jax.tree.map(one, tree)


def merge(tree: Any, n: int, sharding: NamedSharding | None = None) -> Any:
    """Inverse of `split`: `[n, B / n, ...]` leaves back to `[B, ...]` in the original order."""
    if n == 1:
        return tree

    def one(y):
        x = jnp.swapaxes(y, 0, 1).reshape((-1,) + y.shape[2:])
        return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)

    return jax.tree.map(one, tree)


def take(x: Array, i: Array, n: int) -> Array:
    """Chunk i (rows i, i + n, ...) of a whole-batch array `x` `[B, ...]`."""
    if n == 1:
        return x
    return jax.lax.dynamic_index_in_dim(jnp.swapaxes(x.reshape((-1, n) + x.shape[1:]), 0, 1),
                                        i, 0, keepdims=False)


def map_chunks(fn: Callable[[Array, Any], Any], n: int, chunks: Any) -> Any:
    """`fn(i, chunk_i)` for every chunk of a split tree, one after another, outputs stacked.

    With n == 1, `chunks` is the unsplit tree and `fn(0, chunks)` runs directly.
    """
    if n == 1:
        return fn(jnp.zeros((), jnp.int32), chunks)
    return jax.lax.map(lambda args: fn(*args), (jnp.arange(n, dtype=jnp.int32), chunks))


def map_rows(fn: Callable[..., Any], n: int, *args: Any,
             sharding: NamedSharding | None = None) -> Any:
    """`fn(*args)` on row-wise inputs, computed in n chunks; the same result as one call."""
    if n == 1:
        return fn(*args)
    out = map_chunks(lambda _, a: fn(*a), n, split(args, n, sharding))
    return merge(out, n, sharding)


def accumulate_gradients(loss_fn: Callable[[Any, Any], tuple[Array, Any]], params: Any,
                         batch: Any, n: int, sharding: NamedSharding | None = None):
    """`jax.value_and_grad(loss_fn, has_aux=True)(params, batch)` in n equal chunks.

    `loss_fn(params, chunk)` must return (a mean over the chunk's rows, aux of scalars). The mean
    over the whole batch is then the mean of the chunks' means, and so are the gradients; aux
    values are averaged over the chunks too. Gradients are summed in float32 in a scan, so
    only one chunk's activations are alive at a time.

    Returns:
        ((loss, aux), grads) as `jax.value_and_grad` would return them for the whole batch.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if n == 1:
        return grad_fn(params, batch)

    def body(acc, chunk):
        (loss, aux), grads = grad_fn(params, chunk)
        return jax.tree.map(jnp.add, acc, grads), (loss, aux)

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    grads, (losses, aux) = jax.lax.scan(body, zeros, split(batch, n, sharding))
    grads = jax.tree.map(lambda g, p: (g / n).astype(p.dtype), grads, params)
    return (jnp.mean(losses), jax.tree.map(lambda a: jnp.mean(a, axis=0), aux)), grads
