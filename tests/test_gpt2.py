"""GPT-2: parity with transformers' PyTorch GPT2LMHeadModel, padding semantics, KV cache, I/O."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import models
from rlhf_jax.models import hf_import

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# (n_layer, n_embd, n_head, vocab, n_positions)
TINY_CONFIGS = [(2, 64, 4, 100, 32), (3, 48, 3, 57, 40), (1, 32, 8, 211, 24)]


def _hf_model(n_layer, n_embd, n_head, vocab, n_pos, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=vocab, n_positions=n_pos,
        bos_token_id=0, eos_token_id=0, attn_implementation="eager",
    )
    model = transformers.GPT2LMHeadModel(cfg).eval()
    # Random (not default-init) LN params and biases so that every tensor is exercised.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module", params=TINY_CONFIGS, ids=lambda c: "x".join(map(str, c)))
def hf_pair(request, tmp_path_factory):
    """An HF model saved with save_pretrained and the same weights loaded into ours."""
    model = _hf_model(*request.param)
    d = str(tmp_path_factory.mktemp("hf") / "ckpt")
    model.save_pretrained(d)
    cfg, params = hf_import.load_hf_checkpoint(d)
    return model, cfg, jax.tree.map(jnp.asarray, params), d


def _hf_logits(model, ids, attention_mask=None, position_ids=None):
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(np.asarray(ids)),
            attention_mask=None if attention_mask is None else torch.tensor(attention_mask),
            position_ids=None if position_ids is None else torch.tensor(position_ids),
        )
    return out.logits.numpy()


def _our_logits(params, cfg, tokens):
    hidden, _, _ = models.forward(params, jnp.asarray(tokens), cfg)
    return np.asarray(models.logits_from_hidden(params, hidden, cfg))


def test_logits_match_transformers(hf_pair):
    model, cfg, params, _ = hf_pair
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, size=(3, cfg.n_positions))
    np.testing.assert_allclose(
        _our_logits(params, cfg, ids), _hf_logits(model, ids), atol=1e-5, rtol=1e-5
    )


def test_right_padded_layout_matches_unpadded(hf_pair):
    """The original's (query, pads, suffix) layout equals the unpadded sequence at real tokens."""
    model, cfg, params, _ = hf_pair
    rng = np.random.default_rng(1)
    query, suffix = rng.integers(0, cfg.vocab_size, 5), rng.integers(0, cfg.vocab_size, 3)
    pads = np.full(4, cfg.pad_id)
    padded = np.concatenate([query, pads, suffix])[None]
    real = np.concatenate([query, suffix])[None]
    ours = _our_logits(params, cfg, padded)
    ref = _hf_logits(model, real)
    is_real = padded[0] != cfg.pad_id
    np.testing.assert_allclose(ours[0, is_real], ref[0], atol=1e-5, rtol=1e-5)
    # Pad positions carry the state of the last real token before them (spec §1.3.4).
    np.testing.assert_allclose(ours[0, 5:9], np.repeat(ref[0, 4:5], 4, 0), atol=1e-5, rtol=1e-5)


def test_left_padding_matches_hf_with_mask(hf_pair):
    model, cfg, params, _ = hf_pair
    rng = np.random.default_rng(2)
    t, n_pad = 12, 4
    ids = rng.integers(0, cfg.vocab_size, size=(2, t))
    ids[0, :n_pad] = cfg.pad_id
    mask = (ids != cfg.pad_id).astype(np.int64)
    pos = np.clip(np.cumsum(mask, -1) - mask, 0, None)
    ref = _hf_logits(model, np.where(mask, ids, 0), attention_mask=mask, position_ids=pos)
    ours = _our_logits(params, cfg, ids)
    np.testing.assert_allclose(ours[mask == 1], ref[mask == 1], atol=1e-5, rtol=1e-5)
    # Left and right padding agree at real tokens.
    right = np.concatenate([ids[0, n_pad:], np.full(n_pad, cfg.pad_id)])[None]
    np.testing.assert_allclose(
        _our_logits(params, cfg, right)[0, : t - n_pad], ours[0, n_pad:], atol=1e-5, rtol=1e-5
    )


def test_export_loads_in_transformers_and_round_trips(hf_pair, tmp_path):
    model, cfg, params, _ = hf_pair
    params = dict(params)
    params["value_head"] = {"kernel": jnp.ones((cfg.n_embd, 1)) * 0.5, "bias": jnp.ones((1,))}
    params["reward_norm"] = {"gain": jnp.float32(2.0), "bias": jnp.float32(-1.0)}
    out = str(tmp_path / "export")
    hf_import.save_hf_checkpoint(params, cfg, out)
    cfg2, params2 = hf_import.load_hf_checkpoint(out)
    assert cfg2 == cfg
    flat1 = jax.tree_util.tree_leaves_with_path(params)
    flat2 = dict(jax.tree_util.tree_leaves_with_path(params2))
    assert len(flat1) == len(flat2)
    for path, leaf in flat1:
        np.testing.assert_array_equal(np.asarray(leaf), flat2[path])
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(out, local_files_only=True).eval()
    ids = np.random.default_rng(3).integers(0, cfg.vocab_size, size=(2, 7))
    np.testing.assert_allclose(
        _hf_logits(reloaded, ids), _hf_logits(model, ids), atol=1e-6, rtol=1e-6
    )
    with pytest.raises(FileExistsError):
        hf_import.save_hf_checkpoint(params, cfg, out)


def test_checkpoint_errors_name_the_file_and_tensor(hf_pair, tmp_path):
    _, cfg, _, ckpt = hf_pair
    with pytest.raises(hf_import.CheckpointFormatError, match="missing file"):
        hf_import.load_hf_checkpoint(str(tmp_path))
    wrong = models.GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.n_positions, n_embd=cfg.n_embd * 2,
        n_layer=cfg.n_layer, n_head=cfg.n_head,
    )
    with pytest.raises(hf_import.CheckpointFormatError, match="n_embd"):
        hf_import.load_hf_checkpoint(ckpt, expected=wrong)
    # A config.json that disagrees with the tensors' shapes.
    bad = tmp_path / "bad"
    bad.mkdir()
    os.symlink(os.path.join(ckpt, "model.safetensors"), bad / "model.safetensors")
    hf_cfg = json.load(open(os.path.join(ckpt, "config.json")))
    hf_cfg["vocab_size"] += 1
    json.dump(hf_cfg, open(bad / "config.json", "w"))
    with pytest.raises(hf_import.CheckpointFormatError, match=r"wte.weight.*shape"):
        hf_import.load_hf_checkpoint(str(bad))


def test_unknown_preset_and_bad_token_ids():
    with pytest.raises(ValueError, match="unknown GPT-2 preset '7B'"):
        models.preset("7B")
    assert models.preset("gpt2-large") == models.preset("774M")
    assert models.preset("124M").num_params() == 124_439_808
    assert models.preset("774M").num_params() == 774_030_080
    cfg = models.preset("tiny-vocab")
    params = models.init_params(cfg, jax.random.key(0))
    with pytest.raises(ValueError, match=f"token id {cfg.vocab_size} .* not the pad id"):
        models.forward(params, jnp.array([[1, cfg.vocab_size]]), cfg)
    models.forward(params, jnp.array([[1, cfg.pad_id]]), cfg)  # the pad id itself is fine


def test_heads_init():
    cfg = models.preset("tiny-vocab")
    params = models.init_params(cfg, jax.random.key(0), heads=("value", "reward"))
    assert not np.any(np.asarray(params["value_head"]["kernel"]))
    k = np.asarray(params["reward_head"]["kernel"])
    assert abs(k.std() - 1 / np.sqrt(cfg.n_embd + 1)) < 0.5 / np.sqrt(cfg.n_embd + 1)
    assert float(params["reward_norm"]["gain"]) == 1.0
    _, scalars, _ = models.forward(params, jnp.zeros((2, 3), jnp.int32), cfg)
    assert set(scalars) == {"value", "reward"}
    np.testing.assert_array_equal(np.asarray(scalars["value"]), 0.0)


def test_incremental_decoding_equals_full_forward():
    """The original's test_incremental: KV-cache decoding equals a full forward pass."""
    cfg = models.preset("tiny-vocab")
    params = models.init_params(cfg, jax.random.key(1), heads=("value",))
    rng = np.random.default_rng(4)
    ctx = rng.integers(0, cfg.vocab_size, (2, 6))
    ctx[0, 3:5] = cfg.pad_id  # mid-context padding, as in (query, pads, suffix)
    steps = rng.integers(0, cfg.vocab_size, (2, 5))
    full = np.concatenate([ctx, steps], 1)
    h_full, s_full, _ = models.forward(params, jnp.asarray(full), cfg)
    cache = models.KVCache.zeros(cfg, 2, full.shape[1])
    h, s, cache = models.forward(params, jnp.asarray(ctx), cfg, cache)
    outs, vals = [h[:, -1]], [s["value"][:, -1]]
    for t in range(steps.shape[1]):
        h, s, cache = models.forward(params, jnp.asarray(steps[:, t : t + 1]), cfg, cache)
        outs.append(h[:, -1])
        vals.append(s["value"][:, -1])
    np.testing.assert_allclose(
        np.stack(outs, 1), np.asarray(h_full[:, ctx.shape[1] - 1 :]), atol=1e-5, rtol=1e-5
    )
    np.testing.assert_allclose(
        np.stack(vals, 1), np.asarray(s_full["value"][:, ctx.shape[1] - 1 :]), atol=1e-5
    )


def test_mask_invariance():
    """The original's test_mask: random gaps of pads leave the outputs at real tokens unchanged."""
    cfg = models.preset("tiny-vocab")
    params = models.init_params(cfg, jax.random.key(2))
    rng = np.random.default_rng(5)
    real = rng.integers(0, cfg.vocab_size, (3, 10))
    ref = _our_logits(params, cfg, real)
    for trial in range(3):
        gapped = np.full((3, 20), cfg.pad_id)
        for b in range(3):
            slots = np.sort(rng.choice(np.arange(1, 20), 9, replace=False))
            gapped[b, 0] = real[b, 0]  # position 0 stays real, as the original asserts
            gapped[b, slots] = real[b, 1:]
        out = _our_logits(params, cfg, gapped)
        np.testing.assert_allclose(
            out[gapped != cfg.pad_id].reshape(3, 10, -1), ref, atol=1e-5, rtol=1e-5
        )


def test_bf16_compute_keeps_fp32_params_and_logits():
    cfg = models.preset("tiny-vocab", dtype="bfloat16")
    params = models.init_params(cfg, jax.random.key(0))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 8)))
    logits = _our_logits(params, cfg, tokens)
    assert logits.dtype == np.float32
    ref = _our_logits(params, models.preset("tiny-vocab"), tokens)
    assert np.abs(logits - ref).max() < 0.05


def test_remat_gives_same_gradients():
    cfg = models.preset("tiny-vocab")
    cfg_remat = models.preset("tiny-vocab", remat=True)
    params = models.init_params(cfg, jax.random.key(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 8)))

    def loss(p, c):
        h, _, _ = models.forward(p, tokens, c)
        return models.logits_from_hidden(p, h, c).std()

    g1 = jax.grad(loss)(params, cfg)
    g2 = jax.grad(loss)(params, cfg_remat)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5)


def _masks(rng, b, t):
    """Causal masks with padded keys: mid-sequence pads, and a leading pad (a query whose keys
    are all masked)."""
    real = rng.random((b, t)) > 0.3
    real[:, 1] = True
    real[0, 0] = False  # left padding: query 0 of row 0 sees no key at all
    causal = np.tril(np.ones((t, t), bool))
    return jnp.asarray((real[:, None, :] & causal[None])[:, None])


def test_fused_attention_equals_the_unfused_reference():
    """jax.nn.dot_product_attention with our masks = the textbook computation (both dtypes)."""
    from rlhf_jax.models import attention

    rng = np.random.default_rng(0)
    b, t, h, d = 3, 9, 2, 8
    q, k, v = (jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.float32) for _ in range(3))
    mask = _masks(rng, b, t)
    with jax.default_matmul_precision("highest"):
        ref = attention.reference_attention(q, k, v, mask)
        got = attention.full_attention(q, k, v, mask, implementation="xla")
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-6, rtol=1e-6)
    # The fully masked query attends uniformly, as the original's -1e10 makes it.
    np.testing.assert_allclose(np.asarray(got[0, 0]), np.asarray(v[0].mean(0)), atol=1e-6)
    bf = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    got16 = attention.full_attention(*bf, mask, implementation="xla")
    ref16 = attention.reference_attention(*bf, mask)
    assert got16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got16, np.float32), np.asarray(ref16, np.float32),
                               atol=2e-2)
    # The cached path over a [batch, heads, slots, head_dim] cache gives the same numbers.
    cached = attention.cached_attention(q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), mask)
    np.testing.assert_allclose(np.asarray(cached), np.asarray(ref), atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="attention implementation 'flash'"):
        attention.full_attention(q, k, v, mask, implementation="flash")


def test_prefill_equals_forward_into_an_empty_cache():
    """`models.prefill` (fused, the context only) = `forward` with a zero cache (every slot)."""
    cfg = models.preset("tiny-vocab")
    params = models.init_params(cfg, jax.random.key(3), heads=("value",))
    rng = np.random.default_rng(6)
    ctx = rng.integers(0, cfg.vocab_size, (2, 7))
    ctx[1, 2:5] = cfg.pad_id
    h1, s1, c1 = models.prefill(params, jnp.asarray(ctx), cfg, 11)
    h2, s2, c2 = models.forward(params, jnp.asarray(ctx), cfg, models.KVCache.zeros(cfg, 2, 11))
    assert h1.shape == (2, 1, cfg.n_embd)  # the last position only: all a sampler reads
    np.testing.assert_allclose(np.asarray(h1), np.asarray(h2[:, -1:]), atol=1e-6)
    np.testing.assert_allclose(np.asarray(s1["value"]), np.asarray(s2["value"][:, -1:]),
                               atol=1e-6)
    for a, b in zip(c1.k + c1.v, c2.k + c2.v):
        assert a.shape == (2, cfg.n_head, 11, cfg.head_dim)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    for f in ("mask", "positions", "index"):
        np.testing.assert_array_equal(np.asarray(getattr(c1, f)), np.asarray(getattr(c2, f)))
    with pytest.raises(ValueError, match="max_len=5 is shorter than the context"):
        models.prefill(params, jnp.asarray(ctx), cfg, 5)


def test_out_positions_equal_the_full_forward_at_those_positions():
    """Only the last block is pruned; pad positions still carry the last real state forward,
    and gradients through the pruned forward equal those through the full one (with remat, the
    large presets' default; without it the PPO alignment tests cover the pruned forward)."""
    cfg = models.preset("tiny-vocab", remat=True)
    params = models.init_params(cfg, jax.random.key(4), heads=("value",))
    rng = np.random.default_rng(7)
    tokens = rng.integers(0, cfg.vocab_size, (2, 9))
    tokens[0, 5:7] = cfg.pad_id
    tokens[1, -1] = cfg.pad_id
    pos = jnp.asarray([[4, 5, 6, 8], [0, 3, 7, 8]], jnp.int32)
    tokens = jnp.asarray(tokens)

    def full(p):
        h, s, _ = models.forward(p, tokens, cfg)
        take = lambda a: jnp.take_along_axis(a, pos.reshape(pos.shape + (1,) * (a.ndim - 2)),
                                             axis=1)  # noqa: E731
        return take(h), take(s["value"])

    def pruned(p):
        h, s, _ = models.forward(p, tokens, cfg, out_positions=pos)
        return h, s["value"]

    for a, b in zip(full(params), pruned(params)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=1e-5)
    loss = lambda f: lambda p: jnp.sum(jnp.tanh(f(p)[0])) + jnp.sum(f(p)[1])  # noqa: E731
    for a, b in zip(jax.tree.leaves(jax.grad(loss(full))(params)),
                    jax.tree.leaves(jax.grad(loss(pruned))(params))):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=1e-4)


def test_float32_means_highest_precision_matmuls_and_dtype_is_validated():
    """dtype=float32 traces every matmul (attention included, backward too) at HIGHEST, so
    GPUs and TPUs do not silently run TF32 / one bfloat16 pass; bfloat16 leaves the default."""
    import re

    def precisions(dtype):
        cfg = models.preset("tiny-vocab", dtype=dtype)
        params = models.init_params(cfg, jax.random.key(0), heads=("value",))
        tokens = jnp.zeros((2, 5), jnp.int32)

        def f(p):
            h, s, _ = models.forward(p, tokens, cfg)
            return models.logits_from_hidden(p, h, cfg).sum() + s["value"].sum()

        text = str(jax.make_jaxpr(jax.grad(f))(params))
        return text.count("dot_general["), len(re.findall(r"precision=\(Precision.HIGHEST", text))

    n_dots, n_highest = precisions("float32")
    assert n_dots > 20 and n_highest == n_dots
    assert precisions("bfloat16")[1] == 0
    with pytest.raises(ValueError, match="dtype='float16'"):
        models.preset("tiny-vocab", dtype="float16")
