"""label.py shows the mock labeler only valid samples (rejection sampling, spec §2.3)."""

import jax
import numpy as np
import pytest

from rlhf_jax import experiment, label
from rlhf_jax.data import labels as labels_lib
from rlhf_jax.data import tasks
from tests.test_train_reward import load_config

SPEC = tasks.TaskSpec(query_length=2, response_length=5, truncate_token=13, truncate_after=2,
                      pad_id=99)


def _fake_draws(num_queries, n, seed=0):
    """Independent random responses over {5, 13}: about 1 in 2 has a 13 at index >= 2."""
    rng = np.random.default_rng(seed)
    made = []

    def draw(r):
        assert r == len(made), "rounds are drawn in order"
        made.append(rng.choice([5, 5, 5, 5, 13], size=(num_queries * n, 5)).astype(np.int32))
        return made[-1]

    return draw, made


@pytest.mark.parametrize("rounds", [0, 1, 8])
def test_draw_valid_samples(rounds):
    draw, made = _fake_draws(16, 4)
    samples, keep, counts = label.draw_valid_samples(draw, 16, 4, SPEC, rounds)
    drawn = np.stack(made).reshape(len(made), 16, 4, 5)
    valid_drawn = tasks.responses_valid(drawn.reshape(-1, 5), SPEC).reshape(len(made), 16, 4)
    assert counts == {"drawn": valid_drawn.size, "invalid": int((~valid_drawn).sum())}
    assert len(made) <= rounds + 1
    valid = tasks.responses_valid(samples.reshape(-1, 5), SPEC).reshape(16, 4)
    np.testing.assert_array_equal(keep, valid.all(axis=1))
    for q in range(16):
        # Every valid slot holds a distinct valid draw of this same query (first draw kept in
        # place when valid): nothing is invented or shared between queries.
        pool = [tuple(drawn[r, q, k]) for r in range(len(made)) for k in range(4)
                if valid_drawn[r, q, k]]
        used = [tuple(s) for s, ok in zip(samples[q], valid[q]) if ok]
        assert all(used.count(u) <= pool.count(u) for u in used)
        np.testing.assert_array_equal(samples[q][valid_drawn[0, q]], drawn[0, q][valid_drawn[0, q]])
    if rounds == 0:
        np.testing.assert_array_equal(keep, valid_drawn[0].all(axis=1))
    if rounds == 8:
        assert keep.all()  # p(valid) ~ 0.59: nine draws of 4 fill every query here
    else:
        assert not keep.all()


def _eager_trunk(monkeypatch, p_stop):
    """A tiny GPT-2 whose every position emits '.' (token 13) with probability ~p_stop at T=0.7:
    ln_f's scale is 0, so the final hidden state is its bias e_0, and wte[13] points along it."""
    real = experiment.initial_trunk

    def trunk(config, gpt_cfg):
        t = jax.tree.map(np.array, real(config, gpt_cfg))
        t["ln_f"]["scale"][:] = 0.0
        t["ln_f"]["bias"][:] = 0.0
        t["ln_f"]["bias"][0] = 1.0
        t["wte"][:, 0] = 0.0
        t["wte"][13, 0] = 0.7 * np.log(p_stop / (1 - p_stop) * (gpt_cfg.vocab_size - 1))
        return t

    monkeypatch.setattr(experiment, "initial_trunk", trunk)


def _config(mode, rounds=1):
    cfg = load_config()
    cfg.labeler.rollout_batch_size = 8
    cfg.labeler.invalid_samples = mode
    cfg.labeler.resample_rounds = rounds
    return cfg


def test_labels_hold_only_valid_samples_and_count_the_dropped(monkeypatch, tmp_path):
    _eager_trunk(monkeypatch, p_stop=0.1)  # P(valid) = 1 - 0.9^8 ~ 0.57 per sample
    spec = tasks.TaskSpec(query_length=64, response_length=24, truncate_token=13,
                          truncate_after=16)
    out = {}
    for mode in ("resample", "keep"):
        path = str(tmp_path / f"{mode}.json")
        stats = label.write_mock_labels(_config(mode), path, num_labels=16)
        records = labels_lib.load_labels(path, "best_of_4", query_length=64, response_length=24,
                                         vocab_size=50257)
        valid = np.stack([tasks.responses_valid(records[f"sample{k}"], spec) for k in range(4)])
        out[mode] = stats, valid
    stats, valid = out["resample"]
    assert valid.all() and stats["num_labels"] == 16
    assert stats["invalid_samples"] > 0 and stats["queries_dropped"] > 0
    # "keep": the old behaviour, invalid samples shown, nothing dropped.
    stats, valid = out["keep"]
    assert not valid.all() and stats["queries_dropped"] == 0
    assert stats["invalid_samples"] == (~valid).sum() and stats["samples_drawn"] == 64


def test_a_model_that_never_stops_is_a_clear_error(tmp_path):
    cfg = _config("resample", rounds=0)  # the random tiny model: ~1e-4 of samples are valid
    with pytest.raises(ValueError, match=r"none of 8 queries got 4 valid samples .*"
                                         r"--config.labeler.invalid_samples=keep"):
        label.write_mock_labels(cfg, str(tmp_path / "x.json"), num_labels=8)
    cfg.labeler.invalid_samples = "some"
    with pytest.raises(ValueError, match=r"labeler.invalid_samples='some': expected one of"):
        label.write_mock_labels(cfg, str(tmp_path / "x.json"), num_labels=8)

