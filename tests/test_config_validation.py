"""Start-up validation: every bad value fails before any model is built, naming the
`--config.` path (or flag) and the value, and a failed start leaves no workdir behind."""

import os
import re
import subprocess
import sys

import pytest

from rlhf_jax import label, train_policy, train_reward, train_sft
from rlhf_jax.runs import validation
from tests.test_train_reward import ROOT, load_config

# (sections an entry point validates, field, bad value, what the message says)
BAD_VALUES = [
    ("ppo", "ppo.nminibatches", 0, "must be >= 1"),
    ("ppo", "ppo.whiten_groups", 0, "must be >= 1"),
    ("ppo", "ppo.batch_size", -8, "must be >= 1"),
    ("ppo", "ppo.noptepochs", 0, "must be >= 1"),
    ("ppo", "ppo.total_episodes", 0, "must be >= 1"),
    ("ppo", "ppo.gamma", 1.5, r"must be in \[0.0, 1.0\]"),
    ("ppo", "ppo.cliprange", 0.0, r"must be in \(0.0, inf\]"),
    ("ppo", "ppo.lr", float("nan"), "must be a finite number"),
    ("ppo", "ppo.value_model", "shard", "expected one of 'shared', 'separate'"),
    ("ppo", "ppo.kl.horizon", 0, "must be >= 1"),
    ("ppo", "ppo.batch_size", 12, "is not divisible by the 8 devices"),
    ("ppo", "ppo.nminibatches", 3, "is not divisible by ppo.nminibatches=3"),
    ("rewards", "rewards.batch_size", 0, "must be >= 1"),
    ("rewards", "rewards.batch_size", -8, "must be >= 1"),
    ("rewards", "rewards.rollout_batch_size", 0, "must be >= 1"),
    ("rewards", "rewards.log_every", 0, "must be >= 1"),
    ("rewards", "rewards.lr_schedule", "step", "expected one of 'linear', 'cosine'"),
    ("rewards", "rewards.kind", "programmatic", "expected one of 'learned', 'labeler'"),
    ("rewards", "rewards.normalize_samples", 0, "while rewards.normalize_before/after is on"),
    ("rewards", "labels.num_train", 0, "must be >= 1"),
    ("rewards", "labels.num_valid", -1, "must be >= 0"),
    ("rewards", "labels.type", "best_of_four", "unknown label type"),
    ("rewards", "labels.num_train", 60, "is not divisible by rewards.batch_size=8"),
    ("runtime", "log_every", 0, "must be >= 1"),
    ("runtime", "ckpt_every", 0, "must be >= 1"),
    ("runtime", "ckpt_keep", 0, "must be >= 1"),
    ("runtime", "stop_after", -1, "must be >= 0"),
    ("runtime", "mesh.fsdp", 0, "must be >= 1, or -1"),
    ("model", "model.preset", "7B", "unknown GPT-2 preset"),
    ("model", "model.dtype", "float8", "dtype='float8'"),
    ("task", "task.response_length", 0, "must be >= 1"),
    ("task", "task.temperature", 0.0, r"must be in \(0.0, inf\]"),
    ("task", "task.truncate_after", -1, "must be >= 0"),
    ("labeler", "labeler.kind", "gpt4", "expected one of 'vader', 'descriptiveness', 'copying'"),
    ("labeler", "labeler.invalid_samples", "drop", "expected one of 'resample', 'keep'"),
    ("labeler", "labeler.resample_rounds", -1, "must be >= 0"),
    ("ppo", "ppo.ent_coef", -0.1, r"must be in \[0.0, inf\]"),
    ("labeler", "labeler.rollout_batch_size", 0, "must be >= 1"),
    ("labeler", "labeler.rollout_batch_size", 12, "is not divisible by the 8 devices"),
    ("labeler", "labeler.temperature", -1.0, r"must be in \[0.0, inf\]"),
    ("sft", "sft.steps", 0, "must be >= 1"),
    ("sft", "sft.log_every", 0, "must be >= 1"),
    ("sft", "sft.ckpt_every", 0, "must be >= 1"),
    ("sft", "sft.batch_size", -8, "must be >= 1"),
    ("sft", "sft.mode", "rl", "expected one of 'lm', 'summarize'"),
    ("sft", "sft.seq_len", 1000, r"must be in \[2, n_positions=256\]"),
]


def _set(cfg, path, value):
    *parents, last = path.split(".")
    node = cfg
    for key in parents:
        node = node[key]
    with node.ignore_type():
        node[last] = value


@pytest.mark.parametrize("section,path,value,why", BAD_VALUES,
                         ids=[f"{p}={v}" for _, p, v, _ in BAD_VALUES])
def test_bad_value_names_path_and_value(section, path, value, why):
    cfg = load_config()
    _set(cfg, path, value)
    with pytest.raises(validation.ConfigError) as err:
        validation.validate_with_mesh(cfg, [section])
    msg = str(err.value)
    assert f"{path}={value!r}" in msg and msg.startswith("--config."), msg
    assert re.search(why, msg), msg


def test_the_shipped_configs_are_valid():
    for name in ("sentiment", "descriptiveness", "tldr", "cnndm"):
        for arg in ("runlocal", None):
            validation.validate_with_mesh(load_config(name, arg), validation.SECTIONS)


@pytest.mark.parametrize("entry,path,value", [
    (train_reward.train_reward, "rewards.batch_size", 0),
    (train_reward.train_reward, "log_every", 0),
    (train_sft.train_sft, "sft.ckpt_every", 0),
    (train_policy.train_policy, "ppo.nminibatches", 0),
    (train_policy.train_policy, "ppo.whiten_groups", 0),
    (train_policy.train_policy, "log_every", 0),
])
def test_trainers_fail_at_start_and_leave_no_workdir(tmp_path, entry, path, value):
    cfg = load_config()
    cfg.labels.path = "unused.json"
    _set(cfg, path, value)
    workdir = tmp_path / "run"
    with pytest.raises(validation.ConfigError, match=re.escape(f"--config.{path}={value}")):
        entry(cfg, str(workdir))
    assert not workdir.exists()


def test_label_flags_and_output_fail_before_sampling(tmp_path):
    cfg = load_config()
    with pytest.raises(validation.ConfigError, match=r"--num_labels=-5: must be an integer >= 0"):
        label.write_mock_labels(cfg, str(tmp_path / "l.json"), num_labels=-5)
    with pytest.raises(validation.ConfigError, match="directory .*missing.* does not exist"):
        label.write_mock_labels(cfg, str(tmp_path / "missing" / "l.json"), num_labels=8)
    with pytest.raises(validation.ConfigError, match="is a directory"):
        label.write_mock_labels(cfg, str(tmp_path), num_labels=8)
    assert os.listdir(tmp_path) == []


def test_output_locations(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(validation.ConfigError, match="is a file, not a directory"):
        validation.check_workdir(str(tmp_path / "file" / "run"))
    validation.check_workdir(str(tmp_path / "a" / "b"))  # created later, under a writable dir
    assert not (tmp_path / "a").exists()
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(validation.ConfigError, match="is not writable"):
            validation.check_workdir(str(locked / "run"))
        with pytest.raises(validation.ConfigError, match="is not writable"):
            validation.check_output_file(str(locked / "out.json"))


@pytest.mark.slow
def test_cli_names_the_field_and_creates_nothing(tmp_path):
    """`python -m rlhf_jax.train_reward` with ckpt_every=0: one clear line, no workdir."""
    workdir = tmp_path / "rm"
    out = subprocess.run(
        [sys.executable, "-m", "rlhf_jax.train_reward", "--config",
         os.path.join(ROOT, "configs/sentiment.py:runlocal"), "--workdir", str(workdir),
         "--config.labels.path=x.json", "--config.ckpt_every=0"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "ConfigError: --config.ckpt_every=0: must be >= 1" in out.stderr
    assert "save_every" not in out.stderr
    assert not workdir.exists()


def test_reward_source_of_a_ppo_run(tmp_path):
    cfg = load_config()
    cfg.rewards.trained_model = str(tmp_path / "missing")
    with pytest.raises(validation.ConfigError, match=r"--config.rewards.trained_model=.*missing'"
                                                     r": does not exist"):
        validation.check_reward_source(cfg)
    cfg.rewards.trained_model, cfg.labels.path = "", ""  # train one, but from what?
    with pytest.raises(validation.ConfigError, match=r"--config.labels.path='': give a label"):
        validation.check_reward_source(cfg)
    cfg.rewards.trained_model = str(tmp_path)
    validation.check_reward_source(cfg)


def test_a_start_that_fails_after_making_the_workdir_removes_it(tmp_path):
    """The initial model is read after the workdir is made; if that fails, the new workdir
    (with the parents this attempt made) goes again, and an existing one stays."""
    from rlhf_jax.models import hf_import
    from tests.test_train_reward import _synthetic_labels

    labels = str(tmp_path / "labels.json")
    _synthetic_labels(labels, 16)
    cfg = load_config()
    cfg.labels.path, cfg.labels.num_train, cfg.labels.num_valid = labels, 16, 0
    cfg.model.checkpoint = str(tmp_path / "no_such_model")
    with pytest.raises(hf_import.CheckpointFormatError, match="no_such_model"):
        train_reward.train_reward(cfg, str(tmp_path / "new" / "rm"))
    assert not (tmp_path / "new").exists()
    (tmp_path / "old").mkdir()
    with pytest.raises(hf_import.CheckpointFormatError):
        train_reward.train_reward(cfg, str(tmp_path / "old"))
    assert (tmp_path / "old").is_dir()
