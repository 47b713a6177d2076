"""GPT-2 language models with optional value and reward heads, as pure functions of params.

This package is the only one that imports `flax.linen`. Everything else sees:

    params = init_params(config, rng, heads=("value",))
    hidden, scalars, cache = forward(params, tokens, config)
    hidden, scalars, cache = prefill(params, context, config, max_len)   # for sampling
    logits = logits_from_hidden(params, hidden, config)

Every matmul is traced under `gpt2.precision_scope(config)`: true float32 for
`dtype="float32"` on every backend (see `gpt2.py`).

Param trees: `{"transformer": ..., "value_head": ..., "reward_head": ..., "reward_norm": ...}`;
which heads exist is read off the tree, so the policy (trunk + value head), the reference
policy and the reward model (trunk + reward head + gain/bias) all use the same functions.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from rlhf_jax.models.gpt2 import (  # noqa: F401
    GPT2,
    HF_NAMES,
    PRESETS,
    GPT2Config,
    KVCache,
    carry_forward_index,
    exclusive_cumsum,
    precision_scope,
    preset,
)
from rlhf_jax.models.heads import RewardNorm, ScalarHead, lm_logits

Array = jax.Array
HEADS = ("value", "reward")


class LanguageModel(nn.Module):
    """GPT-2 trunk plus the scalar heads named in `heads` ("value", "reward")."""

    config: GPT2Config
    heads: tuple[str, ...] = ()

    @nn.compact
    def __call__(self, tokens: Array, cache: KVCache | None = None, prefill_len: int = 0,
                 out_positions: Array | None = None):
        with precision_scope(self.config):
            trunk = GPT2(self.config, name="transformer")
            return self._heads(*trunk(tokens, cache, prefill_len, out_positions))

    def _heads(self, hidden, cache):
        scalars = {}
        if "value" in self.heads:
            scalars["value"] = ScalarHead(0.0, name="value_head")(hidden)
        if "reward" in self.heads:
            std = 1.0 / (self.config.n_embd + 1) ** 0.5
            raw = ScalarHead(std, name="reward_head")(hidden)
            scalars["reward"] = RewardNorm(name="reward_norm")(raw)
        return hidden, scalars, cache


def _check_heads(heads: Sequence[str]) -> tuple[str, ...]:
    unknown = set(heads) - set(HEADS)
    if unknown:
        raise ValueError(f"unknown heads {sorted(unknown)}; known heads: {HEADS}")
    return tuple(h for h in HEADS if h in heads)


def heads_of(params) -> tuple[str, ...]:
    """The scalar heads present in a param tree."""
    return tuple(h for h in HEADS if f"{h}_head" in params)


def _dummy_tokens(config: GPT2Config):
    return jnp.zeros((1, 1), jnp.int32)


def init_boxed(config: GPT2Config, rng: Array, heads: Sequence[str] = ()):
    """Initialises params with their logical-axis boxes (`nn.LogicallyPartitioned`)."""
    model = LanguageModel(config, _check_heads(heads))
    return model.init(rng, _dummy_tokens(config))["params"]


def init_params(config: GPT2Config, rng: Array, heads: Sequence[str] = ()):
    """Initialises a float32 param tree (GPT-2 init; value head zero; reward head N(0, 1/sqrt(d+1)))."""
    return nn.meta.unbox(init_boxed(config, rng, heads))


def logical_axes(config: GPT2Config, heads: Sequence[str] = ()):
    """A tree of logical-axis PartitionSpecs matching `init_params`, computed without FLOPs."""
    boxed = jax.eval_shape(lambda r: init_boxed(config, r, heads), jax.random.key(0))
    return nn.get_partition_spec(boxed)


def axis_rules(rules):
    """Context manager binding logical axis names to mesh axes for activation constraints."""
    return nn.logical_axis_rules(rules)


def forward(params, tokens: Array, config: GPT2Config, cache: KVCache | None = None,
            out_positions: Array | None = None):
    """Runs the model.

    Args:
        params: a param tree from `init_params` (or an HF import / checkpoint).
        tokens: `[batch, T]` int32 ids; `config.pad_id` marks padding.
        config: the static GPT2Config.
        cache: optional KVCache for incremental decoding.
        out_positions: optional `[batch, P]` positions (no cache): hidden states and scalars
            are returned at those positions only, and the last block skips the rest.

    Returns:
        (hidden `[batch, T or P, d]` float32, scalars {"value"/"reward": `[batch, T or P]`},
        cache).
    """
    if not isinstance(tokens, jax.core.Tracer):
        check_token_ids(tokens, config)
    model = LanguageModel(config, heads_of(params))
    return model.apply({"params": params}, tokens, cache, 0, out_positions)


def prefill(params, tokens: Array, config: GPT2Config, max_len: int):
    """`forward` over a whole context that also returns a KVCache of `max_len` slots holding it.

    Equal to `forward(params, tokens, config, KVCache.zeros(config, batch, max_len))` at the
    last position, which is all a sampler reads: hidden `[batch, 1, d]` and scalars
    `[batch, 1]` are returned for the last position only. The context attends only to itself
    through the fused full-sequence attention instead of scoring every (still empty) cache
    slot, and the last block runs the last position only.
    """
    if max_len < tokens.shape[1]:
        raise ValueError(f"max_len={max_len} is shorter than the context ({tokens.shape[1]})")
    if not isinstance(tokens, jax.core.Tracer):
        check_token_ids(tokens, config)
    model = LanguageModel(config, heads_of(params))
    return model.apply({"params": params}, tokens, None, max_len,
                       jnp.full((tokens.shape[0], 1), tokens.shape[1] - 1, jnp.int32))


def check_token_ids(tokens, config: GPT2Config, where: str = "tokens") -> None:
    """Raises ValueError if an id is negative or >= vocab_size without being the pad id.

    Runs on the host (on concrete arrays); jitted code cannot raise, so inputs are checked
    where they enter the program (label files, query datasets, eager calls of `forward`).
    """
    import numpy as np

    arr = np.asarray(tokens)
    bad = (arr < 0) | ((arr >= config.vocab_size) & (arr != config.pad_id))
    if bad.any():
        pos = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"{where}: token id {int(arr[pos])} at index {pos} is outside the vocabulary "
            f"[0, {config.vocab_size}) and is not the pad id {config.pad_id}"
        )


MATMUL_MODULES = ("c_attn", "c_proj", "c_fc")


def cast_matmul_weights(params, config: GPT2Config):
    """Params whose matmul weights are already in the compute dtype, for a loop that reuses them.

    The dense layers cast their float32 kernels and biases to the compute dtype at every call,
    and the LM head casts `wte`; a decode loop would redo that (and read float32 weights) at
    every step. Casting once gives the same numbers. `wte` itself stays float32 (the embedding
    lookup reads it in float32); the LM head's copy is returned apart.

    Returns:
        (params for `forward`, params for `logits_from_hidden`); both are `params` in float32.
    """
    if config.dtype == "float32":
        return params, params
    dtype = config.compute_dtype

    def cast(path, x):
        names = {getattr(k, "key", None) for k in path}
        return x.astype(dtype) if names & set(MATMUL_MODULES) else x

    lm = {"transformer": {"wte": params["transformer"]["wte"].astype(dtype)}}
    return jax.tree_util.tree_map_with_path(cast, params), lm


def logits_from_hidden(params, hidden: Array, config: GPT2Config) -> Array:
    """Tied LM-head logits, float32 `[..., vocab]`."""
    with precision_scope(config):
        return lm_logits(params["transformer"]["wte"], hidden, config.compute_dtype)
