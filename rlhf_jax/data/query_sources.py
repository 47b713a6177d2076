"""Query sources for when the original corpus is unavailable: a label file's queries, own books.

The original books corpus is lost (spec §5.1), while the released label files still hold the
queries their labelers saw, as token ids (spec §5.2). Two `task.query_dataset` forms:

- `labels:PATH`: the distinct queries of a label file (local, gs:// or https), so the reward
  model and PPO see the same query distribution. Their token ids are used exactly as stored
  (they are already cut and padded by the task's rules); text consumers get them decoded.
- `text:PATH`: a plain UTF-8 text corpus. If the file has blank lines, each blank-line separated
  paragraph is one passage (its lines joined by spaces: hard-wrapped books); otherwise each
  line is one. Passages then go through the task's query rules like any corpus.

Both are split into train and test deterministically by content: an item is in "test" when the
sha256 of its content falls in the lowest `TEST_PERCENT` percent, so the split does not depend
on file order and an item keeps its split when others are added. A "{split}" in a `text:` path
names one file per split instead.
"""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np

from rlhf_jax.data import sources
from rlhf_jax.data.labels import GPT2_PAD_ID

LABELS_PREFIX = "labels:"
TEXT_PREFIX = "text:"
TEST_PERCENT = 10
SPLITS = ("train", "test")


class QuerySourceError(ValueError):
    """A query source is missing, empty or malformed; the message names the file and record."""


def is_query_source(name: str) -> bool:
    """Whether `name` is a `labels:` or `text:` query source."""
    return name.startswith((LABELS_PREFIX, TEXT_PREFIX))


def split_of(content: bytes) -> str:
    """"test" for the `TEST_PERCENT` percent of contents with the lowest sha256, else "train"."""
    bucket = int.from_bytes(hashlib.sha256(content).digest()[:8], "big") % 100
    return "test" if bucket < TEST_PERCENT else "train"


def _check_split(split: str, where: str) -> None:
    if split not in SPLITS:
        raise QuerySourceError(f"{where}: split {split!r}; this source has splits {SPLITS}")


def label_file_queries(path: str, split: str = "train", *, query_length: int | None = None,
                       vocab_size: int = 50257, pad_id: int = GPT2_PAD_ID) -> np.ndarray:
    """The distinct queries of a label file in one split, as right-padded token ids.

    Args:
        path: a label file (JSON array of records with a "query" field).
        split: "train" or "test" (see the module docstring).
        query_length: the task's query length; every query must have it (None: not checked).
        vocab_size: ids must be below it, or equal the file's pad id 50259.
        pad_id: written in place of the file's pad id 50259.

    Returns:
        int32[N, query_length], deduplicated, in first-appearance order.

    Raises:
        QuerySourceError: naming the file (and record) for unreadable JSON, a record without
            "query", a query of another length than the task's, a bad token id, a query that
            starts with padding, or a split with no query.
    """
    _check_split(split, f"{LABELS_PREFIX}{path}")
    try:
        records = json.loads(sources.read_text(path))
    except json.JSONDecodeError as e:
        raise QuerySourceError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from e
    if not isinstance(records, list) or not records:
        raise QuerySourceError(f"{path}: expected a non-empty JSON array of label records")
    for index, record in enumerate(records):
        where = f"{path}: record {index}"
        if not isinstance(record, dict) or "query" not in record:
            raise QuerySourceError(f"{where}: no 'query' field; a labels: query source needs a "
                                   "label file whose records hold their queries (token ids)")
        ids = record["query"]
        # set(map(type, ...)) runs in C: 60k queries of 500 ids are checked in well under 1 s.
        if not isinstance(ids, list) or not ids or set(map(type, ids)) - {int}:
            raise QuerySourceError(f"{where}: 'query' must be a non-empty list of integer "
                                   "token ids")
        if query_length is not None and len(ids) != query_length:
            raise QuerySourceError(
                f"{where}: the query has {len(ids)} tokens but task.query_length={query_length}; "
                "a label file's queries can only feed a task of the same query length")
    lengths = {len(r["query"]) for r in records}
    if len(lengths) > 1:
        raise QuerySourceError(f"{path}: queries of different lengths {sorted(lengths)}")
    try:
        all_ids = np.asarray([r["query"] for r in records], np.int64)
    except OverflowError as e:
        raise QuerySourceError(f"{path}: a query token id does not fit 64 bits") from e
    bad = ((all_ids < 0) | (all_ids >= vocab_size)) & (all_ids != GPT2_PAD_ID)
    bad[:, 0] |= all_ids[:, 0] == GPT2_PAD_ID  # position 0 must be a real token (spec §1.3)
    if bad.any():
        index, pos = np.argwhere(bad)[0]
        raise QuerySourceError(
            f"{path}: record {index}: query[{pos}] = {all_ids[index, pos]}: expected a token id "
            f"in [0, {vocab_size}), or the pad id {GPT2_PAD_ID} after the first token")
    _, first = np.unique(all_ids, axis=0, return_index=True)
    distinct = all_ids[np.sort(first)]
    rows = [row for row in distinct
            if split_of(row[row != GPT2_PAD_ID].astype(np.int32).tobytes()) == split]
    if not rows:
        raise QuerySourceError(f"{path}: no query in split {split!r} ({len(distinct)} distinct "
                               f"queries; {TEST_PERCENT}% go to 'test')")
    queries = np.stack(rows)
    return np.where(queries == GPT2_PAD_ID, pad_id, queries).astype(np.int32)


def decode_queries(queries: np.ndarray, tokenizer, pad_id: int) -> list[str]:
    """The text of each right-padded query (padding dropped)."""
    return [tokenizer.decode([int(t) for t in row if t != pad_id]) for row in queries]


def passages(text: str) -> list[str]:
    """A corpus's passages: blank-line separated paragraphs if it has blank lines, else lines.

    Args:
        text: the corpus.

    Returns:
        The non-empty passages, whitespace-normalised at the edges; a paragraph's lines are
        joined by single spaces.
    """
    if re.search(r"\n[ \t]*\n", text.strip()):
        paragraphs = re.split(r"\n[ \t]*\n", text)
        return [p for p in (" ".join(line.strip() for line in par.splitlines() if line.strip())
                            for par in paragraphs) if p]
    return [line.strip() for line in text.splitlines() if line.strip()]


def text_corpus(path: str, split: str = "train") -> list[str]:
    """The passages of a plain text corpus in one split (module docstring).

    Args:
        path: the file; "{split}" in it names one file per split (then all of it is used).
        split: "train" or "test".

    Returns:
        The distinct passages of the split, in file order.

    Raises:
        QuerySourceError: naming the file when it has no passage, or none in the split.
    """
    _check_split(split, f"{TEXT_PREFIX}{path}")
    per_split = "{split}" in path
    name = path.replace("{split}", split)
    found = list(dict.fromkeys(passages(sources.read_text(name))))
    if not found:
        raise QuerySourceError(f"{name}: no text passage (empty or blank file)")
    if per_split:
        return found
    kept = [p for p in found if split_of(p.encode("utf-8")) == split]
    if not kept:
        raise QuerySourceError(f"{name}: none of its {len(found)} passages is in split "
                               f"{split!r} ({TEST_PERCENT}% go to 'test'); give more passages "
                               "or one file per split with '{split}' in the path")
    return kept


def source_texts(name: str, split: str = "train", tokenizer=None) -> list[str]:
    """Texts of a `labels:` (decoded queries) or `text:` source.

    Args:
        name: "labels:PATH" or "text:PATH".
        split: "train" or "test".
        tokenizer: decodes label-file queries; default the builtin GPT-2 BPE, the released
            files' encoding.

    Returns:
        The texts in order.
    """
    if name.startswith(TEXT_PREFIX):
        return text_corpus(name[len(TEXT_PREFIX):], split)
    path = name[len(LABELS_PREFIX):]
    if not path:
        raise QuerySourceError("labels: needs a label file (labels:PATH); as "
                               "task.query_dataset, a bare 'labels:' means the run's labels.path")
    if tokenizer is None:
        from rlhf_jax.tokenizer import get_tokenizer

        tokenizer = get_tokenizer()
    return decode_queries(label_file_queries(path, split, vocab_size=len(tokenizer)), tokenizer,
                          GPT2_PAD_ID)
