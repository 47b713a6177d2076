"""Reward normalisation arithmetic (spec §3.3)."""

import numpy as np
import pytest

from rlhf_jax import reward_modeling as rm


def test_reward_stats_population_std():
    stats = rm.reward_stats(np.array([[1.0, 2.0], [3.0, 6.0]], np.float32))
    assert stats["mean"] == pytest.approx(3.0)
    assert stats["std"] == pytest.approx(np.sqrt(((1 - 3) ** 2 + 1 + 0 + 9) / 4))


def test_reward_stats_matches_pooled_original_formula():
    r = np.random.default_rng(0).normal(2.0, 3.0, size=512)
    mean = r.mean()
    pooled_std = np.sqrt(np.mean(r**2) - mean**2)  # how the original pools over ranks
    assert rm.reward_stats(r)["std"] == pytest.approx(pooled_std, rel=1e-9)


@pytest.mark.parametrize("target_mean, target_std", [(0.0, 1.0), (0.3, 2.5), (-1.0, 0.5)])
def test_fit_gain_bias_hits_targets(target_mean, target_std):
    r = np.random.default_rng(1).normal(4.0, 0.2, size=512).astype(np.float32)
    gain, bias = rm.fit_gain_bias(r, target_mean, target_std)
    normalized = gain * r.astype(np.float64) + bias
    assert normalized.mean() == pytest.approx(target_mean, abs=1e-6)
    assert normalized.std() == pytest.approx(target_std, rel=1e-6)
    std = r.astype(np.float64).std()
    assert gain == pytest.approx(target_std / std, rel=1e-9)
    assert bias == pytest.approx(target_mean - gain * r.astype(np.float64).mean(), rel=1e-9)


def test_fit_gain_bias_defaults_and_errors():
    gain, bias = rm.fit_gain_bias(np.array([1.0, 3.0]))
    assert (gain, bias) == (pytest.approx(1.0), pytest.approx(-2.0))
    with pytest.raises(ValueError, match="constant"):
        rm.fit_gain_bias(np.ones(8))
    with pytest.raises(ValueError, match="non-finite"):
        rm.fit_gain_bias(np.array([1.0, np.nan]))
    with pytest.raises(ValueError, match="at least one"):
        rm.fit_gain_bias(np.array([]))


@pytest.mark.parametrize(
    "samples, batch, expected",
    [
        (256, 512, 1),  # books: 1 batch of 512
        (256, 128, 2),  # summarisation: 2 batches of 128
        (1024, 8, 128),
        (1025, 8, 129),
        (0, 64, 0),
    ],
)
def test_normalization_num_batches(samples, batch, expected):
    assert rm.normalization_num_batches(samples, batch) == expected


def test_normalization_num_batches_errors():
    with pytest.raises(ValueError):
        rm.normalization_num_batches(8, 0)
    with pytest.raises(ValueError):
        rm.normalization_num_batches(-1, 8)
