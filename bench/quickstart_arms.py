r"""Learned vs direct reward at the quickstart's scale: each arm run in turn, timed (issue 16).

  python bench/quickstart_arms.py --root /tmp/qs_arms \
      [--arm sentiment:labeler --arm sentiment:learned --arm descriptiveness:learned ...]

Each arm is `python -m rlhf_jax.quickstart --task TASK --reward REWARD --workdir ROOT/TASK_REWARD`:
the same tiny book-tuned GPT-2, seed and PPO budget (60 iterations of 32 episodes); the
learned arm also writes 4,352 mock labels and trains a reward model on 4,096 of them, the
direct arm (`rewards.kind=labeler`) skips both and maximises the labeler's score itself. Both
are judged by the labeler's own scorer on the same held-out queries (`quickstart.judge`).
Arms run one after another, never side by side, so that each wall time is its own; a line
per arm goes to ROOT/arms.jsonl with `date -u`, the wall seconds, the load averages before and
after, and the arm's summary.json (before/after score, final PPO KL). Not a test: it asserts
nothing. On a shared machine the wall times move with the load: quote them with it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_ARMS = ("sentiment:labeler", "sentiment:learned", "descriptiveness:learned",
                "descriptiveness:labeler")


def run_arm(root: str, arm: str) -> dict:
    """Runs one arm (TASK:REWARD) to completion; returns its record."""
    task, reward = arm.split(":")
    workdir = os.path.join(root, f"{task}_{reward}")
    cmd = [sys.executable, "-m", "rlhf_jax.quickstart", "--task", task, "--reward", reward,
           "--workdir", workdir]
    start, load_before = datetime.datetime.now(datetime.timezone.utc), os.getloadavg()
    t0 = time.time()
    with open(os.path.join(root, f"{task}_{reward}.log"), "w") as log:
        rc = subprocess.call(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    wall = time.time() - t0
    summary_path = os.path.join(workdir, "summary.json")
    summary = json.load(open(summary_path)) if rc == 0 and os.path.exists(summary_path) else None
    return {"arm": arm, "command": " ".join(cmd[1:]), "date_utc": start.isoformat(
        timespec="seconds"), "wall_s": round(wall, 1), "rc": rc,
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()], "summary": summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="Where each arm's workdir goes.")
    parser.add_argument("--arm", action="append", help="TASK:REWARD, repeatable; default: "
                        + ", ".join(DEFAULT_ARMS))
    args = parser.parse_args()
    os.makedirs(args.root, exist_ok=True)
    for arm in args.arm or DEFAULT_ARMS:
        record = run_arm(args.root, arm)
        with open(os.path.join(args.root, "arms.jsonl"), "a") as out:
            out.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
