"""Supervised fine-tuning data: fixed-length examples and the batch of any step (spec §2.4, §8).

"lm" mode: a corpus tokenised, each text followed by EOT, joined and cut into windows.
"summarize" mode: (article, reference) pairs laid out as the policy's context plus the reference
as its response, with the loss mask on the summary tokens. The data order is a pure function of
(seed, step), so a resumed `train_sft` run sees the same batches.
"""

from __future__ import annotations

import functools
import logging

import numpy as np

from rlhf_jax.data import summarization, tasks
from rlhf_jax.tokenizer import EOT_ID

logger = logging.getLogger(__name__)

MAX_SKIPPED = 1000  # unusable examples in a row before the data is declared unusable


def summary_example(article: str, reference: str, tok, spec: tasks.TaskSpec):
    """One supervised summary example laid out as a policy context plus response.

    Args:
        article: the article text.
        reference: its reference summary; newlines become spaces, because the task ends a
            response at a newline (truncate_token 198).
        tok: tokenizer.
        spec: the task settings.

    Returns:
        (tokens int32[context_length + response_length], mask bool[same]) where mask marks the
        summary tokens (the loss targets), or None when the article yields no query (as the
        query stream skips it) or the reference is empty.
    """
    query = tasks.make_query(tok.encode(article), spec)
    reference = " ".join(reference.split())
    if query is None or not reference:
        return None
    context = tasks.format_context(query[None], spec)[0]
    # A leading space: after "TL;DR:" GPT-2 continues with " word", not "word".
    target = tok.encode(" " + reference + "\n")[: spec.response_length]
    response = np.full(spec.response_length, spec.pad_id, np.int32)
    response[: len(target)] = target
    mask = np.zeros(spec.context_length + spec.response_length, bool)
    mask[spec.context_length : spec.context_length + len(target)] = True
    return np.concatenate([context, response]).astype(np.int32), mask


class SFTData:
    """Fixed-length examples and the batch of any step, a pure function of (seed, step).

    Pass `e` over the examples is a permutation drawn with `np.random.default_rng((seed, e))`;
    the global batch of step `s` is rows [s*B, (s+1)*B) of that stream. An example that turns
    out unusable (lazy tfds records) is replaced by the next usable one in the same pass.

    Attributes:
        seq_len: tokens per example.
        target_start: first position whose token can be a target (1 for "lm", the context
            length for "summarize"); the loss reads logits only from there on.
    """

    def __init__(self, num: int, example_fn, seq_len: int, target_start: int, seed: int):
        if num == 0:
            raise ValueError("SFT dataset is empty")
        self.num, self.seq_len, self.target_start, self.seed = num, seq_len, target_start, seed
        self.example = functools.lru_cache(maxsize=8192)(example_fn)
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 4:  # a batch spans at most two passes
                self._perms.clear()
            self._perms[epoch] = np.random.default_rng((self.seed, epoch)).permutation(self.num)
        return self._perms[epoch]

    @classmethod
    def lm(cls, texts, tok, seq_len: int, seed: int) -> SFTData:
        """Texts joined with EOT and cut into windows of `seq_len` (the tail is dropped)."""
        stream = np.fromiter((t for text in texts for t in tok.encode(text) + [EOT_ID]), np.int32)
        windows = stream[: len(stream) // seq_len * seq_len].reshape(-1, seq_len)
        if not len(windows):
            raise ValueError(f"SFT corpus has {len(stream)} tokens, fewer than seq_len={seq_len}")
        mask = np.ones(seq_len, bool)
        logger.info("SFT lm data: %d tokens, %d windows of %d", len(stream), len(windows), seq_len)
        return cls(len(windows), lambda i: (windows[i], mask), seq_len, 1, seed)

    @classmethod
    def summarize(cls, pairs, tok, spec: tasks.TaskSpec, seed: int) -> SFTData:
        def example_fn(i):
            try:
                return summary_example(*pairs[i], tok, spec)
            except summarization.RecordError as err:
                logger.warning("skipping: %s", err)
                return None

        return cls(len(pairs), example_fn, spec.context_length + spec.response_length,
                   spec.context_length, seed)

    def row(self, r: int):
        """(tokens, mask) of stream row `r`."""
        epoch, offset = divmod(r, self.num)
        perm = self._perm(epoch)
        for k in range(min(self.num, MAX_SKIPPED)):
            ex = self.example(int(perm[(offset + k) % self.num]))
            if ex is not None:
                return ex
        raise ValueError(f"{min(self.num, MAX_SKIPPED)} SFT examples in a row are unusable "
                         "(articles the task skips, e.g. no end_text in the query window, or "
                         "empty references)")

    def get_batch(self, step: int, batch_size: int, process_index: int = 0,
                  process_count: int = 1) -> dict[str, np.ndarray]:
        """This process's contiguous slice of the global batch of `step`."""
        local = batch_size // process_count
        start = step * batch_size + process_index * local
        rows = [self.row(r) for r in range(start, start + local)]
        return {"tokens": np.stack([t for t, _ in rows]), "mask": np.stack([m for _, m in rows])}
