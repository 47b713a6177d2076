"""A mock labeler for the descriptiveness task: prefers vivid, descriptive continuations.

The paper's second style task (Ziegler et al. 2019, §3.1; spec §8) asked labelers for book
continuations that are "vivid" and "descriptive"; the released code has no programmatic
stand-in, so offline runs of that task had nothing to learn from. This scorer follows the
project's scorer protocol (`labelers.Scorer`): `scorer(queries, responses) -> float64[B]`.

Score of a text with W words (`summary_metrics.words`)::

    score = (sum over its words of credit(word)) / max(W, target_words)        (0 when W == 0)

credit(word) comes from lemminflect's lexicon (the NIH SPECIALIST lexicon, shipped inside the
PyPI package as CSV tables: no download, no model; only its dictionary lookups are used):
1 for a modifier: a word whose readings are all adjective/adverb ("gaunt", "silently"), or a
gradable adjective, one with comparative forms ("pale" -> "paler", "cold"), even if it can also
be a noun or verb; otherwise the share of its readings that are adjective or adverb ("silver":
ADJ, NOUN, VERB -> 1/3; "house", which the lexicon also lists as an adjective, 1/3; "window" 0).
Closed-class words that the lexicon also lists as adjectives or adverbs ("to", "then", "there",
"very", "under", ...) get 0: they are not description. An -ly word missing from the lexicon
whose base is an adjective ("lazily" <- "lazy") is an adverb.

The score is a density in [0, 1]; `target_words` keeps a one-word response such as
"Beautiful." from beating a descriptive sentence.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

from rlhf_jax import summary_metrics

MODIFIERS = frozenset({"ADJ", "ADV"})
# Function words, intensifiers, time/place deictics and prepositions that the lexicon also lists
# as adjectives or adverbs. They are in every sentence, vivid or not.
CLOSED_CLASS = frozenset("""
    about above across after again ago ahead all almost already also always any apart around as
    aside at away back
    before behind below beneath beside besides between beyond by down each either else enough
    even ever far few first for forth forward from further here home however in indeed inside
    instead into just last later least less
    like little long maybe more most much near neither never next no not now off often on once
    only onto other otherwise out outside over own past perhaps quite rather really right round
    same since so some sometimes soon still such sure than that then there therefore these this
    those though through throughout thus to together too toward towards twice under until up
    upon very well what when where whole why with within without yes yet
""".split())
FIELDS = ("response", "query+response")


@functools.lru_cache(maxsize=1)
def _lexicon():
    # Imported lazily: the tables load in ~0.5 s, only for runs that use this labeler.
    from lemminflect import getAllInflections, getAllLemmas

    return getAllLemmas, getAllInflections


def _readings(word: str) -> dict[str, tuple[str, ...]]:
    return _lexicon()[0](word)


def _gradable(lemma: str) -> bool:
    return "JJR" in _lexicon()[1](lemma, upos="ADJ")


@functools.lru_cache(maxsize=65536)
def modifier_credit(word: str) -> float:
    """The share of `word`'s part-of-speech readings that are adjective or adverb (see above).

    Args:
        word: a lower-case word.

    Returns:
        A credit in [0, 1]; 0 for closed-class and unknown words.
    """
    if word in CLOSED_CLASS:
        return 0.0
    readings = _readings(word)
    if not readings and word.endswith("ly") and len(word) > 4:
        # lemminflect lists few -ly adverbs of rarer adjectives ("lazily"); derive them.
        bases = (word[:-2], word[:-3] + "y", word[:-1] + "e")  # quick-, lazy-, simple-
        return float(any("ADJ" in _readings(base) for base in bases))
    if not readings:
        return 0.0
    if set(readings) <= MODIFIERS or any(_gradable(x) for x in readings.get("ADJ", ())):
        return 1.0
    return len(set(readings) & MODIFIERS) / len(readings)


class DescriptivenessScorer:
    """Scores how vivid and descriptive a continuation is (formula in the module docstring)."""

    def __init__(self, field: str = "response", target_words: int = 10):
        """Creates the scorer.

        Args:
            field: "response" scores the continuation alone; "query+response" the query text
                followed by it.
            target_words: responses shorter than this many words are scored as if padded with
                plain words.
        """
        if field not in FIELDS:
            raise ValueError(f"field must be one of {FIELDS}, got {field!r}")
        if target_words < 1:
            raise ValueError(f"target_words must be >= 1, got {target_words}")
        self.field = field
        self.target_words = target_words

    def score_text(self, text: str) -> float:
        """The descriptiveness of one text, in [0, 1]."""
        words = summary_metrics.words(text)
        if not words:
            return 0.0
        return sum(modifier_credit(w) for w in words) / max(len(words), self.target_words)

    def __call__(self, queries: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        """Scores each (query, response) pair.

        Args:
            queries: B query texts.
            responses: B response texts.

        Returns:
            float64[B] scores in [0, 1].
        """
        if isinstance(queries, str) or isinstance(responses, str):
            raise TypeError("queries and responses must be sequences of strings")
        if len(queries) != len(responses):
            raise ValueError(f"{len(queries)} queries but {len(responses)} responses")
        if self.field == "query+response":
            texts = [q + r for q, r in zip(queries, responses)]
        else:
            texts = list(responses)
        return np.array([self.score_text(t) for t in texts], dtype=np.float64)
