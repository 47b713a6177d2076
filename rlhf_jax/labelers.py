"""Mock labelers, so the whole pipeline runs without humans.

A *labeler* is anything with `label(query_texts, sample_texts) -> int32[B]` returning the
index of the preferred sample for each query (the `Labeler` protocol). `BestOfNLabeler`
implements it with a programmatic `Scorer` (e.g. VADER sentiment for the sentiment task).
A human labeling front end can be added later as another `Labeler`: it shows each query
with its N samples, collects the choices, and returns them in the same form; nothing
downstream changes, because labels are exchanged through `make_label_records` and the
JSON files of `rlhf_jax.data.labels`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np


class Scorer(Protocol):
    """Scores (query, response) pairs; higher is better."""

    def __call__(self, queries: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        """Returns float[len(queries)] scores."""
        ...


class Labeler(Protocol):
    """Picks the best of N samples per query (mock or human)."""

    def label(
        self, query_texts: Sequence[str], sample_texts: Sequence[Sequence[str]]
    ) -> np.ndarray:
        """Returns int32[B] chosen indices, each in [0, N)."""
        ...


class VaderSentimentScorer:
    """VADER compound sentiment in [-1, 1] (vaderSentiment ships its lexicon; no network).

    A stand-in for the paper's "positive sentiment" labelers.
    """

    FIELDS = ("response", "query+response")

    def __init__(self, field: str = "response"):
        """Creates the scorer.

        Args:
            field: "response" scores only the continuation; "query+response" scores the
                query text followed directly by the response (the response continues it).
        """
        if field not in self.FIELDS:
            raise ValueError(f"field must be one of {self.FIELDS}, got {field!r}")
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.field = field
        self._analyzer = SentimentIntensityAnalyzer()

    def __call__(self, queries: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        """Scores each pair.

        Args:
            queries: B query texts.
            responses: B response texts.

        Returns:
            float64[B] compound scores.
        """
        if len(queries) != len(responses):
            raise ValueError(f"{len(queries)} queries but {len(responses)} responses")
        if self.field == "response":
            texts = responses
        else:
            texts = [q + r for q, r in zip(queries, responses, strict=True)]
        return np.array([self._analyzer.polarity_scores(t)["compound"] for t in texts])


class BestOfNLabeler:
    """Picks the best of N samples with a scorer, optionally as a noisy (Boltzmann) human.

    With `temperature == 0` the choice is the argmax of the scores, ties broken uniformly at
    random (seeded). With `temperature > 0` the choice is drawn from softmax(score / temperature), a
    Boltzmann-rational labeler. Real labels are far from noiseless: the paper reports that
    labelers agreed with each other only 38-46% of the time on the 4-way style tasks, so a
    positive temperature gives more realistic mock data.

    Choices are deterministic for a given seed: a new labeler with the same seed reproduces
    the same sequence of `label` calls.
    """

    def __init__(self, scorer: Scorer, temperature: float = 0.0, seed: int = 0):
        """Creates the labeler.

        Args:
            scorer: scores (query, sample) pairs, higher is better.
            temperature: 0 for argmax; > 0 for softmax sampling at that temperature.
            seed: numpy seed for the sampling.
        """
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        self.scorer = scorer
        self.temperature = float(temperature)
        self._rng = np.random.default_rng(seed)

    def scores(
        self, query_texts: Sequence[str], sample_texts: Sequence[Sequence[str]]
    ) -> np.ndarray:
        """Scores every sample; returns float64[B, N]."""
        if len(query_texts) != len(sample_texts):
            raise ValueError(f"{len(query_texts)} queries but {len(sample_texts)} sample lists")
        widths = {len(s) for s in sample_texts}
        if len(widths) > 1:
            raise ValueError(f"every query needs the same number of samples, got {widths}")
        n = widths.pop() if widths else 0
        # One scorer call for the whole batch: scorers may batch internally.
        flat_queries = [q for q in query_texts for _ in range(n)]
        flat_samples = [s for row in sample_texts for s in row]
        flat = np.asarray(self.scorer(flat_queries, flat_samples), np.float64)
        return flat.reshape(len(query_texts), n)

    def label(
        self, query_texts: Sequence[str], sample_texts: Sequence[Sequence[str]]
    ) -> np.ndarray:
        """Chooses the best sample for each query.

        Args:
            query_texts: B decoded queries.
            sample_texts: B lists of N decoded samples.

        Returns:
            int32[B] indices in [0, N).
        """
        scores = self.scores(query_texts, sample_texts)
        if self.temperature == 0:
            # Ties (e.g. several samples VADER finds neutral) are broken uniformly at random: an
            # indifferent person does not always pick the first sample, and a fixed index would
            # teach the reward model a position bias it cannot see in the text.
            is_max = scores == scores.max(axis=1, keepdims=True)
            noise = self._rng.random(scores.shape)
            return np.argmax(np.where(is_max, noise, -1.0), axis=1).astype(np.int32)
        logits = scores / self.temperature
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        # Inverse-CDF sampling with one uniform per row: simple and seed-stable.
        u = self._rng.random(len(scores))[:, None]
        choice = (np.cumsum(probs, axis=1) < u).sum(axis=1)
        return np.minimum(choice, scores.shape[1] - 1).astype(np.int32)


def make_label_records(query_tokens, sample_tokens, best) -> dict[str, np.ndarray]:
    """Packs a labelled batch into the label-file dict that `save_labels` writes.

    Args:
        query_tokens: int[B, Q] raw right-padded queries (no prefix/suffix: the reward
            model sees the raw query, spec §2.2).
        sample_tokens: int[B, N, L] samples, normally post-processed (padded after the
            truncation token), as in the released files.
        best: int[B] chosen sample indices.

    Returns:
        `{"query": int32[B, Q], "sample0": int32[B, L], ..., "best": int32[B]}`.
    """
    query_tokens = np.asarray(query_tokens, np.int32)
    sample_tokens = np.asarray(sample_tokens, np.int32)
    best = np.asarray(best, np.int32)
    if sample_tokens.ndim != 3 or query_tokens.ndim != 2 or best.ndim != 1:
        raise ValueError(
            f"expected query [B, Q], samples [B, N, L], best [B]; got shapes "
            f"{query_tokens.shape}, {sample_tokens.shape}, {best.shape}"
        )
    if not query_tokens.shape[0] == sample_tokens.shape[0] == best.shape[0]:
        raise ValueError("query, samples and best disagree on the batch size")
    n = sample_tokens.shape[1]
    if ((best < 0) | (best >= n)).any():
        raise ValueError(f"best must be in [0, {n}), got {best.tolist()}")
    records = {"query": query_tokens}
    for i in range(n):
        records[f"sample{i}"] = sample_tokens[:, i]
    records["best"] = best
    return records


def decode_tokens(tokenizer, tokens, pad_id: int) -> list[str]:
    """Decodes each row, dropping padding ids (50259 is not in the GPT-2 vocabulary).

    Args:
        tokenizer: object with `decode(list[int]) -> str`.
        tokens: int[B, T].
        pad_id: padding id to drop.

    Returns:
        B strings.
    """
    return [tokenizer.decode([int(t) for t in row if t != pad_id]) for row in np.asarray(tokens)]


def label_token_batch(
    labeler: Labeler, tokenizer, query_tokens, sample_tokens, *, pad_id: int
) -> dict[str, np.ndarray]:
    """Decodes a token batch, labels it and returns label-file records.

    Args:
        labeler: any Labeler (mock or human front end).
        tokenizer: object with `decode`.
        query_tokens: int[B, Q].
        sample_tokens: int[B, N, L].
        pad_id: padding id dropped before decoding.

    Returns:
        The dict of `make_label_records`.
    """
    sample_tokens = np.asarray(sample_tokens)
    queries = decode_tokens(tokenizer, query_tokens, pad_id)
    per_sample = [
        decode_tokens(tokenizer, sample_tokens[:, i], pad_id) for i in range(sample_tokens.shape[1])
    ]
    samples = [list(row) for row in zip(*per_sample, strict=True)]
    best = labeler.label(queries, samples)
    return make_label_records(query_tokens, sample_tokens, best)
