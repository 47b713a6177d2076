"""Task formatting: query construction, context layout, response truncation (spec §2.2-2.4).

Query and response shapes are static everywhere, so the array functions here run inside
`jax.jit`. They also accept numpy input and then stay in numpy, so host-side code makes no
implicit device transfer (entry points run with `jax_transfer_guard="disallow"`).

`QueryDataset` turns raw texts into an infinite, reproducible stream of query batches: the
batch for a step is a pure function of `(shuffle_seed, step)`, so resuming needs only the
step (architecture.md §3.6), and each process reads only its own contiguous slice (§3.10).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Sequence
from typing import Protocol

import jax.numpy as jnp
import numpy as np

logger = logging.getLogger(__name__)


class Tokenizer(Protocol):
    """What this module needs from a tokenizer (HF GPT2Tokenizer satisfies it)."""

    def encode(self, text: str) -> list[int]:
        """Text to token ids."""
        ...

    def decode(self, ids: list[int]) -> str:
        """Token ids to text."""
        ...


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """Token-level task settings (the original `TaskHParams`, with texts already encoded).

    Attributes:
        query_length: tokens per query, after right padding.
        response_length: tokens sampled per response (always exactly this many).
        start_token: drop everything up to and including its first occurrence; None = off.
        end_token: cut after its last occurrence in the query window; None = off.
        query_prefix_tokens: encoded prefix put before the padded query in the context.
        query_suffix_tokens: encoded suffix put after the padded query in the context.
        pad_id: padding id (50259 for GPT-2, outside the vocabulary).
        truncate_token: responses are cut after this token; None = no truncation.
        truncate_after: only occurrences at index >= this count.
        penalty_reward_value: score that replaces the reward of an invalid response.
        temperature: sampling temperature of the policy and the reference.
    """

    query_length: int
    response_length: int
    start_token: int | None = None
    end_token: int | None = None
    query_prefix_tokens: tuple[int, ...] = ()
    query_suffix_tokens: tuple[int, ...] = ()
    pad_id: int = 50259
    truncate_token: int | None = None
    truncate_after: int = 0
    penalty_reward_value: float = -1.0
    temperature: float = 1.0

    def __post_init__(self):
        # Tuples keep the spec hashable, so it can be a static argument of jit.
        object.__setattr__(self, "query_prefix_tokens", tuple(self.query_prefix_tokens))
        object.__setattr__(self, "query_suffix_tokens", tuple(self.query_suffix_tokens))
        if self.query_length <= 0 or self.response_length <= 0:
            raise ValueError(
                f"query_length and response_length must be > 0, got "
                f"{self.query_length}, {self.response_length}"
            )
        if self.truncate_token is not None and not 0 <= self.truncate_after < self.response_length:
            raise ValueError(
                f"truncate_after must be in [0, response_length={self.response_length}), "
                f"got {self.truncate_after}: no response could ever be valid"
            )
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")

    @property
    def context_length(self) -> int:
        """Tokens in a formatted context: prefix + query + suffix."""
        return len(self.query_prefix_tokens) + self.query_length + len(self.query_suffix_tokens)


def make_task_spec(
    tokenizer: Tokenizer,
    *,
    query_length: int,
    response_length: int,
    start_text: str | None = ".",
    end_text: str | None = None,
    query_prefix: str = "",
    query_suffix: str = "",
    pad_id: int = 50259,
    truncate_token: int | None = None,
    truncate_after: int = 0,
    penalty_reward_value: float = -1.0,
    temperature: float = 1.0,
) -> TaskSpec:
    """Builds a TaskSpec from the original's text-level settings (defaults as `TaskHParams`).

    Args:
        tokenizer: encodes the start/end texts and the prefix/suffix.
        query_length: see TaskSpec.
        response_length: see TaskSpec.
        start_text: must encode to exactly one token, or be None/"" (off).
        end_text: must encode to exactly one token, or be None/"" (off).
        query_prefix: text put before the query in the policy context.
        query_suffix: text put after the padded query in the policy context.
        pad_id: see TaskSpec.
        truncate_token: see TaskSpec.
        truncate_after: see TaskSpec.
        penalty_reward_value: see TaskSpec.
        temperature: see TaskSpec.

    Returns:
        The TaskSpec.
    """

    def single_token(text, what):
        if not text:
            return None
        ids = tokenizer.encode(text)
        if len(ids) != 1:
            raise ValueError(f"{what} {text!r} must encode to exactly one token, got {ids}")
        return ids[0]

    return TaskSpec(
        query_length=query_length,
        response_length=response_length,
        start_token=single_token(start_text, "start_text"),
        end_token=single_token(end_text, "end_text"),
        query_prefix_tokens=tuple(tokenizer.encode(query_prefix)) if query_prefix else (),
        query_suffix_tokens=tuple(tokenizer.encode(query_suffix)) if query_suffix else (),
        pad_id=pad_id,
        truncate_token=truncate_token,
        truncate_after=truncate_after,
        penalty_reward_value=penalty_reward_value,
        temperature=temperature,
    )


def make_query(tokens: Sequence[int], spec: TaskSpec) -> np.ndarray | None:
    """Turns one encoded text into a right-padded query, or None to skip it (spec §2.2).

    1. start_token: drop up to and including its first occurrence; skip if absent; if it is
       the last token, keep the text whole (as the original does).
    2. Keep the first `query_length` tokens.
    3. end_token: cut after its last occurrence in that window; skip if absent.
    4. Right-pad with `pad_id`.

    An empty result is also skipped: the original would emit an all-padding query, which
    the model cannot take (position 0 must be a real token, spec §1.3).

    Args:
        tokens: the encoded text.
        spec: the task settings.

    Returns:
        int32[query_length], or None when the text is skipped.
    """
    tokens = list(tokens)
    if spec.start_token is not None:
        if spec.start_token not in tokens:
            return None
        first = tokens.index(spec.start_token) + 1
        if first < len(tokens):
            tokens = tokens[first:]
    tokens = tokens[: spec.query_length]
    if spec.end_token is not None:
        if spec.end_token not in tokens:
            return None
        tokens = tokens[: len(tokens) - tokens[::-1].index(spec.end_token)]
    if not tokens:
        return None
    query = np.full(spec.query_length, spec.pad_id, np.int32)
    query[: len(tokens)] = tokens
    return query


def _xp(x):
    # numpy in -> numpy out: keeps host-side callers free of device transfers.
    return np if isinstance(x, np.ndarray) else jnp


def format_context(queries, spec: TaskSpec):
    """Builds the policy context: prefix ‖ padded query ‖ suffix (spec §2.2).

    The query's right padding stays in the middle, before the suffix, exactly as in the
    original; the model's mask and position ids make that harmless. The reward model never
    sees prefix or suffix.

    Args:
        queries: int32[B, query_length].
        spec: the task settings.

    Returns:
        int32[B, spec.context_length].
    """
    xp = _xp(queries)
    batch = queries.shape[0]
    parts = []
    for tokens in (spec.query_prefix_tokens, None, spec.query_suffix_tokens):
        if tokens is None:
            parts.append(queries.astype(xp.int32))
        elif tokens:
            row = xp.asarray(tokens, xp.int32)
            parts.append(xp.broadcast_to(row[None, :], (batch, len(tokens))))
    return xp.concatenate(parts, axis=1)


def _truncation_hits(responses, spec: TaskSpec):
    xp = _xp(responses)
    positions = xp.arange(responses.shape[-1])
    return (responses == spec.truncate_token) & (positions >= spec.truncate_after)


def postprocess_responses(responses, spec: TaskSpec):
    """Pads every token after the first truncate_token at index >= truncate_after (§2.3).

    The truncation token itself is kept; occurrences before `truncate_after` are ignored;
    a response without one is returned unchanged (and is invalid, see `responses_valid`).

    Args:
        responses: int32[B, response_length].
        spec: the task settings.

    Returns:
        int32[B, response_length].
    """
    if spec.truncate_token is None:
        return responses
    xp = _xp(responses)
    hits = _truncation_hits(responses, spec).astype(xp.int32)
    # cumsum - hits > 0 exactly at positions strictly after the first hit.
    after = (xp.cumsum(hits, axis=-1) - hits) > 0
    return xp.where(after, xp.asarray(spec.pad_id, responses.dtype), responses)


def stop_mask(responses, spec: TaskSpec):
    """1.0 up to and including each response's stop token, 0.0 after it (`ppo.mask_after_stop`).

    The stop token is the first `truncate_token` at an index >= `truncate_after`, the one
    `postprocess_responses` cuts after. A response without one (invalid, or no truncate_token)
    keeps every position.

    Args:
        responses: int32[B, response_length].
        spec: the task settings.

    Returns:
        float32[B, response_length], a prefix of ones per row.
    """
    xp = _xp(responses)
    if spec.truncate_token is None:
        return xp.ones(responses.shape, xp.float32)
    hits = _truncation_hits(responses, spec).astype(xp.int32)
    return ((xp.cumsum(hits, axis=-1) - hits) == 0).astype(xp.float32)


def responses_valid(responses, spec: TaskSpec):
    """Whether each response has the truncation token at some index >= truncate_after.

    Args:
        responses: int32[B, response_length].
        spec: the task settings.

    Returns:
        bool[B]; all True when `truncate_token` is None.
    """
    xp = _xp(responses)
    if spec.truncate_token is None:
        return xp.ones(responses.shape[:1], bool)
    return xp.any(_truncation_hits(responses, spec), axis=-1)


def penalize_invalid(scores, responses, spec: TaskSpec):
    """Replaces (not adds to) the score of invalid responses by `penalty_reward_value`.

    Args:
        scores: float32[B] reward-model scores of the post-processed responses.
        responses: int32[B, response_length] raw or post-processed responses.
        spec: the task settings.

    Returns:
        float32[B].
    """
    xp = _xp(scores)
    penalty = xp.asarray(spec.penalty_reward_value, scores.dtype)
    return xp.where(responses_valid(responses, spec), scores, penalty)


class QueryDataset:
    """An infinite, deterministic stream of query batches built from raw texts.

    The texts are encoded and filtered once. The stream repeats the surviving queries
    forever; pass `e` is a fresh permutation drawn with `np.random.default_rng((shuffle_seed,
    e))`, and the global batch of step `s` is rows `[s*B, (s+1)*B)` of that stream.

    `shuffle_seed` defaults to 0 and is deliberately *not* tied to the run seed: the original
    shuffles with a fixed seed 0 whatever `run.seed` is (spec §6.3.5), so query order is the
    same across runs. Pass a different seed to vary it on purpose.
    """

    def __init__(
        self,
        texts: Sequence[str],
        tokenizer: Tokenizer,
        spec: TaskSpec,
        *,
        shuffle_seed: int = 0,
    ):
        """Encodes and filters the texts.

        Args:
            texts: raw passages.
            tokenizer: object with `encode(str) -> list[int]`.
            spec: the task settings (query_length, start/end tokens, pad_id).
            shuffle_seed: seed of the per-epoch permutations.

        Raises:
            ValueError: when no text survives filtering.
        """
        self.spec = spec
        self.shuffle_seed = shuffle_seed
        queries = []
        self.skipped: collections.Counter[str] = collections.Counter()
        # Kept texts that encode to more than the query window are cut to it (as the original
        # did for long articles); they are counted so that the cut is never silent.
        self.num_truncated = 0
        for text in texts:
            tokens = tokenizer.encode(text)
            query = make_query(tokens, spec)
            if query is None:
                self.skipped[_skip_reason(tokens, spec)] += 1
            else:
                queries.append(query)
                self.num_truncated += len(tokens) > spec.query_length
        logger.info(
            "QueryDataset: kept %d of %d texts (%d of them longer than query_length=%d tokens, "
            "cut to it); skipped %s",
            len(queries),
            len(texts),
            self.num_truncated,
            spec.query_length,
            dict(self.skipped) or "none",
        )
        if not queries:
            raise ValueError(
                f"no query survived filtering ({len(texts)} texts, skipped: "
                f"{dict(self.skipped)}); check start_token/end_token and query_length"
            )
        self.queries = np.stack(queries)  # [N, query_length]
        self._perm_cache: dict[int, np.ndarray] = {}

    @classmethod
    def from_queries(cls, queries: np.ndarray, spec: TaskSpec, *,
                     shuffle_seed: int = 0) -> "QueryDataset":
        """A stream over ready-made queries (a label file's), used exactly as they are.

        Args:
            queries: int[N, query_length] right-padded queries (`spec.pad_id`).
            spec: the task settings.
            shuffle_seed: seed of the per-epoch permutations.

        Returns:
            The dataset; the start/end rules are not applied again.
        """
        queries = np.asarray(queries, np.int32)
        if queries.ndim != 2 or queries.shape[1] != spec.query_length or not len(queries):
            raise ValueError(f"expected queries [N > 0, {spec.query_length}], got {queries.shape}")
        self = cls.__new__(cls)
        self.spec, self.shuffle_seed = spec, shuffle_seed
        self.skipped, self.num_truncated = collections.Counter(), 0
        self.queries = queries
        self._perm_cache = {}
        logger.info("QueryDataset: %d ready-made queries", len(queries))
        return self

    def __len__(self) -> int:
        return len(self.queries)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm_cache:
            if len(self._perm_cache) > 4:  # a batch touches at most a few consecutive epochs
                self._perm_cache.clear()
            rng = np.random.default_rng((self.shuffle_seed, epoch))
            self._perm_cache[epoch] = rng.permutation(len(self.queries))
        return self._perm_cache[epoch]

    def get_batch(
        self,
        step: int,
        global_batch_size: int,
        *,
        process_index: int = 0,
        process_count: int = 1,
    ) -> np.ndarray:
        """This process's slice of the global query batch of `step`.

        Args:
            step: 0-based step; any step can be read directly (no iterator state).
            global_batch_size: queries per step across all processes.
            process_index: this process (jax.process_index()).
            process_count: number of processes (jax.process_count()).

        Returns:
            int32[global_batch_size // process_count, query_length]: the contiguous rows
            `[process_index * b, (process_index + 1) * b)` of the global batch.

        Raises:
            ValueError: when the batch does not divide by `process_count`, or bad arguments.
        """
        if step < 0 or global_batch_size <= 0:
            raise ValueError(
                f"need step >= 0 and global_batch_size > 0, got {step}, {global_batch_size}"
            )
        if global_batch_size % process_count:
            raise ValueError(
                f"global_batch_size={global_batch_size} is not divisible by "
                f"process_count={process_count}"
            )
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} not in [0, {process_count})")
        local = global_batch_size // process_count
        start = step * global_batch_size + process_index * local
        rows = np.arange(start, start + local)
        epochs, offsets = np.divmod(rows, len(self.queries))
        indices = np.empty(local, np.int64)
        for epoch in np.unique(epochs):
            sel = epochs == epoch
            indices[sel] = self._permutation(int(epoch))[offsets[sel]]
        return self.queries[indices]


def _skip_reason(tokens: Sequence[int], spec: TaskSpec) -> str:
    # Replays make_query's checks in order, only for skipped texts, to count why.
    tokens = list(tokens)
    if spec.start_token is not None:
        if spec.start_token not in tokens:
            return "no start token"
        first = tokens.index(spec.start_token) + 1
        if first < len(tokens):
            tokens = tokens[first:]
    if spec.end_token is not None and spec.end_token not in tokens[: spec.query_length]:
        return "no end token in the query window"
    return "empty"
