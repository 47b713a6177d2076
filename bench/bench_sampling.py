"""Benchmark: rlhf_jax's sampler against transformers' PyTorch `generate` (KV cache), same weights.

Not a test. Both sides get the same random GPT-2 weights (our random init, exported with
`save_hf_checkpoint` and loaded by `transformers.GPT2LMHeadModel.from_pretrained`), the same
context token ids (no pads) and the same shapes, and both draw exactly `--response` tokens per
row by multinomial sampling from softmax(logits / T) with no top-k / top-p truncation. Wall time
covers the prefill plus the decode loop; tokens/s = batch * response / wall time.

Our sampler does strictly more work per step than `generate`: it also returns the log-prob of
every sampled token (a full-vocabulary log-softmax) and the value head at every step.

    python bench/bench_sampling.py                       # 124M, batch 16, query 64, response 24
    python bench/bench_sampling.py --model tiny --repeats 3
    python bench/bench_sampling.py --xla-flags=--xla_cpu_multi_thread_eigen=false

JAX runs on one CPU device by default (`--devices 1`: no XLA_FLAGS device forcing). XLA's CPU
backend sizes its own intra-op thread pool (all visible cores); `--threads` sets torch's.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="124M", help="GPT-2 preset (124M, 355M, tiny, ...)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--query", type=int, default=64, help="context length (tokens, no pads)")
    p.add_argument("--response", type=int, default=24, help="tokens sampled per row")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--repeats", type=int, default=5, help="timed runs per side")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per side after compile")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: all usable cores)")
    p.add_argument("--devices", type=int, default=1,
                   help="JAX CPU devices; 1 = the default single device, >1 forces host devices "
                        "with XLA_FLAGS and shards the batch over them")
    p.add_argument("--xla-flags", default="",
                   help="extra XLA_FLAGS appended before JAX is imported (for experiments)")
    p.add_argument("--rlhf-jax-root", default=None,
                   help="import rlhf_jax from this directory instead of this checkout (to "
                        "measure an experimental copy of the sampler)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", choices=("both", "torch", "jax"), default="both",
                   help="run one side only (the ratio needs both)")
    return p.parse_args(argv)


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def summarize(times: list[float], tokens: int) -> dict:
    med, best = statistics.median(times), min(times)
    return {"median_s": med, "min_s": best, "tok_s_median": tokens / med, "tok_s_best": tokens / best}


def setup_torch(args, ckpt_dir: str, context_np):
    """Loads the exported checkpoint into transformers; returns (run, info)."""
    import numpy as np
    import torch
    import transformers

    torch.set_num_threads(args.threads or usable_cores())
    torch.manual_seed(args.seed)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    model = transformers.GPT2LMHeadModel.from_pretrained(ckpt_dir, dtype=dtype).eval()
    # The exported config names 50256 as EOS; sampling must never stop early or be steered away
    # from any token, so the model's generation defaults carry no EOS either.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    gen_kwargs = dict(
        do_sample=True,
        temperature=args.temperature,
        top_k=0,
        top_p=1.0,
        max_new_tokens=args.response,
        min_new_tokens=args.response,
        eos_token_id=None,
        pad_token_id=0,
        use_cache=True,
    )
    input_ids = torch.from_numpy(np.asarray(context_np, np.int64))
    attention_mask = torch.ones_like(input_ids)

    # What generate will actually apply to the logits (private API; skipped if it moves).
    try:
        gc, _ = model._prepare_generation_config(None, **gen_kwargs)
        assert gc.eos_token_id is None, gc.eos_token_id
        procs = model._get_logits_processor(
            generation_config=gc, input_ids_seq_length=input_ids.shape[1],
            encoder_input_ids=input_ids, prefix_allowed_tokens_fn=None, logits_processor=None,
            device=input_ids.device,
        )
        processors = ", ".join(type(p).__name__ for p in procs) or "none"
    except (AttributeError, TypeError) as e:  # pragma: no cover - private API drift
        processors = f"n/a ({type(e).__name__})"

    def run(i: int):
        torch.manual_seed(args.seed + i)
        with torch.inference_mode():
            out = model.generate(input_ids, attention_mask=attention_mask, **gen_kwargs)
        new = out.shape[1] - input_ids.shape[1]
        if new != args.response:
            raise RuntimeError(f"torch generate produced {new} tokens, expected {args.response}")

    t0 = time.perf_counter()
    run(0)  # first call: lazy init, allocator warm-up
    info = {"first_s": time.perf_counter() - t0, "threads": torch.get_num_threads(),
            "processors": processors}
    return run, info


def setup_jax(args, config, params, context_np):
    """Compiles the sampler (timed); returns (run, info)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from rlhf_jax import sampling

    context = jnp.asarray(np.asarray(context_np, np.int32))
    if args.devices > 1:
        from jax.sharding import Mesh, NamedSharding
        from jax.sharding import PartitionSpec as P

        mesh = Mesh(np.array(jax.devices()[: args.devices]), ("data",))
        batch_sh, repl = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
        params = jax.device_put(params, repl)
        context = jax.device_put(context, batch_sh)
        fn = sampling.make_sampler(
            config, response_length=args.response, temperature=args.temperature,
            params_sharding=repl, batch_sharding=batch_sh,
        )
    else:
        params = jax.device_put(params)
        fn = sampling.make_sampler(config, response_length=args.response,
                                   temperature=args.temperature)
    key = jax.random.key(args.seed)

    t0 = time.perf_counter()
    compiled = fn.lower(params, context, key).compile()
    compile_s = time.perf_counter() - t0

    def run(i: int):
        out = compiled(params, context, jax.random.fold_in(key, i))
        jax.block_until_ready(out)
        return out

    t0 = time.perf_counter()
    out = run(0)
    first_s = time.perf_counter() - t0
    shape = tuple(out["responses"].shape)
    if shape != (args.batch, args.response):
        raise RuntimeError(f"rlhf_jax sampler returned responses {shape}")
    return run, {"compile_s": compile_s, "first_s": first_s, "outputs": sorted(out)}


def timed_rounds(runs: dict, args) -> dict:
    """Warm-up calls, then `repeats` rounds of one timed call per side.

    The sides alternate call by call (and swap order every round), so on a shared, loaded
    machine both see the same load; wall and process CPU seconds are recorded per call.
    """
    for i in range(args.warmup):
        for run in runs.values():
            run(1 + i)
    wall = {name: [] for name in runs}
    cpu = {name: [] for name in runs}
    names = list(runs)
    for r in range(args.repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            c0, t0 = time.process_time(), time.perf_counter()
            runs[name](100 + r)
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return {"wall": wall, "cpu": cpu}


def main(argv=None) -> None:
    args = parse_args(argv)
    # XLA_FLAGS must be final before JAX initialises its backend.
    flags = [os.environ.get("XLA_FLAGS", "")]
    if args.devices > 1:
        flags.append(f"--xla_force_host_platform_device_count={args.devices}")
    if args.xla_flags:
        flags.append(args.xla_flags)
    xla_flags = " ".join(f for f in flags if f).strip()
    if xla_flags:
        os.environ["XLA_FLAGS"] = xla_flags
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    # Run from a checkout without `pip install -e .`.
    sys.path.insert(0, args.rlhf_jax_root or os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    import jax
    import numpy as np

    from rlhf_jax import models
    from rlhf_jax.models import hf_import

    if args.devices > 1 and args.batch % args.devices:
        sys.exit(f"--batch {args.batch} is not divisible by --devices {args.devices}")
    config = models.preset(args.model, dtype=args.dtype)
    if args.query + args.response > config.n_positions:
        sys.exit(f"query + response exceeds n_positions={config.n_positions}")

    cmd = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    print(f"command: {cmd}")
    try:
        import torch
        torch_version = torch.__version__
        import transformers
        tf_version = transformers.__version__
    except ImportError:
        torch_version = tf_version = "not installed"
    print(f"machine: {cpu_model()}, {usable_cores()} usable cores (os.cpu_count={os.cpu_count()}), "
          f"{platform.system()} {platform.machine()}, python {platform.python_version()}")
    print(f"versions: jax {jax.__version__}, torch {torch_version}, transformers {tf_version}")
    print(f"jax devices: {jax.devices()} XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    print(f"rlhf_jax from: {os.path.dirname(models.__file__.rsplit(os.sep, 2)[0])}")
    print(f"shapes: model {args.model} ({config.n_layer}L d{config.n_embd} vocab {config.vocab_size}), "
          f"batch {args.batch}, query {args.query}, response {args.response}, {args.dtype}, "
          f"T={args.temperature}, repeats {args.repeats}, warmup {args.warmup}")
    load_start = loadavg()
    print(f"load average at start: {load_start}")

    params = models.init_params(config, jax.random.key(args.seed), heads=("value",))
    rs = np.random.RandomState(args.seed)
    context = rs.randint(0, config.vocab_size, size=(args.batch, args.query)).astype(np.int32)
    tokens = args.batch * args.response

    runs, info = {}, {}
    # The checkpoint directory lives until the end: the torch weights may be memory-mapped.
    tmp = tempfile.TemporaryDirectory(prefix="bench-sampling-")
    if args.only in ("both", "torch"):
        ckpt = os.path.join(tmp.name, "hf")
        hf_import.save_hf_checkpoint(params, config, ckpt)
        runs["torch"], info["torch"] = setup_torch(args, ckpt, context)
        print(f"torch:    first call {info['torch']['first_s']:.2f} s, "
              f"{info['torch']['threads']} threads, logits processors: "
              f"{info['torch']['processors']}")
    if args.only in ("both", "jax"):
        runs["rlhf_jax"], info["rlhf_jax"] = setup_jax(args, config, params, context)
        j = info["rlhf_jax"]
        print(f"rlhf_jax: compile {j['compile_s']:.2f} s, first call {j['first_s']:.2f} s, "
              f"outputs {j['outputs']}")
    rounds = timed_rounds(runs, args)
    tmp.cleanup()
    print(f"load average at end: {loadavg()}")
    for name in runs:
        print(f"{name:9s} wall s: " + " ".join(f"{t:.3f}" for t in rounds["wall"][name])
              + "   cpu s: " + " ".join(f"{t:.2f}" for t in rounds["cpu"][name]))

    res = {name: summarize(rounds["wall"][name], tokens) for name in runs}
    print()
    print(f"{'side':10s} {'median s':>9s} {'min s':>8s} {'tok/s (median)':>15s} "
          f"{'tok/s (best)':>13s} {'cpu s (median)':>15s}")
    for name, r in res.items():
        print(f"{name:10s} {r['median_s']:9.3f} {r['min_s']:8.3f} {r['tok_s_median']:15.1f} "
              f"{r['tok_s_best']:13.1f} {statistics.median(rounds['cpu'][name]):15.2f}")
    if len(res) == 2:
        rt, rj = res["torch"], res["rlhf_jax"]
        ratio_med = rj["tok_s_median"] / rt["tok_s_median"]
        ratio_best = rj["tok_s_best"] / rt["tok_s_best"]
        paired = statistics.median(
            t / j for t, j in zip(rounds["wall"]["torch"], rounds["wall"]["rlhf_jax"]))
        print(f"ratio rlhf_jax/torch tokens/s: {ratio_med:.2f}x (medians), "
              f"{ratio_best:.2f}x (bests), {paired:.2f}x (median of per-round ratios)")
        print()
        print("| model | batch | query | response | dtype | torch tok/s | rlhf_jax tok/s | ratio "
              "| jax compile s | load avg start / end |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        print(f"| {args.model} | {args.batch} | {args.query} | {args.response} | {args.dtype} "
              f"| {rt['tok_s_median']:.1f} | {rj['tok_s_median']:.1f} | {ratio_med:.2f}x "
              f"| {info['rlhf_jax']['compile_s']:.1f} "
              f"| {load_start.split()[0]} / {loadavg().split()[0]} |")
    print(f"({tokens} tokens per call; tokens/s = batch*response / wall time of one call, "
          f"prefill + decode; medians over {args.repeats} rounds)")


if __name__ == "__main__":
    main()
