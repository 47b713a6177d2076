"""Supervised fine-tuning: example layout and loss mask, data order, training, export, resume."""

import functools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from rlhf_jax import config_lib, experiment, models, train_sft
from rlhf_jax.data import summarization, tasks
from rlhf_jax.models import hf_import
from rlhf_jax.tokenizer import EOT_ID, PAD_ID, get_tokenizer
from tests.test_train_reward import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_spec(tok, **kw):
    return tasks.make_task_spec(
        tok, query_length=8, response_length=6, start_text=None, query_suffix="\n\nTL;DR:",
        truncate_token=198, truncate_after=2, **kw)


def rows(path, timing=False):
    """metrics.jsonl rows, without the wall-clock `perf/*` metrics unless `timing`."""
    out = [json.loads(line) for line in open(path)]
    return out if timing else [{k: v for k, v in r.items() if not k.startswith("perf/")}
                               for r in out]


# ---------------------------------------------------------------- examples and data order


def test_summary_example_layout_and_mask():
    tok = get_tokenizer()
    spec = small_spec(tok, query_prefix="Article:\n\n")
    article = "The cat sat on the mat."  # 7 tokens: one pad before the suffix
    tokens, mask = train_sft.summary_example(article, "A cat\nsat.", tok, spec)
    prefix, suffix = tok.encode("Article:\n\n"), tok.encode("\n\nTL;DR:")
    target = tok.encode(" A cat sat.\n")  # one line, a leading space, a final newline
    assert len(target) == 5
    want = prefix + tok.encode(article) + [PAD_ID] + suffix + target + [PAD_ID]
    assert tokens.tolist() == want and tokens.dtype == np.int32
    ctx = len(prefix) + 8 + len(suffix)
    assert spec.context_length == ctx
    assert np.flatnonzero(mask).tolist() == list(range(ctx, ctx + 5))
    # A long reference is cut to the response length (losing the newline); no pad is a target.
    tokens, mask = train_sft.summary_example(article, "one two three four five six seven",
                                             tok, spec)
    assert mask.sum() == 6 and PAD_ID not in tokens[ctx:]
    # Articles the query stream would skip, and empty references, give no example.
    assert train_sft.summary_example(article, "  \n", tok, spec) is None
    cnndm = small_spec(tok, end_text="\n")
    assert train_sft.summary_example("no newline here", "x", tok, cnndm) is None


def test_loss_is_the_nll_of_summary_tokens_only():
    tok = get_tokenizer()
    spec = small_spec(tok)
    examples = [train_sft.summary_example(a, r, tok, spec) for a, r in
                [("The cat sat on the mat.", "A cat."), ("Rain fell all day long in town.",
                                                        "It rained a lot today, again.")]]
    batch = {"tokens": np.stack([t for t, _ in examples]),
             "mask": np.stack([m for _, m in examples])}
    cfg = models.preset("tiny")
    # Random numpy params: far quicker on a CPU than a Flax init, and any weights do here.
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: rng.normal(0, 0.05, a.shape).astype(np.float32),
                          jax.eval_shape(lambda: models.init_params(cfg, jax.random.key(0))))
    ctx = spec.context_length
    loss_fn = jax.jit(functools.partial(train_sft.sft_loss, config=cfg, target_start=ctx))
    loss, stats = loss_fn(params, batch)

    @jax.jit
    def logprobs(tokens):
        hidden, _, _ = models.forward(params, tokens, cfg)
        return jax.nn.log_softmax(models.logits_from_hidden(params, hidden, cfg), -1)

    logp = np.asarray(logprobs(batch["tokens"]))
    nll = [-logp[b, t - 1, batch["tokens"][b, t]]
           for b in range(2) for t in np.flatnonzero(batch["mask"][b])]
    np.testing.assert_allclose(float(loss), np.mean(nll), rtol=1e-5)
    assert stats["target_tokens"] == batch["mask"].sum() == len(nll)
    # A token after the summary is no target: making the last pad a real token changes nothing.
    changed = dict(batch, tokens=batch["tokens"].copy())
    changed["tokens"][0, -1] = 123
    np.testing.assert_allclose(float(loss_fn(params, changed)[0]), float(loss), rtol=1e-6)


class CharTok:
    """One token per character, for exact expectations."""

    def encode(self, text):
        return [ord(c) for c in text]


def test_lm_windows_and_batches_are_a_pure_function_of_seed_and_step():
    data = train_sft.SFTData.lm(["abcd", "efg", "hijklmno"], CharTok(), seq_len=3, seed=1)
    stream = [*b"abcd", EOT_ID, *b"efg", EOT_ID, *b"hijklmno", EOT_ID]
    assert data.num == len(stream) // 3 and data.target_start == 1
    # One pass over the windows is a permutation of all of them.
    epoch = np.concatenate([data.get_batch(s, 2)["tokens"] for s in range(3)])
    assert sorted(map(tuple, epoch.tolist())) == sorted(
        tuple(stream[i:i + 3]) for i in range(0, 18, 3))
    again = train_sft.SFTData.lm(["abcd", "efg", "hijklmno"], CharTok(), seq_len=3, seed=1)
    np.testing.assert_array_equal(again.get_batch(5, 4)["tokens"], data.get_batch(5, 4)["tokens"])
    other = train_sft.SFTData.lm(["abcd", "efg", "hijklmno"], CharTok(), seq_len=3, seed=2)
    assert not all(np.array_equal(other.get_batch(s, 2)["tokens"], data.get_batch(s, 2)["tokens"])
                   for s in range(3))
    # Two processes read the two halves of the same global batch.
    whole = data.get_batch(4, 4)["tokens"]
    halves = [data.get_batch(4, 4, process_index=i, process_count=2)["tokens"] for i in range(2)]
    np.testing.assert_array_equal(np.concatenate(halves), whole)
    with pytest.raises(ValueError, match="fewer than seq_len"):
        train_sft.SFTData.lm(["ab"], CharTok(), seq_len=8, seed=0)


def _records(records, seen):
    def as_data_source(self, split, **kwargs):
        del self, kwargs
        seen.append(split)
        return records
    return as_data_source


def test_summarization_sources(tmp_path):
    seen = []
    records = [{"content": "Post one.", "summary": "one"}, {"content": "  ", "summary": "x"},
               {"content": "Post three.", "summary": "three"}]
    with tfds.testing.mock_data(as_data_source_fn=_records(records, seen)):
        assert summarization.summarization_texts("tfds:tldr", "test") == ["Post one.", "Post three."]
        pairs = summarization.summarization_pairs("tfds:reddit", "train")
    assert seen == ["train[95%:]", "train[:95%]"] and pairs[2] == ("Post three.", "three")
    path = tmp_path / "arts_test.jsonl"
    path.write_text(json.dumps({"article": "A b.", "summary": "S."}) + "\n")
    name = "jsonl:" + str(tmp_path / "arts_{split}.jsonl")
    assert summarization.summarization_pairs(name, "test") == [("A b.", "S.")]
    lead = summarization.summarization_pairs("builtin:lead", "test")
    article, ref = lead[0]
    assert article.startswith(ref) and article.count("\n\n") >= 2 and ref.endswith(".")
    assert summarization.corpus_texts("builtin:lead", "test")[0] == article
    assert summarization.is_summarization_source(name) and not summarization.is_summarization_source(
        "builtin")


def test_bad_settings_fail_before_any_compute():
    cfg = load_config("tldr")
    cfg.sft.dataset = "builtin"
    with pytest.raises(ValueError, match="needs .article, reference. pairs"):
        train_sft.SFTSetup(cfg)
    cfg = load_config("tldr")
    cfg.sft.mode = "rl"
    with pytest.raises(ValueError, match="sft.mode"):
        train_sft.SFTSetup(cfg)
    cfg = load_config()
    cfg.sft = config_lib.sft_config(seq_len=1000, batch_size=12)
    with pytest.raises(ValueError, match="sft.batch_size=12 is not divisible"):
        train_sft.SFTSetup(cfg)


# ---------------------------------------------------------------- training runs


def lm_config(**sft):
    """The sentiment task (books queries) with a short lm-mode SFT on the builtin corpus."""
    cfg = load_config()
    cfg.sft = config_lib.sft_config()
    config_lib.sft_tiny_overrides(cfg)
    cfg.sft.update(dict(steps=6, batch_size=8, seq_len=32, lr=3e-3, warmup_steps=0,
                        lr_schedule="constant", log_every=1, eval_batches=1) | sft)
    cfg.samples_per_log = 2
    cfg.tensorboard = False
    return cfg


@pytest.mark.slow
def test_lm_loss_goes_down_and_the_model_exports(tmp_path):
    workdir = str(tmp_path / "sft")
    final = train_sft.train_sft(lm_config(), workdir)
    metrics = rows(os.path.join(workdir, "metrics.jsonl"), timing=True)
    assert all(r["perf/tokens_per_sec"] > 0 for r in metrics if "train/loss" in r)
    losses = [r["train/loss"] for r in metrics if "train/loss" in r]
    valid = [r["valid/loss"] for r in metrics if "valid/loss" in r]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.2
    assert len(valid) == 2 and valid[1] < valid[0] and final["valid/loss"] == valid[1]
    samples = rows(os.path.join(workdir, "samples.jsonl"))
    assert [r["step"] for r in samples] == [0, 0, 6, 6]
    assert all(isinstance(r["response"], str) and r["query"] for r in samples)
    assert os.path.exists(os.path.join(workdir, "plot.png"))

    hf_dir = os.path.join(workdir, "hf_model")
    gpt_cfg, params = hf_import.load_hf_checkpoint(hf_dir, expected=models.preset("tiny"))
    # The exported model is what config.model.checkpoint loads for label/train_reward/policy.
    cfg = lm_config()
    cfg.model.checkpoint = hf_dir
    trunk = experiment.initial_trunk(cfg, experiment.gpt2_config(cfg))
    np.testing.assert_array_equal(trunk["wte"], params["transformer"]["wte"])
    ids = np.asarray([get_tokenizer().encode("The rain fell on the quiet town.")], np.int32)
    hidden, _, _ = models.forward(params, ids, gpt_cfg)
    ours = np.asarray(models.logits_from_hidden(params, hidden, gpt_cfg))

    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        theirs = model(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)
    assert transformers.AutoTokenizer.from_pretrained(hf_dir).encode("Hello world") == [15496, 995]


def summarize_config(**sft):
    cfg = load_config("tldr")
    cfg.sft.update(dict(steps=4, log_every=1, eval_batches=0, ckpt_every=2) | sft)
    cfg.samples_per_log = 0  # sampling is covered by the lm test
    cfg.tensorboard = False
    return cfg


@pytest.mark.slow
def test_resume_gives_the_metrics_of_an_uninterrupted_run(tmp_path):
    whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
    train_sft.train_sft(summarize_config(), whole)
    cfg = summarize_config(ckpt_every=1)  # checkpoint cadence may change on resume
    cfg.stop_after = 3
    with pytest.raises(SystemExit) as stopped:
        train_sft.train_sft(cfg, parts)
    assert stopped.value.code == train_sft.EXIT_STOPPED
    assert not os.path.exists(os.path.join(parts, "hf_model"))
    # The newest checkpoint (3) is damaged: the resume names it, sets it aside and goes on
    # from step 2 to the same end.
    state_dir = os.path.join(parts, "checkpoints", "3", "state")
    data = max((os.path.join(d, f) for d, _, fs in os.walk(state_dir) for f in fs
                if os.path.basename(d) == "d"), key=os.path.getsize)
    os.truncate(data, os.path.getsize(data) // 2)
    train_sft.train_sft(summarize_config(), parts)
    assert [n.split("-")[0] for n in os.listdir(os.path.join(parts, "checkpoints", "corrupt"))] == [
        "3"]
    a, b = rows(os.path.join(whole, "metrics.jsonl")), rows(os.path.join(parts, "metrics.jsonl"))
    assert [r["step"] for r in a] == [1, 2, 3, 4] == [r["step"] for r in b]
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        np.testing.assert_allclose([x[k] for k in x], [y[k] for k in x], rtol=1e-6)
    wa = hf_import.load_hf_checkpoint(os.path.join(whole, "hf_model"))[1]
    wb = hf_import.load_hf_checkpoint(os.path.join(parts, "hf_model"))[1]
    jax.tree.map(np.testing.assert_array_equal, wa, wb)
    # A finished workdir returns at once with the final metrics.
    assert train_sft.train_sft(summarize_config(), parts)["train/loss"] == b[-1]["train/loss"]
    # A different batch size cannot resume this workdir.
    with pytest.raises(ValueError, match="batch_size"):
        train_sft.train_sft(summarize_config(batch_size=16), parts)


@pytest.mark.slow
def test_entry_point(tmp_path):
    """Two-step smoke run of `python -m rlhf_jax.train_sft` in summarize mode."""
    workdir = str(tmp_path / "cli")
    cmd = [sys.executable, "-m", "rlhf_jax.train_sft", "--config",
           os.path.join(ROOT, "configs/cnndm.py:runlocal"), "--workdir", workdir,
           "--config.sft.steps=2", "--config.sft.log_every=1", "--config.sft.eval_batches=0",
           "--config.samples_per_log=0", "--config.tensorboard=False"]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "train_sft 2/2" in out.stdout + out.stderr
    assert [r["step"] for r in rows(os.path.join(workdir, "metrics.jsonl"))] == [1, 2]
    for name in ("config.json", "hf_model/config.json", "hf_model/model.safetensors"):
        assert os.path.exists(os.path.join(workdir, name)), name
