"""Sampling: a jitted prefill plus a KV-cache decode loop (spec §2.1, §10.12).

Exactly `response_length` tokens are drawn every time: EOT does not stop sampling, and pad or
special ids outside the vocabulary can never be drawn (logits cover the vocabulary only). The
sampler records, for every response token t,
- `logprobs[t]`: the log-prob of the sampled token under softmax(logits / temperature), the
  distribution PPO re-evaluates, so these are PPO's "old" log-probs;
- `values[t]`: the value head at the position that predicts token t (values[0] is read at the
  last context position), when the params have a value head.

Top-k / top-p truncation is optional and off by default (the original samples from the full
softmax). When on, `logprobs` still refer to the untruncated temperature-scaled distribution,
which is what a training forward pass computes; use truncation for evaluation, not for PPO.

Drawing a token: inverse-CDF sampling with one uniform number per row (`categorical`), not the
Gumbel-max trick of `jax.random.categorical`, which generates a random number for every
vocabulary entry (50,257 per row and step) and was 4x slower per decode step on a CPU.

Random numbers: one key per decode step, `fold_in(key, t)`, drawn for the whole global batch.
With JAX's partitionable threefry every device generates the bits of its own rows, so each shard
draws its own random numbers, and the samples do not depend on how the batch is sharded.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from rlhf_jax import models

Array = jax.Array


def filter_logits(logits: Array, top_k: int = 0, top_p: float = 1.0) -> Array:
    """Masks logits outside the top-k / nucleus (top-p) set to -1e10.

    Args:
        logits: `[..., vocab]` float32.
        top_k: keep the k largest; 0 keeps all.
        top_p: keep the largest logits whose cumulative probability stays <= top_p; the most
            likely token is always kept (top_p=0 keeps only it); 1.0 keeps all.

    Returns:
        Filtered logits of the same shape.
    """
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, models.gpt2.MASK_VALUE, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep the largest entries whose cumulative probability (inclusive) stays <= top_p, as
        # the original's top_p: on logits [1, 1.01, 1.001, 0, 0, 0, 2], p=0.7 keeps 3 entries.
        keep_sorted = jnp.cumsum(probs, axis=-1) <= top_p
        keep_sorted = keep_sorted.at[..., 0].set(True)
        n_keep = keep_sorted.sum(axis=-1, keepdims=True)
        cutoff = jnp.take_along_axis(sorted_logits, n_keep - 1, axis=-1)
        logits = jnp.where(logits < cutoff, models.gpt2.MASK_VALUE, logits)
    return logits


CDF_BLOCK = 256  # vocabulary entries per block of the two-level cumulative sum


def categorical(rng: Array, logits: Array) -> Array:
    """Draws one index per row of `logits` `[..., vocab]` from softmax(logits).

    Inverse-CDF sampling with a two-level cumulative sum: the vocabulary is split into blocks
    of `CDF_BLOCK`; one uniform number picks a block by the running sum of block masses and then
    an entry by the running sum inside that block. Each float32 running sum adds at most a few
    hundred terms (not 50,257), so rounding cannot noticeably shift the probability of any entry,
    and an entry of probability 0 (masked by top-k/top-p) is never drawn.

    Args:
        rng: PRNG key.
        logits: `[..., vocab]` float32; -1e10 (or -inf) masks an entry.

    Returns:
        int32 `[...]` indices.
    """
    vocab = logits.shape[-1]
    nb = -(-vocab // CDF_BLOCK)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    pad = [(0, 0)] * (probs.ndim - 1) + [(0, nb * CDF_BLOCK - vocab)]
    probs = jnp.pad(probs, pad).reshape(logits.shape[:-1] + (nb, CDF_BLOCK))
    mass = probs.sum(-1)  # [..., nb]
    cum = jnp.cumsum(mass, axis=-1)
    # u in (0, total]: never 0, so a leading entry of probability 0 cannot be drawn.
    tiny = jnp.finfo(jnp.float32).tiny
    u = jax.random.uniform(rng, logits.shape[:-1], minval=tiny, maxval=1.0) * cum[..., -1]
    block = jnp.minimum(jnp.sum(cum < u[..., None], axis=-1), nb - 1)
    take = lambda x: jnp.take_along_axis(x, block[..., None], axis=-1)[..., 0]  # noqa: E731
    rest = u - (take(cum) - take(mass))  # how far into the chosen block u falls
    inner = jnp.take_along_axis(probs, block[..., None, None], axis=-2)[..., 0, :]
    index = jnp.sum(jnp.cumsum(inner, axis=-1) < rest[..., None], axis=-1)
    # Rounding between the two levels could step past the block's last possible entry.
    last = CDF_BLOCK - 1 - jnp.argmax((inner > 0)[..., ::-1], axis=-1)
    return (block * CDF_BLOCK + jnp.minimum(index, last)).astype(jnp.int32)


def sample(
    params,
    context: Array,
    rng: Array,
    *,
    config: models.GPT2Config,
    response_length: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
):
    """Samples `response_length` tokens after each context row. Jit it with static kwargs.

    Args:
        params: policy params (a value head is optional).
        context: `[batch, ctx_len]` int32 formatted contexts; may contain pads (e.g. the
            original's prefix ‖ right-padded query ‖ suffix layout).
        rng: a PRNG key.
        config: static model config.
        response_length: number of tokens to draw.
        temperature: logits are divided by this before sampling and log-probs.
        top_k, top_p: optional truncation (see module docstring).

    Returns:
        dict with "responses" `[batch, response_length]` int32, "logprobs" `[batch,
        response_length]` float32 and, with a value head, "values" `[batch, response_length]`.
    """
    batch, ctx_len = context.shape
    cache = models.KVCache.zeros(config, batch, ctx_len + response_length - 1)
    hidden, scalars, cache = models.forward(params, context, config, cache)
    has_value = "value" in scalars

    def draw(h_last: Array, t) -> tuple[Array, Array]:
        logits = models.logits_from_hidden(params, h_last, config) / temperature
        logp_all = jax.nn.log_softmax(logits, axis=-1)
        sample_logits = filter_logits(logits, top_k, top_p)
        token = categorical(jax.random.fold_in(rng, t), sample_logits)
        logp = jnp.take_along_axis(logp_all, token[:, None], axis=-1)[:, 0]
        return token.astype(jnp.int32), logp

    token0, logp0 = draw(hidden[:, -1], 0)
    value0 = scalars["value"][:, -1] if has_value else jnp.zeros((batch,), jnp.float32)

    def step(carry, t):
        cache, prev = carry
        h, s, cache = models.forward(params, prev[:, None], config, cache)
        token, logp = draw(h[:, 0], t)
        value = s["value"][:, 0] if has_value else jnp.zeros((batch,), jnp.float32)
        return (cache, token), (token, logp, value)

    _, (tokens, logps, values) = jax.lax.scan(
        step, (cache, token0), jnp.arange(1, response_length)
    )
    out = {
        "responses": jnp.concatenate([token0[:, None], tokens.T], axis=1),
        "logprobs": jnp.concatenate([logp0[:, None], logps.T], axis=1),
    }
    if has_value:
        out["values"] = jnp.concatenate([value0[:, None], values.T], axis=1)
    return out


def make_sampler(config: models.GPT2Config, *, response_length: int, temperature: float,
                 top_k: int = 0, top_p: float = 1.0, params_sharding=None, batch_sharding=None):
    """Returns `fn(params, context, rng) -> dict`, jitted with the given shardings.

    The context's batch axis is sharded over every device (`batch_sharding`); params may be
    FSDP-sharded or replicated (`params_sharding`; None lets JAX keep their current layout).
    """
    fn = functools.partial(
        sample,
        config=config,
        response_length=response_length,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
    )
    if batch_sharding is None:
        return jax.jit(fn)
    return jax.jit(
        fn,
        in_shardings=(params_sharding, batch_sharding, None),
        out_shardings=batch_sharding,
    )
