"""One process of the multi-process train_policy run of tests/test_multihost.py.

  python -m tests.multihost_worker WORKDIR RM_DIR REPORT_JSON
  python -m tests.multihost_worker WORKDIR --online=STORE_DIR REPORT_JSON

The test starts one of these per process, with XLA_FLAGS giving each process its CPU devices
and RLHF_JAX_COORDINATOR / RLHF_JAX_NUM_PROCESSES / RLHF_JAX_PROCESS_ID describing the cluster
(`runtime.maybe_initialize_distributed`); without those it is the 1-process reference run.
Every process runs the identical program and writes REPORT_JSON (outside the workdir) with what
it saw, including the workdir files it opened for writing outside `checkpoints/` (where orbax
writes each process's shards): only process 0 may have any.
"""

from __future__ import annotations

import builtins
import json
import os
import sys
import time


def config(rm_dir: str):
    """The run both sides compare: tests/test_train_policy.py's tiny PPO config, 2 iterations."""
    from tests.test_train_policy import tiny_config

    cfg = tiny_config(total_episodes=32)  # batch 16: 2 PPO iterations
    cfg.rewards.trained_model = rm_dir
    return cfg


def online_config(store_dir: str):
    """tests/test_online.py's tiny online run, shortened to 2 PPO iterations and 2 reward-model
    rounds (16 labels, then 24), against the SQLite label store in `store_dir`."""
    from tests.test_online import online_config as tiny_online

    return tiny_online(**{"online.db": store_dir, "ppo.total_episodes": 32,
                          "online.total_labels": 24, "online.rm_rounds": 2})


def _record_writes(workdir: str, runtime) -> list[str]:
    """Records the workdir files this process opens for writing (checkpoints excepted)."""
    root = os.path.realpath(workdir) + os.sep
    skip = os.path.join(root, "checkpoints") + os.sep
    seen: list[str] = []

    def note(path) -> None:
        if isinstance(path, int):
            return
        real = os.path.realpath(os.fspath(path))
        if real.startswith(root) and not real.startswith(skip):
            seen.append(os.path.relpath(real, root))

    real_open, real_atomic = builtins.open, runtime.atomic_write_bytes

    def open_(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            note(file)
        return real_open(file, mode, *args, **kwargs)

    def atomic_write_bytes(path, data):
        note(path)
        return real_atomic(path, data)

    builtins.open = open_
    runtime.atomic_write_bytes = atomic_write_bytes
    return seen


def main(argv: list[str]) -> None:
    workdir, rm_dir, report = argv[1:4]
    t0 = time.time()
    from rlhf_jax import runtime

    # Without RLHF_JAX_COORDINATOR this is the single-process reference run.
    runtime.maybe_initialize_distributed()
    import jax

    from rlhf_jax import train_policy

    writes = _record_writes(workdir, runtime)
    cfg = (online_config(rm_dir.split("=", 1)[1]) if rm_dir.startswith("--online=")
           else config(rm_dir))
    last = train_policy.train_policy(cfg, workdir)
    out = {"process_index": jax.process_index(), "process_count": jax.process_count(),
           "device_count": jax.device_count(), "local_device_count": jax.local_device_count(),
           "workdir_writes": sorted(set(writes)), "last": last, "seconds": time.time() - t0}
    with open(report, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main(sys.argv)
