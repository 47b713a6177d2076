"""Benchmark: one PPO iteration, rlhf_jax against the same iteration in PyTorch + transformers.

Not a test. One iteration = rollout (sample responses, reference log-probs, reward-model score
of the truncated response with the -1 penalty, KL-penalised per-token rewards) + update
(`noptepochs` x `nminibatches` Adam steps on the clipped policy + value loss), with the books
task's settings: temperature 0.7, truncation at '.' (id 13) from index 16, KL coefficient 0.15,
reward whitening, GAE (gamma 1, lambda 0.95), 4 epochs of 1 minibatch, lr 1e-5, Adam eps 1e-5.

- rlhf_jax: `ppo_trainer.PPOFunctions` built as `train_policy.train_policy` builds it (mesh,
  param / optimizer-state shardings, `PPOSettings.from_config`, `ppo_trainer.make_optimizer`, the
  `to_rollout` reshard); one iteration = `to_rollout` + `fns.rollout(...)` (its stages: prefill,
  decode, reference, reward, finish, each timed) + `fns.update(...)` + reading the stats back, as
  the train loop does. Every program is compiled ahead of time; compile time is reported apart.
- PyTorch: `torch_ppo_reference.PPOReference`, the same iteration written in the style of TRL's
  PPO loop (HF `generate` with the KV cache, then forwards of policy, reference and reward model,
  GAE as a Python loop, 4 epochs of Adam steps); see that module's docstring.

Same GPT-2 weights on both sides (our random init exported with `save_hf_checkpoint` and loaded
with `from_pretrained`; value head zero; the reward head copied), same random query batches (no
pads). A check before the timings: torch's reference forward on rlhf_jax's first rollout must
reproduce the sampler's log-probs (policy = reference at that point).

    python bench/bench_ppo.py                          # 124M, batch 16, query 64, response 24
    python bench/bench_ppo.py --model tiny --repeats 3
    python bench/bench_ppo.py --only jax --repeats 2   # rlhf_jax alone (phases are always timed)
    python bench/bench_ppo.py --device cuda --dtype bfloat16 --batch 512   # on a GPU (issue 15)

Each side's first iteration (and JAX's compile) is reported apart; then `--warmup` untimed and
`--repeats` timed rounds of one iteration per side, alternating (order swapped every round) so
both sides see the same load; `--sequential` times one side after the other instead and frees
the first before the second starts (about 6 GB peak instead of about 12 GB for both at 124M).
Wall and process CPU seconds are recorded per iteration, with per-phase timings. episodes/s =
batch / seconds per iteration. JAX runs on one CPU device by default (`--devices 1`); XLA sizes
its own intra-op thread pool, `--threads` sets torch's.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_reward import (  # noqa: E402  (helpers shared by the two benchmarks)
    add_common_flags,
    fmt_times,
    loadavg,
    paired_ratio,
    print_header,
    run_sides,
    setup_env,
    summarize,
    usable_cores,
)

PHASES_TORCH = ("generate", "policy_fwd", "ref_fwd", "reward", "advantages", "update")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="124M", help="GPT-2 preset (124M, 355M, tiny, ...)")
    p.add_argument("--batch", type=int, default=16, help="rollouts per iteration (ppo.batch_size)")
    p.add_argument("--query", type=int, default=64, help="query length (tokens, no pads)")
    p.add_argument("--response", type=int, default=24, help="tokens sampled per rollout")
    p.add_argument("--noptepochs", type=int, default=4)
    p.add_argument("--nminibatches", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--kl-coef", type=float, default=0.15)
    p.add_argument("--repeats", type=int, default=3,
                   help="timed rounds (one iteration per side each)")
    p.add_argument("--warmup", type=int, default=0,
                   help="untimed rounds after each side's first iteration (JAX: after compile)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: torch on the GPU and JAX on its default (GPU) backend")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="both sides: rlhf_jax's model.dtype; torch mixed precision (float32 "
                        "weights, bfloat16 autocast)")
    p.add_argument("--micro-batch", type=int, default=0,
                   help="rlhf_jax: model.micro_batch_size (rows per forward/backward; 0 = all)")
    add_common_flags(p)
    return p.parse_args(argv)


def ppo_config(args):
    from rlhf_jax import config_lib

    # The books task's PPO settings at the benchmark's batch; whitening over the whole batch
    # (one group: the batch is already one original rank's worth or less).
    return config_lib.ppo_config(
        batch_size=args.batch, nminibatches=args.nminibatches, noptepochs=args.noptepochs,
        lr=args.lr, whiten_groups=1, total_episodes=1_000_000,
        kl=dict(coef=args.kl_coef, adaptive=False, target=6.0, horizon=10000))


def task_spec(args, config):
    from rlhf_jax.data import tasks

    return tasks.TaskSpec(query_length=args.query, response_length=args.response,
                          pad_id=config.pad_id, truncate_token=13, truncate_after=16,
                          penalty_reward_value=-1.0, temperature=0.7)


# -- rlhf_jax ---------------------------------------------------------------------------------
def setup_jax(args, config, policy_params, rm_params, queries_list):
    """Compiles every PPO program and runs the first iteration; returns (run(i), info)."""
    import math

    import jax
    import jax.numpy as jnp
    import numpy as np

    from rlhf_jax import ppo_trainer, sharding
    from rlhf_jax.runs import nonfinite
    from rlhf_jax import programs as programs_lib

    p = ppo_config(args)
    spec = task_spec(args, config)
    mesh = sharding.make_mesh(data=1, fsdp=-1, devices=jax.devices()[: args.devices])
    rules = sharding.DEFAULT_RULES
    ppo_trainer.check_ppo_config(p, mesh, args.micro_batch)
    settings = ppo_trainer.PPOSettings.from_config(p, args.micro_batch)
    num_updates = math.ceil(p.total_episodes / p.batch_size)
    tx = ppo_trainer.make_optimizer(p, num_updates)
    lay = ppo_trainer.build_layout(config, config, settings, tx, mesh, rules)
    fns = lay.functions(config, config, spec, settings, tx, mesh)
    repl = sharding.replicated(mesh)
    rng_sample, rng_shuffle = jax.random.split(jax.random.key(args.seed), 2)

    ctx = sharding.mesh_context(mesh, rules)
    ctx.__enter__()  # left open for the life of the benchmark
    trainable = jax.device_put({"policy": policy_params}, lay.trainable)
    ref = jax.device_put({"transformer": policy_params["transformer"]}, lay.ref)
    rm = jax.device_put(rm_params, lay.reward)
    box = {"state": {"params": trainable,
                     "opt_state": jax.jit(tx.init, out_shardings=lay.opt_state)(trainable),
                     "step": jax.device_put(jnp.zeros((), jnp.int32), repl),
                     "kl_coef": jax.device_put(jnp.float32(p.kl.coef), repl)}}
    queries = [sharding.host_batch_to_global(q, mesh) for q in queries_list]
    jax.block_until_ready((box, ref, rm, queries))

    # Every program compiled ahead of time, as train_policy runs them (timed apart).
    programs = programs_lib.ppo_programs(fns, lay.to_rollout(), lay, config, mesh, rules, spec)
    t0 = time.perf_counter()
    reports, to_rollout = programs_lib.compile_ppo(fns, lay.to_rollout(), programs, mesh, rules)
    info = {"compile_s": time.perf_counter() - t0,
            "xla_temp_gb": {r.name: r.temp_bytes / 1e9 for r in reports
                            if r.name in ("decode", "reference", "update")}}

    def run(i):
        t0 = time.perf_counter()
        state = box.pop("state")
        policy = to_rollout(state["params"]["policy"])
        timings = {}
        data, stats, extras = fns.rollout(policy, None, ref, rm, queries[i], state["kl_coef"],
                                          jax.random.fold_in(rng_sample, i), timings)
        del policy
        t1 = time.perf_counter()
        if "first_rollout" not in info:
            info["first_rollout"] = {k: np.asarray(v) for k, v in jax.device_get(data).items()}
        state, train_stats, flags = fns.update(state, data, jax.random.fold_in(rng_shuffle, i))
        # The train loop reads every stat back each iteration (finiteness check, KL control).
        stats = {k: float(v) for k, v in jax.device_get({**stats, **train_stats}).items()}
        assert int(flags) == 0, nonfinite.flag_names(int(flags))
        box["state"] = state
        info.setdefault("first_stats", stats)
        return {"rollout": t1 - t0, "update": time.perf_counter() - t1,
                **{f"rollout/{k}": v for k, v in timings.items()}}

    t0 = time.perf_counter()
    run(0)
    info["first_s"] = time.perf_counter() - t0
    return run, info


# -- PyTorch ----------------------------------------------------------------------------------
def setup_torch(args, ckpt_dir, rm_head, queries_list, first_rollout):
    """Loads the three models and runs the first iteration; returns (run(i), info)."""
    import numpy as np
    import torch

    import torch_ppo_reference as ref_impl

    torch.set_num_threads(args.threads or usable_cores())
    hp = ref_impl.Hyper(batch_size=args.batch, query_length=args.query,
                        response_length=args.response, kl_coef=args.kl_coef, lr=args.lr,
                        noptepochs=args.noptepochs, nminibatches=args.nminibatches,
                        device=args.device, dtype=args.dtype)
    runner = ref_impl.PPOReference(ckpt_dir, rm_head, hp, seed=args.seed)
    info = {"threads": torch.get_num_threads(), "attn": runner.attn}

    if first_rollout is not None:
        # rlhf_jax's sampler log-probs on its own first rollout (policy == reference then)
        # against torch's reference forward on the same tokens: same weights, same maths.
        ctx = torch.from_numpy(np.asarray(first_rollout["context"], np.int64))
        resp = torch.from_numpy(np.asarray(first_rollout["responses"], np.int64))
        with torch.no_grad(), runner.autocast():
            lp = runner.ref_logprobs(torch.cat([ctx, resp], 1).to(runner.device),
                                     ctx.shape[1]).float().cpu().numpy()
        info["check_logprob_maxdiff"] = float(np.max(np.abs(lp - first_rollout["logprobs"])))

    qs = [torch.from_numpy(np.asarray(q, np.int64)) for q in queries_list]

    def run(i):
        phases, stats = runner.iteration(qs[i])
        info.setdefault("first_stats", stats)
        return phases

    t0 = time.perf_counter()
    run(0)
    info["first_s"] = time.perf_counter() - t0
    return run, info


def median_phases(phases: list[dict]) -> dict:
    import statistics

    return {k: statistics.median(p[k] for p in phases) for k in phases[0]}


def main(argv=None) -> None:
    args = parse_args(argv)
    setup_env(args)

    import jax
    import numpy as np

    from rlhf_jax import models
    from rlhf_jax.models import hf_import

    if args.batch % args.devices:
        sys.exit(f"--batch {args.batch} is not divisible by --devices {args.devices}")
    config = models.preset(args.model, dtype=args.dtype)
    if args.query + args.response > config.n_positions:
        sys.exit(f"query + response exceeds n_positions={config.n_positions}")
    load_start = print_header()
    print(f"shapes: model {args.model} ({config.n_layer}L d{config.n_embd} vocab "
          f"{config.vocab_size}), batch {args.batch}, query {args.query}, response "
          f"{args.response}, {args.dtype} on {args.device}; T 0.7, truncate at 13 from 16, penalty -1, kl_coef "
          f"{args.kl_coef}, whiten rewards, gamma 1, lam 0.95, {args.noptepochs} epochs x "
          f"{args.nminibatches} minibatch, lr {args.lr}; repeats {args.repeats}, warmup "
          f"{args.warmup}")

    k_policy, k_rm = jax.random.split(jax.random.key(args.seed))
    policy_params = jax.tree.map(np.asarray, models.init_params(config, k_policy, ("value",)))
    rm_init = jax.tree.map(np.asarray, models.init_params(config, k_rm, ("reward",)))
    # The reward model starts from the same trunk (as after train_reward from the same init),
    # with its own reward head and gain/bias; separate copies on both sides.
    rm_params = {"transformer": jax.tree.map(np.copy, policy_params["transformer"]),
                 "reward_head": rm_init["reward_head"], "reward_norm": rm_init["reward_norm"]}
    rm_head = {"kernel": rm_params["reward_head"]["kernel"],
               "bias": rm_params["reward_head"]["bias"],
               "gain": rm_params["reward_norm"]["gain"],
               "norm_bias": rm_params["reward_norm"]["bias"]}
    rs = np.random.RandomState(args.seed + 1)
    n_iter = 1 + args.warmup + args.repeats
    queries = [rs.randint(0, config.vocab_size, (args.batch, args.query)).astype(np.int32)
               for _ in range(n_iter)]

    def describe(name, i):
        mem = f"memory +{i['peak_gb']:.2f} GB peak RSS"
        if name == "rlhf_jax":
            return (f"rlhf_jax: compile {i['compile_s']:.2f} s; first iteration "
                    f"{i['first_s']:.2f} s; {mem} (XLA temporaries: "
                    + ", ".join(f"{k} {v:.2f} GB" for k, v in i["xla_temp_gb"].items()) + ")")
        return (f"torch:    first iteration {i['first_s']:.2f} s; {i['threads']} threads; "
                f"attention {i['attn']}; {mem}")

    sides = {}
    with tempfile.TemporaryDirectory(prefix="bench-ppo-") as tmp:
        ckpt = os.path.join(tmp, "hf")
        hf_import.save_hf_checkpoint({"transformer": policy_params["transformer"]}, config, ckpt)
        if args.only in ("both", "jax"):
            sides["rlhf_jax"] = lambda info: setup_jax(args, config, policy_params, rm_params,
                                                       queries)
        if args.only in ("both", "torch"):
            sides["torch"] = lambda info: setup_torch(
                args, ckpt, rm_head, queries, info.get("rlhf_jax", {}).get("first_rollout"))
        rounds, info = run_sides(sides, args, describe)
    runs = list(rounds)
    print(f"load average at end: {loadavg()}")
    for name in runs:
        print(f"{name:9s} wall s: {fmt_times(rounds[name]['wall'])}   cpu s: "
              f"{fmt_times(rounds[name]['cpu'])}")

    stat_keys = ("objective/kl", "objective/score", "objective/valid_fraction",
                 "ppo/policy/approxkl", "ppo/policy/clipfrac", "ppo/loss/value")
    for name in runs:
        s = info[name]["first_stats"]
        print(f"{name} first-iteration stats: "
              + ", ".join(f"{k} {s[k]:.4g}" for k in stat_keys if k in s))
    if "check_logprob_maxdiff" in info.get("torch", {}):
        print(f"check: max |torch reference log-prob - rlhf_jax sampler log-prob| on rlhf_jax's "
              f"first rollout = {info['torch']['check_logprob_maxdiff']:.2e}")

    res = {name: summarize(rounds[name], args.batch) for name in runs}
    ph = {name: median_phases(rounds[name]["phases"]) for name in runs}
    print()
    print("phases (median s):")
    if "torch" in runs:
        pt = ph["torch"]
        print("  torch:    " + ", ".join(f"{k} {pt[k]:.2f}" for k in PHASES_TORCH)
              + f"; rollout total {sum(pt[k] for k in PHASES_TORCH[:5]):.2f}")
        pt["rollout"] = sum(pt[k] for k in PHASES_TORCH[:5])
    if "rlhf_jax" in runs:
        print("  rlhf_jax: " + ", ".join(f"{k} {v:.2f}" for k, v in ph["rlhf_jax"].items()))

    print()
    print(f"{'side':9s} {'median s/it':>12s} {'min s/it':>9s} {'CPU s/it':>9s} "
          f"{'episodes/s (median)':>20s} {'episodes/s (best)':>18s}")
    for name, r in res.items():
        print(f"{name:9s} {r['median_s']:12.2f} {r['min_s']:9.2f} {r['cpu_median_s']:9.2f} "
              f"{r['rate_median']:20.3f} {r['rate_best']:18.3f}")
    if len(runs) == 2:
        rj, rt = res["rlhf_jax"], res["torch"]
        ratio_med = rj["rate_median"] / rt["rate_median"]
        ratio_best = rj["rate_best"] / rt["rate_best"]
        paired = "n/a" if args.sequential else f"{paired_ratio(rounds):.2f}x"
        print(f"ratio rlhf_jax/torch episodes/s: {ratio_med:.2f}x (medians), {ratio_best:.2f}x "
              f"(bests), {paired} (median of per-round ratios); CPU s ratio torch/rlhf_jax "
              f"{rt['cpu_median_s'] / rj['cpu_median_s']:.2f}x")
        pj, pt = ph["rlhf_jax"], ph["torch"]
        print()
        print("| model | batch | query | response | torch s/it | rlhf_jax s/it | torch eps/s "
              "| rlhf_jax eps/s | ratio (medians) | ratio (paired) | rollout s torch / rlhf_jax "
              "| update s torch / rlhf_jax | CPU s/it torch / rlhf_jax "
              "| peak RSS GB torch / rlhf_jax | jax compile s | load avg start / end |")
        print(f"| {args.model} | {args.batch} | {args.query} | {args.response} "
              f"| {rt['median_s']:.1f} | {rj['median_s']:.1f} | {rt['rate_median']:.3f} "
              f"| {rj['rate_median']:.3f} | {ratio_med:.2f}x | {paired} "
              f"| {pt['rollout']:.1f} / {pj['rollout']:.1f} | {pt['update']:.1f} / {pj['update']:.1f} "
              f"| {rt['cpu_median_s']:.1f} / {rj['cpu_median_s']:.1f} "
              f"| {info['torch']['peak_gb']:.1f} / {info['rlhf_jax']['peak_gb']:.1f} "
              f"| {info['rlhf_jax']['compile_s']:.0f} | {load_start} / {loadavg().split()[0]} |")
    print(f"({args.batch} episodes per iteration; episodes/s = batch / wall time of one iteration; "
          f"medians over {args.repeats} rounds"
          f"{', sides timed one after the other' if args.sequential else ', sides alternating'}; "
          f"CPU s = process CPU time, all threads)")


if __name__ == "__main__":
    main()
