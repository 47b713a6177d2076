"""Summary metrics against hand-computed values."""

import json
import math

import pytest

from rlhf_jax import summary_metrics as M


def test_word_and_sentence_rules():
    assert M.words("Don\u2019t STOP, U.S. 3.5!") == ["don't", "stop", "u", "s", "3", "5"]
    assert M.sentences("One two. Three? \"Four.\" Five\nsix ... ! ") == [
        ["one", "two"], ["three"], ["four"], ["five"], ["six"]]
    assert M.is_copied(["sat", "on"], M.words("The cat sat on the mat"))
    assert not M.is_copied(["cat", "on"], M.words("The cat sat on the mat"))
    # Whole words only: "at" is not inside "cat".
    assert not M.is_copied(["at"], ["cat"])


def test_novelty_hand_computed():
    source = "The cat sat on the mat."
    # Pair 1: summary words  the cat sat | a dog ran   (source: the cat sat on the mat)
    #   1-grams: the, cat, sat in source; a, dog, ran novel        -> 3 novel of 6
    #   2-grams: the-cat, cat-sat seen; sat-a, a-dog, dog-ran      -> 3 of 5
    #   3-grams: the-cat-sat seen; other 3 novel                   -> 3 of 4
    #   4-grams: all 3 novel                                       -> 3 of 3
    #   sentences: "the cat sat" copied, "a dog ran" novel         -> 1 of 2
    # Pair 2: "On the mat." -> on the mat, fully copied: 0/3, 0/2, 0/1, no 4-gram, 0/1.
    one = M.novelty(["The cat sat. A dog ran."], [source])
    assert one == {
        "novel_1gram_pct": 50.0, "novel_2gram_pct": 60.0, "novel_3gram_pct": 75.0,
        "novel_4gram_pct": 100.0, "novel_sentence_pct": 50.0,
    }
    pooled = M.novelty(["The cat sat. A dog ran.", "On the mat."], [source, source])
    assert pooled["novel_1gram_pct"] == pytest.approx(100 * 3 / 9)
    assert pooled["novel_2gram_pct"] == pytest.approx(100 * 3 / 7)
    assert pooled["novel_3gram_pct"] == pytest.approx(100 * 3 / 5)
    assert pooled["novel_4gram_pct"] == pytest.approx(100 * 3 / 3)
    assert pooled["novel_sentence_pct"] == pytest.approx(100 * 1 / 3)
    # Nothing to count: NaN, not 0.
    assert math.isnan(M.novelty(["On the mat."], [source])["novel_4gram_pct"])


def test_copy_from_start_rate_hand_computed():
    source = "Police said on Monday that the bridge was closed. It reopened later."
    summaries = [
        "Police said on Monday that the bridge was closed.",  # lead copied: yes
        "The bridge was closed, police said on Monday.",  # copied words, not the start: no
        "Police said.",  # 2 words < min_words 5: no
        "Police said. On Monday that the bridge",  # head police said on monday that: yes
    ]
    assert M.copy_from_start_rate(summaries, [source] * 4) == 0.5
    assert M.copies_from_start("Police said.", source, min_words=2)


def test_rouge_identical_and_disjoint():
    same = M.rouge_scores(["the bridge was closed"], ["the bridge was closed"])
    assert same == pytest.approx({"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0, "rouge_avg": 1.0})
    apart = M.rouge_scores(["cats purr loudly"], ["the bridge was closed"])
    assert apart == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0, "rouge_avg": 0.0}
    # Mean over examples: one perfect and one disjoint pair.
    both = M.rouge_scores(["a b c", "x y"], ["a b c", "p q"])
    assert both["rouge1"] == pytest.approx(0.5)


def test_inputs_are_checked():
    with pytest.raises(ValueError, match="length"):
        M.rouge_scores(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="empty"):
        M.novelty([], [])
    with pytest.raises(TypeError):
        M.copy_from_start_rate("summary", "source")


def test_summary_report_is_json_ready():
    source = "The cat sat on the mat. It was warm."
    report = M.summary_report(["The cat sat on the mat.", ""], [source, source],
                              references=["A cat rested.", "A cat rested."])
    text = json.dumps(report, allow_nan=False)  # NaN would fail here
    assert json.loads(text) == report
    assert report["n"] == 2 and report["empty_frac"] == 0.5 and report["mean_words"] == 3.0
    assert report["novelty"]["novel_sentence_pct"] == 0.0
    assert report["copy_from_start_rate"] == 0.5
    assert set(report["rouge"]) == {"rouge1", "rouge2", "rougeL", "rouge_avg"}
    assert report["reference_novelty"]["novel_1gram_pct"] > 0
    assert "rouge" not in M.summary_report(["x y"], ["x y"])


def test_lead_keeps_the_first_sentences_with_their_punctuation():
    text = 'He said "hi." Then he left! Why?\n\nA new para. x'
    assert M.sentence_texts(text) == ['He said "hi."', "Then he left!", "Why?", "A new para.",
                                       "x"]
    assert M.lead(text) == 'He said "hi." Then he left! Why?'
    assert M.lead(text, 1) == 'He said "hi."' and M.lead("...") == ""
    assert M.sentences(text)[0] == ["he", "said", "hi"]
