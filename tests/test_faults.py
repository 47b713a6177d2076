"""Fault injection: kill -9 at the worst moments, then rerun the same command.

Each test runs an entry point three times as a separate process, as a user would: once
uninterrupted, once killed with SIGKILL by a fault armed in `tests/fault_worker.py`, and once
more on the killed run's directory. The rerun must finish with the uninterrupted run's metrics
(wall-clock `perf/*` values aside) and outputs. The runs share a persistent JAX compilation
cache, so only the first run of each program compiles.
"""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from rlhf_jax.models import hf_import
from tests.test_train_reward import ROOT, _synthetic_labels

pytestmark = pytest.mark.slow
WORKER = os.path.join(ROOT, "tests", "fault_worker.py")
CONFIG = os.path.join(ROOT, "configs/sentiment.py:runlocal")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("jax_cache"))
    return dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache,
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def _run(env, module, args, fault=None):
    cmd = ([sys.executable, WORKER, fault, module] if fault else
           [sys.executable, "-m", module]) + args
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)


def _ok(proc):
    assert proc.returncode == 0, proc.stderr[-4000:]


def _killed(proc):
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-4000:])


def _rows(workdir, name="metrics.jsonl"):
    rows = [json.loads(line) for line in open(os.path.join(workdir, name))]
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]


def test_sigkill_during_a_checkpoint_save(env, tmp_path):
    """train_sft killed while orbax commits the step-4 save; the rerun cleans the half-done save
    up, resumes from step 2 and ends exactly where the uninterrupted run did."""
    args = ["--config", CONFIG, "--config.sft.steps=6", "--config.sft.ckpt_every=2",
            "--config.sft.log_every=1", "--config.sft.eval_batches=0",
            "--config.sft.batch_size=8", "--config.sft.seq_len=32",
            "--config.samples_per_log=0", "--config.tensorboard=False"]
    whole, killed = str(tmp_path / "whole"), str(tmp_path / "killed")
    _ok(_run(env, "rlhf_jax.train_sft", args + ["--workdir", whole]))
    _killed(_run(env, "rlhf_jax.train_sft", args + ["--workdir", killed],
                 fault="kill_on_commit:2"))
    ckpt = os.path.join(killed, "checkpoints")
    left = sorted(os.listdir(ckpt))
    assert left[0] == "2" and left[1].startswith("4.orbax-checkpoint-tmp"), left
    assert not os.path.exists(os.path.join(killed, "hf_model"))
    _ok(_run(env, "rlhf_jax.train_sft", args + ["--workdir", killed]))
    assert sorted(os.listdir(ckpt)) == ["2", "4", "6"]
    assert _rows(killed) == _rows(whole)
    assert [r["step"] for r in _rows(killed)] == [1, 2, 3, 4, 5, 6]
    a = hf_import.load_hf_checkpoint(os.path.join(whole, "hf_model"))[1]["transformer"]
    b = hf_import.load_hf_checkpoint(os.path.join(killed, "hf_model"))[1]["transformer"]
    np.testing.assert_array_equal(a["wte"], b["wte"])
    np.testing.assert_array_equal(a["h_1"]["mlp"]["c_fc"]["kernel"],
                                  b["h_1"]["mlp"]["c_fc"]["kernel"])


def test_sigkill_during_reward_model_training(env, tmp_path):
    """train_reward killed after step 3 (its rows written, step 2 the last save); the rerun drops
    the rows past step 2, trains steps 3-4 again and writes the same model and metrics."""
    labels = str(tmp_path / "labels.json")
    _synthetic_labels(labels, 48)
    args = ["--config", CONFIG, f"--config.labels.path={labels}", "--config.labels.num_train=32",
            "--config.labels.num_valid=16", "--config.rewards.normalize_before=False",
            "--config.rewards.normalize_after=False", "--config.rewards.verify_samples=0",
            "--config.rewards.log_every=1", "--config.ckpt_every=2", "--config.tensorboard=False"]
    whole, killed = str(tmp_path / "whole"), str(tmp_path / "killed")
    _ok(_run(env, "rlhf_jax.train_reward", args + ["--workdir", whole]))
    _killed(_run(env, "rlhf_jax.train_reward", args + ["--workdir", killed],
                 fault="kill_after_step:3"))
    assert [r["step"] for r in _rows(killed)] == [1, 2, 3]
    assert not os.path.exists(os.path.join(killed, "reward_model.json"))
    _ok(_run(env, "rlhf_jax.train_reward", args + ["--workdir", killed]))
    assert _rows(killed) == _rows(whole)
    meta = [json.load(open(os.path.join(d, "reward_model.json"))) for d in (whole, killed)]
    assert meta[0]["checksums"] == meta[1]["checksums"]  # the same parameters, bit for bit
    assert meta[0]["final"] == meta[1]["final"] and "valid/accuracy" in meta[0]["final"]
    history = [json.loads(line) for line in open(os.path.join(killed, "config_history.jsonl"))]
    assert [(h["event"], h["step"]) for h in history] == [("start", None), ("resume", 2)]


def test_sigkill_during_a_label_export(env, tmp_path):
    """label killed while moving its finished file into place: no partial labels.json exists,
    and the rerun writes the uninterrupted run's file byte for byte."""
    args = ["--config", CONFIG, "--num_labels", "16", "--config.labeler.rollout_batch_size=16"]
    whole, killed = tmp_path / "whole.json", tmp_path / "out" / "labels.json"
    killed.parent.mkdir()
    _ok(_run(env, "rlhf_jax.label", args + ["--output", str(whole)]))
    _killed(_run(env, "rlhf_jax.label", args + ["--output", str(killed)],
                 fault="kill_on_replace:labels.json"))
    assert not killed.exists()
    (tmp,) = os.listdir(killed.parent)  # the finished temporary file, never published
    assert tmp.startswith(".labels.json.") and tmp.endswith(".tmp")
    _ok(_run(env, "rlhf_jax.label", args + ["--output", str(killed)]))
    assert killed.read_bytes() == whole.read_bytes()
    assert len(json.loads(killed.read_text())) == 16
