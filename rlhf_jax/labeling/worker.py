"""A mock labeler that works like a person, through the public HTTP API (spec §5.3).

It asks `GET /api/v1/next`, waits `delay_s` (a person reads), judges the samples with a mock
scorer and answers `POST /api/v1/labels`. With probability `noise` it picks a sample uniformly
at random instead (a careless or disagreeing person). Nothing is privileged: it uses a bot
labeler's token, and its only extra is the comparison's `extra` dict, which a `rouge` worker
needs for the reference summary. Several workers can run at once, each with its own token.

Scorers: "vader" (VADER sentiment of each sample, `labelers.VaderSentimentScorer`), "copying"
(`summary_scorers.CopyingScorer`: prefers text copied from the query), "rouge" (ROUGE-L to
`extra["reference"]`). Ties are broken at random (`labelers.BestOfNLabeler`).

A worker survives a server restart: connection errors are retried with backoff, and a label
whose answer was lost is sent again (a repeat is a harmless 200). On stop (SIGTERM, SIGINT,
`max_labels`, or `idle_exit_s` with nothing to do) it gives back a comparison it holds, so
nobody waits for its lease to expire.
"""

from __future__ import annotations

import logging
import threading
import time

import httpx2
import numpy as np

from rlhf_jax.labeling.client import ApiError, AuthError, LabelClient

logger = logging.getLogger(__name__)
KINDS = ("vader", "copying", "rouge")


class Judge:
    """Picks the best sample of a comparison with a mock scorer, plus optional noise."""

    def __init__(self, kind: str, *, noise: float = 0.0, seed: int = 0, temperature: float = 0.0,
                 copy_ngram: int = 0):
        """Args:
            kind: "vader", "copying" or "rouge".
            noise: probability of a uniformly random pick instead of the scorer's.
            seed: seeds tie-breaking, temperature sampling and noise.
            temperature: 0 = argmax of the scores; > 0 = softmax(score / temperature).
            copy_ngram: "copying": 0 scores copied sentences, n > 0 copied n-grams.
        """
        from rlhf_jax import labelers, summary_scorers

        if kind not in KINDS:
            raise ValueError(f"--labeler {kind!r}: expected one of {', '.join(KINDS)}")
        if not 0.0 <= noise <= 1.0:
            raise ValueError(f"--noise must be in [0, 1], got {noise}")
        self.kind, self.noise = kind, noise
        self._rng = np.random.default_rng([seed, 1])
        if kind == "vader":
            scorer = labelers.VaderSentimentScorer("response")
        elif kind == "copying":
            scorer = summary_scorers.CopyingScorer(ngram=copy_ngram)
        else:
            scorer = _ReferenceRouge()
        self._scorer = scorer
        self._labeler = labelers.BestOfNLabeler(scorer, temperature, seed=seed)

    def pick(self, comparison: dict) -> tuple[int, bool]:
        """(chosen index, whether it was a noisy random pick)."""
        samples = comparison["samples"]
        if self._rng.random() < self.noise:
            return int(self._rng.integers(len(samples))), True
        if isinstance(self._scorer, _ReferenceRouge):
            reference = (comparison.get("extra") or {}).get("reference")
            if not isinstance(reference, str):
                raise ValueError(f"comparison {comparison['comparison_id']} has no "
                                 "extra.reference: the rouge worker needs comparisons enqueued "
                                 "with their reference summary")
            self._scorer.reference = reference
        return int(self._labeler.label([comparison["query"]], [samples])[0]), False


class _ReferenceRouge:
    """ROUGE-L of each sample against the current comparison's reference summary."""

    reference: str = ""

    def __call__(self, queries, responses):
        from rlhf_jax import summary_scorers

        refs = {q: self.reference for q in queries}
        return summary_scorers.RougeToReferenceScorer(refs)(queries, responses)


class MockWorker:
    """The request loop of one mock labeler."""

    def __init__(self, client: LabelClient, judge: Judge, *, delay_s: float = 0.5,
                 max_labels: int = 0, idle_exit_s: float = 0.0, poll_s: float = 1.0,
                 stop: threading.Event | None = None):
        """Args:
            client: a client with a (bot) labeler's token.
            judge: what picks.
            delay_s: seconds between getting a comparison and answering it.
            max_labels: stop after this many stored labels (0 = no limit).
            idle_exit_s: stop after this long with nothing to label (0 = wait for ever).
            poll_s: seconds between polls while nothing waits.
            stop: set it to stop the worker (signal handlers do).
        """
        self.client, self.judge = client, judge
        self.delay_s, self.max_labels = delay_s, max_labels
        self.idle_exit_s, self.poll_s = idle_exit_s, poll_s
        self.stop = stop or threading.Event()
        self.counts = {"labels": 0, "repeats": 0, "noisy": 0, "conflicts": 0, "skipped": 0,
                       "retries": 0}

    def _call(self, fn, *args, **kw):
        """Runs one API call, retrying connection failures with backoff until stopped."""
        backoff = 0.1
        while True:
            try:
                return fn(*args, **kw)
            except (httpx2.TransportError, ApiError) as e:
                if isinstance(e, AuthError) or (isinstance(e, ApiError) and e.status < 500):
                    raise
                self.counts["retries"] += 1
                logger.warning("%s; retrying in %.1f s", e, backoff)
                if self.stop.wait(backoff):
                    return None
                backoff = min(2 * backoff, 5.0)

    def run(self) -> dict:
        """Labels until stopped; returns the counts."""
        idle_since = None
        while not self.stop.is_set():
            if self.max_labels and self.counts["labels"] >= self.max_labels:
                break
            comparison = self._call(self.client.next)
            if comparison is None:
                if self.stop.is_set():
                    break
                idle_since = idle_since or time.monotonic()
                if self.idle_exit_s and time.monotonic() - idle_since >= self.idle_exit_s:
                    logger.info("nothing to label for %.0f s: stopping", self.idle_exit_s)
                    break
                self.stop.wait(self.poll_s)
                continue
            idle_since = None
            cid = comparison["comparison_id"]
            if self.delay_s and self.stop.wait(self.delay_s):
                self._release(cid)
                break
            try:
                best, noisy = self.judge.pick(comparison)
            except ValueError as e:
                logger.warning("%s: skipping it", e)
                self._call(self.client.skip, cid, flag=str(e)[:500])
                self.counts["skipped"] += 1
                continue
            try:
                result = self._call(self.client.label, cid, best)
            except ApiError as e:
                if e.status != 409:
                    raise
                # The lease expired and another labeler took it: nothing stored, move on.
                self.counts["conflicts"] += 1
                logger.info("comparison %d: %s", cid, e.detail)
                continue
            if result is None:  # stopped while the server was unreachable
                break
            status, _ = result
            # 200 means our label was already stored: its first answer was lost on the way
            # (a server restart), and the retry found it.
            self.counts["labels"] += 1
            self.counts["repeats"] += status == 200
            self.counts["noisy"] += noisy
        return dict(self.counts)

    def _release(self, comparison_id: int) -> None:
        try:
            self.client.skip(comparison_id, release=True)
        except (httpx2.TransportError, ApiError) as e:
            logger.warning("could not give back comparison %d (its lease will expire): %s",
                           comparison_id, e)
