"""rewards.kind="labeler": PPO directly against the mock labeler's score (the paper's baseline)."""

import json
import os

import numpy as np
import pytest

from rlhf_jax import direct_reward, experiment, labelers, sharding, train_policy
from rlhf_jax.runs import record, validation
from tests.conftest import require_devices
from tests.test_train_reward import load_config

PERIOD = 13  # GPT-2's "." (the books tasks' truncation token)


def _direct_config(**task):
    cfg = load_config()  # sentiment:runlocal, the VADER labeler
    cfg.rewards.kind = "labeler"
    cfg.ppo.batch_size, cfg.ppo.total_episodes, cfg.ppo.lr = 16, 32, 1e-3
    cfg.log_every = cfg.ckpt_every = 1
    for k, v in task.items():
        cfg.task[k] = v
    return cfg


def _responses(tok, n, length):
    """Responses whose VADER score depends on where they are cut: praise, then (after a '.')
    abuse. Row i has a '.' at index 6 (before the window: ignored), 17 or 20 (valid, cut
    there), or none (invalid)."""
    praise = tok.encode(" What a lovely, wonderful and happy day, I love it so much and the "
                        "sun is warm and")
    abuse = tok.encode(" I hate this awful, horrible, disgusting and terrible place")
    row = (praise[:18] + abuse)[:length]  # the abuse starts at index 18
    out = np.tile(np.asarray(row, np.int32), (n, 1))
    for i in range(n):
        where = (6, 17, 20, None)[i % 4]
        if where is not None:
            out[i, where] = PERIOD
    return out


@require_devices(8)
def test_rewards_are_the_scorers_scores_of_the_truncated_text_with_the_penalty():
    cfg = _direct_config()
    gpt_cfg = experiment.gpt2_config(cfg)
    tok = experiment.tokenizer(cfg)
    spec = experiment.task_spec(cfg, tok, gpt_cfg)
    mesh = sharding.make_mesh()
    queries = experiment.query_dataset(cfg, tok, spec).get_batch(0, 16)
    responses = _responses(tok, 16, spec.response_length)
    reward = direct_reward.make_host_reward(cfg, tok, spec)
    batch = sharding.batch_sharding(mesh)
    out = reward(sharding.host_batch_to_global(queries, mesh),
                 sharding.host_batch_to_global(responses, mesh), batch)
    assert out["scores"].sharding == batch and out["truncated"].sharding == batch
    scores, truncated = np.asarray(out["scores"]), np.asarray(out["truncated"])
    # The expectation, written out: cut after the first '.' at index >= 16 (truncate_after),
    # pad the rest, decode without padding, VADER of the response; no such '.' -> -1.
    vader = labelers.VaderSentimentScorer("response")
    for i, row in enumerate(responses):
        stops = [j for j, t in enumerate(row) if t == PERIOD and j >= 16]
        if not stops:
            assert scores[i] == -1.0 and list(truncated[i]) == list(row)
            continue
        kept = list(row[:stops[0] + 1])
        assert list(truncated[i]) == kept + [spec.pad_id] * (len(row) - len(kept))
        text = tok.decode(kept)
        expected = vader([""], [text])[0]
        assert scores[i] == pytest.approx(expected, abs=1e-6), (i, text)
    # The valid rows score far above the penalty; the cut at 17 keeps only praise, the cut at
    # 20 "I hate" too, which VADER marks down.
    valid = np.array([i % 4 in (1, 2) for i in range(16)])
    assert scores[valid].min() > 0.5 and (scores[~valid] == -1.0).all()
    assert scores[1] > scores[2]


@require_devices(8)
def test_train_policy_against_the_labeler(tmp_path):
    """2 iterations on the 8-device mesh: finite metrics, the timed labeler phase, no reward
    model; every logged sample's score is VADER of its decoded response (no truncation token,
    so every response is valid). Changing the reward kind or the labeler on resume is refused."""
    cfg = _direct_config(truncate_token=None)
    cfg.samples_per_log = 4
    workdir = str(tmp_path / "direct")
    last = train_policy.train_policy(cfg, workdir)
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert all(np.isfinite(v) for k, v in r.items() if isinstance(v, float)), r
        assert r["time/rollout/labeler"] > 0 and "time/rollout/reward" not in r
    assert last["objective/kl"] != 0.0 and np.isfinite(last["ppo/loss/total"])
    assert not os.path.exists(os.path.join(workdir, "reward"))
    samples = [json.loads(line) for line in open(os.path.join(workdir, "samples.jsonl"))]
    assert len(samples) == 8
    vader = labelers.VaderSentimentScorer("response")
    expected = vader([s["query"] for s in samples], [s["response"] for s in samples])
    np.testing.assert_allclose([s["score"] for s in samples], expected, atol=1e-6)
    for section, key, value in (("rewards", "kind", "learned"),
                                ("labeler", "kind", "descriptiveness")):
        changed = _direct_config(truncate_token=None)
        changed.samples_per_log = 4
        changed[section][key] = value
        with pytest.raises(record.ConfigChangedError, match=rf"--config\.{section}\.{key}: "):
            train_policy.train_policy(changed, workdir)


def test_bad_input(tmp_path):
    cfg = _direct_config()
    cfg.labeler.kind = "human"
    with pytest.raises(validation.ConfigError,
                       match=r"--config\.rewards\.kind='labeler' .*--config\.labeler\.kind="
                             r"'human' is not one; known scorers: vader, descriptiveness, "
                             r"copying, rouge"):
        train_policy.train_policy(cfg, str(tmp_path / "a"))
    cfg = _direct_config()
    cfg.labeler.kind = "rouge"  # books passages have no reference summaries
    with pytest.raises(validation.ConfigError,
                       match=r"--config\.rewards\.kind='labeler': the scorer "
                             r"--config\.labeler\.kind='rouge' cannot be built: .*reference"):
        train_policy.train_policy(cfg, str(tmp_path / "b"))
    assert not any(os.path.exists(tmp_path / d) for d in "ab")


def test_reward_kind_is_recorded_and_not_mutable():
    """A run recorded before the field existed resumes as "learned"; the kind never changes."""
    old = load_config().to_dict()
    del old["rewards"]["kind"]
    assert record.config_changes(old, load_config()) == []
    changes = record.config_changes(old, _direct_config())
    assert "rewards.kind" in [c.path for c in changes]
    assert not record.is_mutable("rewards.kind")
