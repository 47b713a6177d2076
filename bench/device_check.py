"""Device check: one PPO iteration of the books task on this machine's accelerator, measured.

    python bench/device_check.py --preset 124m --minutes 6 [--output out.json]
    python bench/device_check.py --preset 774m --minutes 6
    python bench/device_check.py --preset tiny --minutes 1      # CPU: the same code, small

Builds the PPO programs exactly as `train_policy` runs them (`ppo_trainer.build_layout`, the
staged rollout, the update) for random GPT-2 weights, compiles every program ahead of time
(compile time and per-device memory from the compiler, before anything runs), then runs one
warm-up iteration and as many timed iterations as `--minutes` leaves room for, and prints one
table (also written as JSON with `--output`):

- the iteration split into rollout stages (prefill, decode, reference, reward, finish) and the
  update, medians over the timed iterations;
- episodes/s and tokens/s (context + response tokens of every rollout);
- model TFLOP/s and MFU per phase and end to end: analytic FLOPs (`rlhf_jax.flops`) over the
  measured time and the device's peak for the dtype;
- decode bandwidth: the bytes a decode step must read (every weight, the KV cache) over its
  time, as a percentage of the device's HBM bandwidth;
- peak memory per device: the largest compiled program plus what the run holds beside it, and
  on GPUs the allocator's peak;
- alignment in float32 and bfloat16: on a fresh rollout, before any update, the training
  forward's log-probs against the sampler's (the first minibatch's PPO ratio must be 1).

Presets (books task: query 64, response 24, temperature 0.7, 4 epochs of 1 minibatch):
124m (batch 512, bfloat16), 774m (batch 512, bfloat16, remat), tiny (batch 16, float32, for
CPUs and CI). Exit status: 0 done; 1 the preset does not fit the device (the memory the
compiled program needs is printed); 2 bad arguments; 3 an alignment check failed its
tolerance (everything is still printed and written).

Dependencies: jax, flax, optax, chex and numpy only (no ml_collections, tokenizer or datasets),
so it runs on a bare accelerator image with this repository on `PYTHONPATH`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
import types

T_START = time.time()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

GIB = 1 << 30
QUERY, RESPONSE, EPOCHS, LR = 64, 24, 4, 1e-5
PRESETS = {
    "124m": dict(model="124M", batch=512, dtype="bfloat16", remat=False),
    "774m": dict(model="774M", batch=512, dtype="bfloat16", remat=True),
    "tiny": dict(model="tiny", batch=16, dtype="float32", remat=False),
}
# Alignment tolerances (first minibatch, before any update): approxkl and max |log-ratio|.
# float32 runs true float32 matmuls; bfloat16 rounds matmul outputs, and the training forward
# (fused attention over the whole sequence) and the KV-cache decode may round differently.
TOLERANCES = {"float32": (1e-8, 1e-3), "bfloat16": (1e-4, 0.05)}
STAGES = ("prefill", "decode", "value", "reference", "reward", "finish")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", required=True, choices=sorted(PRESETS))
    p.add_argument("--minutes", type=float, default=6.0,
                   help="wall-clock budget including compiling; timed iterations fill what is "
                        "left after the warm-up and the alignment checks")
    p.add_argument("--output", default=None, help="also write the results as JSON here")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="compute dtype of the timed run (default: the preset's)")
    p.add_argument("--batch", type=int, default=None, help="rollouts per iteration")
    p.add_argument("--micro-batch", type=int, default=0,
                   help="model.micro_batch_size: rows per forward/backward (0 = all)")
    p.add_argument("--check-batch", type=int, default=64,
                   help="rows sampled for the other dtype's alignment check")
    p.add_argument("--max-iterations", type=int, default=20, help="timed iterations at most")
    p.add_argument("--memory-limit-gib", type=float, default=None,
                   help="per-device memory limit (default: the device's own)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.minutes <= 0 or args.max_iterations < 1:
        p.error("--minutes must be > 0 and --max-iterations >= 1")
    return args


def log(msg: str) -> None:
    print(f"[{time.time() - T_START:7.1f}s] {msg}", file=sys.stderr, flush=True)


def loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def usable_bytes(device, override_gib: float | None) -> int | None:
    """Per-device memory a program may use: the flag, the GPU allocator's limit, or the TPU
    table in `rlhf_jax.flops`; None when unknown (CPU)."""
    from rlhf_jax import flops

    if override_gib is not None:
        return int(override_gib * GIB)
    try:
        stats = device.memory_stats() or {}
    except Exception:  # CPU devices may not implement it
        stats = {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    spec = flops.device_spec(device.device_kind)
    return spec.hbm_bytes if spec else None


def build(args, dtype: str, batch: int):
    """Model config, task, settings, optimizer, layout and PPOFunctions on all local devices."""
    import jax

    from rlhf_jax import models, optim, ppo_trainer, sharding
    from rlhf_jax.data import tasks

    pre = PRESETS[args.preset]
    cfg = models.preset(pre["model"], dtype=dtype, remat=pre["remat"])
    spec = tasks.TaskSpec(query_length=QUERY, response_length=RESPONSE, pad_id=cfg.pad_id,
                          truncate_token=13, truncate_after=16, penalty_reward_value=-1.0,
                          temperature=0.7)
    mesh = sharding.make_mesh(devices=jax.devices())
    rules = sharding.DEFAULT_RULES
    # The books PPO settings; the original whitened over its 8 ranks' slices.
    groups = 8 if batch % 8 == 0 and batch // 8 >= 8 else 1
    ppo = types.SimpleNamespace(batch_size=batch, nminibatches=1, whiten_groups=groups,
                                whiten_rewards=True)
    ppo_trainer.check_ppo_config(ppo, mesh, args.micro_batch)
    settings = ppo_trainer.PPOSettings(
        batch_size=batch, nminibatches=1, noptepochs=EPOCHS, cliprange=0.2, cliprange_value=0.2,
        vf_coef=0.1, gamma=1.0, lam=0.95, whiten_rewards=True, whiten_groups=groups,
        separate_value=False, micro_batch_size=args.micro_batch)
    num_updates = math.ceil(1_000_000 / batch)
    tx = optim.make_optimizer(optim.ppo_lr_schedule(LR, num_updates, EPOCHS), eps=1e-5)
    layout = ppo_trainer.build_layout(cfg, cfg, settings, tx, mesh, rules)
    fns = layout.functions(cfg, cfg, spec, settings, tx, mesh)
    return types.SimpleNamespace(cfg=cfg, spec=spec, mesh=mesh, rules=rules, settings=settings,
                                 tx=tx, layout=layout, fns=fns, batch=batch)


def init_state(b, seed: int):
    """Random policy (zero value head), a separate reference copy, a random reward model."""
    import jax
    import jax.numpy as jnp

    from rlhf_jax import models, sharding

    lay, cfg = b.layout, b.cfg
    k_policy, k_rm = jax.random.split(jax.random.key(seed))
    init = lambda heads, out: jax.jit(  # noqa: E731
        lambda k: models.init_params(cfg, k, heads), out_shardings=out)
    trainable = {"policy": init(("value",), lay.policy)(k_policy)}
    # The same trunk as the policy's (same key), in buffers of its own: the update donates the
    # train state, and the reference must survive it.
    ref = {"transformer": jax.jit(lambda k: models.init_params(cfg, k)["transformer"],
                                  out_shardings=lay.ref["transformer"])(k_policy)}
    rm = init(("reward",), lay.reward)(k_rm)
    repl = sharding.replicated(b.mesh)
    state = {"params": trainable,
             "opt_state": jax.jit(b.tx.init, out_shardings=lay.opt_state)(trainable),
             "step": jax.device_put(jnp.zeros((), jnp.int32), repl),
             "kl_coef": jax.device_put(jnp.float32(0.15), repl)}
    return state, ref, rm


def queries(b, i: int):
    """A batch of random query tokens (no pads), different per iteration."""
    import numpy as np

    from rlhf_jax import sharding

    rs = np.random.RandomState(1000 + i)
    local = rs.randint(0, b.cfg.vocab_size, (b.batch, QUERY)).astype(np.int32)
    return sharding.host_batch_to_global(local, b.mesh)


def alignment(fns, state, data) -> dict:
    import jax

    return {k: float(v) for k, v in jax.device_get(fns.alignment(state["params"], data)).items()}


def check_other_dtype(args, main, state, rng) -> dict:
    """Alignment in the other dtype: same params, `--check-batch` rows, sample + forward."""
    import jax

    from rlhf_jax import sharding
    from rlhf_jax.data import tasks

    dtype = "float32" if main.cfg.dtype == "bfloat16" else "bfloat16"
    n_dev = len(jax.devices())
    batch = max(n_dev, min(args.check_batch, main.batch) // n_dev * n_dev)
    saved = args.micro_batch
    args.micro_batch = 0
    try:
        b = build(args, dtype, batch)
    finally:
        args.micro_batch = saved
    t0 = time.time()
    with sharding.mesh_context(b.mesh, b.rules):
        copy = b.layout.to_rollout()(state["params"]["policy"])
        q = queries(b, 999)
        st = b.fns.prefill(copy, q, rng)
        cache = st.pop("cache")
        samples, _ = b.fns.decode(copy, cache, st, rng)
        data = {"context": tasks.format_context(q, b.spec), **samples}
        out = alignment(b.fns, state, data)
    return dict(out, dtype=dtype, rows=batch, seconds=time.time() - t0)


def verdict(result: dict) -> bool:
    max_kl, max_lr = TOLERANCES[result["dtype"]]
    return result["approxkl"] <= max_kl and result["max_abs_logratio"] <= max_lr


def atomic_write(path: str, text: str) -> None:
    # rlhf_jax.runtime.atomic_write_text needs absl and etils, which a bare image may lack.
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=d, delete=False, suffix=".tmp") as f:
        f.write(text)
    os.replace(f.name, path)


def main(argv=None) -> int:
    args = parse_args(argv)
    budget = args.minutes * 60.0

    import jax

    from rlhf_jax import compile_cache, sharding
    from rlhf_jax import programs as programs_lib

    compile_cache.enable("auto")
    pre = PRESETS[args.preset]
    dtype, batch = args.dtype or pre["dtype"], args.batch or pre["batch"]
    dev = jax.devices()[0]
    n_dev = len(jax.devices())
    info = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "device": dev.device_kind, "platform": dev.platform, "devices": n_dev,
            "jax": jax.__version__, "python": platform.python_version(),
            "load_average_start": loadavg(), "preset": args.preset, "model": pre["model"],
            "dtype": dtype, "batch": batch, "query": QUERY, "response": RESPONSE,
            "epochs": EPOCHS, "micro_batch": args.micro_batch}
    log(f"{info['device']} x {n_dev}, {pre['model']} {dtype} batch {batch}")
    try:
        b = build(args, dtype, batch)
    except ValueError as e:
        print(f"device_check: {e}", file=sys.stderr)
        return 2

    # 1. Compile every program; refuse a preset that does not fit before running anything.
    limit = usable_bytes(dev, args.memory_limit_gib)
    progs = programs_lib.ppo_programs(b.fns, b.layout.to_rollout(), b.layout, b.cfg, b.mesh,
                                      b.rules, b.spec)
    t0 = time.time()
    reports, to_rollout = programs_lib.compile_ppo(b.fns, b.layout.to_rollout(), progs, b.mesh,
                                                   b.rules, log=log)
    info["compile_seconds"] = time.time() - t0
    memory = {r.name: {"program_gib": r.program_bytes / GIB, "resident_gib":
                       r.resident_bytes / GIB, "total_gib": r.total_bytes / GIB,
                       "compile_s": r.compile_seconds} for r in reports}
    peak = max(reports, key=lambda r: r.total_bytes)
    info |= {"memory": memory, "peak_program": peak.name, "peak_gib": peak.total_bytes / GIB,
             "limit_gib": None if limit is None else limit / GIB}
    if (limit is not None and peak.total_bytes > limit) or any(r.oom_bytes for r in reports):
        print(format_memory(info))
        print(f"device_check: {pre['model']} {dtype} batch {batch} does not fit: {peak.name} "
              f"needs {peak.total_bytes / GIB:.2f} GiB per device, the device has "
              f"{(limit or 0) / GIB:.2f} GiB (try --micro-batch, or a smaller --batch)",
              file=sys.stderr)
        if args.output:
            atomic_write(args.output, json.dumps(info | {"fits": False}, indent=2))
        return 1

    # 2. Warm-up iteration; the alignment check in this dtype on its fresh rollout.
    state, ref, rm = init_state(b, args.seed)
    rng_sample, rng_shuffle = jax.random.split(jax.random.key(args.seed + 1))
    iters = []

    def iteration(i: int, check: bool = False):
        nonlocal state
        q = queries(b, i)
        t_start = time.perf_counter()
        policy = to_rollout(state["params"]["policy"])
        timings = {}
        data, stats, _ = b.fns.rollout(policy, None, ref, rm, q, state["kl_coef"],
                                       jax.random.fold_in(rng_sample, i), timings)
        del policy
        t_rollout = time.perf_counter()
        result = alignment(b.fns, state, data) if check else None
        t_update = time.perf_counter()
        state, train_stats, _ = b.fns.update(state, data, jax.random.fold_in(rng_shuffle, i))
        jax.device_get({**stats, **train_stats})
        t_end = time.perf_counter()
        times = dict(timings, rollout=t_rollout - t_start, update=t_end - t_update,
                     iteration=(t_rollout - t_start) + (t_end - t_update))
        return times, result

    with sharding.mesh_context(b.mesh, b.rules):
        warm, checked = iteration(0, check=True)
        info["warmup_iteration_s"] = warm["iteration"]
        checks = [dict(checked, dtype=dtype, rows=batch)]
        log(f"warm-up iteration {warm['iteration']:.2f}s; alignment {checks[0]}")
    # The other dtype compiles three more programs; skip it rather than overrun the budget.
    if budget - (time.time() - T_START) > 3 * warm["iteration"] + info["compile_seconds"] / 3:
        checks.append(check_other_dtype(args, b, state, jax.random.key(args.seed + 2)))
        log(f"alignment {checks[1]}")
    else:
        log("no time left for the other dtype's alignment check (raise --minutes)")
    for c in checks:
        c["tolerance"] = dict(zip(("approxkl", "max_abs_logratio"), TOLERANCES[c["dtype"]]))
        c["ok"] = verdict(c)
    info["alignment"] = checks

    # 3. Timed iterations in the time that is left.
    with sharding.mesh_context(b.mesh, b.rules):
        i = 1
        while len(iters) < args.max_iterations:
            left = budget - (time.time() - T_START) - 5.0
            per_it = statistics.median([t["iteration"] for t in iters]) if iters else warm[
                "iteration"]
            if iters and left < per_it:
                break
            iters.append(iteration(i)[0])
            i += 1
    info["iterations"] = iters
    info |= summarize(b, iters, dev, n_dev)
    if dev.platform == "gpu":
        info["gpu_peak_bytes_in_use_gib"] = (dev.memory_stats() or {}).get(
            "peak_bytes_in_use", 0) / GIB
    info["load_average_end"] = loadavg()
    info["total_seconds"] = time.time() - T_START
    print(format_table(info))
    if args.output:
        atomic_write(args.output, json.dumps(info, indent=2))
    return 0 if all(c["ok"] for c in checks) else 3


def summarize(b, iters: list[dict], dev, n_dev: int) -> dict:
    """Medians per phase, throughput, TFLOP/s, MFU and decode bandwidth."""
    from rlhf_jax import flops

    med = {k: statistics.median(t[k] for t in iters) for k in iters[0]}
    cfg, batch, ctx = b.cfg, b.batch, b.spec.context_length
    total = flops.ppo_iteration_flops(cfg, batch, QUERY, RESPONSE, EPOCHS, context_len=ctx)
    phase_flops = {"prefill": batch * flops.prefill_flops(cfg, ctx),
                   "decode": batch * flops.decode_flops(cfg, ctx, RESPONSE),
                   "reference": total["reference"], "reward": total["reward"],
                   "update": total["update"], "iteration": total["total"]}
    peak = flops.peak_flops(dev.device_kind, cfg.dtype)
    spec = flops.device_spec(dev.device_kind)
    phases = {}
    for name in (*STAGES, "rollout", "update", "iteration"):
        if name not in med:
            continue
        row = {"seconds": med[name]}
        if name in phase_flops:
            rate = phase_flops[name] / med[name]
            row["tflops_per_s"] = rate / 1e12
            row["mfu"] = None if peak is None else rate / (peak * n_dev)
        phases[name] = row
    step_bytes = flops.decode_step_bytes(cfg, batch // n_dev, ctx, RESPONSE)
    bandwidth = step_bytes * (RESPONSE - 1) / med["decode"]
    hbm = spec.hbm_bandwidth if spec else None
    tokens = flops.ppo_iteration_tokens(batch, ctx, RESPONSE)
    return {"phases": phases, "iteration_flops": total,
            "episodes_per_s": batch / med["iteration"],
            "tokens_per_s": tokens / med["iteration"],
            "sampled_tokens_per_s": batch * RESPONSE / (med["prefill"] + med["decode"]),
            "decode_step_bytes_per_device": step_bytes,
            "decode_bandwidth_gb_per_s": bandwidth / 1e9,
            "decode_hbm_roofline_fraction": None if hbm is None else bandwidth / hbm,
            "peak_flops_per_device": peak,
            "minutes_per_1m_episodes": med["iteration"] * math.ceil(1e6 / batch) / 60}


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def format_memory(info: dict) -> str:
    lines = ["compiled programs (per device, GiB): program + resident = total, compile s"]
    for name, m in info["memory"].items():
        lines.append(f"  {name:<11}{m['program_gib']:8.2f} +{m['resident_gib']:7.2f} = "
                     f"{m['total_gib']:7.2f}  {m['compile_s']:6.1f}s")
    limit = "unknown" if info["limit_gib"] is None else f"{info['limit_gib']:.2f} GiB"
    lines.append(f"  peak {info['peak_gib']:.2f} GiB ({info['peak_program']}) of {limit}")
    return "\n".join(lines)


def format_table(info: dict) -> str:
    lines = [f"device check: {info['model']} {info['dtype']}, batch {info['batch']}, query "
             f"{info['query']} + response {info['response']}, {info['epochs']} epochs; "
             f"{info['devices']} x {info['device']}; jax {info['jax']}; {info['date']}; "
             f"load average {info['load_average_start']} -> {info['load_average_end']}",
             f"{'phase':<11}{'median s':>10}{'TFLOP/s':>10}{'MFU':>8}"]
    for name, row in info["phases"].items():
        tf = f"{row['tflops_per_s']:10.3f}" if "tflops_per_s" in row else f"{'':>10}"
        mfu = f"{_pct(row.get('mfu')):>8}" if "tflops_per_s" in row else ""
        lines.append(f"{name:<11}{row['seconds']:10.3f}{tf}{mfu}")
    lines += [
        f"{len(info['iterations'])} timed iterations after 1 warm-up "
        f"({info['warmup_iteration_s']:.2f}s); compile {info['compile_seconds']:.1f}s",
        f"episodes/s {info['episodes_per_s']:.2f}, tokens/s {info['tokens_per_s']:.0f}, "
        f"sampled tokens/s {info['sampled_tokens_per_s']:.0f}; 1M episodes at this rate: "
        f"{info['minutes_per_1m_episodes']:.1f} min",
        f"decode: {info['decode_bandwidth_gb_per_s']:.1f} GB/s per device = "
        f"{_pct(info['decode_hbm_roofline_fraction'])} of HBM bandwidth",
        format_memory(info)]
    if "gpu_peak_bytes_in_use_gib" in info:
        lines.append(f"  GPU allocator peak {info['gpu_peak_bytes_in_use_gib']:.2f} GiB")
    for c in info["alignment"]:
        lines.append(f"alignment {c['dtype']:<9} ({c['rows']} rows): approxkl "
                     f"{c['approxkl']:.2e}, max |log-ratio| {c['max_abs_logratio']:.2e}, max "
                     f"|value diff| {c['max_abs_value_diff']:.2e}: "
                     f"{'ok' if c['ok'] else 'FAIL'} (tolerance {c['tolerance']['approxkl']:.0e}"
                     f", {c['tolerance']['max_abs_logratio']:.0e})")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
