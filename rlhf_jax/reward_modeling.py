"""Reward normalisation arithmetic (spec §3.3), free of model code.

The trainer resets the reward head's gain to 1 and bias to 0, scores
`normalization_num_batches(...)` rollout batches of reference-policy samples (raw: not
truncated, no penalty), and then sets the gain and bias from `fit_gain_bias`, so that the
normalised reward `gain * r + bias` has the target mean and std on those samples.

The losses themselves live with the label types (`rlhf_jax.label_types`).
"""

from __future__ import annotations

import numpy as np


def reward_stats(rewards) -> dict[str, float]:
    """Mean and population std of rewards.

    The original pools over ranks as sqrt(E[r^2] - mean^2), i.e. the population std; pass
    the rewards of all processes (a global array) to get the same number.

    Args:
        rewards: float[...] rewards, any shape (flattened).

    Returns:
        {"mean": float, "std": float}.
    """
    values = np.asarray(rewards, np.float64).reshape(-1)
    if values.size == 0:
        raise ValueError("reward_stats needs at least one reward")
    return {"mean": float(values.mean()), "std": float(values.std())}


def fit_gain_bias(
    rewards, target_mean: float = 0.0, target_std: float = 1.0
) -> tuple[float, float]:
    """Gain and bias that map rewards to the target mean and std.

    `rewards` must have been measured with gain=1, bias=0. Then
    gain = target_std / std and bias = target_mean - gain * mean, so that
    gain * rewards + bias has exactly the target mean and (population) std.

    Args:
        rewards: float[...] rewards of reference samples, measured with gain 1, bias 0.
        target_mean: desired mean (the label type's target before training, 0 after).
        target_std: desired std (1 after training).

    Returns:
        (gain, bias) as floats.

    Raises:
        ValueError: when the statistics are not finite or the rewards are constant
            (the original asserts finiteness; a zero std would give an infinite gain).
    """
    stats = reward_stats(rewards)
    mean, std = stats["mean"], stats["std"]
    if not np.isfinite([mean, std, target_mean, target_std]).all():
        raise ValueError(
            f"non-finite normalisation statistics: mean={mean}, std={std}, "
            f"target_mean={target_mean}, target_std={target_std}"
        )
    if std == 0:
        raise ValueError(f"cannot normalise constant rewards (all equal to {mean})")
    gain = target_std / std
    return float(gain), float(target_mean - gain * mean)


def normalization_num_batches(normalize_samples: int, rollout_batch_size: int) -> int:
    """Rollout batches drawn to measure reward statistics: ceil(samples / batch).

    Rounding up means the effective sample count is a whole number of batches (512 for
    the books tasks: 256 samples asked, one batch of 512 drawn).

    Args:
        normalize_samples: samples asked for (0 disables normalisation).
        rollout_batch_size: global batch size of one rollout.

    Returns:
        Number of batches.
    """
    if rollout_batch_size <= 0:
        raise ValueError(f"rollout_batch_size must be > 0, got {rollout_batch_size}")
    if normalize_samples < 0:
        raise ValueError(f"normalize_samples must be >= 0, got {normalize_samples}")
    return -(-normalize_samples // rollout_batch_size)
