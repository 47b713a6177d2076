"""Benchmark: reward-model training throughput (labels/s), rlhf_jax against PyTorch + transformers.

Not a test. One training step of the best-of-4 reward model, same shapes and same weights on
both sides: our random GPT-2 init plus a reward head, exported with `save_hf_checkpoint` and
loaded by `transformers.GPT2Model.from_pretrained` (the head, gain and bias are copied over).
A label is one query with 4 responses; a global batch of `--batch` labels runs 4 * batch
sequences of query + response tokens through the trunk, forward and backward.

- rlhf_jax: the step of `RewardTrainer._train_step` (rlhf_jax/train_reward.py), rebuilt from the
  same library pieces: `networks.rewards_of_samples`, the label type's `loss`, TF1-style Adam
  from `optim.make_optimizer` with the linear per-batch lr schedule, `jax.jit` with the train
  state donated. Params and Adam slots are placed with the library's shardings on a mesh of
  `--devices` CPU devices (1 by default). The stats are read back every step.
- PyTorch: `GPT2Model` trunk + `Linear(d, 1)` reward head + scalar gain/bias, the reward read at
  the last position, 4-way softmax cross-entropy, `torch.optim.Adam(eps=1e-5)` (PyTorch eps
  placement; the arithmetic per step is the same as TF's), `LambdaLR` with the same linear decay,
  one step per batch.

Both sides train on the same random token batches (no pads); the first step's losses must agree
(printed). JAX compile time and each side's first step are reported apart. Then `--warmup`
untimed rounds and `--repeats` timed rounds; in each round both sides take one step, alternating
(and swapping order every round), so on a shared, loaded machine both see the same load
(`--sequential`: one side after the other, the first freed before the second starts). Wall
and process CPU seconds (all threads) are recorded per step, and each side's peak resident
memory. labels/s = batch / wall seconds of one step.

    python bench/bench_reward.py                       # 124M, batch 32, query 64, response 24
    python bench/bench_reward.py --model tiny --repeats 3
    python bench/bench_reward.py --batch 8 --only jax
    python bench/bench_reward.py --rlhf-jax-root /tmp/exp   # an experimental copy of rlhf_jax

At 124M the rlhf_jax step needs about 0.37 GB of XLA temporaries per label (12 GB at batch 32,
see RESULTS.md); on a small machine use a smaller `--batch` (labels/s barely depends on it).
XLA's CPU backend sizes its own intra-op thread pool (all visible cores); `--threads` sets
torch's.
"""

from __future__ import annotations

import argparse
import gc
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
    p.add_argument("--batch", type=int, default=32, help="labels per step (global)")
    p.add_argument("--query", type=int, default=64, help="query length (tokens, no pads)")
    p.add_argument("--response", type=int, default=24, help="tokens per response")
    p.add_argument("--num-samples", type=int, default=4, help="responses per label (best_of_N)")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--num-steps", type=int, default=156,
                   help="length of the linear lr decay (labels.num_train / batch; books: 156)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (one step per side each)")
    p.add_argument("--warmup", type=int, default=0,
                   help="untimed rounds after each side's first step (JAX: after compile)")
    add_common_flags(p)
    return p.parse_args(argv)


def add_common_flags(p: argparse.ArgumentParser) -> None:
    """Flags shared with bench_ppo.py."""
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: all usable cores)")
    p.add_argument("--devices", type=int, default=1,
                   help="JAX CPU devices; 1 = the default single device, >1 forces host devices "
                        "with XLA_FLAGS (they split the same cores) and shards the batch")
    p.add_argument("--xla-flags", default="",
                   help="extra XLA_FLAGS appended before JAX is imported (for experiments)")
    p.add_argument("--rlhf-jax-root", default=None,
                   help="import rlhf_jax from DIR/rlhf_jax instead of this checkout (to measure "
                        "an experimental copy)")
    p.add_argument("--sequential", action="store_true",
                   help="time all of one side's rounds, free it, then the other's: peak memory "
                        "of one side instead of both, but the sides no longer share the load")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", choices=("both", "torch", "jax"), default="both",
                   help="run one side only (the ratio needs both)")


# -- machine info and timing helpers (bench_ppo.py imports these) -----------------------------
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


def _status_gb(name: str) -> float:
    """A /proc/self/status memory field in GB (0 where unavailable)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(name + ":"):
                    return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return 0.0


class PeakMemory:
    """Peak resident memory of this process over a block (Linux; GB).

    Resets the kernel's high-water mark on entry (`/proc/self/clear_refs`), so `peak_gb` is the
    block's own peak; `added_gb` subtracts what was resident when it started.
    """

    def __enter__(self):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
        self.start_gb = _status_gb("VmRSS")
        return self

    def __exit__(self, *exc):
        self.peak_gb = _status_gb("VmHWM")
        self.added_gb = self.peak_gb - self.start_gb
        return False


def setup_env(args) -> None:
    """XLA_FLAGS, offline switches and sys.path; must run before JAX is imported."""
    flags = [os.environ.get("XLA_FLAGS", "")]
    if args.devices > 1:
        flags.append(f"--xla_force_host_platform_device_count={args.devices}")
    if args.xla_flags:
        flags.append(args.xla_flags)
    xla_flags = " ".join(f for f in flags if f).strip()
    if xla_flags:
        os.environ["XLA_FLAGS"] = xla_flags
    if getattr(args, "device", "cpu") == "cpu":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    # Run from a checkout without `pip install -e .` (or from an experimental copy).
    root = args.rlhf_jax_root or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.abspath(root))


def print_header() -> str:
    """Prints the command, machine, versions and load; returns the 1-minute load at start."""
    import jax

    import rlhf_jax

    print("command: python " + " ".join(shlex.quote(a) for a in sys.argv))
    try:
        import torch
        import transformers
        torch_version, tf_version = torch.__version__, transformers.__version__
    except ImportError:
        torch_version = tf_version = "not installed"
    print(f"machine: {cpu_model()}, {usable_cores()} usable cores (os.cpu_count={os.cpu_count()}), "
          f"{platform.system()} {platform.machine()}, python {platform.python_version()}")
    print(f"versions: jax {jax.__version__}, torch {torch_version}, transformers {tf_version}")
    print(f"jax devices: {jax.devices()} XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    print(f"rlhf_jax from: {os.path.dirname(os.path.dirname(os.path.abspath(rlhf_jax.__file__)))}")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}")
    load = loadavg()
    print(f"load average at start: {load}")
    return load.split()[0]


def timed_rounds(runs: dict, args, first_index: int) -> dict:
    """`warmup` untimed rounds, then `repeats` timed rounds of one call per side.

    The sides alternate call by call and swap order every round, so both see the same load.
    `runs[name](i)` runs step / iteration `i` (inputs differ per i) and may return a dict of
    phase timings, which is kept.
    """
    names = list(runs)
    i = first_index
    for _ in range(args.warmup):
        for name in names:
            runs[name](i)
        i += 1
    out = {name: {"wall": [], "cpu": [], "phases": []} for name in names}
    for r in range(args.repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            c0, t0 = time.process_time(), time.perf_counter()
            phases = runs[name](i)
            out[name]["wall"].append(time.perf_counter() - t0)
            out[name]["cpu"].append(time.process_time() - c0)
            out[name]["phases"].append(phases or {})
        i += 1
    return out


def run_sides(sides: dict, args, describe) -> tuple[dict, dict]:
    """Sets up each side and times `repeats` rounds; returns (rounds, info) keyed by side.

    `sides[name](info)` builds a side and takes its first step (it may read the info of sides
    set up before it) and returns (run, side_info); `describe(name, side_info)` is printed after
    it. By default every side is set up first and the timed calls alternate (`timed_rounds`);
    with `--sequential` each side is timed alone and freed before the next is set up.
    """
    runs, info, rounds = {}, {}, {}
    for name, setup in sides.items():
        with PeakMemory() as mem:
            run, info[name] = setup(info)
        info[name]["peak_gb"] = mem.added_gb
        print(describe(name, info[name]))
        if args.sequential:
            rounds.update(timed_rounds({name: run}, args, first_index=1))
            del run
        else:
            runs[name] = run
        gc.collect()
    if not args.sequential:
        rounds = timed_rounds(runs, args, first_index=1)
    return rounds, info


def summarize(rounds: dict, items: int) -> dict:
    wall, cpu = rounds["wall"], rounds["cpu"]
    med, best = statistics.median(wall), min(wall)
    return {"median_s": med, "min_s": best, "rate_median": items / med, "rate_best": items / best,
            "cpu_median_s": statistics.median(cpu), "times": wall, "cpu": cpu}


def paired_ratio(rounds: dict) -> float:
    """Median over rounds of torch wall / rlhf_jax wall (each round saw the same load)."""
    return statistics.median(t / j for t, j in zip(rounds["torch"]["wall"],
                                                    rounds["rlhf_jax"]["wall"]))


def fmt_times(times) -> str:
    return " ".join(f"{t:.2f}" for t in times)


# -- data -------------------------------------------------------------------------------------
def make_batches(args, vocab_size: int, count: int):
    import numpy as np

    rs = np.random.RandomState(args.seed + 1)
    out = []
    for _ in range(count):
        out.append({
            "query": rs.randint(0, vocab_size, (args.batch, args.query)).astype(np.int32),
            "samples": rs.randint(0, vocab_size, (args.batch, args.num_samples, args.response))
                         .astype(np.int32),
            "label": rs.randint(0, args.num_samples, (args.batch,)).astype(np.int32),
        })
    return out


# -- rlhf_jax ---------------------------------------------------------------------------------
def setup_jax(args, config, params, batches):
    """Compiles the train step; returns (run(i), info)."""
    import jax
    import jax.numpy as jnp
    import optax

    from rlhf_jax import label_types, models, networks, optim, sharding
    from rlhf_jax.runs import nonfinite

    label_type = label_types.get_label_type(f"best_of_{args.num_samples}")
    schedule = optim.reward_lr_schedule(args.lr, args.num_steps, kind="linear")
    tx = optim.make_optimizer(schedule, adam_style="tf", eps=1e-5)
    mesh = sharding.make_mesh(data=1, fsdp=-1, devices=jax.devices()[: args.devices])
    rules = sharding.DEFAULT_RULES
    param_sh = sharding.param_shardings(config, ("reward",), mesh, rules)
    abstract = jax.eval_shape(lambda: models.init_params(config, jax.random.key(0), ("reward",)))
    opt_sh = sharding.opt_state_shardings(tx, abstract, param_sh, mesh)
    state_sh = {"params": param_sh, "opt_state": opt_sh, "step": sharding.replicated(mesh)}

    # The same maths as RewardTrainer._loss / _train_step.
    def loss_fn(p, batch):
        rewards = networks.rewards_of_samples(p, batch["query"], batch["samples"], config)
        return label_type.loss(rewards, batch["label"])

    def train_step(state, batch):
        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], batch)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        new_params = optax.apply_updates(state["params"], updates)
        stats = {f"train/{k}": v for k, v in stats.items()}
        stats["train/lr"] = schedule(state["step"])
        stats["train/gain"] = new_params["reward_norm"]["gain"]
        flags = nonfinite.step_flags(loss, grads, new_params)
        return ({"params": new_params, "opt_state": opt_state, "step": state["step"] + 1}, stats,
                flags)

    step_fn = jax.jit(train_step, in_shardings=(state_sh, None),
                      out_shardings=(state_sh, None, None), donate_argnums=(0,))
    ctx = sharding.mesh_context(mesh, rules)
    ctx.__enter__()  # left open for the life of the benchmark
    p = jax.device_put(params, param_sh)
    box = {"state": {"params": p, "opt_state": jax.jit(tx.init, out_shardings=opt_sh)(p),
                     "step": jax.device_put(jnp.zeros((), jnp.int32), sharding.replicated(mesh))}}
    dev_batches = [{k: sharding.host_batch_to_global(v, mesh) for k, v in b.items()}
                   for b in batches]
    jax.block_until_ready(dev_batches)
    t0 = time.perf_counter()
    compiled = step_fn.lower(box["state"], dev_batches[0]).compile()
    compile_s = time.perf_counter() - t0
    losses = []

    def run(i):
        box["state"], stats, flags = compiled(box["state"], dev_batches[i])
        # The train loop reads its non-finite flags every step and stats every log step; read
        # both every step here.
        losses.append(float(jax.device_get(stats)["train/loss"]))
        assert int(flags) == 0, nonfinite.flag_names(int(flags))

    t0 = time.perf_counter()
    run(0)
    first_s = time.perf_counter() - t0
    info = {"compile_s": compile_s, "first_s": first_s, "losses": losses}
    mem = compiled.memory_analysis()
    if mem is not None:
        info["xla_temp_gb"] = mem.temp_size_in_bytes / 1e9
    return run, info


# -- PyTorch ----------------------------------------------------------------------------------
def setup_torch(args, ckpt_dir: str, head_np: dict, batches):
    """Builds the model and optimizer and takes the first step; returns (run(i), info)."""
    import numpy as np
    import torch
    import transformers

    torch.set_num_threads(args.threads or usable_cores())
    torch.manual_seed(args.seed)
    transformers.utils.logging.disable_progress_bar()

    class RewardModel(torch.nn.Module):
        """GPT2Model trunk + Linear(d, 1) head + trainable gain and bias."""

        def __init__(self):
            super().__init__()
            self.trunk = transformers.GPT2Model.from_pretrained(ckpt_dir, dtype=torch.float32)
            d = self.trunk.config.n_embd
            self.head = torch.nn.Linear(d, 1)
            with torch.no_grad():
                self.head.weight.copy_(torch.tensor(head_np["kernel"]).T)
                self.head.bias.copy_(torch.tensor(head_np["bias"]))
            self.gain = torch.nn.Parameter(torch.tensor(float(head_np["gain"])))
            self.bias = torch.nn.Parameter(torch.tensor(float(head_np["norm_bias"])))

        def forward(self, input_ids):
            hidden = self.trunk(input_ids=input_ids).last_hidden_state
            return self.head(hidden[:, -1]).squeeze(-1) * self.gain + self.bias

    model = RewardModel().eval()  # eval(): dropout off, as the original (spec §10.14)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-5)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: max(0.0, 1.0 - s / args.num_steps))
    n = args.num_samples

    def to_torch(b):
        q = torch.from_numpy(b["query"].astype(np.int64))
        s = torch.from_numpy(b["samples"].astype(np.int64))
        ids = torch.cat([q.repeat_interleave(n, dim=0), s.reshape(-1, s.shape[-1])], dim=1)
        return ids, torch.from_numpy(b["label"].astype(np.int64))

    data = [to_torch(b) for b in batches]
    losses = []

    def run(i):
        ids, label = data[i]
        rewards = model(ids).view(-1, n)
        loss = torch.nn.functional.cross_entropy(rewards, label)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))

    t0 = time.perf_counter()
    run(0)
    first_s = time.perf_counter() - t0
    info = {"first_s": first_s, "losses": losses, "threads": torch.get_num_threads(),
            "attn": getattr(model.trunk.config, "_attn_implementation", "n/a")}
    return run, info


def main(argv=None) -> None:
    args = parse_args(argv)
    setup_env(args)

    import jax
    import numpy as np

    from rlhf_jax import models
    from rlhf_jax.models import hf_import

    if args.batch % args.devices:
        sys.exit(f"--batch {args.batch} is not divisible by --devices {args.devices}")
    config = models.preset(args.model)
    if args.query + args.response > config.n_positions:
        sys.exit(f"query + response exceeds n_positions={config.n_positions}")
    load_start = print_header()
    seqs = args.batch * args.num_samples
    print(f"shapes: model {args.model} ({config.n_layer}L d{config.n_embd} vocab "
          f"{config.vocab_size}), batch {args.batch} labels x {args.num_samples} samples = {seqs} "
          f"sequences of {args.query}+{args.response} tokens, float32, lr {args.lr} (linear decay "
          f"over {args.num_steps} steps), repeats {args.repeats}, warmup {args.warmup}")

    params = models.init_params(config, jax.random.key(args.seed), heads=("reward",))
    params = jax.tree.map(np.asarray, params)
    batches = make_batches(args, config.vocab_size, 1 + args.warmup + args.repeats)
    head_np = {"kernel": params["reward_head"]["kernel"], "bias": params["reward_head"]["bias"],
               "gain": params["reward_norm"]["gain"], "norm_bias": params["reward_norm"]["bias"]}

    def describe(name, i):
        mem = f"memory +{i['peak_gb']:.2f} GB peak RSS"
        if name == "rlhf_jax":
            return (f"rlhf_jax: compile {i['compile_s']:.2f} s; first step {i['first_s']:.2f} s; "
                    f"{mem} (XLA temporaries {i.get('xla_temp_gb', float('nan')):.2f} GB)")
        return (f"torch:    first step {i['first_s']:.2f} s; {i['threads']} threads; attention "
                f"{i['attn']}; {mem}")

    sides = {}
    with tempfile.TemporaryDirectory(prefix="bench-reward-") as tmp:
        ckpt = os.path.join(tmp, "hf")
        hf_import.save_hf_checkpoint({"transformer": params["transformer"]}, config, ckpt)
        if args.only in ("both", "jax"):
            sides["rlhf_jax"] = lambda info: setup_jax(args, config, params, batches)
        if args.only in ("both", "torch"):
            sides["torch"] = lambda info: setup_torch(args, ckpt, head_np, batches)
        rounds, info = run_sides(sides, args, describe)
    runs = list(rounds)
    print(f"load average at end: {loadavg()}")
    for name in runs:
        print(f"{name:9s} wall s: {fmt_times(rounds[name]['wall'])}   cpu s: "
              f"{fmt_times(rounds[name]['cpu'])}")
    # Same weights, same batches: the first step's loss must agree (both sides train the same
    # model on the same data; later steps drift apart through the Adam eps form).
    for name in runs:
        print(f"{name} losses: " + " ".join(f"{x:.5f}" for x in info[name]["losses"]))
    if len(runs) == 2:
        diff = abs(info["torch"]["losses"][0] - info["rlhf_jax"]["losses"][0])
        print(f"first-step loss |diff|: {diff:.2e}")

    res = {name: summarize(rounds[name], args.batch) for name in runs}
    print()
    print(f"{'side':9s} {'median s':>9s} {'min s':>8s} {'CPU s':>7s} {'labels/s (median)':>18s} "
          f"{'labels/s (best)':>16s}")
    for name, r in res.items():
        print(f"{name:9s} {r['median_s']:9.2f} {r['min_s']:8.2f} {r['cpu_median_s']:7.2f} "
              f"{r['rate_median']:18.3f} {r['rate_best']:16.3f}")
    if len(runs) == 2:
        rj, rt = res["rlhf_jax"], res["torch"]
        ratio_med = rj["rate_median"] / rt["rate_median"]
        ratio_best = rj["rate_best"] / rt["rate_best"]
        paired = "n/a" if args.sequential else f"{paired_ratio(rounds):.2f}x"
        print(f"ratio rlhf_jax/torch labels/s: {ratio_med:.2f}x (medians), {ratio_best:.2f}x "
              f"(bests), {paired} (median of per-round ratios); CPU s ratio torch/rlhf_jax "
              f"{rt['cpu_median_s'] / rj['cpu_median_s']:.2f}x")
        print()
        print("| model | batch (labels) | query | response | torch labels/s | rlhf_jax labels/s "
              "| ratio (medians) | ratio (paired) | CPU s/step torch / rlhf_jax "
              "| peak RSS GB torch / rlhf_jax | jax compile s | load avg start / end |")
        print(f"| {args.model} | {args.batch} | {args.query} | {args.response} "
              f"| {rt['rate_median']:.3f} | {rj['rate_median']:.3f} | {ratio_med:.2f}x "
              f"| {paired} | {rt['cpu_median_s']:.1f} / {rj['cpu_median_s']:.1f} "
              f"| {info['torch']['peak_gb']:.1f} / {info['rlhf_jax']['peak_gb']:.1f} "
              f"| {info['rlhf_jax']['compile_s']:.0f} | {load_start} / {loadavg().split()[0]} |")
    print(f"({args.batch} labels = {seqs} sequences per step; labels/s = batch / wall time of one "
          f"train step; medians over {args.repeats} rounds"
          f"{', sides timed one after the other' if args.sequential else ', sides alternating'}; "
          f"CPU s = process CPU time of one step, all threads)")


if __name__ == "__main__":
    main()
