"""Summary evaluation: ROUGE to references, novelty as in the paper, copying from the start.

Text rules shared by novelty, copying and the summary scorers:

- **Words**: the text is lower-cased, curly apostrophes become "'", and words are the maximal
  runs matching ``[a-z0-9]+('[a-z0-9]+)*`` (so "don't" is one word, punctuation is dropped and
  "U.S." is "u", "s").
- **Sentences**: the text is split after ".", "!" or "?" (optionally followed by a closing
  quote or bracket) when whitespace follows, and at every newline. A sentence with no words is
  ignored.
- **Copied**: a word sequence is copied from a source when it occurs contiguously in the
  source's word sequence (anywhere, across the source's sentence boundaries).

ROUGE uses the ``rouge-score`` package's own tokenizer (lower case, alphanumerics) with the
Porter stemmer, as is usual for CNN/DM. ROUGE and copy rates are fractions in [0, 1]; novelty
is in percent, as the paper reports it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z0-9]+)*")
# A sentence ends after ".", "!" or "?" and an optional closing quote or bracket (kept, in
# group 1) when whitespace follows, and at every newline.
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])(['\"\u2019\u201d)]?)\s+|\n+")
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def words(text: str) -> list[str]:
    """Lower-cased word tokens of ``text`` (module docstring rules).

    Args:
        text: any text.

    Returns:
        The words in order.
    """
    return _WORD.findall(text.lower().replace("\u2019", "'").replace("\u2018", "'"))


def sentence_texts(text: str) -> list[str]:
    """Splits ``text`` into sentences (module docstring rules), as text; wordless ones dropped.

    Args:
        text: any text.

    Returns:
        The sentences in order, stripped, each with its end punctuation and closing quote.
    """
    parts = _SENTENCE_SPLIT.split(text)  # [s0, closer0, s1, closer1, ..., sn]
    out = [parts[0]]
    for closer, sentence in zip(parts[1::2], parts[2::2]):
        out[-1] += closer or ""
        out.append(sentence)
    return [t.strip() for t in out if words(t)]


def sentences(text: str) -> list[list[str]]:
    """Splits ``text`` into sentences and each into words; sentences without words are dropped.

    Args:
        text: any text.

    Returns:
        One word list per sentence, in order.
    """
    return [words(s) for s in sentence_texts(text)]


def lead(article: str, k: int = 3) -> str:
    """The lead-k baseline: the first ``k`` sentences of ``article``, joined by spaces.

    Lead-3 is the paper's strongest simple baseline on CNN/DM (labelers preferred it to the
    models; spec §8).

    Args:
        article: the article text.
        k: sentences to keep.

    Returns:
        The baseline summary ("" for an article without words).
    """
    return " ".join(sentence_texts(article)[:k])


def _joined(tokens: Sequence[str]) -> str:
    # Words contain no spaces, so " a b " occurs in " x a b y " exactly when the word sequence
    # a b occurs contiguously: substring search does the subsequence test.
    return " " + " ".join(tokens) + " "


def is_copied(tokens: Sequence[str], source_tokens: Sequence[str]) -> bool:
    """Whether the word sequence ``tokens`` occurs contiguously in ``source_tokens``.

    Args:
        tokens: words of a sentence (non-empty for a meaningful answer).
        source_tokens: words of the source.

    Returns:
        True if copied. An empty ``tokens`` counts as copied.
    """
    return _joined(tokens) in _joined(source_tokens)


def _check_pairs(a: Sequence[str], b: Sequence[str], names: str) -> None:
    if isinstance(a, str) or isinstance(b, str):
        raise TypeError(f"{names} must be sequences of strings, not a single string")
    if len(a) != len(b):
        raise ValueError(f"{names} differ in length: {len(a)} vs {len(b)}")
    if not a:
        raise ValueError(f"{names} are empty")


def rouge_per_example(
    predictions: Sequence[str], references: Sequence[str], use_stemmer: bool = True
) -> dict[str, np.ndarray]:
    """ROUGE-1, ROUGE-2 and ROUGE-L F-measures for each prediction/reference pair.

    Args:
        predictions: generated summaries.
        references: reference summaries, aligned with ``predictions``.
        use_stemmer: apply the Porter stemmer (rouge-score option).

    Returns:
        ``{"rouge1": array, "rouge2": array, "rougeL": array}`` of F-measures in [0, 1].
    """
    from rouge_score import rouge_scorer  # Deferred: pulls in nltk (~0.5 s).

    _check_pairs(predictions, references, "predictions and references")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer)
    out = {k: np.zeros(len(predictions)) for k in ROUGE_TYPES}
    for i, (pred, ref) in enumerate(zip(predictions, references)):
        # rouge-score's argument order is (target, prediction).
        scores = scorer.score(ref, pred)
        for k in ROUGE_TYPES:
            out[k][i] = scores[k].fmeasure
    return out


def rouge_scores(
    predictions: Sequence[str], references: Sequence[str], use_stemmer: bool = True
) -> dict[str, float]:
    """Mean ROUGE F-measures over a set of summaries.

    Args:
        predictions: generated summaries.
        references: reference summaries, aligned with ``predictions``.
        use_stemmer: apply the Porter stemmer.

    Returns:
        ``{"rouge1", "rouge2", "rougeL", "rouge_avg"}`` in [0, 1]; ``rouge_avg`` is the mean
        of the three (the paper's R-AVG).
    """
    per = rouge_per_example(predictions, references, use_stemmer)
    out = {k: float(v.mean()) for k, v in per.items()}
    out["rouge_avg"] = float(np.mean([out[k] for k in ROUGE_TYPES]))
    return out


def _ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def novelty(
    summaries: Sequence[str], sources: Sequence[str], n_values: Sequence[int] = (1, 2, 3, 4)
) -> dict[str, float]:
    """Percentage of summary n-grams and sentences that do not appear in the source.

    Pooled over the whole set: for each n, (novel n-gram occurrences in all summaries) /
    (n-gram occurrences in all summaries) x 100. N-grams are taken over a text's whole word
    sequence, so they may cross sentence ends; an occurrence is novel when that n-gram never
    occurs in its own source. A summary sentence is novel when its word sequence is not copied
    (module docstring) from its source; the sentence percentage is pooled the same way. A
    percentage with nothing to count (e.g. all summaries shorter than n words) is NaN.

    Args:
        summaries: summaries to measure.
        sources: the article each summary was written from, aligned with ``summaries``.
        n_values: n-gram orders.

    Returns:
        ``{"novel_{n}gram_pct": ..., "novel_sentence_pct": ...}``.
    """
    _check_pairs(summaries, sources, "summaries and sources")
    novel = {n: 0 for n in n_values}
    total = {n: 0 for n in n_values}
    novel_sents = total_sents = 0
    for summary, source in zip(summaries, sources):
        src = words(source)
        summ = words(summary)
        for n in n_values:
            grams = _ngrams(summ, n)
            seen = set(_ngrams(src, n))
            total[n] += len(grams)
            novel[n] += sum(g not in seen for g in grams)
        src_joined = _joined(src)
        for sent in sentences(summary):
            total_sents += 1
            novel_sents += _joined(sent) not in src_joined

    def pct(num: int, den: int) -> float:
        return 100.0 * num / den if den else math.nan

    out = {f"novel_{n}gram_pct": pct(novel[n], total[n]) for n in n_values}
    out["novel_sentence_pct"] = pct(novel_sents, total_sents)
    return out


def copies_from_start(summary: str, source: str, min_words: int = 5) -> bool:
    """Whether ``summary`` opens by copying the very start of ``source``.

    The summary's head is its first sentence, extended with the following words to at least
    ``min_words`` words (a short first sentence alone matches the source's start by chance too
    easily). It copies from the start when the head equals the first words of the source.
    A summary with fewer than ``min_words`` words never counts.

    Args:
        summary: the summary.
        source: its article.
        min_words: shortest head that counts.

    Returns:
        True when the head is a prefix of the source's words.
    """
    summ = words(summary)
    sents = sentences(summary)
    if len(summ) < min_words or not sents:
        return False
    head = summ[:max(len(sents[0]), min_words)]
    return words(source)[:len(head)] == head


def copy_from_start_rate(
    summaries: Sequence[str], sources: Sequence[str], min_words: int = 5
) -> float:
    """Fraction of summaries that copy the start of their source (see :func:`copies_from_start`).

    The paper's RL summarizers did this 77.6% (CNN/DM) and 28.3% (TL;DR) of the time.

    Args:
        summaries: summaries to measure.
        sources: aligned articles.
        min_words: passed to :func:`copies_from_start`.

    Returns:
        A fraction in [0, 1]; the denominator counts every summary, empty ones included.
    """
    _check_pairs(summaries, sources, "summaries and sources")
    hits = sum(copies_from_start(s, a, min_words) for s, a in zip(summaries, sources))
    return hits / len(summaries)


def _json_float(x: float) -> float | None:
    # JSON has no NaN; None keeps the report loadable by strict parsers.
    return None if math.isnan(x) else float(x)


def summary_report(
    summaries: Sequence[str],
    sources: Sequence[str],
    references: Sequence[str] | None = None,
    n_values: Sequence[int] = (1, 2, 3, 4),
    min_words: int = 5,
) -> dict[str, Any]:
    """All summary metrics in one JSON-ready dict (NaN written as None).

    Args:
        summaries: a policy's summaries.
        sources: the articles they were written from.
        references: reference summaries; ROUGE is left out when None or all empty.
        n_values: n-gram orders for novelty.
        min_words: for the copy-from-start rate.

    Returns:
        ``{"n", "mean_words", "empty_frac", "novelty": {...}, "copy_from_start_rate",
        "rouge": {...} (only with references), "reference_novelty": {...} (idem)}``.
    """
    _check_pairs(summaries, sources, "summaries and sources")
    lengths = [len(words(s)) for s in summaries]
    report: dict[str, Any] = {
        "n": len(summaries),
        "mean_words": float(np.mean(lengths)),
        "empty_frac": float(np.mean([n == 0 for n in lengths])),
        "novelty": {k: _json_float(v) for k, v in novelty(summaries, sources, n_values).items()},
        "copy_from_start_rate": copy_from_start_rate(summaries, sources, min_words),
    }
    if references is not None and any(r.strip() for r in references):
        _check_pairs(summaries, references, "summaries and references")
        report["rouge"] = rouge_scores(summaries, references)
        # The paper compares its models' novelty with the references' own.
        report["reference_novelty"] = {
            k: _json_float(v) for k, v in novelty(references, sources, n_values).items()
        }
    return report
