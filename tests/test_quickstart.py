"""The quickstart pipeline (SFT, mock labels, reward model, PPO, before/after) at toy sizes."""

import json
import os

import pytest

from rlhf_jax import quickstart


@pytest.mark.slow
@pytest.mark.parametrize("task", ["tldr"])  # the sentiment pipeline is the same code; ~3 min each
def test_quickstart_runs_every_stage(task, tmp_path):
    workdir = str(tmp_path / task)
    cfg = quickstart.quickstart_config(workdir, task)
    cfg.sft.steps, cfg.sft.eval_batches, cfg.samples_per_log = 4, 1, 2
    cfg.labels.num_train, cfg.labels.num_valid = 32, 16
    cfg.rewards.normalize_samples = cfg.rewards.verify_samples = 32
    cfg.ppo.batch_size, cfg.ppo.total_episodes = 16, 32
    summary = quickstart.run_quickstart(workdir, task, num_queries=4, config=cfg,
                                        samples_per_query=2)
    assert summary["num_samples"] == 8 and summary["task"] == task
    key = "vader" if task == "sentiment" else "copying_score"
    assert -1.0 <= summary["before"][key] <= 1.0 and -1.0 <= summary["after"][key] <= 1.0
    if task == "tldr":
        assert set(summary["after"]["novelty"]) >= {"novel_1gram_pct", "novel_sentence_pct"}
        assert "rouge" in summary["after"]  # builtin:lead gives references
    for name in ("before_after.md", "summary.json", "samples_before_after.jsonl",
                 "policy/plot.png", "reward/reward_model.json", "sft/hf_model"):
        assert os.path.exists(os.path.join(workdir, name)), name
    assert json.load(open(os.path.join(workdir, "summary.json"))) == summary
    # A rerun skips every finished stage and reproduces the same summary.
    assert quickstart.run_quickstart(workdir, task, num_queries=4, config=cfg,
                                     samples_per_query=2) == summary


def test_judges():
    rows = [{"query": "It was a day.", "response": "I love this wonderful day!"},
            {"query": "It was a day.", "response": "I hate this awful day."}]
    assert quickstart.judge("sentiment", rows)["vader"] == pytest.approx(
        (rows[0]["score"] + rows[1]["score"]) / 2)
    assert rows[0]["score"] > 0.5 > -0.5 > rows[1]["score"]
    rows = [{"query": "It was a day.", "response": "The pale moon rose slowly over silent hills."},
            {"query": "It was a day.", "response": "He went to the shop and then he left."}]
    judged = quickstart.judge("descriptiveness", rows)
    assert rows[0]["score"] > rows[1]["score"] and set(judged) == {"descriptiveness",
                                                                   "descriptiveness_stderr"}
    rows = [{"query": "The cat sat on the mat. It purred.", "response": "The cat sat on the mat.",
             "reference": "A cat sat."},
            {"query": "The cat sat on the mat. It purred.", "response": "Dogs bark loudly.",
             "reference": "A cat sat."}]
    judged = quickstart.judge("tldr", rows)
    assert rows[0]["score"] > 0 == rows[1]["score"]
    assert judged["novelty"]["novel_1gram_pct"] == pytest.approx(100 * 3 / 9)
    assert set(judged["rouge"]) >= {"rouge1", "rouge2", "rougeL"}


def test_unknown_task():
    with pytest.raises(ValueError, match="known tasks are sentiment, descriptiveness, tldr"):
        quickstart.quickstart_config("/tmp/x", "cnn")
    with pytest.raises(ValueError, match="known rewards are learned, labeler"):
        quickstart.quickstart_config("/tmp/x", "sentiment", reward="direct")
    with pytest.raises(ValueError, match="--reward labeler uses none"):
        quickstart.quickstart_config("/tmp/x", "sentiment", online=True, reward="labeler")
    cfg = quickstart.quickstart_config("/tmp/x", "sentiment", reward="labeler")
    assert cfg.rewards.kind == "labeler"
