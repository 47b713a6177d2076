"""`python -m rlhf_jax.export`: PPO, SFT and reward-model runs out as Hugging Face directories."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from rlhf_jax import export, models, networks, train_policy, train_reward, train_sft
from rlhf_jax.data import preference_import
from rlhf_jax.tokenizer import PAD_ID, get_tokenizer
from tests.test_preference_import import load_config, sentiment_pairs, write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _snapshot(directory):
    """Every path under `directory` with its size and mtime: proof that a read wrote nothing."""
    out = []
    for root, dirs, files in os.walk(directory):
        out += [(root, d) for d in dirs]
        out += [(os.path.join(root, f), os.stat(os.path.join(root, f)).st_mtime_ns,
                 os.path.getsize(os.path.join(root, f))) for f in files]
    return sorted(out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny real runs: a reward model (imported pairs), one PPO iteration against it, SFT."""
    base = tmp_path_factory.mktemp("runs")
    src = write_jsonl(base / "pairs.jsonl", sentiment_pairs(32))
    cfg = load_config()
    preference_import.import_for_task(cfg, src, "pairs", str(base / "labels.json"))
    cfg.labels.path, cfg.labels.type = str(base / "labels.json"), "best_of_2"
    cfg.labels.num_train, cfg.labels.num_valid = 16, 0
    cfg.rewards.normalize_before = cfg.rewards.normalize_after = False
    cfg.rewards.verify_samples, cfg.tensorboard, cfg.task.temperature = 0, False, 0.8
    train_reward.train_reward(cfg, str(base / "rm"))
    cfg = load_config()
    cfg.rewards.trained_model = str(base / "rm")
    cfg.ppo.batch_size = cfg.ppo.total_episodes = 16
    cfg.ppo.lr, cfg.tensorboard, cfg.task.temperature = 1e-3, False, 0.8
    train_policy.train_policy(cfg, str(base / "ppo"))
    cfg = load_config()
    cfg.sft.update(dict(steps=2, batch_size=8, log_every=1, eval_batches=0))
    cfg.samples_per_log, cfg.tensorboard = 0, False
    train_sft.train_sft(cfg, str(base / "sft"))
    return base


def _lm_parity(out_dir, params, gpt_cfg):
    ids = np.asarray([get_tokenizer().encode("The rain fell on the quiet town. It was late.")])
    hidden, _, _ = models.forward(params, ids.astype(np.int32), gpt_cfg)
    ours = np.asarray(models.logits_from_hidden(params, hidden, gpt_cfg))
    model = transformers.GPT2LMHeadModel.from_pretrained(out_dir).eval()
    with torch.no_grad():
        theirs = model(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["ppo", "sft"])
def test_policy_and_sft_export_load_in_transformers_with_equal_logits(runs, tmp_path, kind):
    workdir = str(runs / kind)
    before = _snapshot(workdir)
    info = export.export_run(workdir, str(tmp_path / "hf"))
    assert _snapshot(workdir) == before  # read-only: no temp dirs, no cleanup, no new files
    run = export.read_run(workdir)
    assert info["kind"] == run["kind"] == {"ppo": "policy", "sft": "sft"}[kind]
    assert info["step"] == {"ppo": 1, "sft": 2}[kind]
    out = str(tmp_path / "hf")
    for name in ("config.json", "model.safetensors", "generation_config.json",
                 "tokenizer_config.json", export.EXPORT_FILE):
        assert os.path.exists(os.path.join(out, name)), name
    assert not os.path.exists(os.path.join(out, "rlhf_jax_heads.safetensors"))  # no value head
    _lm_parity(out, run["params"], run["gpt2_config"])
    gen = transformers.GenerationConfig.from_pretrained(out)
    assert gen.temperature == {"ppo": 0.8, "sft": 0.7}[kind]
    assert gen.do_sample and gen.top_k == 0 and gen.max_new_tokens == 24
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.encode("Hello world") == [15496, 995]
    # Refuses to overwrite.
    with pytest.raises(export.ExportError, match="already exists"):
        export.export_run(workdir, out)


def _readme_snippet():
    """The README's PyTorch reward snippet, so that the documented code is the tested code."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    return re.search(r"<!-- reward-snippet -->\s*```python\n(.*?)```", text, re.S).group(1)


def test_reward_model_export_and_readme_snippet(runs, tmp_path):
    out = str(tmp_path / "rm_hf")
    info = export.export_run(str(runs / "rm"), out)
    assert info["kind"] == "reward" and info["step"] is None
    assert os.path.exists(os.path.join(out, "rlhf_jax_heads.safetensors"))
    run = export.read_run(str(runs / "rm"))
    _lm_parity(out, run["params"], run["gpt2_config"])
    namespace = {}
    exec(_readme_snippet().replace('"exported/rm"', repr(out)), namespace)  # noqa: S102
    tok = get_tokenizer()
    query, responses = "The day began. The table was", [" good and nice.", " bad and sad."]
    q = tok.encode(query)
    queries = np.full((2, 64), PAD_ID, np.int32)
    queries[:, :len(q)] = q
    samples = np.full((2, 24), PAD_ID, np.int32)
    for i, r in enumerate(responses):
        ids = tok.encode(r)
        samples[i, :len(ids)] = ids
    ours = np.asarray(networks.reward(run["params"], queries, samples, run["gpt2_config"]))
    theirs = np.asarray([namespace["score"](query, r) for r in responses])
    np.testing.assert_allclose(theirs, ours, atol=1e-5, rtol=1e-5)
    assert abs(ours[0] - ours[1]) > 1e-4  # the two texts get different rewards


def test_bad_input_and_push_without_network(runs, tmp_path):
    with pytest.raises(export.ExportError, match="no such directory"):
        export.export_run(str(tmp_path / "nope"), str(tmp_path / "a"))
    empty = tmp_path / "empty_run"
    (empty / "checkpoints").mkdir(parents=True)
    with pytest.raises(export.ExportError,
                       match=f"--workdir {empty}: nothing to export: no committed checkpoint"):
        export.export_run(str(empty), str(tmp_path / "b"))
    assert not (tmp_path / "b").exists() and _snapshot(empty) == [(str(empty), "checkpoints")]
    # The command line: export, then a push that fails clearly (the hub is offline here).
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "rlhf_jax.export", "--workdir", str(runs / "sft"), "--output",
           str(out), "--push_to_hub", "someone/rlhf-test"]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "--push_to_hub someone/rlhf-test: the upload failed" in proc.stderr
    assert f"The export at {out} is complete" in proc.stderr
    assert json.load(open(out / export.EXPORT_FILE))["kind"] == "sft"
