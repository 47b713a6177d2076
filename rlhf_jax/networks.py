"""The networks the train loops call, as pure functions of params (spec §1.4, §2.1).

- the policy: log-probs, entropies and values of responses given formatted contexts;
- the reference policy: the same function with frozen params;
- the reward model: a scalar read at the last position of raw query ‖ response.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax import models

Array = jax.Array


def response_logprobs(params, context: Array, responses: Array, config: models.GPT2Config,
                      temperature: float, with_entropy: bool = True):
    """Re-analyses sampled responses with one full forward pass (the original's analyze_responses).

    Response token t is predicted by the logits at position ctx_len - 1 + t, so logits, values
    and entropies are taken from positions [ctx_len - 1, -1) (spec §10.2). Logits are divided by
    the temperature, as during sampling. The LM head, and the last block, run only at those
    positions (`out_positions`).

    Args:
        params: policy or reference params; a value head is optional.
        context: `[batch, ctx_len]` formatted contexts (prefix ‖ padded query ‖ suffix).
        responses: `[batch, response_length]` sampled tokens (untruncated).
        config: static model config.
        temperature: sampling temperature.
        with_entropy: also return the per-token entropy of softmax(logits / T).

    Returns:
        dict with "logprobs" `[batch, response_length]`, optionally "entropy" and, with a value
        head, "values" `[batch, response_length]`.
    """
    ctx_len, resp_len = context.shape[1], responses.shape[1]
    tokens = jnp.concatenate([context, responses], axis=1)
    positions = jnp.broadcast_to(ctx_len - 1 + jnp.arange(resp_len, dtype=jnp.int32),
                                 responses.shape)
    h, scalars, _ = models.forward(params, tokens, config, out_positions=positions)
    logits = models.logits_from_hidden(params, h, config) / temperature
    logp_all = jax.nn.log_softmax(logits, axis=-1)
    out = {"logprobs": jnp.take_along_axis(logp_all, responses[..., None], axis=-1)[..., 0]}
    if with_entropy:
        out["entropy"] = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
    if "value" in scalars:
        out["values"] = scalars["value"]
    return out


def reward(params, queries: Array, responses: Array, config: models.GPT2Config) -> Array:
    """The reward model's score of raw query ‖ response (no prefix or suffix, spec §10.6).

    The scalar is read at index -1; pad states are carried forward (spec §1.3), so for a
    truncated response this is the reward at the truncation token.

    Args:
        params: reward-model params (trunk, reward head, gain and bias).
        queries: `[batch, query_length]` right-padded raw queries.
        responses: `[batch, response_length]` (truncated responses are padded after the stop).
        config: static model config.

    Returns:
        `[batch]` float32 rewards.
    """
    tokens = jnp.concatenate([queries, responses], axis=1)
    last = jnp.full((tokens.shape[0], 1), tokens.shape[1] - 1, jnp.int32)
    _, scalars, _ = models.forward(params, tokens, config, out_positions=last)
    return scalars["reward"][:, 0]


def rewards_of_samples(params, queries: Array, samples: Array, config: models.GPT2Config) -> Array:
    """Rewards of N samples per query: queries `[B, Q]`, samples `[B, N, R]` -> `[B, N]`."""
    b, n, r = samples.shape
    flat_q = jnp.repeat(queries, n, axis=0)
    return reward(params, flat_q, samples.reshape(b * n, r), config).reshape(b, n)
