"""The non-finite rule: checked every step, stops before the next save naming step and quantity,
keeps only finite checkpoints, for every trainer (train_policy's test is in test_train_policy)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import checkpointing, train_policy, train_reward, train_sft
from rlhf_jax.runs import nonfinite, record
from tests.test_train_reward import _synthetic_labels, load_config
from tests.test_train_sft import lm_config


def test_step_flags_name_each_quantity():
    good = {"w": jnp.ones(3)}
    flags = jax.jit(nonfinite.step_flags)
    assert int(flags(jnp.float32(1.0), good, good)) == 0
    assert nonfinite.flag_names(int(flags(jnp.float32(jnp.nan), good, good))) == ["loss"]
    bad = {"w": jnp.array([1.0, jnp.inf, 0.0])}
    assert nonfinite.flag_names(int(flags(jnp.float32(1.0), bad, good))) == ["gradient norm"]
    assert nonfinite.flag_names(int(flags(jnp.float32(1.0), good, bad))) == ["parameters"]
    # Integer leaves (step counters) are not parameters that can be non-finite.
    assert int(nonfinite.step_flags(params={"n": jnp.int32(3), "w": jnp.ones(2)})) == 0
    both = jnp.array([[0, nonfinite.LOSS], [nonfinite.PARAMS, 0]], jnp.int32)
    assert int(nonfinite.any_flags(both)) == nonfinite.LOSS | nonfinite.PARAMS


def test_guard_checks_one_step_late_and_on_flush():
    guard = nonfinite.NonFiniteGuard("train_x", "/run/checkpoints")
    guard.push(1, jnp.int32(0))
    guard.push(2, jnp.int32(nonfinite.GRAD_NORM))  # not read yet: step 2 may still be running
    with pytest.raises(nonfinite.NonFiniteError) as err:
        guard.push(3, jnp.int32(0))  # reads step 2's flags
    assert err.value.step == 2 and err.value.quantities == ["gradient norm"]
    assert "train_x: non-finite gradient norm at step 2" in str(err.value)
    assert "/run/checkpoints is kept" in str(err.value)
    guard.push(4, jnp.int32(nonfinite.LOSS))
    with pytest.raises(nonfinite.NonFiniteError, match="loss at step 4"):
        guard.flush()
    with pytest.raises(nonfinite.NonFiniteError, match=r"objective/score \(nan\) at step 5"):
        guard.check_values(5, {"objective/score": float("nan"), "objective/kl": 1.0})
    assert train_policy.NonFiniteLossError is nonfinite.NonFiniteError  # one family


def _saved_states(workdir):
    path = os.path.join(workdir, "checkpoints")
    with checkpointing.Checkpointer(path, save_every=1, read_only=True) as ckpt:
        return {step: ckpt.restore(step)[0] for step in ckpt.all_steps()}


def _all_finite(tree):
    return all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(tree)
               if np.issubdtype(np.asarray(x).dtype, np.floating))


def _metric_rows(workdir):
    path = os.path.join(workdir, "metrics.jsonl")
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


@pytest.mark.slow
def test_train_reward_stops_before_saving_a_non_finite_state(tmp_path):
    labels = str(tmp_path / "labels.json")
    _synthetic_labels(labels, 32)
    cfg = load_config()
    cfg.labels.path, cfg.labels.num_train, cfg.labels.num_valid = labels, 32, 0
    cfg.rewards.update(dict(lr=1e30, normalize_before=False, normalize_after=False,
                            verify_samples=0, log_every=1))
    cfg.ckpt_every, cfg.ckpt_keep, cfg.tensorboard = 1, 2, False
    workdir = str(tmp_path / "rm")
    with pytest.raises(nonfinite.NonFiniteError) as err:
        train_reward.train_reward(cfg, workdir)
    bad = err.value.step
    assert 1 < bad <= 4 and "loss" in err.value.quantities
    assert "train_reward: non-finite loss" in str(err.value) and f"at step {bad}" in str(err.value)
    saved = _saved_states(workdir)
    # Only finite states were saved, the newest the step before the bad one, and ckpt_keep
    # counted only those: no bad state pushed a good one out.
    assert sorted(saved) == list(range(max(1, bad - 2), bad))
    assert all(_all_finite(s["params"]) for s in saved.values())
    assert all(r["step"] < bad for r in _metric_rows(workdir))
    assert not os.path.exists(os.path.join(workdir, "reward_model"))
    # A resume with another learning rate must be asked for: the run record refuses it, before
    # anything is built or written.
    cfg.rewards.lr = 1e-3
    with pytest.raises(record.ConfigChangedError, match=r"--config\.rewards\.lr: 1e\+30 recorded, "
                                                         r"0\.001 now"):
        train_reward.train_reward(cfg, workdir)
    history = [json.loads(line) for line in open(os.path.join(workdir, record.HISTORY_FILE))]
    assert [(h["event"], h["step"]) for h in history] == [("start", None)]


@pytest.mark.slow
def test_train_sft_stops_before_saving_a_non_finite_state(tmp_path):
    cfg = lm_config(lr=1e30, steps=6, ckpt_every=1, log_every=3, eval_batches=0)
    cfg.samples_per_log, cfg.ckpt_keep = 0, 10
    workdir = str(tmp_path / "sft")
    with pytest.raises(nonfinite.NonFiniteError) as err:
        train_sft.train_sft(cfg, workdir)
    bad = err.value.step
    assert 1 < bad <= 6 and "train_sft: non-finite" in str(err.value)
    saved = _saved_states(workdir)
    assert sorted(saved) == list(range(1, bad))
    assert all(_all_finite(s["params"]) for s in saved.values())
    assert all(r["step"] < bad for r in _metric_rows(workdir))
    assert not os.path.exists(os.path.join(workdir, train_sft.HF_MODEL_DIR))
