"""Mock summary labelers rank summaries as intended."""

import numpy as np
import pytest

from rlhf_jax.summary_scorers import CopyingScorer, RougeToReferenceScorer

ARTICLE = (
    "Police closed the old river bridge on Monday after engineers found cracks in two "
    "supports. The mayor said repairs would take three weeks.\n\nTraffic was diverted."
)
REFERENCE = "Cracks found in river bridge supports; repairs to take three weeks."
LEAD = "Police closed the old river bridge on Monday after engineers found cracks in two supports."
INVENTED = "A new stadium opened downtown with a concert by a famous band last night."


def test_rouge_scorer_prefers_the_reference():
    scorer = RougeToReferenceScorer({ARTICLE: REFERENCE})
    responses = [REFERENCE, LEAD, INVENTED]
    scores = scorer([ARTICLE] * 3, responses)
    assert scores.shape == (3,) and scores.dtype == np.float64
    assert scores[0] == pytest.approx(1.0)
    assert scores[0] > scores[1] > scores[2]
    mean = RougeToReferenceScorer({ARTICLE: REFERENCE}, metric="mean")([ARTICLE] * 3, responses)
    assert mean[0] == pytest.approx(1.0) and mean[1] > mean[2]


def test_rouge_scorer_lookup():
    scorer = RougeToReferenceScorer({ARTICLE: REFERENCE})
    # Decoded queries often lose surrounding whitespace.
    assert scorer.reference("  " + ARTICLE + "\n") == REFERENCE
    with pytest.raises(KeyError, match=r"no reference summary for query 'Unknown article.*knows 1"):
        scorer(["Unknown article text"], ["x"])
    with pytest.raises(ValueError, match="metric"):
        RougeToReferenceScorer({}, metric="bleu")
    assert scorer([], []).shape == (0,)


def test_copying_scorer_formula_and_ranking():
    scorer = CopyingScorer(target_words=25)
    mixed = "Traffic was diverted. Aliens landed nearby."  # 3 copied + 3 invented words
    responses = [LEAD + " The mayor said repairs would take three weeks.", LEAD, mixed,
                 INVENTED, ""]
    scores = scorer([ARTICLE] * 5, responses)
    # LEAD has 15 words, all copied: (15/15) * (15/25) = 0.6. LEAD + next sentence: 15 + 8
    # = 23 words, all copied: 23/25 = 0.92. mixed: (3/6) * (6/25) = 0.12.
    assert scores == pytest.approx([0.92, 0.6, 0.12, 0.0, 0.0])
    assert scorer([ARTICLE], [LEAD + " Traffic was diverted."])[0] == pytest.approx(18 / 25)
    assert CopyingScorer(target_words=10)([ARTICLE], [LEAD])[0] == 1.0


def test_the_two_labelers_disagree_as_the_paper_describes():
    # The ROUGE labeler prefers the abstractive reference; the copying labeler prefers the
    # copied lead sentence, as the paper's human labelers ended up doing.
    queries, responses = [ARTICLE] * 2, [REFERENCE, LEAD]
    rouge = RougeToReferenceScorer({ARTICLE: REFERENCE})(queries, responses)
    copying = CopyingScorer()(queries, responses)
    assert rouge[0] > rouge[1] and copying[1] > copying[0]


def test_scorers_check_lengths():
    with pytest.raises(ValueError, match="2 queries but 1 responses"):
        CopyingScorer()([ARTICLE, ARTICLE], ["x"])
    with pytest.raises(TypeError):
        CopyingScorer()(ARTICLE, "x")


def test_copying_scorer_ngram_mode():
    article = "The cat sat on the mat. It purred loudly all night."
    scorer = CopyingScorer(target_words=4, ngram=2)
    # "the cat sat" has bigrams (the cat), (cat sat): both in the article; length 3 of 4 words.
    assert scorer.score_one(article, "The cat sat") == pytest.approx(1.0 * 3 / 4)
    # (a dog), (dog sat), (sat on), (on the): 2 of 4 copied; 5 words >= target.
    assert scorer.score_one(article, "A dog sat on the") == pytest.approx(0.5)
    assert scorer.score_one(article, "Cat") == 0.0  # no bigram at all
    # The sentence rule gives a partly copied sentence nothing; the n-gram rule gives it credit.
    sentence = CopyingScorer(target_words=4)
    assert sentence.score_one(article, "A dog sat on the") == sentence.score_one(article, "Dogs") == 0
    with pytest.raises(ValueError, match="ngram"):
        CopyingScorer(ngram=-1)
