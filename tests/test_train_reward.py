"""Reward learning end to end: mock labels, train_reward, normalisation, bad input."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from rlhf_jax import label, labelers, train_reward
from rlhf_jax.data import labels as labels_lib
from rlhf_jax.tokenizer import PAD_ID, get_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


def load_config(name="sentiment", arg="runlocal"):
    spec = importlib.util.spec_from_file_location("cfg", os.path.join(ROOT, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.fixture(scope="module")
def mock_labels(tmp_path_factory):
    """96 VADER best-of-4 labels on samples of the tiny random initial model."""
    path = str(tmp_path_factory.mktemp("labels") / "labels.json")
    stats = label.write_mock_labels(load_config(), path, num_labels=96)
    return path, stats


def test_mock_labels_are_valid_and_follow_the_labeler(mock_labels):
    path, stats = mock_labels
    cfg = load_config()
    loaded = labels_lib.load_labels(path, "best_of_4", query_length=64, response_length=24,
                                    vocab_size=50257)
    assert loaded["query"].shape == (96, 64) and loaded["sample3"].shape == (96, 24)
    # Samples are post-processed as in the released files: pads only after a '.' at >= 16.
    for k in range(4):
        s = loaded[f"sample{k}"]
        for row in s[s[:, -1] == PAD_ID]:
            first_pad = int(np.argmax(row == PAD_ID))
            assert row[first_pad - 1] == cfg.task.truncate_token and first_pad - 1 >= 16
    # With temperature 0 the chosen sample is the one VADER likes best.
    tok = get_tokenizer()
    scorer = labelers.VaderSentimentScorer()
    for i in range(8):
        texts = [tok.decode([t for t in loaded[f"sample{k}"][i] if t != PAD_ID]) for k in range(4)]
        scores = scorer([""] * 4, texts)
        assert scores[loaded["best"][i]] == scores.max()
    assert stats["chosen_score"] >= stats["mean_score"]


def test_train_reward_entry_point(mock_labels, tmp_path):
    """Two-step smoke run of `python -m rlhf_jax.train_reward`, then a no-op resume."""
    workdir = str(tmp_path / "rm")
    cmd = [sys.executable, "-m", "rlhf_jax.train_reward",
           "--config", os.path.join(ROOT, "configs/sentiment.py:runlocal"), "--workdir", workdir,
           f"--config.labels.path={mock_labels[0]}", "--config.labels.num_train=16",
           "--config.labels.num_valid=16", "--config.rewards.log_every=1"]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "train_reward 2/2" in out.stdout + out.stderr
    for name in ("config.json", "metrics.jsonl", "reward_model.json", "reward_model", "tb"):
        assert os.path.exists(os.path.join(workdir, name)), name
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2]
    assert all(r["perf/tokens_per_sec"] > 0 for r in rows if "train/loss" in r)
    final = rows[-1]
    # After normalisation, fresh ρ samples score mean 0 / std 1 within sampling error (64 samples).
    n = final["verify/num_samples"]
    assert abs(final["verify/mean"]) < 4 / np.sqrt(n)
    assert 0.6 < final["verify/std"] < 1.4
    assert 0.0 <= final["valid/accuracy"] <= 1.0
    # The same command on a finished workdir resumes from the final checkpoint and stops at once.
    again = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from step 2" in again.stderr


def _synthetic_labels(path, n, seed=0):
    """Samples made of sentiment-bearing and neutral words, labelled by VADER (best of 4)."""
    tok = get_tokenizer()
    pos = "good great love happy wonderful excellent nice beautiful best amazing joy fun".split()
    neg = "bad terrible hate sad awful horrible worst ugly angry pain fear poor".split()
    neu = "the table walked window river paper house stone car door street tree".split()
    rng = np.random.default_rng(seed)

    def text():
        return " " + " ".join(rng.choice(pos + neg + neu * 3, size=rng.integers(4, 9))) + "."

    def encode(t, length):
        ids = tok.encode(t)[:length]
        return ids + [PAD_ID] * (length - len(ids))

    queries = np.array([encode(" The day began. " + text(), 64) for _ in range(n)])
    texts = [[text() for _ in range(4)] for _ in range(n)]
    samples = np.array([[encode(t, 24) for t in row] for row in texts])
    best = labelers.BestOfNLabeler(labelers.VaderSentimentScorer()).label([""] * n, texts)
    labels_lib.save_labels(path, labelers.make_label_records(queries, samples, best))


def test_reward_model_learns_mock_preferences(tmp_path):
    """On a tiny GPT-2, 512 VADER labels give held-out best-of-4 accuracy far above 25%."""
    path = str(tmp_path / "syn.json")
    _synthetic_labels(path, 640)
    cfg = load_config()
    cfg.labels.path, cfg.labels.num_train, cfg.labels.num_valid = path, 512, 128
    cfg.rewards.batch_size = 16
    final = train_reward.train_reward(cfg, str(tmp_path / "rm"))
    assert final["valid/num_labels"] == 128
    assert final["valid/accuracy"] > 0.5, final


def test_bad_input_fails_before_compute(mock_labels, tmp_path):
    path = mock_labels[0]
    cfg = load_config()
    cfg.labels.path = path
    cfg.labels.type = "best_of_four"
    with pytest.raises(ValueError, match="unknown label type 'best_of_four'"):
        train_reward.train_reward(cfg, str(tmp_path / "a"))
    cfg = load_config()
    cfg.labels.path, cfg.rewards.batch_size = path, 12
    with pytest.raises(ValueError, match="rewards.batch_size=12 is not divisible by the 8 devices"):
        train_reward.train_reward(cfg, str(tmp_path / "b"))
    cfg = load_config()
    cfg.labels.path, cfg.labels.num_train = path, 200
    with pytest.raises(ValueError, match="not enough labels: found 96"):
        train_reward.train_reward(cfg, str(tmp_path / "c"))
    cfg = load_config()
    cfg.labels.path, cfg.task.response_length = path, 20
    with pytest.raises(labels_lib.LabelFileError, match="record 0.*sample0"):
        train_reward.train_reward(cfg, str(tmp_path / "d"))
    cfg = load_config()
    cfg.labels.path, cfg.labels.num_train = path, 60
    with pytest.raises(ValueError, match="num_train=60 is not divisible by rewards.batch_size=8"):
        train_reward.train_reward(cfg, str(tmp_path / "e"))
    for sub in "abcde":
        assert not os.path.exists(tmp_path / sub / "checkpoints")


def test_reward_trunk_choices(tmp_path):
    """rewards.init: the policy's initial trunk (default), a random init, or an HF directory."""
    import jax

    from rlhf_jax import experiment
    from rlhf_jax.models import hf_import

    cfg = load_config()
    gpt_cfg = experiment.gpt2_config(cfg)
    policy = experiment.initial_trunk(cfg, gpt_cfg)
    assert experiment.reward_trunk(cfg, gpt_cfg, policy) is policy
    cfg.rewards.init = "random"
    random = experiment.reward_trunk(cfg, gpt_cfg, None)
    jax.tree.map(np.testing.assert_array_equal, random, policy)  # runlocal's policy is random too
    shifted = jax.tree.map(lambda x: x + 1.0, random)
    hf_import.save_hf_checkpoint({"transformer": shifted}, gpt_cfg, str(tmp_path / "hf"))
    cfg.rewards.init = str(tmp_path / "hf")
    loaded = experiment.reward_trunk(cfg, gpt_cfg, policy)
    jax.tree.map(np.testing.assert_allclose, loaded, shifted)
