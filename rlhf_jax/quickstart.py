r"""The mock sentiment experiment end to end on a CPU, from nothing.

  python -m rlhf_jax.quickstart --workdir /tmp/quickstart

Stages (each resumable; rerunning the command skips what is done):
1. `sft/`: a tiny random GPT-2 (real GPT-2 vocabulary) is fine-tuned on the bundled book
   passages, so that it writes words and sentences (the paper's style tasks also started from a
   book-fine-tuned model);
2. `labels.json`: mock best-of-4 labels: a VADER sentiment labeler picks the best of 4 samples of
   that model, as the paper's mock sentiment experiment did with a classifier;
3. `reward/`: the reward model, trained on those labels and normalised;
4. `policy/`: PPO against the reward model, with the adaptive KL penalty;
5. `before_after.md`, `summary.json`: samples of the initial and the trained policy on held-out
   queries, scored by the VADER labeler itself (not by the learned reward).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os

import ml_collections
import numpy as np
from absl import app, flags

from rlhf_jax import (
    config_lib,
    experiment,
    label,
    labelers,
    runtime,
    sample,
    train_policy,
    train_reward,
    train_sft,
)
from rlhf_jax.data import sources

logger = logging.getLogger(__name__)
CONFIG_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "configs", "sentiment.py")


def quickstart_config(workdir: str) -> ml_collections.ConfigDict:
    """`configs/sentiment.py:runlocal` plus the quickstart's SFT stage and CPU-sized PPO."""
    spec = importlib.util.spec_from_file_location("sentiment_config", CONFIG_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("runlocal")
    config.sft = config_lib.sft_config()
    config_lib.sft_tiny_overrides(config)
    config.labels.path = os.path.join(workdir, "labels.json")
    config.labels.num_train, config.labels.num_valid = 512, 128
    config.rewards.batch_size = 16
    config.rewards.trained_model = os.path.join(workdir, "reward")
    # PPO sized for two CPU cores; a random-init tiny model needs a much larger step than the
    # original's 1e-5 for pretrained GPT-2.
    config.ppo.batch_size = 32
    config.ppo.total_episodes = 32 * 60
    config.ppo.lr = 3e-4
    config.log_every = 5
    config.ckpt_every = 20
    return config


def vader_scores(rows: list[dict]) -> np.ndarray:
    scorer = labelers.VaderSentimentScorer("response")
    return scorer([r["query"] for r in rows], [r["response"] for r in rows])


def _table(before: list[dict], after: list[dict], n: int = 6) -> str:
    lines = ["| query (end) | initial policy | VADER | trained policy | VADER |",
             "|---|---|---|---|---|"]
    clean = lambda s: s.replace("|", "/").replace("\n", " ").strip()  # noqa: E731
    for b, a in zip(before[:n], after[:n]):
        lines.append(f"| …{clean(b['query'][-60:])} | {clean(b['response'])} | {b['vader']:.2f} "
                     f"| {clean(a['response'])} | {a['vader']:.2f} |")
    return "\n".join(lines) + "\n"


def run_quickstart(workdir: str, num_queries: int = 64) -> dict:
    """Runs every stage; returns the summary (VADER score before and after PPO)."""
    os.makedirs(workdir, exist_ok=True)
    config = quickstart_config(workdir)
    sft_dir = os.path.join(workdir, "sft")
    logger.info("[1/5] supervised fine-tuning of a tiny GPT-2 on the bundled book passages")
    train_sft.train_sft(config, sft_dir)
    config.model.checkpoint = os.path.join(sft_dir, train_sft.HF_MODEL_DIR)
    if not os.path.exists(config.labels.path):
        logger.info("[2/5] mock labels: VADER picks the best of 4 samples")
        label.write_mock_labels(config, config.labels.path)
    logger.info("[3/5] reward model")
    rm_final = train_reward.train_reward(config, config.rewards.trained_model)
    logger.info("[4/5] PPO")
    policy_dir = os.path.join(workdir, "policy")
    last = train_policy.train_policy(config, policy_dir)
    logger.info("[5/5] samples of the initial and the trained policy on held-out queries")
    texts = sources.load_texts(config.task.query_dataset, "test")[:num_queries]
    gpt_cfg = experiment.gpt2_config(config)
    initial = {"transformer": experiment.initial_trunk(config, gpt_cfg)}
    before = sample.sample_texts(config, initial, texts, num_samples=2, seed=1)
    trained, _ = sample.load_policy(policy_dir)
    after = sample.sample_texts(config, trained, texts, num_samples=2, seed=1)
    for rows in (before, after):
        for row, score in zip(rows, vader_scores(rows)):
            row["vader"] = float(score)
    summary = {
        "vader_before": float(np.mean([r["vader"] for r in before])),
        "vader_after": float(np.mean([r["vader"] for r in after])),
        "num_samples": len(after),
        "reward_model_valid_accuracy": rm_final.get("valid/accuracy"),
        "final_objective_score": last.get("objective/score"),
        "final_objective_kl": last.get("objective/kl"),
    }
    md = (f"# Quickstart: before and after PPO\n\nMean VADER compound score of {len(after)} "
          f"samples on held-out queries: **{summary['vader_before']:.3f} → "
          f"{summary['vader_after']:.3f}**.\n\n" + _table(before, after))
    runtime.atomic_write_text(os.path.join(workdir, "before_after.md"), md)
    runtime.atomic_write_text(os.path.join(workdir, "summary.json"), json.dumps(summary, indent=2))
    print(md, flush=True)
    print(json.dumps(summary, indent=2), flush=True)
    return summary


def main(argv):
    del argv
    runtime.setup_logging(flags.FLAGS.workdir)
    run_quickstart(flags.FLAGS.workdir)


if __name__ == "__main__":
    flags.DEFINE_string("workdir", None, "Where every stage writes its outputs.")
    flags.mark_flags_as_required(["workdir"])
    app.run(main)
