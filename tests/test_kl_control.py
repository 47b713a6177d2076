"""Tests for rlhf_jax.kl_control: controller arithmetic on Python floats and jnp scalars."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import kl_control

# Books tasks (spec §4.1): beta 0.15, target 6, horizon 10000, global batch 512.
BOOKS = kl_control.KLControllerConfig(kl_coef=0.15, adaptive=True, target=6.0, horizon=10000)


def _reference(beta, kl, n_steps, target, horizon):
    error = np.clip(kl / target - 1, -0.2, 0.2)
    return beta * (1 + error * n_steps / horizon)


@pytest.mark.parametrize(
    "current_kl, factor",
    [
        (100.0, 1.01024),  # far above target: error clipped at +0.2 -> +1.024%
        (0.0, 0.98976),  # far below: clipped at -0.2 -> -1.024%
        (6.6, 1.00512),  # error 0.1 -> +0.512%
        (6.0, 1.0),  # on target
        (4.8, 0.98976),  # error exactly -0.2
    ],
)
def test_adaptive_python_floats(current_kl, factor):
    beta = kl_control.init_kl_coef(BOOKS)
    assert isinstance(beta, float) and beta == 0.15
    new = kl_control.update_kl_coef_from_config(beta, current_kl, 512, BOOKS)
    assert isinstance(new, float)
    np.testing.assert_allclose(new, 0.15 * factor, rtol=1e-12)
    np.testing.assert_allclose(new, _reference(0.15, current_kl, 512, 6.0, 10000), rtol=1e-12)


def test_change_is_bounded():
    beta = 0.15
    for kl in np.linspace(0.0, 50.0, 101):
        new = kl_control.update_kl_coef(beta, float(kl), 512, adaptive=True, target=6, horizon=1e4)
        assert abs(new / beta - 1) <= 0.01024 + 1e-12


def test_adaptive_jnp_scalars_and_jit():
    beta = kl_control.init_kl_coef(BOOKS, dtype=jnp.float32)
    assert isinstance(beta, jax.Array) and beta.dtype == jnp.float32
    update = jax.jit(functools.partial(kl_control.update_kl_coef_from_config, config=BOOKS))
    for kl in [0.0, 3.0, 6.3, 7.2, 40.0]:
        new = update(beta, jnp.float32(kl), 512)
        assert new.dtype == jnp.float32
        np.testing.assert_allclose(float(new), _reference(0.15, kl, 512, 6.0, 10000), rtol=1e-6)
    # Mixed: Python beta with an on-device KL gives a jnp scalar.
    mixed = kl_control.update_kl_coef(0.15, jnp.float32(7.2), 512, adaptive=True, target=6.0,
                                      horizon=10000)
    assert isinstance(mixed, jax.Array)
    np.testing.assert_allclose(float(mixed), 0.15 * (1 + 0.2 * 0.0512), rtol=1e-6)


def test_repeated_updates_compound():
    beta = 0.15
    for _ in range(10):
        beta = kl_control.update_kl_coef_from_config(beta, 100.0, 512, BOOKS)
    np.testing.assert_allclose(beta, 0.15 * 1.01024**10, rtol=1e-12)


def test_fixed_controller_unchanged():
    fixed = kl_control.KLControllerConfig(kl_coef=0.03)
    beta = kl_control.init_kl_coef(fixed)
    assert kl_control.update_kl_coef_from_config(beta, 123.0, 32, fixed) == 0.03
    assert kl_control.update_kl_coef(0.03, 0.0, 32, adaptive=False) == 0.03
    beta_arr = kl_control.init_kl_coef(0.03, dtype=jnp.float32)
    out = jax.jit(lambda b, kl: kl_control.update_kl_coef(b, kl, 32, adaptive=False))(beta_arr, 5.0)
    assert float(out) == float(np.float32(0.03))


def test_invalid_configs():
    with pytest.raises(ValueError):
        kl_control.KLControllerConfig(kl_coef=0.1, adaptive=True)
    with pytest.raises(ValueError):
        kl_control.KLControllerConfig(kl_coef=0.1, adaptive=True, target=0.0, horizon=10000)
    with pytest.raises(ValueError):
        kl_control.KLControllerConfig(kl_coef=-1.0)
    with pytest.raises(ValueError):
        kl_control.update_kl_coef(0.1, 1.0, 64, adaptive=True, target=6.0)
