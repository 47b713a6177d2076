"""Optimizers and learning-rate schedules for reward-model and policy training.

The original (`lm_human_preferences/utils/core.py: minimize`) uses TF1's `AdamOptimizer` with
eps=1e-5, no weight decay and no gradient clipping, for both the reward model and the policy.
TF1 places eps differently from PyTorch/optax (spec §10.1):

- TF1:     theta -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)
- PyTorch: theta -= lr * m_hat / (sqrt(v_hat) + eps), m_hat = m / (1 - b1^t), v_hat = v / (1 - b2^t)

Rewriting the TF form as m_hat / (sqrt(v_hat) + eps / sqrt(1 - b2^t)) shows that TF's effective eps
is ~30x larger at t=1 and shrinks towards eps over the first few thousand steps, which is why the
PyTorch form gives noticeably more aggressive early RLHF updates (Huang et al.). `scale_by_adam_tf`
reproduces the TF form; `make_optimizer(adam_style="pytorch")` gives the other for comparison.

Everything here is a pure optax transformation or schedule: no jit, no I/O.
"""

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

Schedule = Callable[[Any], jax.Array]

ADAM_STYLES = ("tf", "pytorch")
REWARD_LR_KINDS = ("linear", "cosine")


class ScaleByAdamTFState(NamedTuple):
    """State of `scale_by_adam_tf`.

    Attributes:
        count: int32 scalar, the number of Adam steps taken so far (t - 1 during step t).
        mu: first-moment estimate, same tree structure, shapes and dtypes as the params, so it
            can take the params' sharding.
        nu: second-moment estimate, same structure as `mu`.
    """

    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates


def _one_minus_pow(b: Any, t: jax.Array) -> jax.Array:
    """Returns 1 - b**t, accurate in float32 even when it is tiny.

    `1 - 0.999**t` in float32 loses ~5e-5 relative precision at t=1 to cancellation (and the
    rounding of 0.999 itself). Going through expm1 with log(b) taken in float64 on the host keeps
    the bias correction within a few ulp of the exact value.

    Args:
        b: decay rate, a Python float (or an array when hyperparameters are injected).
        t: float32 scalar, the 1-based step count.

    Returns:
        float32 scalar 1 - b**t.
    """
    log_b = math.log(b) if isinstance(b, (int, float)) else jnp.log(b)
    return -jnp.expm1(t * log_b)


def scale_by_adam_tf(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-5
) -> optax.GradientTransformation:
    """Rescales updates like TF1's `tf.train.AdamOptimizer` (before the learning rate).

    For step t = 1, 2, ... (counting Adam steps, not PPO iterations):
        m_t = b1 * m_{t-1} + (1 - b1) * g
        v_t = b2 * v_{t-1} + (1 - b2) * g^2
        u_t = sqrt(1 - b2^t) / (1 - b1^t) * m_t / (sqrt(v_t) + eps)

    Following the optax convention for `scale_by_*` transforms, `u_t` points along the gradient;
    chain `optax.scale_by_learning_rate(lr)` afterwards, which multiplies by -lr, to get the
    TF update -lr * u_t.

    Args:
        b1: decay rate of the first moment.
        b2: decay rate of the second moment.
        eps: added to sqrt(v_t) *without* bias correction, as in TF1 (the original uses 1e-5).

    Returns:
        An `optax.GradientTransformation` whose state is a `ScaleByAdamTFState`.
    """

    def init_fn(params: optax.Params) -> ScaleByAdamTFState:
        return ScaleByAdamTFState(
            count=jnp.zeros([], jnp.int32),
            mu=jax.tree.map(jnp.zeros_like, params),
            nu=jax.tree.map(jnp.zeros_like, params),
        )

    def update_fn(
        updates: optax.Updates, state: ScaleByAdamTFState, params: optax.Params | None = None
    ) -> tuple[optax.Updates, ScaleByAdamTFState]:
        del params
        # TF's fused kernel writes the moment updates as m += (g - m) * (1 - b1); same maths.
        mu = jax.tree.map(lambda m, g: m + (g - m) * (1 - b1), state.mu, updates)
        nu = jax.tree.map(lambda v, g: v + (jnp.square(g) - v) * (1 - b2), state.nu, updates)
        count = optax.safe_int32_increment(state.count)
        t = count.astype(jnp.float32)
        # TF folds both bias corrections into the step size and leaves eps uncorrected.
        alpha = jnp.sqrt(_one_minus_pow(b2, t)) / _one_minus_pow(b1, t)
        new_updates = jax.tree.map(
            lambda m, v: (alpha.astype(m.dtype) * m) / (jnp.sqrt(v) + eps), mu, nu
        )
        return new_updates, ScaleByAdamTFState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(
    learning_rate: float | Schedule,
    *,
    adam_style: str = "tf",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-5,
    max_grad_norm: float | None = None,
) -> optax.GradientTransformation:
    """Builds the Adam optimizer used for both reward-model and policy training.

    Args:
        learning_rate: a float, or an optax schedule mapping the 0-based update count to a
            learning rate (see `ppo_lr_schedule` and `reward_lr_schedule`).
        adam_style: "tf" for TF1's eps placement (the original), or "pytorch" for
            `optax.scale_by_adam` (eps added to sqrt of the bias-corrected v).
        b1: Adam first-moment decay.
        b2: Adam second-moment decay.
        eps: Adam epsilon, interpreted according to `adam_style`.
        max_grad_norm: if set, clip gradients to this global norm before Adam. The original
            does not clip, so the default is None.

    Returns:
        An `optax.GradientTransformation`.

    Raises:
        ValueError: for an unknown `adam_style` or a non-positive `max_grad_norm`.
    """
    if adam_style == "tf":
        adam = scale_by_adam_tf(b1=b1, b2=b2, eps=eps)
    elif adam_style == "pytorch":
        adam = optax.scale_by_adam(b1=b1, b2=b2, eps=eps)
    else:
        raise ValueError(f"unknown adam_style {adam_style!r}; expected one of {ADAM_STYLES}")
    chain = []
    if max_grad_norm is not None:
        if max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be positive or None, got {max_grad_norm!r}")
        chain.append(optax.clip_by_global_norm(max_grad_norm))
    chain += [adam, optax.scale_by_learning_rate(learning_rate)]
    return optax.chain(*chain)


def ppo_lr_schedule(lr: float, num_updates: int, steps_per_update: int) -> Schedule:
    """PPO learning rate: linear decay per PPO iteration, constant within one (spec §10.9).

    The original sets lr = ppo.lr * (1 - iteration / nupdates) once per iteration, and then takes
    noptepochs * nminibatches Adam steps at that lr. Here the schedule sees the Adam step count,
    so the iteration is recovered as step // steps_per_update. The factor is floored at 0 so a
    run that goes past `num_updates` never gets a negative learning rate.

    Args:
        lr: initial learning rate (`ppo.lr`).
        num_updates: number of PPO iterations, ceil(total_episodes / batch_size).
        steps_per_update: Adam steps per iteration, noptepochs * nminibatches.

    Returns:
        A schedule mapping the 0-based Adam step count to a float32 learning rate.
    """
    if num_updates < 1 or steps_per_update < 1:
        raise ValueError(
            f"num_updates and steps_per_update must be >= 1, got {num_updates}, {steps_per_update}"
        )

    def schedule(step: Any) -> jax.Array:
        iteration = jnp.asarray(step, jnp.int32) // steps_per_update
        frac = 1.0 - iteration.astype(jnp.float32) / num_updates
        return lr * jnp.maximum(frac, 0.0)

    return schedule


def reward_lr_schedule(lr: float, num_steps: int, kind: str = "linear") -> Schedule:
    """Reward-model learning rate, one step per label batch.

    "linear" is the original: lr * (1 - start_index / num_train) = lr * (1 - step / num_steps),
    so the last batch trains at lr / num_steps. "cosine" (summarize-from-feedback) is
    lr * (1 + cos(pi * step / num_steps)) / 2. Both are floored at 0 past `num_steps`.

    Args:
        lr: initial learning rate.
        num_steps: number of label batches, labels.num_train / batch_size.
        kind: "linear" or "cosine".

    Returns:
        A schedule mapping the 0-based step count to a float32 learning rate.

    Raises:
        ValueError: for an unknown `kind` or a non-positive `num_steps`.
    """
    if kind not in REWARD_LR_KINDS:
        raise ValueError(f"unknown reward lr schedule kind {kind!r}; expected {REWARD_LR_KINDS}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")

    def schedule(step: Any) -> jax.Array:
        frac = jnp.minimum(jnp.asarray(step, jnp.float32) / num_steps, 1.0)
        if kind == "linear":
            return lr * (1.0 - frac)
        return lr * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))

    return schedule
