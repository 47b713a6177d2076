"""Sampler bookkeeping, alignment with the full forward pass, truncation filters, sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import models, sampling, sharding
from tests.conftest import require_devices

CFG = models.preset("tiny-vocab")


@pytest.fixture(scope="module")
def policy_params():
    return models.init_params(CFG, jax.random.key(0), heads=("value",))


def _context(batch=8, length=6, seed=0):
    rng = np.random.default_rng(seed)
    ctx = rng.integers(0, CFG.vocab_size, (batch, length))
    ctx[::2, 3:5] = CFG.pad_id  # the original's (query, pads, suffix) layout on half the rows
    return jnp.asarray(ctx, jnp.int32)


def test_sample_sequence_bookkeeping():
    """The original's test_sample_sequence: a model that always predicts previous token + 1.

    From contexts [[5, 0], [4, 3]], sampling 4 tokens gives [[1, 2, 3, 4], [4, 5, 6, 7]]. The
    first token comes from the context's last logits.
    """
    v = 16
    cfg = models.GPT2Config(vocab_size=v, n_positions=16, n_embd=v, n_layer=1, n_head=1)
    params = jax.tree.map(jnp.zeros_like, models.init_params(cfg, jax.random.key(0)))
    tr = params["transformer"]
    eye = jnp.eye(v, dtype=jnp.float32)
    tr["wte"] = eye  # one-hot embeddings; wpe, attention and biases are zero
    tr["h_0"]["ln_2"]["scale"] = jnp.ones(v)
    tr["ln_f"]["scale"] = jnp.ones(v)
    # The MLP maps one-hot(i) to a large one-hot(i + 1 mod v), which then dominates the residual
    # stream, so the tied head puts its maximum on token i + 1.
    shift = jnp.roll(eye, 1, axis=1)  # row i -> column i + 1
    tr["h_0"]["mlp"]["c_fc"]["kernel"] = jnp.zeros((v, 4 * v)).at[:, :v].set(10.0 * shift)
    tr["h_0"]["mlp"]["c_proj"]["kernel"] = jnp.zeros((4 * v, v)).at[:v].set(100.0 * eye)
    out = sampling.sample(
        params, jnp.array([[5, 0], [4, 3]]), jax.random.key(0), config=cfg, response_length=4,
        temperature=1e-3,
    )
    np.testing.assert_array_equal(np.asarray(out["responses"]), [[1, 2, 3, 4], [4, 5, 6, 7]])
    np.testing.assert_allclose(np.asarray(out["logprobs"]), 0.0, atol=1e-4)


def test_logprobs_and_values_match_full_forward(policy_params):
    """Sampling-time logprobs/values equal a full forward over context ‖ response (spec §10.2)."""
    ctx = _context()
    temp = 0.7
    out = jax.jit(
        lambda p, c, k: sampling.sample(p, c, k, config=CFG, response_length=5, temperature=temp)
    )(policy_params, ctx, jax.random.key(1))
    full = jnp.concatenate([ctx, out["responses"]], axis=1)
    hidden, scalars, _ = models.forward(policy_params, full, CFG)
    logits = models.logits_from_hidden(policy_params, hidden, CFG)[:, ctx.shape[1] - 1 : -1]
    logp = jax.nn.log_softmax(logits / temp, axis=-1)
    ref = jnp.take_along_axis(logp, out["responses"][..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(out["logprobs"]), np.asarray(ref), atol=1e-5)
    ref_v = scalars["value"][:, ctx.shape[1] - 1 : -1]
    np.testing.assert_allclose(np.asarray(out["values"]), np.asarray(ref_v), atol=1e-5)
    assert out["responses"].shape == (8, 5)
    assert int(out["responses"].max()) < CFG.vocab_size


def test_top_p_and_top_k_match_original_expectations():
    logits = jnp.array([[1, 1.01, 1.001, 0, 0, 0, 2]], jnp.float32)
    kept = lambda f: set(np.flatnonzero(np.asarray(f)[0] > -1e9).tolist())  # noqa: E731
    assert kept(sampling.filter_logits(logits, top_p=1.0)) == set(range(7))
    assert kept(sampling.filter_logits(logits, top_p=0.0)) == {6}
    assert kept(sampling.filter_logits(logits, top_p=0.7)) == {6, 1, 2}
    assert kept(sampling.filter_logits(logits, top_p=0.6)) == {6, 1}
    assert kept(sampling.filter_logits(logits, top_p=0.5)) == {6}
    assert kept(sampling.filter_logits(logits, top_k=2)) == {6, 1}


@require_devices(8)
def test_sharded_sampling_is_reproducible_and_mesh_independent(policy_params):
    mesh = sharding.make_mesh(data=2, fsdp=-1)
    rules = sharding.DEFAULT_RULES
    p_shard = sharding.param_shardings(CFG, ("value",), mesh, rules)
    b_shard = sharding.batch_sharding(mesh)
    params = jax.device_put(policy_params, p_shard)
    ctx = jax.device_put(_context(16), b_shard)
    with sharding.mesh_context(mesh, rules):
        fn = sampling.make_sampler(
            CFG, response_length=6, temperature=0.7, params_sharding=p_shard, batch_sharding=b_shard
        )
        a = fn(params, ctx, jax.random.key(3))
        b = fn(params, ctx, jax.random.key(3))
        c = fn(params, ctx, jax.random.key(4))
    assert a["responses"].sharding.spec == b_shard.spec
    np.testing.assert_array_equal(np.asarray(a["responses"]), np.asarray(b["responses"]))
    assert not np.array_equal(np.asarray(a["responses"]), np.asarray(c["responses"]))
    # Rows differ from each other (each shard draws its own numbers), and the result equals the
    # unsharded single-device sampler's.
    single = sampling.sample(
        policy_params, _context(16), jax.random.key(3), config=CFG, response_length=6,
        temperature=0.7,
    )
    np.testing.assert_array_equal(np.asarray(a["responses"]), np.asarray(single["responses"]))
    np.testing.assert_allclose(np.asarray(a["logprobs"]), np.asarray(single["logprobs"]), atol=1e-5)
    rows = {tuple(r) for r in np.asarray(a["responses"]).tolist()}
    assert len(rows) > 8
    # Sampled in 2 strided chunks of 8 rows (micro-batching), on the same mesh: same samples.
    with sharding.mesh_context(mesh, rules):
        chunked = jax.jit(lambda p, c, k: sampling.sample(
            p, c, k, config=CFG, response_length=6, temperature=0.7, num_chunks=2),
            in_shardings=(p_shard, b_shard, None), out_shardings=b_shard)(
            params, ctx, jax.random.key(3))
    np.testing.assert_array_equal(np.asarray(chunked["responses"]), np.asarray(a["responses"]))
    np.testing.assert_allclose(np.asarray(chunked["logprobs"]), np.asarray(a["logprobs"]),
                               atol=1e-5)
    np.testing.assert_allclose(np.asarray(chunked["values"]), np.asarray(a["values"]), atol=1e-6)


def test_prefill_and_decode_compile_once_and_decode_never_copies_the_cache(policy_params):
    """Two programs, each traced once per shape; the decode loop updates the donated cache in
    place and never copies or transposes it (a [batch, slots, heads, head_dim] cache made XLA
    transpose every layer's keys and values at every step)."""
    import chex

    s = sampling.SamplerSettings(CFG, response_length=5, temperature=0.7)
    prefill = jax.jit(chex.assert_max_traces(lambda p, c, k: sampling.prefill(p, c, k, s), n=1))
    decode = jax.jit(chex.assert_max_traces(
        lambda p, cache, first, k: sampling.decode(p, dict(first, cache=cache), k, s), n=1),
        donate_argnums=(1,))
    outs = []
    for i in range(3):
        state = prefill(policy_params, _context(seed=i), jax.random.key(i))
        cache = state.pop("cache")
        outs.append(decode(policy_params, cache, state, jax.random.key(i))[0]["responses"])
        assert cache.k[0].is_deleted()  # donated to the decode loop
    assert len({np.asarray(o).tobytes() for o in outs}) == 3
    state = prefill(policy_params, _context(), jax.random.key(0))
    cache = state.pop("cache")
    hlo = decode.lower(policy_params, cache, state, jax.random.key(0)).compile().as_text()
    assert cache_copies(hlo, cache.k[0].shape) == []


def cache_copies(hlo: str, shape) -> list[str]:
    """HLO instructions that copy or transpose an array with the dimensions of `shape`."""
    import re

    out = []
    for m in re.finditer(r"%([\w.-]+) = \w+\[([\d,]+)\]\S* ([\w-]+)\(", hlo):
        name, dims, op = m.groups()
        moves = op in ("copy", "transpose") or (op == "fusion" and re.search("copy|transpose",
                                                                              name))
        if moves and sorted(int(x) for x in dims.split(",")) == sorted(shape):
            out.append(m.group(0))
    return out


@require_devices(8)
def test_param_shardings_are_fsdp_and_sufficient():
    cfg = models.preset("tiny")
    mesh = sharding.make_mesh()
    shardings = sharding.param_shardings(cfg, ("value",), mesh, sharding.DEFAULT_RULES)
    tr = shardings["transformer"]
    assert tr["wte"].spec == jax.sharding.PartitionSpec(None, "fsdp")
    assert tr["h_0"]["mlp"]["c_fc"]["kernel"].spec == jax.sharding.PartitionSpec("fsdp", None)
    abstract = jax.eval_shape(lambda: models.init_params(cfg, jax.random.key(0), ("value",)))
    assert sharding.unsharded_fraction(shardings, abstract) < 0.02
    sharding.assert_sufficiently_sharded(shardings, abstract)
    no_fsdp = tuple((k, None) if k == "embed" else (k, v) for k, v in sharding.DEFAULT_RULES)
    bad = sharding.param_shardings(cfg, ("value",), mesh, no_fsdp)
    with pytest.raises(ValueError, match="replicated on every device"):
        sharding.assert_sufficiently_sharded(bad, abstract)
    with pytest.raises(ValueError, match="3 x fsdp"):
        sharding.make_mesh(data=3, fsdp=3)
    with pytest.raises(ValueError, match="ppo.batch_size=12 is not divisible by the 8 devices"):
        sharding.check_batch_divisible("ppo.batch_size", 12, mesh)


def test_categorical_matches_the_distribution_and_never_draws_masked_entries():
    """Inverse-CDF draws: frequencies match softmax within 4.5 standard errors, entries of
    probability 0 (masked, padding of the last block, the very first entry) are never drawn."""
    vocab = 3 * sampling.CDF_BLOCK + 17  # a partial last block
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, vocab).astype(np.float32)
    logits[0] = logits[sampling.CDF_BLOCK - 1] = logits[-1] = models.gpt2.MASK_VALUE
    logits[5], logits[2 * sampling.CDF_BLOCK + 3] = 6.0, 5.5  # two likely entries, two blocks
    n = 200_000
    draws = np.asarray(jax.jit(jax.vmap(sampling.categorical, in_axes=(0, None)))(
        jax.random.split(jax.random.key(0), n), jnp.asarray(logits)))
    assert draws.min() >= 0 and draws.max() < vocab
    counts = np.bincount(draws, minlength=vocab)
    assert counts[0] == counts[sampling.CDF_BLOCK - 1] == counts[-1] == 0
    p = np.asarray(jax.nn.softmax(jnp.asarray(logits)))
    for i in (5, 2 * sampling.CDF_BLOCK + 3, int(np.argsort(p)[-3])):
        se = np.sqrt(p[i] * (1 - p[i]) / n)
        assert abs(counts[i] / n - p[i]) < 4.5 * se, (i, counts[i] / n, p[i])
    # The rest of the mass, pooled per block, matches too.
    for b in range(4):
        sl = slice(b * sampling.CDF_BLOCK, (b + 1) * sampling.CDF_BLOCK)
        q = p[sl].sum()
        assert abs(counts[sl].sum() / n - q) < 4.5 * np.sqrt(q * (1 - q) / n) + 1e-6, b
    # Batched logits: one independent draw per row, same shapes.
    rows = jnp.stack([jnp.asarray(logits)] * 3)
    assert sampling.categorical(jax.random.key(1), rows).shape == (3,)
