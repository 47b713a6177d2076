"""Analytic FLOPs against hand-computed numbers, the peak table, and MFU."""

import importlib.util

import pytest

from rlhf_jax import flops, models

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None

# L=1, d=4, V=10: per token 24*d^2 = 384 (matmuls), 4*d = 16 per key, 2*d*V = 80 per logit row.
SMALL = models.GPT2Config(vocab_size=10, n_positions=16, n_embd=4, n_layer=1, n_head=2)


def test_forward_flops_by_hand():
    cfg = models.preset("tiny-vocab")  # L=2, d=32, V=96
    matmuls = 2 * 12 * 32 * 32 * 2 * 10
    attention = 2 * 2 * 32 * 2 * 10 * 10
    lm_head = 2 * 32 * 96 * 3
    assert flops.forward_flops(cfg, tokens=10, keys=10, lm_head_positions=3) == (
        matmuls + attention + lm_head) == 535_552


def test_matmul_flops_are_twice_the_non_embedding_params():
    """The usual 2N per token: N = GPT-2's weights outside the embeddings (biases aside)."""
    for name in ("124M", "774M", "1.5B"):
        cfg = models.preset(name)
        non_embedding = cfg.num_params() - (cfg.vocab_size + cfg.n_positions) * cfg.n_embd
        per_token = flops.forward_flops(cfg, tokens=1, keys=0)
        assert per_token == pytest.approx(2 * non_embedding, rel=2e-3)


def test_ppo_iteration_flops_by_hand():
    # batch 2, query 3, response 2, 1 epoch.
    # sample: prefill of 3 tokens against themselves with logits once (3*384 + 16*3*3 + 80
    #   = 1376), then 1 decode step against a 4-slot cache with logits once (384 + 16*4 + 80
    #   = 528): 1904 per rollout
    # reference: 5 tokens against 5 keys, logits at the 2 response positions: 2480
    # reward: 5 tokens, no LM head: 2320
    # update: 3 * 1 epoch * reference forward = 7440 per rollout
    out = flops.ppo_iteration_flops(SMALL, 2, 3, 2, 1)
    assert out == {"sample": 3808.0, "value": 0.0, "reference": 4960.0, "reward": 4640.0,
                   "update": 14880.0, "total": 28288.0}
    assert flops.prefill_flops(SMALL, 3) == 1376 and flops.decode_flops(SMALL, 3, 2) == 528


def test_ppo_iteration_flops_context_and_separate_value():
    # A 2-token suffix: the policy sees 5 + 2 = 7 tokens, the reward model still 3 + 2 = 5.
    out = flops.ppo_iteration_flops(SMALL, 1, 3, 2, 2, context_len=5, separate_value=True)
    sample = (5 * 384 + 16 * 5 * 5 + 80) + (384 + 16 * 6 + 80)
    policy = 7 * 384 + 16 * 7 * 7 + 80 * 2
    value = 7 * 384 + 16 * 7 * 7
    reward = 5 * 384 + 16 * 5 * 5
    assert out["sample"] == sample and out["reference"] == policy
    assert out["value"] == value and out["reward"] == reward
    assert out["update"] == 3 * 2 * (policy + value)
    assert out["total"] == sample + policy + value + reward + 3 * 2 * (policy + value)


def test_ppo_iteration_flops_774m_sentiment_magnitude():
    """774M, batch 512, 64 + 24 tokens: about 6 * 2N per token over 4 epochs plus the rollout."""
    cfg = models.preset("774M")
    out = flops.ppo_iteration_flops(cfg, 512, 64, 24, 4)
    # update: 3 * 4 epochs * 512 * 88 tokens * (2N + attention) + the LM head at 24 positions
    # per rollout; 2N = 1.416e9 for 774M's 708M non-embedding weights.
    assert out["update"] == pytest.approx(3 * 4 * 512 * (88 * 1.416e9 + 24 * 2 * 1280 * 50257),
                                          rel=0.02)
    assert out["total"] == pytest.approx(sum(v for k, v in out.items() if k != "total"))


def test_reward_step_flops_by_hand():
    # 2 labels x 4 samples of 5 tokens, no LM head, trained: 3 * 8 * 2320.
    assert flops.reward_step_flops(SMALL, 2, 3, 2) == 3 * 8 * 2320


def test_ppo_iteration_tokens():
    assert flops.ppo_iteration_tokens(512, 64, 24) == 512 * 88


def test_peak_flops_table():
    assert flops.peak_flops("TPU v5 lite") == 197e12
    # model.dtype=float32 runs Precision.HIGHEST: 6 bfloat16 passes on TPU, FP32 cores on GPUs.
    assert flops.peak_flops("TPU v3", "float32") == flops.peak_flops("TPU v3") / 6
    assert flops.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert flops.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert flops.peak_flops("NVIDIA H200", "float32") == 67e12
    assert flops.peak_flops("NVIDIA A100-SXM4-40GB") == 312e12
    assert flops.peak_flops("cpu") is None
    with pytest.raises(ValueError, match="dtype"):
        flops.peak_flops("TPU v4", "float16")


def test_decode_step_bytes_by_hand():
    # SMALL in float32: (12*16*1 + 10*4) weights * 4 bytes + 2*1 layer * 2 rows * 4 slots * 4 * 4
    assert flops.decode_step_bytes(SMALL, 2, 3, 2) == (12 * 16 + 40) * 4 + 2 * 2 * 4 * 4 * 4
    bf16 = models.GPT2Config(**{**vars(SMALL), "dtype": "bfloat16"})
    assert flops.decode_step_bytes(bf16, 2, 3, 2) == (12 * 16 + 40) * 2 + 2 * 2 * 4 * 4 * 2
    assert flops.device_spec("NVIDIA H100 80GB HBM3").hbm_bandwidth == 3.35e12


def test_mfu():
    # 1e15 model FLOPs in 2 s on 8 v5e chips of 197 TFLOP/s.
    assert flops.mfu(1e15, 2.0, "TPU v5 lite", 8) == pytest.approx(1e15 / 2 / (8 * 197e12))
    assert flops.mfu(1e15, 2.0, "cpu", 8) is None
    assert flops.mfu(1e15, 0.0, "TPU v4", 4) is None


def test_throughput_metrics():
    tp = flops.Throughput(8e12, 1000, "TPU v4", 4, "bfloat16")
    out = tp(2.0)
    assert out["perf/tokens_per_sec"] == 500.0 and out["perf/step_seconds"] == 2.0
    assert out["perf/model_tflops_per_sec_per_device"] == pytest.approx(1.0)
    assert out["perf/mfu"] == pytest.approx(8e12 / 2.0 / (4 * 275e12))
    assert "perf/mfu" not in flops.Throughput(1.0, 1, "cpu", 8)(1.0)  # no known peak


def test_ppo_config_flops_matches_the_explicit_call():
    cfg = models.preset("tiny")

    class Spec:
        query_length, response_length, context_length = 64, 24, 66

    class PPO:
        batch_size, noptepochs, value_model = 16, 4, "separate"

    assert flops.ppo_config_flops(cfg, PPO, Spec) == flops.ppo_iteration_flops(
        cfg, 16, 64, 24, 4, context_len=66, separate_value=True)


@pytest.mark.skipif(not HAS_LIBTPU, reason="needs libtpu (pip install libtpu) for TPU topologies")
def test_table_matches_the_topologies_and_the_compiler():
    """device_kind strings and usable HBM as libtpu's compile-only devices report them."""
    from rlhf_jax import aot_check

    grids = {2: "2x2", 3: "2x2x1"}
    for gen, (ndim, _) in aot_check.TPU_GENERATIONS.items():
        devices = aot_check.topology_devices(aot_check.parse_topology(f"{gen}:{grids[ndim]}"))
        kind = devices[0].device_kind
        assert kind in flops.DEVICE_SPECS, (gen, kind)
        usable = aot_check.usable_hbm_bytes(devices)
        assert usable == pytest.approx(flops.DEVICE_SPECS[kind].hbm_bytes, abs=0.01 * flops.GIB)
