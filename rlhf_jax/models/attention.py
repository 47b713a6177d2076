"""Attention kernels of the GPT-2 trunk, with the original's masks (spec §1.3).

Two paths, one set of masks (causal, plus padded keys masked out for every query):

- `full_attention`: a whole sequence attends to itself (training forward, reference and reward
  forwards, sampling's prefill). It goes through `jax.nn.dot_product_attention`, so on NVIDIA
  GPUs, in bfloat16, cuDNN's fused (flash) kernel serves the forward and the backward pass, and
  XLA serves every other case.
- `cached_attention`: new queries attend to a preallocated KV cache (the decode loop). Plain
  einsums over a `[batch, heads, slots, head_dim]` cache: that layout is what both matmuls of a
  decode step read without transposing the cache (a `[batch, slots, heads, head_dim]` cache made
  XLA copy and transpose every layer's keys and values at every decoding step).

`reference_attention` is the unfused textbook computation both are tested against.

Masked logits: the original sets them to -1e10 (`MASK_VALUE`); `jax.nn.dot_product_attention`
uses a larger negative number. Either way a masked key gets probability exactly 0 whenever the
query has one real key, and a query whose keys are all masked (a leading pad under left padding)
attends uniformly, so the two agree.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp

Array = jax.Array
logger = logging.getLogger(__name__)

MASK_VALUE = -1e10

# "auto": cuDNN's fused kernel where it applies (GPU, bfloat16), XLA elsewhere.
IMPLEMENTATIONS = ("auto", "xla", "cudnn")


def _scale(head_dim: int) -> float:
    return float(head_dim) ** -0.5


def reference_attention(q: Array, k: Array, v: Array, mask: Array) -> Array:
    """Unfused softmax(q k^T / sqrt(d)) v in the `[batch, T, heads, head_dim]` layout.

    Args:
        q: `[B, T, H, D]` queries.
        k, v: `[B, S, H, D]` keys and values.
        mask: `[B, 1, T, S]` bool, True where a query may attend to a key.

    Returns:
        `[B, T, H, D]` in the dtype of `v`.
    """
    scores = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32)
    scores = jnp.where(mask, scores * _scale(q.shape[-1]), MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bhts,bshd->bthd", probs, v)


def _resolve(implementation: str, dtype) -> str | None:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r}; expected one of "
                         f"{IMPLEMENTATIONS}")
    if implementation == "auto":
        # cuDNN's fused attention takes half precision only.
        use_cudnn = jax.default_backend() == "gpu" and dtype == jnp.bfloat16
        return "cudnn" if use_cudnn else None
    return None if implementation == "xla" else implementation


def full_attention(q: Array, k: Array, v: Array, mask: Array,
                   implementation: str = "auto", causal: bool = True) -> Array:
    """A sequence attending to itself through `jax.nn.dot_product_attention`.

    Args:
        q: `[B, T, H, D]` queries, or `[B, P, H, D]` for P selected positions.
        k, v: `[B, T, H, D]`.
        mask: `[B, 1, T or P, T]` bool: causal and padded keys (True = attend).
        implementation: "auto", "xla" or "cudnn" (see module docstring).
        causal: the queries are the T positions in order (lets cuDNN skip the blocks above
            the diagonal); False for selected positions (then `mask` alone says what to see).

    Returns:
        `[B, T or P, H, D]` in the dtype of `q`.
    """
    impl = _resolve(implementation, q.dtype)
    if impl == "cudnn":
        try:
            # `mask` is folded into a bias by JAX: it adds the padded keys.
            return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal,
                                                implementation="cudnn")
        except (ValueError, NotImplementedError, RuntimeError) as e:
            if implementation == "cudnn":
                raise
            logger.warning("cuDNN attention unavailable for %s %s (%s); using XLA",
                           q.shape, q.dtype, e)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")


def cached_attention(q: Array, k_cache: Array, v_cache: Array, mask: Array) -> Array:
    """New queries attending to a KV cache.

    Args:
        q: `[B, T, H, D]` queries of the new tokens.
        k_cache, v_cache: `[B, H, S, D]` caches, already holding the new tokens' keys/values.
        mask: `[B, 1, T, S]` bool over cache slots (filled real slots, causally).

    Returns:
        `[B, T, H, D]` in the cache dtype.
    """
    scores = jnp.einsum("bthd,bhsd->bhts", q, k_cache, preferred_element_type=jnp.float32)
    scores = jnp.where(mask, scores * _scale(q.shape[-1]), MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_cache.dtype)
    return jnp.einsum("bhts,bhsd->bthd", probs, v_cache)
