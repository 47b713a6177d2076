"""Label types: parsing, losses against numpy references, target scales."""

import jax
import numpy as np
import pytest

from rlhf_jax import label_types
from rlhf_jax.label_types import get_label_type


def _log_softmax(x):
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


@pytest.mark.parametrize(
    "name, keys, label_key",
    [
        ("best_of_4", ("sample0", "sample1", "sample2", "sample3"), "best"),
        ("best_of_2", ("sample0", "sample1"), "best"),
        ("scalar_rating", ("sample",), "score"),
        ("scalar_compare", ("sample0", "sample1"), "difference"),
    ],
)
def test_parse(name, keys, label_key):
    lt = get_label_type(name)
    assert lt.name == name
    assert lt.sample_keys == keys
    assert lt.label_key == label_key
    assert lt.num_samples == len(keys)
    assert lt.question_keys == ("query",) + keys


@pytest.mark.parametrize(
    "bad",
    [
        "best_of_1",
        "best_of_0",
        "best_of_x",
        "best_of_",
        "best_of_+4",
        "scalar",
        "Best_of_4",
        "",
        "best_of_4 ",
    ],
)
def test_parse_rejects(bad):
    with pytest.raises(ValueError, match=repr(bad).replace("+", r"\+")):
        get_label_type(bad)


def test_schemas():
    sch = get_label_type("best_of_4").schemas(query_length=5, response_length=3)
    assert sch["query"] == (np.dtype(np.int32), (5,))
    assert sch["sample3"] == (np.dtype(np.int32), (3,))
    assert sch["best"] == (np.dtype(np.int32), ())
    assert get_label_type("scalar_rating").schemas(query_length=5, response_length=3)["score"] == (
        np.dtype(np.float32),
        (),
    )


def test_best_of_n_loss_matches_numpy():
    rng = np.random.default_rng(0)
    rewards = rng.normal(size=(16, 4)).astype(np.float32) * 3
    best = rng.integers(0, 4, size=16).astype(np.int32)
    lt = get_label_type("best_of_4")
    loss, stats = jax.jit(lt.loss)(rewards, best)
    ref = -_log_softmax(rewards.astype(np.float64))[np.arange(16), best].mean()
    np.testing.assert_allclose(loss, ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(stats["error"], ref, rtol=1e-6, atol=1e-6)
    assert stats["loss"] == loss
    np.testing.assert_allclose(stats["accuracy"], (rewards.argmax(1) == best).mean(), atol=1e-7)


def test_best_of_n_accuracy_counts_ties_as_a_random_pick():
    lt = get_label_type("best_of_4")
    rewards = np.array([[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0], [2.0, 1.0, 0.0, 0.0]],
                       np.float32)
    _, stats = lt.loss(rewards, np.array([0, 1, 0], np.int32))
    np.testing.assert_allclose(stats["accuracy"], (0.25 + 0.5 + 1.0) / 3, rtol=1e-6)
    _, stats = lt.loss(rewards, np.array([0, 2, 1], np.int32))  # a tie the label is not in
    np.testing.assert_allclose(stats["accuracy"], 0.25 / 3, rtol=1e-6)


def test_best_of_n_loss_stable_for_large_rewards():
    rewards = np.array([[1000.0, 0.0, -1000.0, 0.0]], np.float32)
    loss, stats = get_label_type("best_of_4").loss(rewards, np.array([0], np.int32))
    np.testing.assert_allclose(loss, 0.0, atol=1e-6)
    assert stats["accuracy"] == 1.0
    loss, _ = get_label_type("best_of_4").loss(rewards, np.array([2], np.int32))
    np.testing.assert_allclose(loss, 2000.0, rtol=1e-6)


def test_best_of_n_gradient_matches_softmax_minus_onehot():
    rewards = np.array([[0.5, -1.0, 2.0], [0.0, 0.0, 0.0]], np.float32)
    best = np.array([1, 2], np.int32)
    lt = get_label_type("best_of_3")
    grad = jax.grad(lambda r: lt.loss(r, best)[0])(rewards)
    p = np.exp(_log_softmax(rewards.astype(np.float64)))
    ref = (p - np.eye(3)[best]) / 2
    np.testing.assert_allclose(grad, ref, rtol=1e-5, atol=1e-6)


def test_scalar_rating_loss_and_stats():
    rng = np.random.default_rng(1)
    r = rng.normal(size=(32, 1)).astype(np.float32)
    score = (2 * r[:, 0] + rng.normal(size=32) + 0.5).astype(np.float32)
    loss, stats = jax.jit(get_label_type("scalar_rating").loss)(r, score)
    s, p = score.astype(np.float64), r[:, 0].astype(np.float64)
    np.testing.assert_allclose(loss, np.mean((s - p) ** 2), rtol=1e-5)
    np.testing.assert_allclose(stats["error"], loss, rtol=0)
    np.testing.assert_allclose(stats["label_mean"], s.mean(), rtol=1e-5)
    np.testing.assert_allclose(stats["label_var"], s.var(), rtol=1e-5)
    np.testing.assert_allclose(stats["corr"], np.corrcoef(s, p)[0, 1], rtol=1e-5)


def test_scalar_rating_corr_constant_labels_is_zero_not_nan():
    r = np.arange(4, dtype=np.float32)[:, None]
    _, stats = get_label_type("scalar_rating").loss(r, np.zeros(4, np.float32))
    assert float(stats["corr"]) == 0.0


def test_scalar_compare_loss():
    rng = np.random.default_rng(2)
    r = rng.normal(size=(8, 2)).astype(np.float32)
    diff = rng.normal(size=8).astype(np.float32)
    loss, stats = get_label_type("scalar_compare").loss(r, diff)
    ref = np.mean((diff.astype(np.float64) - (r[:, 1] - r[:, 0])) ** 2)
    np.testing.assert_allclose(loss, ref, rtol=1e-5)
    assert set(stats) == {"loss", "error"}


def test_loss_rejects_wrong_reward_width():
    with pytest.raises(ValueError, match=r"\[batch, 4\]"):
        get_label_type("best_of_4").loss(np.zeros((2, 3), np.float32), np.zeros(2, np.int32))


def test_target_scales():
    labels = {"score": np.array([1.0, 2.0, 3.0, 6.0], np.float32)}
    mean, std = get_label_type("scalar_rating").target_scales(labels)
    assert mean == pytest.approx(3.0)
    assert std == pytest.approx(np.std([1.0, 2.0, 3.0, 6.0]))  # population std
    mean, std = get_label_type("scalar_compare").target_scales(
        {"difference": np.array([2.0, -2.0, 4.0, 0.0], np.float32)}
    )
    assert mean == pytest.approx(0.5)
    assert std == pytest.approx(np.std([1.0, -1.0, 2.0, 0.0]))
    bo4 = get_label_type("best_of_4")
    assert bo4.target_scales({"best": np.array([0, 1])}) is None
    assert label_types.target_mean_std(bo4, {"best": np.array([0, 1])}) == (0.0, 1.0)
