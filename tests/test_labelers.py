"""Mock labelers: VADER scorer, best-of-N choices, label records round trip."""

import numpy as np
import pytest

from rlhf_jax import labelers
from rlhf_jax.data.labels import load_labels, save_labels

PAD = 27


class TableScorer:
    """Scores a response by looking it up in a dict; records every call."""

    def __init__(self, table):
        self.table = table
        self.calls = 0

    def __call__(self, queries, responses):
        self.calls += 1
        assert len(queries) == len(responses)
        return np.array([self.table[r] for r in responses], np.float64)


class CharTokenizer:
    def encode(self, text):
        return [ord(c) - 97 if "a" <= c <= "z" else 26 for c in text]

    def decode(self, ids):
        assert PAD not in ids, "pad ids must be dropped before decoding"
        return "".join("." if i == 26 else chr(97 + i) for i in ids)


def test_vader_ranks_positive_above_negative():
    scorer = labelers.VaderSentimentScorer()
    scores = scorer(
        ["The film was", "The film was"],
        [" wonderful, I loved it and felt so happy.", " awful, I hated it and felt miserable."],
    )
    assert scores.shape == (2,)
    assert scores[0] > 0.5 and scores[1] < -0.5


def test_vader_query_plus_response_field():
    scorer = labelers.VaderSentimentScorer(field="query+response")
    pos, neutral = scorer(["What a great and lovely day.", "The door"], [" It ended.", " is blue."])
    assert pos > 0.3 and neutral == pytest.approx(0.0)
    with pytest.raises(ValueError, match="field"):
        labelers.VaderSentimentScorer(field="query")


def test_argmax_labeler_and_ties():
    scorer = TableScorer({"a": 0.0, "b": 2.0, "c": 1.0, "d": 2.0})
    labeler = labelers.BestOfNLabeler(scorer)
    best = labeler.label(
        ["q1", "q2", "q3"], [["a", "b", "c", "d"], ["c", "a", "a", "a"], ["a", "a", "a", "a"]]
    )
    assert best[0] in (1, 3) and best[1] == 0  # the maximum, whichever of the tied maxima
    assert best.dtype == np.int32
    assert scorer.calls == 1  # one batched scorer call
    # Ties are broken uniformly at random (no position bias), reproducibly for a seed.
    rows = [["a", "a", "a", "a"]] * 4000
    ties = labelers.BestOfNLabeler(scorer, seed=3).label(["q"] * 4000, rows)
    freqs = np.bincount(ties, minlength=4) / 4000
    np.testing.assert_allclose(freqs, 0.25, atol=0.03)
    again = labelers.BestOfNLabeler(scorer, seed=3).label(["q"] * 4000, rows)
    np.testing.assert_array_equal(ties, again)


def _choice_freqs(temperature, scores, n_rows, seed=0):
    table = {f"s{i}": v for i, v in enumerate(scores)}
    labeler = labelers.BestOfNLabeler(TableScorer(table), temperature=temperature, seed=seed)
    best = labeler.label(["q"] * n_rows, [list(table)] * n_rows)
    return np.bincount(best, minlength=len(scores)) / n_rows, best


def test_high_temperature_is_near_uniform():
    freqs, _ = _choice_freqs(1000.0, [0.0, 1.0, 2.0, 3.0], 8000)
    # binomial std at p=0.25, n=8000 is 0.0048; 0.02 is > 4 std
    np.testing.assert_allclose(freqs, 0.25, atol=0.02)


def test_low_temperature_follows_scorer():
    freqs, best = _choice_freqs(0.01, [0.0, 1.0, 3.0, 2.0], 2000)
    assert (best == 2).all()


def test_moderate_temperature_matches_softmax():
    scores = np.array([0.0, 0.5, 1.0, -1.0])
    freqs, _ = _choice_freqs(0.5, scores, 20000)
    p = np.exp(scores / 0.5) / np.exp(scores / 0.5).sum()
    np.testing.assert_allclose(freqs, p, atol=0.015)  # max binomial std here is 0.0035


def test_sampling_is_deterministic_for_a_seed():
    _, a = _choice_freqs(1.0, [0.0, 1.0, 2.0], 50, seed=3)
    _, b = _choice_freqs(1.0, [0.0, 1.0, 2.0], 50, seed=3)
    _, c = _choice_freqs(1.0, [0.0, 1.0, 2.0], 50, seed=4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_labeler_input_checks():
    labeler = labelers.BestOfNLabeler(TableScorer({"a": 0.0}))
    with pytest.raises(ValueError, match="same number of samples"):
        labeler.label(["q", "q"], [["a", "a"], ["a"]])
    with pytest.raises(ValueError, match="temperature"):
        labelers.BestOfNLabeler(TableScorer({}), temperature=-1.0)


def test_make_label_records_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    queries = rng.integers(0, 27, (5, 6))
    queries[:, -2:] = PAD
    samples = rng.integers(0, 27, (5, 4, 3))
    best = np.array([0, 3, 1, 2, 2])
    records = labelers.make_label_records(queries, samples, best)
    assert list(records) == ["query", "sample0", "sample1", "sample2", "sample3", "best"]
    path = str(tmp_path / "mock.json")
    save_labels(path, records)
    out = load_labels(
        path, "best_of_4", query_length=6, response_length=3, vocab_size=27, pad_id=PAD
    )
    for key, value in records.items():
        np.testing.assert_array_equal(out[key], value)
    np.testing.assert_array_equal(out["sample3"], samples[:, 3])


def test_make_label_records_checks():
    with pytest.raises(ValueError, match="best must be in"):
        labelers.make_label_records(np.zeros((1, 2)), np.zeros((1, 2, 3)), [2])
    with pytest.raises(ValueError, match="shapes"):
        labelers.make_label_records(np.zeros((1, 2)), np.zeros((1, 3)), [0])


def test_label_token_batch_decodes_without_padding():
    tok = CharTokenizer()
    queries = np.array([tok.encode("the") + [PAD]])
    samples = np.array([[tok.encode("ab") + [PAD], tok.encode("abc"), tok.encode("a") + [PAD] * 2]])
    labeler = labelers.BestOfNLabeler(lambda q, r: np.array([len(x) for x in r], float))
    records = labelers.label_token_batch(labeler, tok, queries, samples, pad_id=PAD)
    np.testing.assert_array_equal(records["best"], [1])  # "abc" is the longest
    np.testing.assert_array_equal(records["sample0"], samples[:, 0])
