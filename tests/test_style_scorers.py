"""The descriptiveness mock labeler: hand-written pairs, its lexicon rules, label.py wiring."""

import numpy as np
import pytest

from rlhf_jax import experiment, label, labelers, style_scorers
from rlhf_jax.data import labels as labels_lib
from tests.test_train_reward import load_config

# (descriptive, plain) continuations of about the same length, written for this test.
PAIRS = [
    ("The old stone bridge glittered softly under a pale, silver moon.",
     "He went to the bridge and then he came back to the house."),
    ("Her crimson dress rustled gently in the cold, damp wind.",
     "She put on her dress and went out to see him there."),
    ("A tall, gaunt stranger stood silently by the dusty window.",
     "A man was there by the window when I got home from work."),
    ("Thick golden light spilled lazily across the quiet, empty street.",
     "I think that is what he said to me at the time."),
    ("The ancient, crumbling tower loomed darkly over the misty valley.",
     "They said that the tower was over there in the valley."),
]


def test_descriptive_sentences_rank_above_plain_ones():
    scorer = style_scorers.DescriptivenessScorer()
    desc = scorer([""] * len(PAIRS), [d for d, _ in PAIRS])
    plain = scorer([""] * len(PAIRS), [p for _, p in PAIRS])
    assert np.all(desc > plain), (desc, plain)
    assert np.all((0 <= plain) & (desc <= 1))
    # A best-of-4 labeler with this scorer picks the descriptive one wherever it stands.
    labeler = labelers.BestOfNLabeler(scorer)
    samples = [[p, p, d, p] for d, p in PAIRS]
    assert labeler.label([""] * len(PAIRS), samples).tolist() == [2] * len(PAIRS)


def test_credit_rules():
    credit = style_scorers.modifier_credit
    assert credit("gaunt") == credit("silently") == 1.0  # ADJ; ADV
    assert credit("pale") == credit("older") == 1.0  # gradable adjectives ("paler"; "old")
    assert credit("silver") == credit("house") == pytest.approx(1 / 3)  # ADJ, NOUN, VERB
    assert credit("window") == credit("went") == 0.0  # NOUN/VERB; VERB
    assert credit("then") == credit("to") == credit("under") == 0.0  # closed class
    assert credit("lazily") == 1.0  # not in the lexicon: -ly of the adjective "lazy"
    assert credit("xqzzy") == 0.0
    scorer = style_scorers.DescriptivenessScorer(target_words=10)
    # One vivid word alone is not a vivid continuation: scored as 1 of 10 words.
    assert scorer.score_text("Beautiful.") == pytest.approx(0.1)
    assert scorer.score_text("") == 0.0 and scorer.score_text("...") == 0.0
    both = style_scorers.DescriptivenessScorer("query+response")
    assert both(["Gaunt and pale"], [""])[0] > 0 == scorer(["Gaunt and pale"], [""])[0]
    with pytest.raises(ValueError, match="field must be one of"):
        style_scorers.DescriptivenessScorer("query")
    with pytest.raises(ValueError, match="2 queries but 1 responses"):
        scorer(["a", "b"], ["c"])


def test_label_py_writes_descriptiveness_labels(tmp_path):
    """configs/descriptiveness.py labels with this scorer by default, through label.py."""
    cfg = load_config("descriptiveness")
    assert cfg.labeler.kind == "descriptiveness"
    cfg.labeler.rollout_batch_size = 8
    tok = experiment.tokenizer(cfg)
    assert isinstance(label.make_scorer(cfg), style_scorers.DescriptivenessScorer)
    path = str(tmp_path / "labels.json")
    stats = label.write_mock_labels(cfg, path, num_labels=8)
    assert stats["num_labels"] == 8 and stats["chosen_score"] >= stats["mean_score"]
    records = labels_lib.load_labels(path, "best_of_4", query_length=64, response_length=24,
                                     vocab_size=len(tok))
    # The recorded choice is the best sample by the scorer (argmax; ties broken at random).
    scorer = style_scorers.DescriptivenessScorer()
    for i in range(8):
        texts = labelers.decode_tokens(tok, np.stack([records[f"sample{k}"][i]
                                                      for k in range(4)]), 50259)
        scores = scorer([""] * 4, texts)
        assert scores[records["best"][i]] == scores.max()
    cfg.labeler.kind = "sentiment"
    with pytest.raises(ValueError, match="known kinds are vader, descriptiveness, copying, rouge"):
        label.make_scorer(cfg)
