"""Micro-batching helpers: strided chunks, row-wise maps and gradient accumulation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import microbatch, sharding
from tests.conftest import require_devices


def test_num_chunks():
    assert microbatch.num_chunks(16, 0) == 1 and microbatch.num_chunks(16, 16) == 1
    assert microbatch.num_chunks(16, 4) == 4
    with pytest.raises(ValueError, match="micro-batch 5 does not divide the batch of 16"):
        microbatch.num_chunks(16, 5)


def test_split_is_strided_and_merge_inverts_it():
    x = jnp.arange(12).reshape(6, 2)
    chunks = microbatch.split(x, 3)
    np.testing.assert_array_equal(np.asarray(chunks[1]), [[2, 3], [8, 9]])  # rows 1 and 4
    np.testing.assert_array_equal(np.asarray(microbatch.take(x, jnp.int32(1), 3)),
                                  np.asarray(chunks[1]))
    np.testing.assert_array_equal(np.asarray(microbatch.merge(chunks, 3)), np.asarray(x))
    assert microbatch.split(x, 1) is x


@require_devices(8)
def test_chunks_of_a_sharded_batch_stay_on_their_devices():
    """Each chunk of a batch sharded over 8 devices is itself spread over the 8 devices."""
    mesh = sharding.make_mesh()
    batch = sharding.batch_sharding(mesh)
    x = jax.device_put(jnp.arange(32.0).reshape(16, 2), batch)
    fn = jax.jit(lambda x: microbatch.map_rows(lambda a: a * 2.0, 2, x, sharding=batch))
    out = fn(x)
    np.testing.assert_array_equal(np.asarray(out), 2 * np.asarray(x))
    assert out.sharding.is_equivalent_to(batch, 2)
    hlo = fn.lower(x).compile().as_text()
    assert "all-to-all" not in hlo and "all-gather" not in hlo and "collective-permute" not in hlo


def test_accumulated_gradients_equal_the_whole_batch():
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32), "b": jnp.ones(2)}
    batch = {"x": jnp.asarray(rng.normal(size=(8, 3)), jnp.float32),
             "y": jnp.asarray(rng.normal(size=(8, 2)), jnp.float32)}

    def loss(p, b):
        err = b["x"] @ p["w"] + p["b"] - b["y"]
        return jnp.mean(err ** 2), {"mean_err": jnp.mean(err)}

    (l1, a1), g1 = jax.value_and_grad(loss, has_aux=True)(params, batch)
    (l4, a4), g4 = jax.jit(lambda p, b: microbatch.accumulate_gradients(loss, p, b, 4))(params,
                                                                                        batch)
    np.testing.assert_allclose(float(l4), float(l1), rtol=1e-6)
    np.testing.assert_allclose(float(a4["mean_err"]), float(a1["mean_err"]), rtol=1e-5)
    for k in params:
        np.testing.assert_allclose(np.asarray(g4[k]), np.asarray(g1[k]), rtol=1e-5, atol=1e-7)
