"""Analytic model FLOPs of GPT-2 RLHF steps, peak FLOP/s per device kind, and MFU.

Model FLOPs count the arithmetic the algorithm needs, not what a particular program executes
(rematerialisation adds a forward pass of hardware FLOPs, never model FLOPs). Conventions:

- A multiply-add is 2 FLOPs. Per token and layer, the four weight matmuls (qkv, attention
  projection, MLP in and out: 12 d^2 weights) cost 2 * 12 d^2 forward.
- Attention scores and the weighted sum of values cost 2 * 2 * d per key the token is scored
  against. That is every key position the implementation scores: the whole sequence for a full
  forward pass (as PaLM's MFU counts it, not halved for causality) and the whole preallocated KV
  cache for a decode step. So the analytic count can be compared with the compiled one; counting
  causal keys only would lower the total by under 1% (books) and about 4% (TL;DR).
- The tied LM head costs 2 * d * vocab per position whose logits are computed. Embedding
  lookups, layer norms, softmaxes and the scalar heads are left out (under 1%).
- Training costs 3x the forward pass (backward = 2x forward).

`ppo_iteration_flops` follows `rlhf_jax.ppo_trainer`: sampling with a KV cache, the reference
forward, the reward model forward (raw query and response), an optional separate value network,
then `noptepochs` passes of training over the batch (the minibatch split does not change it).

Peak FLOP/s are per JAX device (`jax.devices()[0].device_kind`): a TPU v2/v3 device is one
TensorCore (half a chip); TPU v4 and v5p devices are whole chips (megacore, the default on their
VMs); TPU v5e and v6e chips have one TensorCore; a TPU7x device is one of a chip's two
TensorCores. The "float32" column is the rate of the true float32 matmuls that
`model.dtype="float32"` asks for (`Precision.HIGHEST`): six bfloat16 passes on TPU (so a sixth of
the bfloat16 peak, per `jax.lax.Precision`'s documentation), the CUDA-core FP32 rate on NVIDIA
GPUs (not TF32). HBM bandwidth (bytes/s) is the roofline of a decode step, which reads every
weight and the KV cache once per generated token.
"""

from __future__ import annotations

import dataclasses

from rlhf_jax.models import GPT2Config

GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
    """Dense peak rates and memory of one JAX device.

    Attributes:
        peak_bf16: peak dense bfloat16 FLOP/s.
        peak_fp32: peak FLOP/s of true float32 matmuls (`Precision.HIGHEST`).
        hbm_bytes: device memory the XLA TPU compiler lets a program use (measured with libtpu
            0.0.52: the "available HBM" of its out-of-memory error), or None where the memory
            varies by model (GPUs); `rlhf_jax.aot_check` asks the compiler itself.
        hbm_bandwidth: peak memory bandwidth in bytes/s (datasheet), or None if unknown.
    """

    peak_bf16: float
    peak_fp32: float
    hbm_bytes: int | None = None
    hbm_bandwidth: float | None = None


def _tpu(peak_bf16: float, hbm_gib: float, bandwidth: float) -> DeviceSpec:
    # Precision.HIGHEST runs a float32 matmul as 6 bfloat16 passes on TPU.
    return DeviceSpec(peak_bf16, peak_bf16 / 6, int(hbm_gib * GIB), bandwidth)


# Keys are `device_kind` strings. TPU ones were checked against the devices of
# `jax.experimental.topologies.get_topology_desc` (v2:2x2 ... tpu7x:2x2x1); NVIDIA ones are the
# CUDA device names, matched by prefix (e.g. "NVIDIA H100 80GB HBM3" -> "NVIDIA H100").
# Sources: Cloud TPU system architecture pages (per-chip bf16 peak and HBM bandwidth, halved
# where a device is one of two TensorCores) and NVIDIA's H100/H200/A100 datasheets (dense,
# without sparsity; FP32 is the non-tensor-core rate; A100 is the 80 GB SXM part).
DEVICE_SPECS: dict[str, DeviceSpec] = {
    "TPU v2": _tpu(22.5e12, 7.48, 350e9),         # 45 TFLOP/s, 700 GB/s per chip, 2 cores
    "TPU v3": _tpu(61.5e12, 15.48, 450e9),        # 123 TFLOP/s, 900 GB/s per chip, 2 cores
    "TPU v4": _tpu(275e12, 30.75, 1228e9),        # megacore chip, 32 GiB
    "TPU v5 lite": _tpu(197e12, 15.75, 819e9),    # v5e, 16 GiB
    "TPU v5": _tpu(459e12, 95.73, 2765e9),        # v5p megacore chip, 95 GB
    "TPU v6 lite": _tpu(918e12, 31.24, 1640e9),   # v6e (Trillium), 32 GiB
    "TPU7x": _tpu(1153.5e12, 94.74, 3685e9),      # Ironwood: 2307 TFLOP/s, 7.37 TB/s per chip
    "NVIDIA H100 PCIe": DeviceSpec(756e12, 51e12, None, 2.0e12),
    "NVIDIA H100": DeviceSpec(989e12, 67e12, None, 3.35e12),   # SXM
    "NVIDIA H200": DeviceSpec(989e12, 67e12, None, 4.8e12),
    "NVIDIA A100": DeviceSpec(312e12, 19.5e12, None, 2.039e12),
}


def device_spec(device_kind: str) -> DeviceSpec | None:
    """The DeviceSpec of a `device_kind`, or None when unknown (e.g. "cpu")."""
    if device_kind in DEVICE_SPECS:
        return DEVICE_SPECS[device_kind]
    # Longest prefix first, so "NVIDIA H100 PCIe" wins over "NVIDIA H100".
    for key in sorted(DEVICE_SPECS, key=len, reverse=True):
        if key.startswith("NVIDIA") and device_kind.startswith(key):
            return DEVICE_SPECS[key]
    return None


def peak_flops(device_kind: str, dtype: str = "bfloat16") -> float | None:
    """Peak FLOP/s of one device for compute in `dtype` ("bfloat16" or "float32"), or None."""
    if dtype not in ("bfloat16", "float32"):
        raise ValueError(f"dtype={dtype!r}: expected 'bfloat16' or 'float32'")
    spec = device_spec(device_kind)
    if spec is None:
        return None
    return spec.peak_bf16 if dtype == "bfloat16" else spec.peak_fp32


def mfu(flops_per_step: float, seconds_per_step: float, device_kind: str, n_devices: int,
        dtype: str = "bfloat16") -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak of all devices.

    Args:
        flops_per_step: model FLOPs of one step over the whole (global) batch.
        seconds_per_step: wall time of that step.
        device_kind: `jax.devices()[0].device_kind`.
        n_devices: devices the step ran on.
        dtype: the compute dtype (`config.model.dtype`).

    Returns:
        A fraction in [0, 1] on real hardware, or None for an unknown device kind (CPU).
    """
    peak = peak_flops(device_kind, dtype)
    if peak is None or seconds_per_step <= 0 or n_devices <= 0:
        return None
    return flops_per_step / seconds_per_step / (peak * n_devices)


# -- model FLOPs ---------------------------------------------------------------------------------

def forward_flops(cfg: GPT2Config, tokens: int, keys: int, lm_head_positions: int = 0) -> float:
    """Forward FLOPs of one sequence.

    Args:
        cfg: model shapes.
        tokens: positions run through the trunk.
        keys: key positions each of those tokens is scored against.
        lm_head_positions: positions whose vocabulary logits are computed.

    Returns:
        FLOPs.
    """
    d, n_layer = cfg.n_embd, cfg.n_layer
    matmuls = 2 * 12 * d * d * n_layer * tokens
    attention = 2 * 2 * d * n_layer * keys * tokens
    lm_head = 2 * d * cfg.vocab_size * lm_head_positions
    return float(matmuls + attention + lm_head)


def prefill_flops(cfg: GPT2Config, context_len: int) -> float:
    """FLOPs of `rlhf_jax.sampling.prefill` for one row: the context attends to itself, and
    logits are computed at its last position (the first drawn token)."""
    return forward_flops(cfg, context_len, context_len, 1)


def decode_flops(cfg: GPT2Config, context_len: int, response_len: int) -> float:
    """FLOPs of `rlhf_jax.sampling.decode` for one row: `response_len - 1` steps, each running
    the previous token against the whole cache of `context_len + response_len - 1` slots and
    computing one row of logits (the last drawn token is never fed back)."""
    steps = response_len - 1
    return steps * forward_flops(cfg, 1, context_len + response_len - 1, 1)


def sampling_flops(cfg: GPT2Config, context_len: int, response_len: int) -> float:
    """FLOPs of sampling one response as `rlhf_jax.sampling.sample` does: prefill + decode."""
    return prefill_flops(cfg, context_len) + decode_flops(cfg, context_len, response_len)


def decode_step_bytes(cfg: GPT2Config, batch: int, context_len: int, response_len: int) -> float:
    """Bytes one decode step must read from device memory at least (its roofline).

    Every matmul weight once (the trunk's and the tied embedding for the LM head) and the whole
    KV cache of `batch` rows, all in the compute dtype (the decode loop casts the weights once
    before it starts): 2 bytes each for bfloat16, 4 for float32.
    """
    d, n_layer = cfg.n_embd, cfg.n_layer
    size = 2 if cfg.dtype == "bfloat16" else 4
    weights = (12 * d * d * n_layer + cfg.vocab_size * d) * size
    cache = 2 * n_layer * batch * (context_len + response_len - 1) * d * size
    return float(weights + cache)


def ppo_iteration_flops(gpt2_config: GPT2Config, batch: int, query_len: int, response_len: int,
                        noptepochs: int, *, context_len: int | None = None,
                        reward_config: GPT2Config | None = None,
                        separate_value: bool = False) -> dict[str, float]:
    """Model FLOPs of one PPO iteration over the global batch, by stage.

    Args:
        gpt2_config: the policy (and reference) shapes.
        batch: rollouts per iteration (`ppo.batch_size`).
        query_len: raw query tokens (`task.query_length`), what the reward model reads.
        response_len: sampled tokens (`task.response_length`).
        noptepochs: passes over the batch in the update (`ppo.noptepochs`).
        context_len: the policy's formatted context (prefix + query + suffix,
            `TaskSpec.context_length`); defaults to `query_len`.
        reward_config: reward model (and separate value network) shapes; defaults to the
            policy's.
        separate_value: a separate value network (`ppo.value_model="separate"`), run in the
            rollout and trained in the update without an LM head.

    Returns:
        {"sample", "value", "reference", "reward", "update", "total"}: FLOPs per iteration.
    """
    ctx = query_len if context_len is None else context_len
    rm_cfg = reward_config or gpt2_config
    seq = ctx + response_len
    policy_fwd = forward_flops(gpt2_config, seq, seq, response_len)
    value_fwd = forward_flops(rm_cfg, seq, seq) if separate_value else 0.0
    out = {
        "sample": batch * sampling_flops(gpt2_config, ctx, response_len),
        "value": batch * value_fwd,
        "reference": batch * policy_fwd,
        "reward": batch * forward_flops(rm_cfg, query_len + response_len,
                                        query_len + response_len),
        "update": 3.0 * noptepochs * batch * (policy_fwd + value_fwd),
    }
    out["total"] = sum(out.values())
    return out


def ppo_config_flops(gpt2_config: GPT2Config, ppo, spec,
                     reward_config: GPT2Config | None = None) -> dict[str, float]:
    """`ppo_iteration_flops` of a run: `ppo` is `config.ppo`, `spec` its `tasks.TaskSpec`."""
    return ppo_iteration_flops(
        gpt2_config, ppo.batch_size, spec.query_length, spec.response_length, ppo.noptepochs,
        context_len=spec.context_length, reward_config=reward_config,
        separate_value=ppo.value_model == "separate")


class Throughput:
    """The `perf/*` metrics of a training step: tokens/s, model TFLOP/s per device and MFU.

    MFU is left out where the device kind has no known peak (CPUs, unlisted GPUs).
    """

    def __init__(self, flops_per_step: float, tokens_per_step: int, device_kind: str,
                 n_devices: int, dtype: str = "float32"):
        self.flops, self.tokens = flops_per_step, tokens_per_step
        self.kind, self.n, self.dtype = device_kind, n_devices, dtype

    def __call__(self, seconds: float) -> dict[str, float]:
        seconds = max(seconds, 1e-9)
        out = {"perf/step_seconds": seconds, "perf/tokens_per_sec": self.tokens / seconds,
               "perf/model_tflops_per_sec_per_device": self.flops / seconds / self.n / 1e12}
        util = mfu(self.flops, seconds, self.kind, self.n, self.dtype)
        if util is not None:
            out["perf/mfu"] = util
        return out


def ppo_iteration_tokens(batch: int, context_len: int, response_len: int) -> int:
    """Tokens of one PPO iteration, for `perf/tokens_per_sec`: every rollout's full sequence."""
    return batch * (context_len + response_len)


def reward_step_flops(gpt2_config: GPT2Config, batch: int, query_len: int, response_len: int,
                      num_samples: int = 4) -> float:
    """Model FLOPs of one reward-model training step: `batch` labels of `num_samples` responses.

    Each (query, sample) pair is one forward pass of query_len + response_len tokens with no LM
    head, trained (3x).
    """
    seq = query_len + response_len
    return 3.0 * batch * num_samples * forward_flops(gpt2_config, seq, seq)
