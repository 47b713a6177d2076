"""Tests for rlhf_jax.ppo against float64 numpy references and hand-computed examples."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import ppo

TOL = dict(rtol=1e-6, atol=1e-6)


def _np_whiten(x, shift_mean=True):
    x = np.asarray(x, np.float64)
    mean, var = x.mean(), x.var()  # population variance, like tf.nn.moments
    out = (x - mean) / np.sqrt(var + 1e-8)
    return out if shift_mean else out + mean


def _np_gae(rewards, values, gamma, lam):
    """The original's reverse Python loop (train_policy.py: PPOTrainer.loss), in float64."""
    rewards, values = np.asarray(rewards, np.float64), np.asarray(values, np.float64)
    length = rewards.shape[1]
    last = np.zeros(rewards.shape[0])
    reversed_advantages = []
    for t in reversed(range(length)):
        next_values = values[:, t + 1] if t < length - 1 else 0.0
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        last = delta + gamma * lam * last
        reversed_advantages.append(last)
    return np.stack(reversed_advantages[::-1], axis=1)


def _rand(rng, *shape):
    return rng.normal(size=shape).astype(np.float32)


@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_matches_numpy(shift_mean):
    x = 3.0 + 2.0 * _rand(np.random.default_rng(0), 8, 24)
    got = np.asarray(ppo.whiten(jnp.asarray(x), shift_mean=shift_mean))
    np.testing.assert_allclose(got, _np_whiten(x, shift_mean), **TOL)
    if shift_mean:
        np.testing.assert_allclose([got.mean(), got.std()], [0.0, 1.0], atol=1e-5)
    else:
        np.testing.assert_allclose([got.mean(), got.std()], [x.mean(), 1.0], atol=1e-5)


def test_whiten_constant_input_is_finite():
    # var = 0: the 1e-8 keeps it finite, as in the original.
    got = ppo.whiten(jnp.full((4, 3), 2.5), shift_mean=False)
    np.testing.assert_allclose(np.asarray(got), 2.5, **TOL)


@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_groups_are_independent_blocks(shift_mean):
    x = _rand(np.random.default_rng(1), 8, 5) * np.arange(1, 9, dtype=np.float32)[:, None]
    got = np.asarray(ppo.whiten(jnp.asarray(x), shift_mean=shift_mean, groups=4))
    expected = np.concatenate([_np_whiten(b, shift_mean) for b in np.split(x, 4)])
    np.testing.assert_allclose(got, expected, **TOL)
    # groups=1 is the global whitening.
    global_whitened = np.asarray(ppo.whiten(jnp.asarray(x), shift_mean, groups=1))
    np.testing.assert_allclose(global_whitened, _np_whiten(x, shift_mean), **TOL)


def test_whiten_bad_groups():
    with pytest.raises(ValueError):
        ppo.whiten(jnp.zeros((6, 2)), groups=4)
    with pytest.raises(ValueError):
        ppo.whiten(jnp.zeros((6, 2)), groups=0)


def test_compute_rewards():
    rng = np.random.default_rng(2)
    scores, logprobs, ref_logprobs = _rand(rng, 3), _rand(rng, 3, 5), _rand(rng, 3, 5)
    rewards, non_score, kl = ppo.compute_rewards(scores, logprobs, ref_logprobs, 0.15)
    kl_ref = logprobs.astype(np.float64) - ref_logprobs
    rewards_ref = -0.15 * kl_ref
    rewards_ref[:, -1] += scores
    np.testing.assert_allclose(np.asarray(kl), kl_ref, **TOL)
    np.testing.assert_allclose(np.asarray(non_score), -0.15 * kl_ref, **TOL)
    np.testing.assert_allclose(np.asarray(rewards), rewards_ref, **TOL)
    # The score only touches the last position.
    np.testing.assert_allclose(np.asarray(rewards)[:, :-1], -0.15 * kl_ref[:, :-1], **TOL)


@pytest.mark.parametrize(
    "batch, length, gamma, lam",
    [
        (1, 1, 1.0, 0.95),
        (4, 24, 1.0, 0.95),
        (3, 7, 0.99, 0.9),
        (5, 75, 1.0, 0.95),
        (2, 16, 0.5, 1.0),
    ],
)
def test_gae_matches_reverse_loop_float64(batch, length, gamma, lam):
    # In float64 the scan must reproduce the loop to rounding: this checks the recursion, the
    # V[L] = 0 bootstrap and the time direction, free of float32 accumulation error.
    rng = np.random.default_rng(batch * 100 + length)
    rewards, values = rng.normal(size=(2, batch, length))
    with jax.enable_x64(True):
        got = jax.jit(ppo.gae, static_argnums=(2, 3))(rewards, values, gamma, lam)
        assert got.dtype == jnp.float64
        got = np.asarray(got)
    np.testing.assert_allclose(got, _np_gae(rewards, values, gamma, lam), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("batch, length", [(64, 24), (4, 75)])
def test_gae_float32(batch, length):
    # float32 rounding accumulates in proportion to the partial sums (|A| up to ~10 here), not to
    # the possibly cancelled final value, so the fixed 1e-6 is taken relative to the largest |A|.
    rng = np.random.default_rng(batch + length)
    rewards, values = _rand(rng, batch, length), _rand(rng, batch, length)
    got = np.asarray(jax.jit(ppo.gae, static_argnums=(2, 3))(rewards, values, 1.0, 0.95))
    assert got.dtype == np.float32
    expected = _np_gae(rewards, values, 1.0, 0.95)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6 * np.abs(expected).max())


def test_gae_hand_example():
    # One rollout, L=2, gamma=1, lam=0.5: delta_1 = 1 - 2 = -1 (V[2] = 0),
    # delta_0 = 0 + 2 - 1 = 1, A_1 = -1, A_0 = 1 + 0.5 * -1 = 0.5.
    got = ppo.gae(jnp.array([[0.0, 1.0]]), jnp.array([[1.0, 2.0]]), 1.0, 0.5)
    np.testing.assert_allclose(np.asarray(got), [[0.5, -1.0]], **TOL)


@pytest.mark.parametrize("whiten_rewards, groups", [(True, 1), (False, 1), (True, 2)])
def test_advantages_and_returns(whiten_rewards, groups):
    rng = np.random.default_rng(3)
    rewards, values = 0.3 * _rand(rng, 8, 6), _rand(rng, 8, 6)
    advantages, returns = ppo.advantages_and_returns(
        jnp.asarray(rewards),
        jnp.asarray(values),
        gamma=1.0,
        lam=0.95,
        whiten_rewards=whiten_rewards,
        whiten_groups=groups,
    )
    adv_blocks, ret_blocks = [], []
    for r, v in zip(np.split(rewards, groups), np.split(values, groups)):
        if whiten_rewards:
            r = _np_whiten(r, shift_mean=False)
        adv = _np_gae(r, v, 1.0, 0.95)
        ret_blocks.append(adv + v)  # before whitening the advantages
        adv_blocks.append(_np_whiten(adv))
    np.testing.assert_allclose(np.asarray(returns), np.concatenate(ret_blocks), **TOL)
    np.testing.assert_allclose(np.asarray(advantages), np.concatenate(adv_blocks), **TOL)


def test_advantages_and_returns_stop_gradient():
    rng = np.random.default_rng(4)
    rewards, values = jnp.asarray(_rand(rng, 4, 3)), jnp.asarray(_rand(rng, 4, 3))

    def total(r, v):
        adv, ret = ppo.advantages_and_returns(r, v, gamma=1.0, lam=0.95, whiten_rewards=True)
        return jnp.sum(adv * 1.7) + jnp.sum(ret**2)

    grads = jax.jit(jax.grad(total, argnums=(0, 1)))(rewards, values)
    for g in grads:
        np.testing.assert_array_equal(np.asarray(g), 0.0)


def _hand_batch():
    """Six entries laid out as [2, 3] whose pg and value terms are worked out by hand.

    policy (cliprange 0.2):          value (cliprange_value 0.2):
      A   ratio  -A*r  -A*clip  max    V_old vpred  R    (vp-R)^2 (clip-R)^2  max
      1   1.5   -1.5   -1.2   -1.2*    0     0.5   1    0.25     0.64       0.64*
      1   0.5   -0.5   -0.8   -0.5     0     0.5   0    0.25     0.04       0.25
     -1   1.5    1.5    1.2    1.5     1     1.1   2    0.81     0.81       0.81
     -1   0.5    0.5    0.8    0.8*    1     0.0   0    0.00     0.64       0.64*
      2   1.1   -2.2   -2.2   -2.2     0    -1.0  -1    0.00     0.64       0.64*
      0.5 1.0   -0.5   -0.5   -0.5     0     0.0   0.3  0.09     0.09       0.09
    (* = clipped term strictly larger)
    """
    ratio = np.array([1.5, 0.5, 1.5, 0.5, 1.1, 1.0], np.float64)
    batch = dict(
        new_logprobs=np.log(ratio) - 0.7,
        old_logprobs=np.full(6, -0.7),
        advantages=np.array([1.0, 1.0, -1.0, -1.0, 2.0, 0.5]),
        old_values=np.array([0.0, 0.0, 1.0, 1.0, 0.0, 0.0]),
        vpred=np.array([0.5, 0.5, 1.1, 0.0, -1.0, 0.0]),
        returns=np.array([1.0, 0.0, 2.0, 0.0, -1.0, 0.3]),
    )
    return {k: jnp.asarray(v.reshape(2, 3), jnp.float32) for k, v in batch.items()}


LOSS_KW = dict(cliprange=0.2, cliprange_value=0.2, vf_coef=0.1)
# Jitted once per input structure: eager op-by-op dispatch is slower on the shared CPU.
_ppo_loss = jax.jit(functools.partial(ppo.ppo_loss, **LOSS_KW))


def test_ppo_loss_hand_example():
    batch = _hand_batch()
    entropy = jnp.arange(6, dtype=jnp.float32).reshape(2, 3)
    loss, stats = _ppo_loss(**batch, entropy=entropy)
    pg_loss = (-1.2 - 0.5 + 1.5 + 0.8 - 2.2 - 0.5) / 6
    vf_loss = 0.5 * (0.64 + 0.25 + 0.81 + 0.64 + 0.64 + 0.09) / 6
    np.testing.assert_allclose(float(stats["ppo/loss/policy"]), pg_loss, **TOL)
    np.testing.assert_allclose(float(stats["ppo/loss/value"]), vf_loss, **TOL)
    np.testing.assert_allclose(float(loss), pg_loss + 0.1 * vf_loss, **TOL)
    np.testing.assert_allclose(float(stats["ppo/loss/total"]), float(loss), **TOL)
    np.testing.assert_allclose(float(stats["ppo/policy/clipfrac"]), 2 / 6, **TOL)
    np.testing.assert_allclose(float(stats["ppo/val/clipfrac"]), 3 / 6, **TOL)
    logratio = np.log([1.5, 0.5, 1.5, 0.5, 1.1, 1.0])
    approxkl = 0.5 * np.mean(logratio**2)
    np.testing.assert_allclose(float(stats["ppo/policy/approxkl"]), approxkl, **TOL)
    np.testing.assert_allclose(float(stats["ppo/policy/entropy"]), 2.5, **TOL)
    returns = np.array([1.0, 0.0, 2.0, 0.0, -1.0, 0.3])
    old_values = np.array([0.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    error = (0.25 + 0.25 + 0.81 + 0.0 + 0.0 + 0.09) / 6
    expected = {
        "ppo/returns/mean": returns.mean(),
        "ppo/returns/var": returns.var(),
        "ppo/val/vpred": 1.1 / 6,
        "ppo/val/error": error,
        "ppo/val/mean": old_values.mean(),
        "ppo/val/var": old_values.var(),
        "ppo/val/var_explained": 1 - error / returns.var(),
    }
    for key, value in expected.items():
        np.testing.assert_allclose(float(stats[key]), value, err_msg=key, **TOL)


def test_ppo_loss_stat_keys():
    _, stats = _ppo_loss(**_hand_batch())
    assert set(stats) == {
        "ppo/loss/policy", "ppo/loss/value", "ppo/loss/total",
        "ppo/policy/approxkl", "ppo/policy/clipfrac",
        "ppo/returns/mean", "ppo/returns/var",
        "ppo/val/vpred", "ppo/val/error", "ppo/val/clipfrac", "ppo/val/mean", "ppo/val/var",
        "ppo/val/var_explained",
    }  # fmt: skip
    _, stats = _ppo_loss(**_hand_batch(), entropy=jnp.zeros((2, 3)))
    assert "ppo/policy/entropy" in stats


def test_ppo_loss_at_ratio_one():
    # First minibatch of an iteration: new == old, vpred == old values. Nothing clips.
    rng = np.random.default_rng(5)
    logprobs, values = jnp.asarray(_rand(rng, 4, 6)), jnp.asarray(_rand(rng, 4, 6))
    advantages, returns = jnp.asarray(_rand(rng, 4, 6)), jnp.asarray(_rand(rng, 4, 6))
    _, stats = _ppo_loss(logprobs, values, logprobs, values, advantages, returns)
    assert float(stats["ppo/policy/approxkl"]) == 0.0
    assert float(stats["ppo/policy/clipfrac"]) == 0.0
    assert float(stats["ppo/val/clipfrac"]) == 0.0
    np.testing.assert_allclose(float(stats["ppo/loss/policy"]), -np.mean(advantages), **TOL)


def test_ppo_loss_gradients():
    batch = _hand_batch()

    def loss_fn(new_logprobs, vpred):
        return _ppo_loss(**{**batch, "new_logprobs": new_logprobs, "vpred": vpred})[0]

    grad_fn = jax.jit(jax.grad(loss_fn, argnums=(0, 1)))
    g_logp, g_vpred = grad_fn(batch["new_logprobs"], batch["vpred"])
    ratio = np.array([1.5, 0.5, 1.5, 0.5, 1.1, 1.0])
    adv = np.array([1.0, 1.0, -1.0, -1.0, 2.0, 0.5])
    # d/dlogp of mean(-A * ratio) is -A * ratio / n where unclipped, 0 where the clip is active.
    active = np.array([0.0, 1.0, 1.0, 0.0, 1.0, 1.0])
    np.testing.assert_allclose(np.ravel(g_logp), -adv * ratio * active / 6, **TOL)
    # Value: 0.1 * 0.5 * 2 (vpred - R) / n where unclipped; 0 where the clipped term wins.
    vpred = np.array([0.5, 0.5, 1.1, 0.0, -1.0, 0.0])
    returns = np.array([1.0, 0.0, 2.0, 0.0, -1.0, 0.3])
    active_v = np.array([0.0, 1.0, 1.0, 0.0, 0.0, 1.0])
    np.testing.assert_allclose(np.ravel(g_vpred), 0.1 * (vpred - returns) * active_v / 6, **TOL)


def test_ppo_loss_mask():
    rng = np.random.default_rng(6)
    arrays = {
        k: jnp.asarray(0.3 * _rand(rng, 4, 6))
        for k in ("new_logprobs", "vpred", "old_logprobs", "old_values", "advantages", "returns")
    }
    entropy = jnp.asarray(np.abs(_rand(rng, 4, 6)))
    _, stats = _ppo_loss(**arrays, entropy=entropy)
    _, stats_ones = _ppo_loss(**arrays, entropy=entropy, mask=jnp.ones((4, 6)))
    for key in stats:
        np.testing.assert_allclose(float(stats_ones[key]), float(stats[key]), err_msg=key, **TOL)
    # Masking the last two tokens equals computing on the first four columns only.
    mask = jnp.asarray(np.arange(6) < 4, jnp.int32)[None].repeat(4, axis=0)
    _, stats_masked = _ppo_loss(**arrays, entropy=entropy, mask=mask)
    sliced = {k: v[:, :4] for k, v in arrays.items()}
    _, stats_sliced = _ppo_loss(**sliced, entropy=entropy[:, :4])
    for key in stats:
        np.testing.assert_allclose(
            float(stats_masked[key]), float(stats_sliced[key]), err_msg=key, **TOL
        )


def test_rollout_stats():
    rng = np.random.default_rng(7)
    scores, logprobs, ref_logprobs = _rand(rng, 5), _rand(rng, 5, 4) - 2, _rand(rng, 5, 4) - 2
    _, non_score, _ = ppo.compute_rewards(scores, logprobs, ref_logprobs, 0.2)
    stats = jax.jit(ppo.rollout_stats)(scores, logprobs, ref_logprobs, non_score, 0.2)
    lp, ref = logprobs.astype(np.float64), ref_logprobs.astype(np.float64)
    kl = np.mean(np.sum(lp - ref, axis=1))
    expected = {
        "objective/kl": kl,
        "objective/kl_coef": 0.2,
        "objective/entropy": np.mean(np.sum(-lp, axis=1)),
        "objective/score": scores.mean(),
        "objective/score_total": scores.mean() - 0.2 * kl,
    }
    assert set(stats) == set(expected)
    for key, value in expected.items():
        np.testing.assert_allclose(float(stats[key]), value, err_msg=key, **TOL)


# -- ppo.ent_coef and ppo.mask_after_stop -----------------------------------------------------


def test_entropy_bonus_hand_example_and_gradient():
    """total = pg + vf_coef * vf - ent_coef * mean(entropy); d total / d entropy = -c / N."""
    batch = _hand_batch()
    entropy = jnp.arange(6, dtype=jnp.float32).reshape(2, 3)
    base, _ = _ppo_loss(**batch, entropy=entropy)
    with_bonus = jax.jit(functools.partial(ppo.ppo_loss, **LOSS_KW, ent_coef=0.01))
    loss, stats = with_bonus(**batch, entropy=entropy)
    pg = (-1.2 - 0.5 + 1.5 + 0.8 - 2.2 - 0.5) / 6
    vf = 0.5 * (0.64 + 0.25 + 0.81 + 0.64 + 0.64 + 0.09) / 6
    np.testing.assert_allclose(float(loss), pg + 0.1 * vf - 0.01 * 2.5, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(float(loss) - float(base), -0.01 * 2.5, rtol=1e-5)
    assert float(stats["ppo/loss/total"]) == float(loss)
    grad = jax.grad(lambda e: with_bonus(**batch, entropy=e)[0])(entropy)
    np.testing.assert_allclose(np.asarray(grad), -0.01 / 6, rtol=1e-6)
    with pytest.raises(ValueError, match="ent_coef is set but no entropy"):
        ppo.ppo_loss(**batch, **LOSS_KW, ent_coef=0.01)


def test_stop_mask():
    from rlhf_jax.data import tasks

    spec = tasks.TaskSpec(query_length=2, response_length=6, truncate_token=13, truncate_after=2)
    responses = np.array([[13, 5, 5, 13, 5, 13],   # the '.' at 0 is before truncate_after
                          [5, 5, 13, 5, 5, 5],     # stop at index 2
                          [5, 5, 5, 5, 5, 5],      # no stop: invalid, keeps everything
                          [5, 5, 5, 5, 5, 13]])    # stop at the last index
    want = [[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0], [1] * 6, [1] * 6]
    np.testing.assert_array_equal(tasks.stop_mask(responses, spec), want)
    np.testing.assert_array_equal(np.asarray(tasks.stop_mask(jnp.asarray(responses), spec)), want)
    # The last kept position is exactly the token postprocess_responses keeps last.
    post = tasks.postprocess_responses(responses, spec)
    np.testing.assert_array_equal(post != spec.pad_id, np.asarray(want, bool))


def _prefix_mask(lengths, length):
    return (np.arange(length)[None] < np.asarray(lengths)[:, None]).astype(np.float32)


def test_masked_rewards_put_the_score_on_the_stop_token():
    rng = np.random.default_rng(8)
    scores, logprobs, ref_logprobs = _rand(rng, 3), _rand(rng, 3, 5), _rand(rng, 3, 5)
    mask = _prefix_mask([2, 5, 1], 5)
    rewards, non_score, kl = ppo.compute_rewards(scores, logprobs, ref_logprobs, 0.15,
                                                 jnp.asarray(mask))
    kl_ref = (logprobs.astype(np.float64) - ref_logprobs) * mask
    rewards_ref = -0.15 * kl_ref
    for row, stop in enumerate([1, 4, 0]):
        rewards_ref[row, stop] += scores[row]
    np.testing.assert_allclose(np.asarray(kl), kl_ref, **TOL)
    np.testing.assert_allclose(np.asarray(non_score), -0.15 * kl_ref, **TOL)
    np.testing.assert_allclose(np.asarray(rewards), rewards_ref, **TOL)
    # An all-ones mask is the original (score at L-1).
    unmasked = ppo.compute_rewards(scores, logprobs, ref_logprobs, 0.15)
    ones = ppo.compute_rewards(scores, logprobs, ref_logprobs, 0.15, jnp.ones((3, 5)))
    for a, b in zip(unmasked, ones):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), **TOL)


@pytest.mark.parametrize("whiten_rewards, groups", [(True, 1), (False, 1), (True, 2)])
def test_masked_advantages_are_the_truncated_episodes(whiten_rewards, groups):
    """With a mask each row is an episode of its own length: GAE on the prefix (bootstrapping 0
    after the stop), whitening statistics over the kept entries of each group, zeros after."""
    rng = np.random.default_rng(9)
    rewards, values = 0.3 * _rand(rng, 8, 6), _rand(rng, 8, 6)
    lengths = np.array([6, 1, 3, 4, 2, 6, 5, 3])
    mask = _prefix_mask(lengths, 6)
    # Anything after the stop must not matter: poison it.
    rewards_in = np.where(mask > 0, rewards, 1e3).astype(np.float32)
    values_in = np.where(mask > 0, values, -1e3).astype(np.float32)
    advantages, returns = ppo.advantages_and_returns(
        jnp.asarray(rewards_in), jnp.asarray(values_in), gamma=1.0, lam=0.95,
        whiten_rewards=whiten_rewards, whiten_groups=groups, mask=jnp.asarray(mask))
    want_adv, want_ret = np.zeros((8, 6)), np.zeros((8, 6))
    rows = np.split(np.arange(8), groups)
    for block in rows:
        kept_r = np.concatenate([rewards[i, :lengths[i]] for i in block]).astype(np.float64)
        r_mean, r_std = kept_r.mean(), np.sqrt(kept_r.var() + 1e-8)
        advs = {}
        for i in block:
            r = rewards[i:i + 1, :lengths[i]].astype(np.float64)
            if whiten_rewards:
                r = (r - r_mean) / r_std + r_mean
            adv = _np_gae(r, values[i:i + 1, :lengths[i]], 1.0, 0.95)
            want_ret[i, :lengths[i]] = adv[0] + values[i, :lengths[i]]
            advs[i] = adv[0]
        kept_a = np.concatenate(list(advs.values()))
        for i in block:
            want_adv[i, :lengths[i]] = (advs[i] - kept_a.mean()) / np.sqrt(kept_a.var() + 1e-8)
    np.testing.assert_allclose(np.asarray(advantages), want_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(returns) * mask, want_ret, rtol=1e-5, atol=1e-5)


def test_masked_whiten_empty_block_is_finite():
    got = ppo.whiten(jnp.ones((2, 3)), groups=2, mask=jnp.asarray([[1, 1, 0], [0, 0, 0]]))
    np.testing.assert_array_equal(np.asarray(got), [[0, 0, 0], [0, 0, 0]])


def test_masked_rollout_stats_sum_over_kept_tokens():
    rng = np.random.default_rng(10)
    scores, logprobs, ref_logprobs = _rand(rng, 4), _rand(rng, 4, 5) - 2, _rand(rng, 4, 5) - 2
    mask = _prefix_mask([5, 2, 3, 1], 5)
    _, non_score, _ = ppo.compute_rewards(scores, logprobs, ref_logprobs, 0.2, jnp.asarray(mask))
    stats = ppo.rollout_stats(scores, logprobs, ref_logprobs, non_score, 0.2, jnp.asarray(mask))
    lp, ref = logprobs.astype(np.float64) * mask, ref_logprobs.astype(np.float64) * mask
    kl = np.mean(np.sum(lp - ref, axis=1))
    np.testing.assert_allclose(float(stats["objective/kl"]), kl, **TOL)
    np.testing.assert_allclose(float(stats["objective/entropy"]), np.mean(np.sum(-lp, 1)), **TOL)
    np.testing.assert_allclose(float(stats["objective/score_total"]),
                               scores.mean() - 0.2 * kl, **TOL)
