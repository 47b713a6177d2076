"""Heads on the GPT-2 trunk: the tied LM head and the scalar value and reward heads (spec §1.2)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


class ScalarHead(nn.Module):
    """A linear map d_model -> 1 applied to the final hidden state at every position.

    Attributes:
        init_std: std of the normal kernel init; 0 gives an exactly-zero kernel (the value head,
            so V == 0 at the start of PPO). The reward head uses 1/sqrt(d_model + 1).
    """

    init_std: float = 0.0

    @nn.compact
    def __call__(self, hidden: Array) -> Array:
        """Returns `[batch, T]` float32 scalars for `hidden` `[batch, T, d_model]`."""
        if self.init_std == 0.0:
            kernel_init = nn.initializers.zeros
        else:
            kernel_init = nn.initializers.normal(self.init_std)
        d = hidden.shape[-1]
        kernel = self.param(
            "kernel", nn.with_logical_partitioning(kernel_init, ("embed", "scalar")), (d, 1)
        )
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("scalar",)), (1,))
        return (hidden.astype(jnp.float32) @ kernel + bias)[..., 0]


class RewardNorm(nn.Module):
    """Trainable reward gain and bias: reward = gain * head + bias (original `reward_norm`).

    Both are Adam-trainable, as in the original; normalisation overwrites them (spec §3.3).
    """

    @nn.compact
    def __call__(self, raw: Array) -> Array:
        init = lambda value: nn.with_logical_partitioning(  # noqa: E731
            nn.initializers.constant(value), ()
        )
        gain = self.param("gain", init(1.0), (), jnp.float32)
        bias = self.param("bias", init(0.0), (), jnp.float32)
        return raw * gain + bias


def lm_logits(wte: Array, hidden: Array, compute_dtype=jnp.float32) -> Array:
    """Tied LM head: `hidden @ wte.T`, accumulated and returned in float32.

    Args:
        wte: `[vocab, d_model]` token embedding.
        hidden: `[..., d_model]` final hidden states.
        compute_dtype: dtype of the matmul inputs.

    Returns:
        `[..., vocab]` float32 logits.
    """
    return jnp.einsum(
        "...d,vd->...v",
        hidden.astype(compute_dtype),
        wte.astype(compute_dtype),
        preferred_element_type=jnp.float32,
    )
