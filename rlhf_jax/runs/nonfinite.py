"""One rule for every trainer: a non-finite loss, gradient or parameter stops the run before
the next save, naming the step and the quantity, so the last good checkpoint stays.

The jitted step returns one int32 `flags` scalar (`step_flags`): a bit per quantity that is not
finite. `NonFiniteGuard` reads it on the host every step, one step late: when step s is
dispatched, the flags of step s-1 are read, which that step has (nearly) finished computing, so
the device is never idle waiting for the host. `flush()` reads the newest flags; the loops call
it before a checkpoint is written, before metrics are logged and at the end, so no state is
ever saved or reported without its check. Used by train_reward (and so by train_policy's reward
stage and the online loop's reward rounds), train_sft and train_policy. (The original asserted
only that its reward normalisation statistics were finite, spec §3.3.)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

LOSS, GRAD_NORM, PARAMS = 1, 2, 4
_NAMES = {LOSS: "loss", GRAD_NORM: "gradient norm", PARAMS: "parameters"}


class NonFiniteError(FloatingPointError):
    """A training step produced a NaN or infinite loss, gradient norm, parameter or score.

    Attributes:
        step: the step (1-based count of updates) whose result is not finite.
        quantities: names of what was not finite ("loss", "gradient norm", ...).
    """

    def __init__(self, message: str, step: int, quantities: list[str]):
        super().__init__(message)
        self.step, self.quantities = step, quantities


def step_flags(loss: jax.Array | None = None, grads: Any = None, params: Any = None) -> jax.Array:
    """The fused finiteness scalar of one step, inside jit.

    Args:
        loss: the scalar loss (or None).
        grads: the gradient tree; its global norm is checked (or None).
        params: the updated parameter tree; every element is checked (or None).

    Returns:
        int32 bit mask: LOSS | GRAD_NORM | PARAMS for each quantity that is not finite.
    """
    flags = jnp.int32(0)
    if loss is not None:
        flags |= jnp.where(jnp.isfinite(loss), 0, LOSS)
    if grads is not None:
        flags |= jnp.where(jnp.isfinite(optax.tree.norm(grads)), 0, GRAD_NORM)
    if params is not None:
        finite = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params)
                  if jnp.issubdtype(x.dtype, jnp.inexact)]
        flags |= jnp.where(jnp.all(jnp.stack(finite)), 0, PARAMS)
    return flags


def any_flags(flags: jax.Array) -> jax.Array:
    """The bitwise OR of an array of flags (e.g. those of every minibatch of a scan)."""
    return jax.lax.reduce(flags, jnp.int32(0), jax.lax.bitwise_or, tuple(range(flags.ndim)))


def flag_names(flags: int) -> list[str]:
    """The quantities a flags value marks as non-finite."""
    return [name for bit, name in _NAMES.items() if flags & bit]


class NonFiniteGuard:
    """Host side of the rule: checks each step's flags (one step late) and host values.

    Args:
        where: who trains, for messages ("train_reward", "train_policy", ...).
        checkpoint_dir: named in the error: where the last good checkpoint is.
    """

    def __init__(self, where: str, checkpoint_dir: str | None = None):
        self.where, self.checkpoint_dir = where, checkpoint_dir
        self._pending: tuple[int, jax.Array] | None = None

    def push(self, step: int, flags: jax.Array) -> None:
        """Records step `step`'s flags and checks the previous step's.

        Raises:
            NonFiniteError: when the previous step's flags are set.
        """
        self.flush()
        self._pending = (step, flags)

    def flush(self) -> None:
        """Checks the newest recorded step now (blocks until it is computed).

        Raises:
            NonFiniteError: naming the step and the quantities.
        """
        if self._pending is None:
            return
        step, flags = self._pending
        self._pending = None
        value = int(jax.device_get(flags))
        if value:
            self._raise(step, flag_names(value))

    def check_values(self, step: int, values: Mapping[str, float]) -> None:
        """Checks host scalars (a score, a normalisation gain) of step `step`.

        Raises:
            NonFiniteError: naming the step and the non-finite values.
        """
        bad = [f"{k} ({v})" for k, v in values.items() if not math.isfinite(float(v))]
        if bad:
            self._raise(step, bad)

    def _raise(self, step: int, quantities: list[str]) -> None:
        where = (f"; the last good checkpoint in {self.checkpoint_dir} is kept"
                 if self.checkpoint_dir else "")
        raise NonFiniteError(
            f"{self.where}: non-finite {', '.join(quantities)} at step {step}; stopping before "
            f"it is saved{where}. Fix the cause (the data, or a lower learning rate: resuming "
            "with a changed config needs --config.allow_config_change=True), then rerun to "
            "resume from that checkpoint", step, quantities)
