"""Mock summary labelers: scorers that stand in for the paper's human labelers.

Both follow the project's scorer protocol ``scorer(queries, responses) -> np.ndarray`` of
float64, one score per pair, higher is better. ``queries`` are the article texts (no
"Article:" prefix or "TL;DR:" suffix) and ``responses`` the decoded summaries.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from rlhf_jax import summary_metrics as sm


def _check(queries: Sequence[str], responses: Sequence[str]) -> None:
    if isinstance(queries, str) or isinstance(responses, str):
        raise TypeError("queries and responses must be sequences of strings")
    if len(queries) != len(responses):
        raise ValueError(f"{len(queries)} queries but {len(responses)} responses")


class RougeToReferenceScorer:
    """Prefers summaries closer to the article's reference summary, by ROUGE F-measure.

    Score = the chosen ROUGE F-measure (rouge-score, Porter stemmer) of the response against
    the reference, in [0, 1]; ``"mean"`` averages ROUGE-1, -2 and -L.
    """

    def __init__(
        self,
        references_by_query: Mapping[str, str],
        metric: str = "rougeL",
        use_stemmer: bool = True,
    ):
        """Builds the scorer.

        Args:
            references_by_query: reference summary per article text. Keys are also matched
                after stripping surrounding whitespace, since decoded queries often lose it.
            metric: "rouge1", "rouge2", "rougeL" or "mean".
            use_stemmer: rouge-score's stemmer option.
        """
        if metric not in (*sm.ROUGE_TYPES, "mean"):
            raise ValueError(f"metric must be one of {sm.ROUGE_TYPES + ('mean',)}, not {metric!r}")
        self.metric = metric
        self.use_stemmer = use_stemmer
        self._refs = dict(references_by_query)
        self._stripped = {k.strip(): v for k, v in self._refs.items()}

    def reference(self, query: str) -> str:
        """Looks up the reference summary of one article.

        Args:
            query: the article text.

        Returns:
            Its reference summary.

        Raises:
            KeyError: naming the start of the article and how many references are known.
        """
        if query in self._refs:
            return self._refs[query]
        if query.strip() in self._stripped:
            return self._stripped[query.strip()]
        raise KeyError(
            f"no reference summary for query {query[:60]!r}... "
            f"({len(query)} chars); RougeToReferenceScorer knows {len(self._refs)} queries"
        )

    def __call__(self, queries: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        _check(queries, responses)
        if not queries:
            return np.zeros(0)
        refs = [self.reference(q) for q in queries]
        per = sm.rouge_per_example(list(responses), refs, self.use_stemmer)
        if self.metric == "mean":
            return np.mean([per[k] for k in sm.ROUGE_TYPES], axis=0)
        return per[self.metric]


class CopyingScorer:
    """Prefers copied, hence accurate, sentences, as the paper's labelers ended up doing.

    With the module-docstring rules of :mod:`rlhf_jax.summary_metrics`, for a response with
    ``W`` words in total, of which ``C`` are in sentences copied verbatim from the article::

        score = (C / W) * min(1, W / target_words)        (0 when W == 0)

    The first factor is the share of the response that is copied (word-weighted, so one short
    copied sentence cannot carry a long invented one); the second keeps an empty or very short
    response from winning. Scores lie in [0, 1]; a fully copied response of at least
    ``target_words`` words scores 1.
    """

    def __init__(self, target_words: int = 25, ngram: int = 0):
        """Builds the scorer.

        Args:
            target_words: response length (in words) below which the score is scaled down.
            ngram: 0 scores whole copied sentences (above). n > 0 scores the share of the
                response's word n-grams that occur in the article instead of C / W: a graded
                signal for models too small to copy a whole sentence, where the sentence rule
                scores almost every sample 0 and so gives best-of-4 labels no information.
        """
        if target_words < 1:
            raise ValueError(f"target_words must be >= 1, got {target_words}")
        if ngram < 0:
            raise ValueError(f"ngram must be >= 0, got {ngram}")
        self.target_words = target_words
        self.ngram = ngram

    def score_one(self, article: str, response: str) -> float:
        """Scores one response against its article (formula in the class docstring).

        Args:
            article: the article text.
            response: the summary.

        Returns:
            The score in [0, 1].
        """
        if self.ngram:
            resp = sm.words(response)
            grams = sm._ngrams(resp, self.ngram)
            if not grams:
                return 0.0
            seen = set(sm._ngrams(sm.words(article), self.ngram))
            share = sum(g in seen for g in grams) / len(grams)
            return share * min(1.0, len(resp) / self.target_words)
        sents = sm.sentences(response)
        total = sum(len(s) for s in sents)
        if total == 0:
            return 0.0
        source = sm.words(article)
        copied = sum(len(s) for s in sents if sm.is_copied(s, source))
        return (copied / total) * min(1.0, total / self.target_words)

    def __call__(self, queries: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        _check(queries, responses)
        return np.array([self.score_one(q, r) for q, r in zip(queries, responses)], dtype=float)
