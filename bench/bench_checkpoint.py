"""Benchmark: what the integrity checks add to a checkpoint save and restore.

Not a test. The train state of `train_reward` (reward model params, TF-style Adam slots, step)
for a GPT-2 preset, FSDP-sharded over `--devices` CPU devices as the trainer places it, is saved
with `checkpointing.Checkpointer` `--repeats` times with per-leaf checksums (the default) and as
many times without (the digest replaced by an empty dict), alternating, and then restored with
and without verification. Reported per side: the time until `save` returns (the async save's
blocking part: the digest plus orbax's copy to host), the time until the write is committed,
and the restore time; plus the digest alone and its one-off compilation.

    python bench/bench_checkpoint.py                     # tiny preset, 8 CPU devices
    python bench/bench_checkpoint.py --model 124M --devices 8 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={args.devices}")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    import jax
    import jax.numpy as jnp

    from rlhf_jax import checkpoint_integrity, checkpointing, models, optim, sharding

    cfg = models.preset(args.model)
    mesh = sharding.make_mesh(devices=jax.devices()[: args.devices])
    rules = sharding.DEFAULT_RULES
    tx = optim.make_optimizer(1e-4, adam_style="tf", eps=1e-5)
    param_sh = sharding.param_shardings(cfg, ("reward",), mesh, rules)
    abstract = jax.eval_shape(lambda: models.init_params(cfg, jax.random.key(0), ("reward",)))
    opt_sh = sharding.opt_state_shardings(tx, abstract, param_sh, mesh)
    with sharding.mesh_context(mesh, rules):
        params = jax.jit(lambda k: models.init_params(cfg, k, ("reward",)),
                         out_shardings=param_sh)(jax.random.key(0))
        state = {"params": params, "opt_state": jax.jit(tx.init, out_shardings=opt_sh)(params),
                 "step": jnp.zeros((), jnp.int32)}
    n = sum(x.size for x in jax.tree.leaves(state))
    print(f"{args.model}: {n / 1e6:.1f}M state elements in {len(jax.tree.leaves(state))} leaves "
          f"on {args.devices} devices")

    t0 = time.perf_counter()
    checkpoint_integrity.tree_checksums(state)
    print(f"digest, first call (compile + run): {time.perf_counter() - t0:.3f} s")
    digest = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        checkpoint_integrity.tree_checksums(state)
        digest.append(time.perf_counter() - t0)
    print(f"digest alone: median {statistics.median(digest) * 1e3:.1f} ms")

    real = checkpoint_integrity.tree_checksums
    times = {"with checksums": [], "without": []}
    with tempfile.TemporaryDirectory() as root:
        ckpt = checkpointing.Checkpointer(root, save_every=1, keep=2 * args.repeats + 2)
        step = 0
        for i in range(args.repeats + 1):
            for side in ("with checksums", "without") if i % 2 else ("without", "with checksums"):
                checkpoint_integrity.tree_checksums = real if side == "with checksums" else (
                    lambda tree: {})
                step += 1
                t0 = time.perf_counter()
                ckpt.save(step, state, {"step": step})
                returned = time.perf_counter() - t0
                ckpt.wait_until_finished()
                committed = time.perf_counter() - t0
                if i:  # the first round warms orbax up
                    times[side].append((step, returned, committed))
        checkpoint_integrity.tree_checksums = real
        target = checkpointing.abstract_state(state)
        for side, rows in times.items():
            restore = []
            for step, _, _ in rows:
                t0 = time.perf_counter()
                ckpt.restore(step, target)  # verifies only the steps saved with checksums
                restore.append(time.perf_counter() - t0)
            ret = statistics.median(r for _, r, _ in rows)
            com = statistics.median(c for _, _, c in rows)
            print(f"{side:15s}: save returns {ret * 1e3:7.1f} ms, committed {com * 1e3:7.1f} ms, "
                  f"restore {statistics.median(restore) * 1e3:7.1f} ms (medians of {len(rows)})")
        ckpt.close()


if __name__ == "__main__":
    main()
