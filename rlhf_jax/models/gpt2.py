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

Precision (`GPT2Config.dtype`, set from `--config.model.dtype`):
- "float32": every matmul in true float32 (`Precision.HIGHEST`, see `precision_scope`), as the
  original ran. JAX's default would run float32 matmuls as TF32 on NVIDIA GPUs and as one
  bfloat16 pass on TPUs; the sampler's log-probs and the training forward's would then drift
  apart, and the first PPO minibatch's ratio would not be 1.
- "bfloat16": matmul inputs and outputs (and the KV cache) in bfloat16, accumulated in float32;
  parameters stay float32 (the optimizer's master copy), and the residual stream, layer norms,
  attention softmax, logits, log-probs and losses are float32.

Parameters carry logical axis names (`vocab`, `embed`, `qkv`, `mlp`, ...) and activations
carry separate names (`act_batch`, `act_len`, `act_embed`), so sharding is chosen by rules in
config (`rlhf_jax/sharding.py`), never here.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from rlhf_jax.models import attention

Array = jax.Array

# Masked attention logits are set to this value, as in the original (not -inf: a query whose
# keys are all masked, e.g. a leading pad under left padding, then stays finite).
MASK_VALUE = attention.MASK_VALUE

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


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
        dtype: "float32" (true float32 matmuls on every backend) or "bfloat16" (bfloat16
            matmuls); parameters, the residual stream, layer norms, softmaxes and logits are
            float32 either way (see the module docstring).
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
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}; expected one of {', '.join(DTYPES)}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def matmul_precision(self) -> str | None:
        """`jax.default_matmul_precision` for this dtype: "highest" for float32, else default."""
        return "highest" if self.dtype == "float32" else None

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
        k: per layer, keys `[batch, n_head, max_len, head_dim]` in the compute dtype (heads
            before slots: the layout a decode step's two attention matmuls read directly).
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
        shape = (batch, config.n_head, max_len, config.head_dim)
        zeros = lambda: jnp.zeros(shape, config.compute_dtype)  # noqa: E731
        return cls(
            k=tuple(zeros() for _ in range(config.n_layer)),
            v=tuple(zeros() for _ in range(config.n_layer)),
            mask=jnp.zeros((batch, max_len), bool),
            positions=jnp.zeros((batch,), jnp.int32),
            index=jnp.zeros((), jnp.int32),
        )

    @classmethod
    def from_prefix(cls, ks, vs, mask: Array, max_len: int) -> "KVCache":
        """A cache of `max_len` slots holding a prefix's per-layer `[B, T, H, D]` keys/values."""
        t = mask.shape[1]

        def slots(a):
            a = jnp.swapaxes(a, 1, 2)  # [B, H, T, D]
            return jnp.pad(a, ((0, 0), (0, 0), (0, max_len - t), (0, 0)))

        return cls(
            k=tuple(slots(a) for a in ks),
            v=tuple(slots(a) for a in vs),
            mask=jnp.pad(mask, ((0, 0), (0, max_len - t))),
            positions=mask.sum(axis=1, dtype=jnp.int32),
            index=jnp.asarray(t, jnp.int32),
        )


def precision_scope(config: GPT2Config):
    """Context for tracing the model's matmuls at the precision `config.dtype` promises."""
    if config.matmul_precision is None:
        return contextlib.nullcontext()
    return jax.default_matmul_precision(config.matmul_precision)


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
    def __call__(self, x, attend, k_cache=None, v_cache=None, index=None, rows=None):
        """Causal self-attention.

        Args:
            x: `[batch, T, n_embd]` inputs.
            attend: `[batch, 1, T, S]` bool, which keys each query may attend to.
            k_cache, v_cache: optional `[batch, n_head, S, head_dim]` caches; the new keys and
                values are written at slots [index, index + T).
            index: scalar int32 write offset into the caches.
            rows: optional `[batch, P]` positions (without caches): only their queries are
                computed, against every key.

        Returns:
            (output `[batch, T or P, n_embd]`, keys, values): with caches, the updated caches;
            without, this sequence's `[batch, T, n_head, head_dim]` keys and values.
        """
        cfg = self.config
        b, t, _ = x.shape
        std = 0.02
        qkv = _dense(3 * cfg.n_embd, ("embed", "qkv"), cfg, std, "c_attn")(x)
        q, k, v = jnp.split(qkv, 3, axis=-1)
        heads = lambda a: a.reshape(b, a.shape[1], cfg.n_head, cfg.head_dim)  # noqa: E731
        q, k, v = heads(q), heads(k), heads(v)
        if rows is not None:
            q = jnp.take_along_axis(q, rows[:, :, None, None], axis=1)
            attend = jnp.take_along_axis(attend, rows[:, None, :, None], axis=2)
            t = rows.shape[1]
        if k_cache is None:
            out = attention.full_attention(q, k, v, attend, causal=rows is None)
        else:
            start = (0, 0, index, 0)
            new = lambda a, c: jnp.swapaxes(a, 1, 2).astype(c.dtype)  # noqa: E731
            k_cache = jax.lax.dynamic_update_slice(k_cache, new(k, k_cache), start)
            v_cache = jax.lax.dynamic_update_slice(v_cache, new(v, v_cache), start)
            out = attention.cached_attention(q, k_cache, v_cache, attend)
            k, v = k_cache, v_cache
        out = out.reshape(b, t, cfg.n_embd)
        proj_std = 0.02 / (2 * cfg.n_layer) ** 0.5
        out = _dense(cfg.n_embd, ("joined_heads", "embed"), cfg, proj_std, "c_proj")(out)
        return out, k, v


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
    def __call__(self, x, attend, k_cache=None, v_cache=None, index=None, rows=None):
        """One pre-LN block on the float32 residual stream `x`; returns (x, keys, values).

        With `rows` (`[batch, P]` positions), the block's output is computed at those positions
        only (`[batch, P, n_embd]`); keys and values still cover every position.
        """
        cfg = self.config
        h = _layer_norm(cfg, "ln_1")(x).astype(cfg.compute_dtype)
        a, k, v = Attention(cfg, name="attn")(h, attend, k_cache, v_cache, index, rows)
        if rows is not None:
            x = jnp.take_along_axis(x, rows[:, :, None], axis=1)
        x = x + a.astype(jnp.float32)
        h = _layer_norm(cfg, "ln_2")(x).astype(cfg.compute_dtype)
        x = x + MLP(cfg, name="mlp")(h).astype(jnp.float32)
        x = nn.with_logical_constraint(x, ("act_batch", "act_len", "act_embed"))
        return x, k, v


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
    def __call__(self, tokens: Array, cache: KVCache | None = None, prefill_len: int = 0,
                 out_positions: Array | None = None):
        """Runs the trunk.

        Args:
            tokens: `[batch, T]` int32 token ids; `config.pad_id` marks padding.
            cache: optional KVCache. With a cache the tokens are written at slots
                [cache.index, cache.index + T) and attend to every filled slot before them.
            prefill_len: without a cache, > 0 also returns a new KVCache of this many slots
                holding these tokens (a prefill: the sequence attends only to itself, so it
                takes the fused full-sequence attention).
            out_positions: without a cache, optional `[batch, P]` int32 positions whose hidden
                states are all the caller needs (e.g. the response positions of a PPO forward,
                the last position of a reward). The last block then computes queries, MLP and
                `ln_f` at those positions only: its work at every other position feeds nothing.

        Returns:
            (hidden `[batch, T or P, n_embd]` float32 after `ln_f` with pad states carried
             forward, the updated or new cache, or None).
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
        # The residual stream stays float32 in every dtype; blocks cast their matmul inputs.
        x = jnp.take(wte, ids, axis=0) + jnp.take(wpe, positions, axis=0)
        x = nn.with_logical_constraint(x, ("act_batch", "act_len", "act_embed"))

        # Pad positions take the state of the last real token before them (spec §1.3.4).
        source = carry_forward_index(mask)
        rows = None
        if out_positions is not None:
            if cache is not None:
                raise ValueError("out_positions is for full-sequence forwards, not a cache")
            rows = jnp.take_along_axis(source, out_positions.astype(jnp.int32), axis=1)
        block_cls = nn.remat(Block) if cfg.remat else Block
        new_k, new_v = [], []
        for i in range(cfg.n_layer):
            kc = cache.k[i] if cache is not None else None
            vc = cache.v[i] if cache is not None else None
            idx = cache.index if cache is not None else None
            last_rows = rows if i == cfg.n_layer - 1 else None
            x, kc, vc = block_cls(cfg, name=f"h_{i}")(x, attend, kc, vc, idx, last_rows)
            new_k.append(kc)
            new_v.append(vc)
        h = _layer_norm(cfg, "ln_f")(x).astype(jnp.float32)
        if rows is None:
            h = jnp.take_along_axis(h, source[:, :, None], axis=1)

        new_cache = None
        if cache is not None:
            new_cache = KVCache(
                k=tuple(new_k),
                v=tuple(new_v),
                mask=key_mask,
                positions=cache.positions + mask.sum(axis=1, dtype=jnp.int32),
                index=cache.index + t,
            )
        elif prefill_len:
            new_cache = KVCache.from_prefix(new_k, new_v, mask, prefill_len)
        return h, new_cache
