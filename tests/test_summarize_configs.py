"""configs/tldr.py and configs/cnndm.py: the original launch.py values, and working variants."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from rlhf_jax import evaluate, experiment, label, labelers, models
from rlhf_jax.data import summarization, tasks
from rlhf_jax.tokenizer import get_tokenizer
from tests.test_train_reward import ROOT, load_config

LABELS = "https://openaipublic.blob.core.windows.net/lm-human-preferences/labels/"


@pytest.mark.parametrize("name", ["tldr", "cnndm"])
def test_original_values(name):
    cfg = load_config(name, None)
    original = summarization.summarization_task(name)
    for key in ("query_length", "response_length", "start_text", "end_text", "query_prefix",
                "query_suffix", "truncate_token", "truncate_after", "penalty_reward_value",
                "temperature"):
        assert cfg.task[key] == original[key], key
    assert cfg.task.query_dataset == {"tldr": "tfds:reddit", "cnndm": "tfds:cnn_dailymail"}[name]
    assert (cfg.model.preset, cfg.model.checkpoint, cfg.seed) == ("124M", "gpt2", 1)
    assert cfg.labels.path == f"{LABELS}{name}/online_45k.json"
    assert (cfg.labels.type, cfg.labels.num_train) == ("best_of_4", 46000)
    r = cfg.rewards
    assert (r.batch_size, r.lr, r.rollout_batch_size) == (16, 2.5e-5, 128)
    assert (r.normalize_before, r.normalize_after, r.normalize_samples) == (True, True, 256)
    p = cfg.ppo
    assert (p.total_episodes, p.batch_size, p.lr, p.nminibatches, p.noptepochs) == (
        1_000_000, 32, 2e-6, 1, 4)
    # The original's `rewards.whiten=False` (a non-existent field, spec §6.3.1), as intended.
    assert p.whiten_rewards is False
    assert (p.kl.coef, p.kl.adaptive) == ({"tldr": 0.03, "cnndm": 0.01}[name], False)
    assert cfg.labeler.kind == "copying" and cfg.sft.mode == "summarize"
    spec = experiment.task_spec(cfg, get_tokenizer(), experiment.gpt2_config(cfg))
    assert spec.context_length + spec.response_length <= 600


@pytest.mark.parametrize("name", ["tldr", "cnndm"])
def test_runlocal_fits_the_tiny_model(name):
    cfg = load_config(name)
    gpt_cfg = experiment.gpt2_config(cfg)
    assert gpt_cfg == models.preset("tiny")
    spec = experiment.task_spec(cfg, get_tokenizer(), gpt_cfg)
    assert spec.context_length + spec.response_length <= gpt_cfg.n_positions
    assert spec.truncate_after < spec.response_length
    # Task formatting is still the original's; only sizes shrink.
    assert (cfg.task.query_suffix, cfg.task.truncate_token) == ("\n\nTL;DR:", 198)
    assert cfg.task.query_dataset == "builtin:lead" and cfg.sft.lr == 3e-3


def parse_command_line(*args):
    """The config as `--config ... --config.a.b=v` gives it to an entry point."""
    argv = ["prog", *args]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values,
                                    lock_config=True, sys_argv=argv)
    flag_values(argv)
    return flag_values.config


def test_command_line_overrides_and_arguments():
    cfg = parse_command_line(f"--config={ROOT}/configs/cnndm.py:model=774M",
                             "--config.sft.steps=7", "--config.ppo.kl.coef=0.05")
    assert (cfg.model.preset, cfg.model.checkpoint, cfg.sft.steps) == ("774M", "gpt2-large", 7)
    assert cfg.ppo.kl.coef == 0.05 and cfg.task.end_text == "\n"
    # An empty end_text, or None (which the flag parser passes on as the string "None"),
    # switches the end token off; "None" is not taken as the one-token text "None".
    for value, parsed in (("", ""), ("None", "None")):
        cfg = parse_command_line(f"--config={ROOT}/configs/cnndm.py:runlocal",
                                 f"--config.task.end_text={value}")
        spec = experiment.task_spec(cfg, get_tokenizer(), experiment.gpt2_config(cfg))
        assert cfg.task.end_text == parsed and spec.end_token is None
    with pytest.raises(Exception, match="stpes"):
        parse_command_line(f"--config={ROOT}/configs/tldr.py", "--config.sft.stpes=7")
    with pytest.raises(ValueError, match="unknown config argument"):
        load_config("tldr", "runlocal,size=2")


def test_policy_queries_come_from_summarization_sources(tmp_path):
    """train_policy, train_reward and label read `task.query_dataset` through the same
    dispatch as train_sft: summarization sources give their cleaned articles."""
    cfg = load_config("tldr")  # runlocal: "builtin:lead"
    tok = get_tokenizer()
    spec = experiment.task_spec(cfg, tok, experiment.gpt2_config(cfg))
    texts = experiment.query_texts(cfg, "test")
    lead = summarization.summarization_pairs("builtin:lead", "test")
    assert texts == [article for article, _ in lead] and "\n\n" in texts[0]
    dataset = experiment.query_dataset(cfg, tok, spec, "test")
    assert len(dataset) == len(texts)  # long articles are cut to the window, not dropped
    assert dataset.get_batch(0, 4).shape == (4, spec.query_length)
    # A user's own JSONL articles, capped by task.query_max_texts.
    path = tmp_path / "posts.jsonl"
    path.write_text("".join(f'{{"article": "Post {i}.", "summary": "S{i}."}}\n' for i in range(5)))
    cfg.task.query_dataset = f"jsonl:{path}"
    cfg.task.query_max_texts = 3
    assert experiment.query_texts(cfg) == ["Post 0.", "Post 1.", "Post 2."]
    assert summarization.texts_and_references(f"jsonl:{path}", max_texts=2) == [
        ("Post 0.", "S0."), ("Post 1.", "S1.")]
    assert summarization.texts_and_references("builtin", "test", max_texts=1)[0][1] is None
    # An article longer than the query window is cut to it and counted, not dropped.
    long = " ".join(["word"] * (2 * spec.query_length))
    path.write_text(f'{{"article": "{long}", "summary": "S."}}\n'
                    '{"article": "Short.", "summary": "S."}\n')
    dataset = experiment.query_dataset(cfg, tok, spec)
    assert (len(dataset), dataset.num_truncated) == (2, 1)


def test_sample_cli_writes_references_that_evaluate_scores(tmp_path):
    """`rlhf_jax.sample` on a summarization task keeps each query's reference summary, so its
    output goes straight into `rlhf_jax.evaluate` for ROUGE."""
    out = str(tmp_path / "samples.jsonl")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    cmd = [sys.executable, "-m", "rlhf_jax.sample", "--config",
           os.path.join(ROOT, "configs/tldr.py:runlocal"), "--output", out, "--num_queries=3"]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in open(out)]
    lead = summarization.summarization_pairs("builtin:lead", "test")[:3]
    assert [(r["query"], r["reference"]) for r in rows] == lead
    report = evaluate.evaluate_samples(out, str(tmp_path / "report.json"))
    assert report["n"] == 3 and set(report["rouge"]) >= {"rouge1", "rouge2", "rougeL"}


@pytest.mark.parametrize("kind", ["copying", "rouge"])
def test_summary_mock_labelers_write_labels(kind, tmp_path):
    cfg = load_config("tldr")
    cfg.labeler.kind = kind
    cfg.labeler.rollout_batch_size = 8
    cfg.labeler.query_offset = 0
    tok = get_tokenizer()
    spec = experiment.task_spec(cfg, tok, experiment.gpt2_config(cfg))
    scorer = label.make_scorer(cfg, tok, spec)
    article, ref = summarization.summarization_pairs("builtin:lead", "train")[0]
    query = labelers.decode_tokens(tok, tasks.make_query(tok.encode(article), spec)[None],
                                   spec.pad_id)[0]
    if kind == "rouge":  # the reference itself scores 1; an unrelated text scores lower
        np.testing.assert_allclose(scorer([query, query], [ref, "zebra quantum"]), [1.0, 0.0])
    else:  # a copied first sentence of the article beats invented text
        first = query.split("\n\n")[0]
        a, b = scorer([query, query], [first, "zebra quantum"])
        assert a > b == 0.0
    stats = label.write_mock_labels(cfg, str(tmp_path / "labels.json"), num_labels=8)
    assert stats["num_labels"] == 8 and stats["chosen_score"] >= stats["mean_score"]
