"""GPT-2 as a Flax Linen module, with the padding semantics of lm-human-preferences.

The trunk returns final-LayerNorm hidden states. Heads (tied LM head, value, reward) live in
`heads.py`; `rlhf_jax/models/__init__.py` puts them together behind pure `apply` functions.

Padding (spec §1.3): a pad id outside the vocabulary (50259 in the released labels) marks
padding. Pad ids are replaced by 0 before the embedding lookup, padded keys are masked out,
position ids are the exclusive cumulative sum of the mask, and after `ln_f` the hidden state
at a pad position is replaced by the state of the nearest preceding real token. So the
original's right-padded layout (query, pads, suffix) and left padding give the same outputs
at real tokens, and a scalar read at any position after the last real token is the scalar of
that token.

Parameters carry logical axis names (`vocab`, `embed`, `qkv`, `mlp`, ...) and activations
carry separate names (`act_batch`, `act_len`, `act_embed`), so sharding is chosen by rules in
config (`rlhf_jax/sharding.py`), never here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

Array = jax.Array

# Masked attention logits are set to this value, as in the original (not -inf: a query whose
# keys are all masked, e.g. a leading pad under left padding, then stays finite).
MASK_VALUE = -1e10

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """Static GPT-2 hyperparameters. Hashable, so it can be bound with functools.partial.

    Attributes:
        vocab_size: number of real tokens (50257 for GPT-2).
        n_positions: context length (1024 for GPT-2).
        n_embd: model width.
        n_layer: number of transformer blocks.
        n_head: number of attention heads.
        layer_norm_epsilon: LayerNorm epsilon (1e-5 in GPT-2).
        pad_id: padding id; must be >= vocab_size. Defaults to vocab_size + 2 (50259 for
            GPT-2, the "historical" id of the released label files).
        dtype: compute dtype, "float32" or "bfloat16". Parameters are always float32, and
            logits, log-softmax and attention softmax are always computed in float32.
        remat: rematerialise each block in the backward pass (saves activation memory).
    """

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    layer_norm_epsilon: float = 1e-5
    pad_id: int | None = None
    dtype: str = "float32"
    remat: bool = False

    def __post_init__(self):
        if self.pad_id is None:
            object.__setattr__(self, "pad_id", self.vocab_size + 2)
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.pad_id < self.vocab_size:
            raise ValueError(
                f"pad_id={self.pad_id} lies inside the vocabulary (vocab_size="
                f"{self.vocab_size}); it must be >= vocab_size so it is never embedded"
            )
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype={self.dtype!r}; expected one of {sorted(_DTYPES)}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def compute_dtype(self):
        return _DTYPES[self.dtype]

    def num_params(self) -> int:
        """Parameters of the trunk (the LM head is tied to `wte`)."""
        d, n_layer = self.n_embd, self.n_layer
        per_block = 4 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
        return self.vocab_size * d + self.n_positions * d + n_layer * per_block + 2 * d


# Shapes of Hugging Face's gpt2, gpt2-medium, gpt2-large and gpt2-xl.
PRESETS: dict[str, dict[str, int]] = {
    "124M": dict(n_layer=12, n_embd=768, n_head=12),
    "355M": dict(n_layer=24, n_embd=1024, n_head=16),
    "774M": dict(n_layer=36, n_embd=1280, n_head=20),
    "1.5B": dict(n_layer=48, n_embd=1600, n_head=25),
    # Tiny models for tests and CPU runs. `tiny` keeps the real GPT-2 vocabulary so that the
    # real tokenizer works with it; `tiny-vocab` is for unit tests that need no tokenizer.
    "tiny": dict(n_layer=2, n_embd=64, n_head=4, n_positions=256),
    "tiny-vocab": dict(n_layer=2, n_embd=32, n_head=4, n_positions=64, vocab_size=96),
}
HF_NAMES = {"gpt2": "124M", "gpt2-medium": "355M", "gpt2-large": "774M", "gpt2-xl": "1.5B"}


def preset(name: str, **overrides: Any) -> GPT2Config:
    """Returns the GPT2Config of a named size ("124M", "774M", "gpt2-large", "tiny", ...)."""
    key = HF_NAMES.get(name, name)
    if key not in PRESETS:
        known = sorted(PRESETS) + sorted(HF_NAMES)
        raise ValueError(f"unknown GPT-2 preset {name!r}; known presets: {', '.join(known)}")
    return GPT2Config(**{**PRESETS[key], **overrides})


@flax.struct.dataclass
class KVCache:
    """Key/value cache for incremental decoding.

    Attributes:
        k: per layer, keys `[batch, max_len, n_head, head_dim]` in the compute dtype.
        v: per layer, values, same shape.
        mask: `[batch, max_len]` bool, True at filled real-token slots.
        positions: `[batch]` int32, position id of the next real token.
        index: scalar int32, number of slots written so far (same for every row).
    """

    k: tuple[Array, ...]
    v: tuple[Array, ...]
    mask: Array
    positions: Array
    index: Array

    @classmethod
    def zeros(cls, config: GPT2Config, batch: int, max_len: int) -> "KVCache":
        shape = (batch, max_len, config.n_head, config.head_dim)
        zeros = lambda: jnp.zeros(shape, config.compute_dtype)  # noqa: E731
        return cls(
            k=tuple(zeros() for _ in range(config.n_layer)),
            v=tuple(zeros() for _ in range(config.n_layer)),
            mask=jnp.zeros((batch, max_len), bool),
            positions=jnp.zeros((batch,), jnp.int32),
            index=jnp.zeros((), jnp.int32),
        )


def _dense(features: int, axes: tuple[str, str], cfg: GPT2Config, std: float, name: str):
    return nn.Dense(
        features,
        dtype=cfg.compute_dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(std), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes[1],)),
        name=name,
    )


def _layer_norm(cfg: GPT2Config, name: str):
    return nn.LayerNorm(
        epsilon=cfg.layer_norm_epsilon,
        dtype=jnp.float32,  # normalisation statistics in fp32 whatever the compute dtype
        param_dtype=jnp.float32,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
        name=name,
    )


class Attention(nn.Module):
    config: GPT2Config

    @nn.compact
    def __call__(self, x, attend, k_cache=None, v_cache=None, index=None):
        """Causal self-attention.

        Args:
            x: `[batch, T, n_embd]` inputs.
            attend: `[batch, 1, T, S]` bool, which keys each query may attend to.
            k_cache, v_cache: optional `[batch, S, n_head, head_dim]` caches; the new keys and
                values are written at slots [index, index + T).
            index: scalar int32 write offset into the caches.

        Returns:
            (output `[batch, T, n_embd]`, k_cache, v_cache); the caches are None without cache.
        """
        cfg = self.config
        b, t, _ = x.shape
        std = 0.02
        qkv = _dense(3 * cfg.n_embd, ("embed", "qkv"), cfg, std, "c_attn")(x)
        q, k, v = jnp.split(qkv, 3, axis=-1)
        heads = lambda a: a.reshape(b, t, cfg.n_head, cfg.head_dim)  # noqa: E731
        q, k, v = heads(q), heads(k), heads(v)
        if k_cache is not None:
            start = (0, index, 0, 0)
            k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), start)
            v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), start)
            k, v = k_cache, v_cache
        scores = jnp.einsum(
            "bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32
        ) / jnp.sqrt(jnp.float32(cfg.head_dim))
        scores = jnp.where(attend, scores, MASK_VALUE)
        probs = jax.nn.softmax(scores, axis=-1).astype(cfg.compute_dtype)
        out = jnp.einsum("bhts,bshd->bthd", probs, v).reshape(b, t, cfg.n_embd)
        proj_std = 0.02 / (2 * cfg.n_layer) ** 0.5
        out = _dense(cfg.n_embd, ("joined_heads", "embed"), cfg, proj_std, "c_proj")(out)
        return out, k_cache, v_cache


class MLP(nn.Module):
    config: GPT2Config

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        h = _dense(4 * cfg.n_embd, ("embed", "mlp"), cfg, 0.02, "c_fc")(x)
        h = nn.with_logical_constraint(h, ("act_batch", "act_len", "act_mlp"))
        h = jax.nn.gelu(h, approximate=True)  # GPT-2's "gelu_new" (tanh approximation)
        proj_std = 0.02 / (2 * cfg.n_layer) ** 0.5
        return _dense(cfg.n_embd, ("mlp", "embed"), cfg, proj_std, "c_proj")(h)


class Block(nn.Module):
    config: GPT2Config

    @nn.compact
    def __call__(self, x, attend, k_cache=None, v_cache=None, index=None):
        cfg = self.config
        h = _layer_norm(cfg, "ln_1")(x).astype(cfg.compute_dtype)
        a, k_cache, v_cache = Attention(cfg, name="attn")(h, attend, k_cache, v_cache, index)
        x = x + a
        h = _layer_norm(cfg, "ln_2")(x).astype(cfg.compute_dtype)
        x = x + MLP(cfg, name="mlp")(h)
        x = nn.with_logical_constraint(x, ("act_batch", "act_len", "act_embed"))
        return x, k_cache, v_cache


def exclusive_cumsum(mask: Array) -> Array:
    """Position ids that skip pads: `[1,0,0,1,1] -> [0,1,1,1,2]`."""
    m = mask.astype(jnp.int32)
    return jnp.cumsum(m, axis=-1) - m


def carry_forward_index(mask: Array) -> Array:
    """For each position, the index of the nearest real position at or before it.

    Leading pads (left padding) map to index 0.
    """
    idx = jnp.arange(mask.shape[-1], dtype=jnp.int32)
    return jax.lax.cummax(jnp.where(mask, idx, 0), axis=mask.ndim - 1)


class GPT2(nn.Module):
    """The GPT-2 trunk: token ids in, final-LayerNorm hidden states out."""

    config: GPT2Config

    @nn.compact
    def __call__(self, tokens: Array, cache: KVCache | None = None):
        """Runs the trunk.

        Args:
            tokens: `[batch, T]` int32 token ids; `config.pad_id` marks padding.
            cache: optional KVCache. With a cache the tokens are written at slots
                [cache.index, cache.index + T) and attend to every filled slot before them.

        Returns:
            (hidden `[batch, T, n_embd]` float32 after `ln_f` with pad states carried forward,
             the updated cache or None).
        """
        cfg = self.config
        tokens = tokens.astype(jnp.int32)
        mask = tokens != cfg.pad_id
        ids = jnp.where(mask, tokens, 0)
        b, t = tokens.shape
        positions = exclusive_cumsum(mask)
        if cache is not None:
            positions = positions + cache.positions[:, None]
            key_mask = jax.lax.dynamic_update_slice(cache.mask, mask, (0, cache.index))
            query_slot = cache.index + jnp.arange(t)
            key_slot = jnp.arange(cache.mask.shape[1])
        else:
            key_mask = mask
            query_slot = key_slot = jnp.arange(t)
        causal = key_slot[None, :] <= query_slot[:, None]  # [T, S]
        attend = (key_mask[:, None, :] & causal[None])[:, None]  # [B, 1, T, S]

        wte = self.param(
            "wte",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
            (cfg.vocab_size, cfg.n_embd),
            jnp.float32,
        )
        wpe = self.param(
            "wpe",
            nn.with_logical_partitioning(nn.initializers.normal(0.01), ("position", "embed")),
            (cfg.n_positions, cfg.n_embd),
            jnp.float32,
        )
        x = jnp.take(wte, ids, axis=0) + jnp.take(wpe, positions, axis=0)
        x = x.astype(cfg.compute_dtype)
        x = nn.with_logical_constraint(x, ("act_batch", "act_len", "act_embed"))

        block_cls = nn.remat(Block) if cfg.remat else Block
        new_k, new_v = [], []
        for i in range(cfg.n_layer):
            kc = cache.k[i] if cache is not None else None
            vc = cache.v[i] if cache is not None else None
            idx = cache.index if cache is not None else None
            x, kc, vc = block_cls(cfg, name=f"h_{i}")(x, attend, kc, vc, idx)
            new_k.append(kc)
            new_v.append(vc)
        h = _layer_norm(cfg, "ln_f")(x).astype(jnp.float32)
        # Pad positions take the state of the last real token before them (spec §1.3.4).
        h = jnp.take_along_axis(h, carry_forward_index(mask)[:, :, None], axis=1)

        new_cache = None
        if cache is not None:
            new_cache = KVCache(
                k=tuple(new_k),
                v=tuple(new_v),
                mask=key_mask,
                positions=cache.positions + mask.sum(axis=1, dtype=jnp.int32),
                index=cache.index + t,
            )
        return h, new_cache
