"""Tests for rlhf_jax.optim against float64 numpy references of TF1 and PyTorch Adam."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax import optim

B1, B2, EPS = 0.9, 0.999, 1e-5


def _tf_adam_reference(params, grads_seq, lrs, b1=B1, b2=B2, eps=EPS):
    """TF1 AdamOptimizer in float64, written from the TF1 documentation."""
    theta = {k: v.astype(np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in theta.items()}
    v = {k: np.zeros_like(x) for k, x in theta.items()}
    for t, (grads, lr) in enumerate(zip(grads_seq, lrs), start=1):
        lr_t = lr * np.sqrt(1 - b2**t) / (1 - b1**t)
        for k in theta:
            g = grads[k].astype(np.float64)
            m[k] = b1 * m[k] + (1 - b1) * g
            v[k] = b2 * v[k] + (1 - b2) * g * g
            theta[k] = theta[k] - lr_t * m[k] / (np.sqrt(v[k]) + eps)
    return theta


def _torch_adam_reference(params, grads_seq, lrs, b1=B1, b2=B2, eps=EPS):
    """PyTorch-style Adam in float64: eps added to sqrt of the bias-corrected v."""
    theta = {k: v.astype(np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in theta.items()}
    v = {k: np.zeros_like(x) for k, x in theta.items()}
    for t, (grads, lr) in enumerate(zip(grads_seq, lrs), start=1):
        for k in theta:
            g = grads[k].astype(np.float64)
            m[k] = b1 * m[k] + (1 - b1) * g
            v[k] = b2 * v[k] + (1 - b2) * g * g
            m_hat, v_hat = m[k] / (1 - b1**t), v[k] / (1 - b2**t)
            theta[k] = theta[k] - lr * m_hat / (np.sqrt(v_hat) + eps)
    return theta


def _problem(seed, n_steps, grad_scale):
    """Zero params (Adam ignores their values) so that float32 rounding of large parameter
    values cannot hide errors in the small accumulated updates."""
    rng = np.random.default_rng(seed)
    params = {"w": np.zeros((3, 4), np.float32), "b": np.zeros((5,), np.float32)}
    grads_seq = [
        {k: (grad_scale * rng.normal(size=p.shape)).astype(np.float32) for k, p in params.items()}
        for _ in range(n_steps)
    ]
    return params, grads_seq


def _run(tx, params, grads_seq):
    update = jax.jit(tx.update)
    state = tx.init(params)
    p = jax.tree.map(jnp.asarray, params)
    for grads in grads_seq:
        updates, state = update(grads, state, p)
        p = optax.apply_updates(p, updates)
    return p, state


def _assert_close(actual, expected):
    for k in expected:
        np.testing.assert_allclose(np.asarray(actual[k]), expected[k], rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("grad_scale", [1.0, 1e-4])
def test_tf_adam_matches_reference(grad_scale):
    # grad_scale=1e-4 makes sqrt(v) comparable to eps, where the eps placement matters most.
    lr = 1e-2
    params, grads_seq = _problem(0, 6, grad_scale)
    got, _ = _run(optim.make_optimizer(lr, adam_style="tf"), params, grads_seq)
    _assert_close(got, _tf_adam_reference(params, grads_seq, [lr] * 6))


def test_scale_by_adam_tf_direction_and_state():
    params, grads_seq = _problem(1, 3, 1.0)
    tx = optim.scale_by_adam_tf()
    state = tx.init(params)
    assert jax.tree.structure(state.mu) == jax.tree.structure(params)
    assert jax.tree.structure(state.nu) == jax.tree.structure(params)
    assert state.count.dtype == jnp.int32 and int(state.count) == 0
    updates, state = jax.jit(tx.update)(grads_seq[0], state)
    assert int(state.count) == 1
    # First step: m = 0.1 g, v = 0.001 g^2, alpha = sqrt(0.001) / 0.1, so u = g / (|g| + eps / ...)
    # which is ~sign(g) for |g| >> eps; it points along the gradient (lr scaling flips it).
    g = grads_seq[0]["w"].astype(np.float64)
    expected = np.sqrt(1e-3) / 0.1 * 0.1 * g / (np.sqrt(1e-3) * np.abs(g) + EPS)
    np.testing.assert_allclose(np.asarray(updates["w"]), expected, rtol=1e-6, atol=1e-6)


def test_pytorch_style_is_optax_adam():
    lr = 1e-2
    params, grads_seq = _problem(2, 4, 1e-4)
    torch_style, _ = _run(optim.make_optimizer(lr, adam_style="pytorch"), params, grads_seq)
    plain_optax, _ = _run(optax.adam(lr, b1=B1, b2=B2, eps=EPS), params, grads_seq)
    for k in params:
        np.testing.assert_array_equal(np.asarray(torch_style[k]), np.asarray(plain_optax[k]))
    # Same gradients, visibly different trajectory from the TF style.
    tf_style, _ = _run(optim.make_optimizer(lr, adam_style="tf"), params, grads_seq)
    tf_ref = _tf_adam_reference(params, grads_seq, [lr] * 4)
    torch_ref = _torch_adam_reference(params, grads_seq, [lr] * 4)
    for k in params:
        assert np.abs(np.asarray(torch_style[k]) - np.asarray(tf_style[k])).max() > 1e-3
        assert np.abs(torch_ref[k] - tf_ref[k]).max() > 1e-3


def test_eps_placement_on_constant_gradient():
    # With a constant gradient g, m_t = g (1 - b1^t) and v_t = g^2 (1 - b2^t), so the steps are
    #   TF:      lr * g / (|g| + eps / sqrt(1 - b2^t))
    #   PyTorch: lr * g / (|g| + eps)
    # For |g| = 1e-4 = 10 eps, TF's effective eps is ~32x larger at t=1 (a ~3.8x smaller step)
    # and still ~14x larger at t=5 (a ~2.2x smaller step).
    lr, n = 1e-2, 5
    g = float(np.float32(1e-4))  # the value the float32 gradient actually holds
    params = {"x": np.zeros((), np.float32)}
    grads_seq = [{"x": np.float32(g)} for _ in range(n)]
    tx_tf = optim.make_optimizer(lr, adam_style="tf")
    tx_torch = optim.make_optimizer(lr, adam_style="pytorch")
    state_tf, state_torch = tx_tf.init(params), tx_torch.init(params)
    for t in range(1, n + 1):
        step_tf, state_tf = tx_tf.update(grads_seq[t - 1], state_tf)
        step_torch, state_torch = tx_torch.update(grads_seq[t - 1], state_torch)
        expected_tf = -lr * g / (g + EPS / np.sqrt(1 - B2**t))
        expected_torch = -lr * g / (g + EPS)
        np.testing.assert_allclose(float(step_tf["x"]), expected_tf, rtol=1e-6)
        assert float(step_torch["x"]) / float(step_tf["x"]) > 2.0
        assert expected_torch / expected_tf > 2.0
    # The reference implementations agree with the closed forms.
    tf_ref = _tf_adam_reference(params, grads_seq[:1], [lr])["x"]
    torch_ref = _torch_adam_reference(params, grads_seq[:1], [lr])["x"]
    np.testing.assert_allclose(tf_ref, -lr * g / (g + EPS / np.sqrt(1 - B2)), rtol=1e-12)
    np.testing.assert_allclose(torch_ref, -lr * g / (g + EPS), rtol=1e-12)


def test_gradient_clipping():
    lr = 1e-2
    params, grads_seq = _problem(3, 4, 10.0)
    max_norm = 1.0
    clipped = []
    for grads in grads_seq:
        norm = np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in grads.values()))
        clipped.append({k: g * min(1.0, max_norm / norm) for k, g in grads.items()})
    tx = optim.make_optimizer(lr, adam_style="tf", max_grad_norm=max_norm)
    got, _ = _run(tx, params, grads_seq)
    _assert_close(got, _tf_adam_reference(params, clipped, [lr] * 4))


def test_bad_arguments():
    with pytest.raises(ValueError, match="adamw_typo"):
        optim.make_optimizer(1e-3, adam_style="adamw_typo")
    with pytest.raises(ValueError):
        optim.make_optimizer(1e-3, max_grad_norm=0.0)
    with pytest.raises(ValueError, match="step"):
        optim.reward_lr_schedule(1e-3, 10, kind="step")
    with pytest.raises(ValueError):
        optim.ppo_lr_schedule(1e-3, 0, 4)


def test_ppo_lr_schedule_values():
    lr, num_updates, steps_per_update = 1e-5, 5, 4
    schedule = optim.ppo_lr_schedule(lr, num_updates, steps_per_update)
    got = np.array([float(schedule(jnp.int32(s))) for s in range(num_updates * steps_per_update)])
    expected = np.array([lr * (1 - (s // steps_per_update) / num_updates) for s in range(20)])
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    # Constant within an iteration, and the last iteration still trains at lr / num_updates.
    assert np.all(got.reshape(num_updates, steps_per_update) == got[::steps_per_update, None])
    np.testing.assert_allclose(got[-1], lr / num_updates, rtol=1e-6)
    assert float(schedule(10_000)) == 0.0  # floored, never negative


def test_reward_lr_schedule_values():
    lr, n = 5e-5, 8
    linear = optim.reward_lr_schedule(lr, n)
    cosine = optim.reward_lr_schedule(lr, n, kind="cosine")
    steps = np.arange(n + 1)
    np.testing.assert_allclose(
        [float(linear(s)) for s in steps], lr * (1 - steps / n), rtol=1e-6, atol=1e-12
    )
    np.testing.assert_allclose(
        [float(cosine(s)) for s in steps],
        lr * 0.5 * (1 + np.cos(np.pi * steps / n)),
        rtol=1e-6,
        atol=1e-12,
    )


def test_schedule_drives_optimizer():
    # The schedule sees the 0-based Adam step: steps 0..3 use iteration 0's lr, 4..7 iteration 1's.
    lr, num_updates, spu = 1e-2, 2, 4
    params, grads_seq = _problem(4, 8, 1.0)
    tx = optim.make_optimizer(optim.ppo_lr_schedule(lr, num_updates, spu), adam_style="tf")
    got, state = _run(tx, params, grads_seq)
    lrs = [lr * (1 - (s // spu) / num_updates) for s in range(8)]
    _assert_close(got, _tf_adam_reference(params, grads_seq, lrs))
    assert int(state[0].count) == 8
