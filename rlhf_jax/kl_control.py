"""Fixed and adaptive KL-coefficient controllers as pure functions (spec §4.2, §10.10).

The original keeps beta in a Python object (`FixedKLController` / `AdaptiveKLController` in
`train_policy.py`) and updates it on the host after each PPO iteration:

    e = clip(kl / target - 1, -0.2, 0.2)
    beta <- beta * (1 + e * n_steps / horizon)

with kl = `objective/kl` from the batch's sampling-time log-probs and n_steps = the *global*
`ppo.batch_size`. Here beta is just a scalar (a Python float, or a jnp scalar kept in the train
state), so the same function works on the host and inside jit.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

# Bound on the proportional error, as in the original `AdaptiveKLController.update`.
MAX_PROPORTIONAL_ERROR = 0.2


@dataclasses.dataclass(frozen=True)
class KLControllerConfig:
    """Settings of the KL controller (the original's `rewards.kl_coef` / `rewards.adaptive_kl`).

    Frozen and hashable, so it can be bound with `functools.partial` as a static argument.

    Attributes:
        kl_coef: initial beta (`rewards.kl_coef`).
        adaptive: use the adaptive controller; otherwise beta stays at `kl_coef`.
        target: target `objective/kl` in nats per response (6.0 for the books tasks).
        horizon: controller horizon in episodes (10000 for the books tasks).
    """

    kl_coef: float = 0.2
    adaptive: bool = False
    target: float | None = None
    horizon: float | None = None

    def __post_init__(self):
        if self.kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {self.kl_coef}")
        if self.adaptive:
            _check_adaptive(self.target, self.horizon)


def _check_adaptive(target: Any, horizon: Any) -> None:
    """Raises ValueError unless target and horizon are usable for the adaptive controller."""
    if target is None or horizon is None:
        raise ValueError("the adaptive KL controller needs both target and horizon")
    # Only Python numbers can be checked here; traced values are the caller's responsibility.
    if isinstance(target, (int, float)) and target <= 0:
        raise ValueError(f"adaptive KL target must be > 0, got {target}")
    if isinstance(horizon, (int, float)) and horizon <= 0:
        raise ValueError(f"adaptive KL horizon must be > 0, got {horizon}")


def init_kl_coef(config: KLControllerConfig | float, *, dtype: Any = None) -> Any:
    """Returns the initial beta.

    Args:
        config: a `KLControllerConfig`, or the initial coefficient itself.
        dtype: if given, return a jnp scalar of this dtype (for a jitted train state);
            otherwise a Python float (for a host-side controller, as in the original).

    Returns:
        The initial KL coefficient.
    """
    value = config.kl_coef if isinstance(config, KLControllerConfig) else config
    if dtype is None:
        return float(value)
    return jnp.asarray(value, dtype)


def update_kl_coef(
    kl_coef: Any,
    current_kl: Any,
    n_steps: Any,
    *,
    adaptive: bool,
    target: float | None = None,
    horizon: float | None = None,
) -> Any:
    """One controller update, applied after the PPO epochs of a batch.

    With batch 512 and horizon 10000, beta moves by at most +-1.024% per update.

    Args:
        kl_coef: current beta, a Python/numpy float or a jnp scalar.
        current_kl: `objective/kl` of the batch: mean over rollouts of the summed per-token KL.
        n_steps: episodes in the batch, the global `ppo.batch_size`.
        adaptive: False for the fixed controller (beta returned unchanged).
        target: target KL (adaptive only).
        horizon: horizon in episodes (adaptive only).

    Returns:
        The new beta. It stays a Python/numpy float when no argument is a jax array, and is a
        jnp scalar otherwise (so the function also works under jit).

    Raises:
        ValueError: if `adaptive` and target or horizon is missing or not positive.
    """
    if not adaptive:
        return kl_coef
    _check_adaptive(target, horizon)
    proportional_error = current_kl / target - 1
    if any(isinstance(a, jax.Array) for a in (kl_coef, current_kl, n_steps, target, horizon)):
        proportional_error = jnp.clip(
            proportional_error, -MAX_PROPORTIONAL_ERROR, MAX_PROPORTIONAL_ERROR
        )
    else:
        proportional_error = min(
            max(proportional_error, -MAX_PROPORTIONAL_ERROR), MAX_PROPORTIONAL_ERROR
        )
    return kl_coef * (1 + proportional_error * n_steps / horizon)


def update_kl_coef_from_config(
    kl_coef: Any, current_kl: Any, n_steps: Any, config: KLControllerConfig
) -> Any:
    """`update_kl_coef` with the controller settings taken from a `KLControllerConfig`.

    Args:
        kl_coef: current beta.
        current_kl: `objective/kl` of the batch.
        n_steps: episodes in the batch (global `ppo.batch_size`).
        config: the controller settings.

    Returns:
        The new beta (see `update_kl_coef`).
    """
    return update_kl_coef(
        kl_coef,
        current_kl,
        n_steps,
        adaptive=config.adaptive,
        target=config.target,
        horizon=config.horizon,
    )
