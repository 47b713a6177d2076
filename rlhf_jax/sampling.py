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
draws its own random numbers, and the samples do not depend on how the batch is sharded, nor on
how many chunks it is sampled in.

Two programs: `prefill` (the contexts through the fused full-sequence attention, the cache
filled, the first token drawn) and `decode` (a `lax.scan` of one-token steps over the cache).
`sample` composes them in one jit; the PPO rollout jits them apart to time them apart.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from rlhf_jax import microbatch, models

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

    Args:
        rng: PRNG key.
        logits: `[..., vocab]` float32; -1e10 (or -inf) masks an entry.

    Returns:
        int32 `[...]` indices (see `inverse_cdf`).
    """
    return inverse_cdf(uniform(rng, logits.shape[:-1]), logits)


def uniform(rng: Array, shape) -> Array:
    """Uniform numbers in (0, 1]: never 0, so a leading entry of probability 0 is never drawn."""
    tiny = jnp.finfo(jnp.float32).tiny
    return jax.random.uniform(rng, shape, minval=tiny, maxval=1.0)


def inverse_cdf(u: Array, logits: Array) -> Array:
    """The entry of softmax(logits) at which the cumulative probability reaches `u`.

    Inverse-CDF sampling with a two-level cumulative sum: the vocabulary is split into blocks
    of `CDF_BLOCK`; `u` picks a block by the running sum of block masses and then an entry by
    the running sum inside that block. Each float32 running sum adds at most a few hundred
    terms (not 50,257), so rounding cannot noticeably shift the probability of any entry, and
    an entry of probability 0 (masked by top-k/top-p) is never drawn.

    Args:
        u: `[...]` float32 in (0, 1], one per row (`uniform`).
        logits: `[..., vocab]` float32.

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
    u = u * cum[..., -1]
    block = jnp.minimum(jnp.sum(cum < u[..., None], axis=-1), nb - 1)
    take = lambda x: jnp.take_along_axis(x, block[..., None], axis=-1)[..., 0]  # noqa: E731
    rest = u - (take(cum) - take(mass))  # how far into the chosen block u falls
    inner = jnp.take_along_axis(probs, block[..., None, None], axis=-2)[..., 0, :]
    index = jnp.sum(jnp.cumsum(inner, axis=-1) < rest[..., None], axis=-1)
    # Rounding between the two levels could step past the block's last possible entry.
    last = CDF_BLOCK - 1 - jnp.argmax((inner > 0)[..., ::-1], axis=-1)
    return (block * CDF_BLOCK + jnp.minimum(index, last)).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
    """Static sampling settings (hashable, bound into the jitted prefill and decode).

    Attributes:
        config: the model.
        response_length: tokens drawn per row.
        temperature: logits are divided by this before sampling and log-probs.
        top_k, top_p: optional truncation (see module docstring).
        num_chunks: rows are sampled in this many strided chunks, one after another
            (`rlhf_jax.microbatch`); the samples do not depend on it.
    """

    config: models.GPT2Config
    response_length: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    num_chunks: int = 1


def _draw(params, h: Array, rng: Array, t, rows: Array, s: SamplerSettings):
    """Token and its log-prob for hidden states `h` `[b, d]` of chunk `rows` at step t.

    The uniform numbers are drawn for the whole batch at step t and the chunk's rows taken from
    them, so a row's sample is the same whatever the chunking.
    """
    logits = models.logits_from_hidden(params, h, s.config) / s.temperature
    logp_all = jax.nn.log_softmax(logits, axis=-1)
    u = microbatch.take(uniform(jax.random.fold_in(rng, t), (h.shape[0] * s.num_chunks,)),
                        rows, s.num_chunks)
    token = inverse_cdf(u, filter_logits(logits, s.top_k, s.top_p))
    logp = jnp.take_along_axis(logp_all, token[:, None], axis=-1)[:, 0]
    return token, logp


def prefill(params, context: Array, rng: Array, settings: SamplerSettings) -> dict:
    """Runs the contexts, fills the KV cache and draws the first token. Jit with static settings.

    Returns:
        The sampler state: "cache" (a KVCache of context + response - 1 slots), the first
        "token", its "logprob" and the "value" at the last context position (zeros without a
        value head). With `num_chunks` n > 1 every leaf has a leading chunk axis of size n.
    """
    s = settings
    max_len = context.shape[1] + s.response_length - 1
    n = s.num_chunks

    def one(i, ctx):
        hidden, scalars, cache = models.prefill(params, ctx, s.config, max_len)
        token, logp = _draw(params, hidden[:, 0], rng, 0, i, s)
        value = scalars["value"][:, 0] if "value" in scalars else jnp.zeros_like(logp)
        return {"cache": cache, "token": token, "logprob": logp, "value": value}

    return microbatch.map_chunks(one, n, microbatch.split(context, n))


def decode(params, state: dict, rng: Array, settings: SamplerSettings):
    """Draws the remaining tokens with the KV cache. Jit with static settings, `state` donated.

    Returns:
        (outputs, cache): outputs as `sample` returns them; the final cache is returned only so
        that a donated one can be updated in place, and can be dropped.
    """
    s = settings
    has_value = "value_head" in params
    # Weights in the compute dtype once, not at every step (the same numbers).
    params, lm_params = models.cast_matmul_weights(params, s.config)

    def one(i, st):
        def step(carry, t):
            cache, prev = carry
            h, scalars, cache = models.forward(params, prev[:, None], s.config, cache)
            token, logp = _draw(lm_params, h[:, 0], rng, t, i, s)
            value = scalars["value"][:, 0] if has_value else jnp.zeros_like(logp)
            return (cache, token), (token, logp, value)

        (cache, _), (tokens, logps, values) = jax.lax.scan(
            step, (st["cache"], st["token"]), jnp.arange(1, s.response_length))
        join = lambda first, rest: jnp.concatenate([first[:, None], rest.T], axis=1)  # noqa
        out = {"responses": join(st["token"], tokens), "logprobs": join(st["logprob"], logps)}
        if has_value:
            out["values"] = join(st["value"], values)
        return out, cache

    out, cache = microbatch.map_chunks(one, s.num_chunks, state)
    return microbatch.merge(out, s.num_chunks), cache


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
    num_chunks: int = 1,
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
        num_chunks: sample the rows in this many chunks (memory; same samples).

    Returns:
        dict with "responses" `[batch, response_length]` int32, "logprobs" `[batch,
        response_length]` float32 and, with a value head, "values" `[batch, response_length]`.
    """
    settings = SamplerSettings(config, response_length, temperature, top_k, top_p, num_chunks)
    return decode(params, prefill(params, context, rng, settings), rng, settings)[0]


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
