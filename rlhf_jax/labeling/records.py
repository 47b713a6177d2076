"""Comparison records: the task identity and the validation of enqueued comparisons (spec §5.3).

A comparison is what a labeler judges: a query and N samples (4 for `best_of_4`), as text for
people and as token ids for the reward model, in the released label format's shapes (spec §5.2:
the query right-padded to `query_length`, each sample padded to `response_length`). It also
records what the online loop needs later: its kind (train, validation, gold), the round, where
each sample came from (policy or reference, policy step) and an optional `extra` dict that is
never shown to people.

Every store holds comparisons of one task identity (tokenizer, lengths, N, vocabulary), so that
its `released` export is one consistent label file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence

from rlhf_jax.labeling.schema import KINDS, InvalidError, TaskMismatchError

MAX_KEY_LENGTH = 200
MAX_TEXT_CHARS = 100_000
MAX_EXTRA_CHARS = 100_000


@dataclasses.dataclass(frozen=True)
class TaskIdentity:
    """What every comparison of a store must agree on.

    Attributes:
        tokenizer: the tokenizer name or path of `config.model.tokenizer` ("gpt2").
        query_length: tokens per query (right-padded).
        response_length: tokens per sample (padded after the truncation token).
        num_samples: samples per comparison (4 for best_of_4).
        vocab_size: token ids must be below this...
        pad_id: ...or equal to the padding id.
    """

    tokenizer: str
    query_length: int
    response_length: int
    num_samples: int
    vocab_size: int = 50257
    pad_id: int = 50259

    def as_dict(self) -> dict:
        """A JSON-able dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, value, where: str = "task") -> TaskIdentity:
        """Parses a dict (from JSON), naming the bad field."""
        if not isinstance(value, Mapping):
            raise InvalidError(f"{where}: expected an object with fields "
                               f"{[f.name for f in dataclasses.fields(cls)]}")
        out = {}
        for f in dataclasses.fields(cls):
            if f.name not in value:
                if f.default is dataclasses.MISSING:
                    raise InvalidError(f"{where}: missing field {f.name!r}")
                continue
            v = value[f.name]
            want = str if f.name == "tokenizer" else int
            if type(v) is not want or (want is int and v < 1):
                raise InvalidError(f"{where}.{f.name}: expected a {'string' if want is str else 'positive integer'}, got {v!r}")
            out[f.name] = v
        unknown = set(value) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise InvalidError(f"{where}: unknown fields {sorted(unknown)}")
        return cls(**out)

    def check_same(self, stored: TaskIdentity, where: str) -> None:
        """Raises TaskMismatchError naming every differing field."""
        if stored == self:
            return
        diffs = [f"{f.name}={getattr(self, f.name)!r} (store: {getattr(stored, f.name)!r})"
                 for f in dataclasses.fields(self) if getattr(self, f.name) != getattr(stored, f.name)]
        raise TaskMismatchError(
            f"{where} holds comparisons of another task: {', '.join(diffs)}; use a new store "
            "(another --workdir or --db) for this task")


def _type_name(value) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null",
             int: "integer", float: "number"}
    return names.get(type(value), type(value).__name__)


def _token_list(value, length: int, task: TaskIdentity, where: str) -> list[int]:
    if not isinstance(value, list):
        raise InvalidError(f"{where}: expected a list of token ids, got {_type_name(value)}")
    if len(value) != length:
        raise InvalidError(f"{where}: expected {length} token ids, got {len(value)}")
    for i, t in enumerate(value):
        if type(t) is not int or t < 0 or (t >= task.vocab_size and t != task.pad_id):
            raise InvalidError(f"{where}[{i}]: token id {t!r} out of range: expected 0 <= id < "
                               f"{task.vocab_size} or the pad id {task.pad_id}")
    return value


def validate_comparison(record, task: TaskIdentity, where: str) -> dict:
    """Checks one enqueued comparison and returns the row to insert (without id and slots).

    Fields: `key` (str, unique per store; re-sending a stored key is a no-op), `query` (text
    shown to people), `query_tokens` (query_length ids), `samples` (N non-empty texts),
    `sample_tokens` (N lists of response_length ids), and optional `kind` ("train",
    "validation", "gold"; default "train"), `best` (required for gold, the known answer),
    `round` (int >= 0), `task` (instructions to show: "sentiment", "tldr", ...), `provenance`
    (N objects such as {"source": "policy", "step": 120}) and `extra` (an object never shown to
    people).

    Args:
        record: the parsed JSON object.
        task: the store's task identity.
        where: names the record in errors ("comparisons[3]", "samples.jsonl: line 7").

    Returns:
        The column values for `schema.comparisons`.

    Raises:
        InvalidError: naming `where` and the field.
    """
    if not isinstance(record, Mapping):
        raise InvalidError(f"{where}: expected an object, got {_type_name(record)}")
    known = {"key", "kind", "round", "task", "query", "query_tokens", "samples", "sample_tokens",
             "provenance", "extra", "best"}
    unknown = set(record) - known
    if unknown:
        raise InvalidError(f"{where}: unknown fields {sorted(unknown)} (known: {sorted(known)})")
    for field in ("key", "query", "query_tokens", "samples", "sample_tokens"):
        if field not in record:
            raise InvalidError(f"{where}: missing field {field!r}")
    key = record["key"]
    if not isinstance(key, str) or not 0 < len(key) <= MAX_KEY_LENGTH:
        raise InvalidError(f"{where}.key: expected a string of 1 to {MAX_KEY_LENGTH} characters")
    kind = record.get("kind", "train")
    if kind not in KINDS:
        raise InvalidError(f"{where}.kind: {kind!r} is not one of {list(KINDS)}")
    round_ = record.get("round", 0)
    if type(round_) is not int or round_ < 0:
        raise InvalidError(f"{where}.round: expected an integer >= 0, got {round_!r}")
    task_name = record.get("task", "")
    if not isinstance(task_name, str) or len(task_name) > 64:
        raise InvalidError(f"{where}.task: expected a string of at most 64 characters")
    query = record["query"]
    if not isinstance(query, str) or not query.strip() or len(query) > MAX_TEXT_CHARS:
        raise InvalidError(f"{where}.query: expected a non-empty string (at most "
                           f"{MAX_TEXT_CHARS} characters)")
    n = task.num_samples
    samples = record["samples"]
    if not isinstance(samples, list) or len(samples) != n:
        got = len(samples) if isinstance(samples, list) else _type_name(samples)
        raise InvalidError(f"{where}.samples: expected {n} samples (the store's task has "
                           f"num_samples={n}), got {got}")
    for i, s in enumerate(samples):
        if not isinstance(s, str) or not s:
            raise InvalidError(f"{where}.samples[{i}]: empty sample (expected non-empty text)")
        if len(s) > MAX_TEXT_CHARS:
            raise InvalidError(f"{where}.samples[{i}]: longer than {MAX_TEXT_CHARS} characters")
    query_tokens = _token_list(record["query_tokens"], task.query_length, task,
                               f"{where}.query_tokens")
    sample_tokens = record["sample_tokens"]
    if not isinstance(sample_tokens, list) or len(sample_tokens) != n:
        raise InvalidError(f"{where}.sample_tokens: expected {n} lists of token ids")
    sample_tokens = [_token_list(t, task.response_length, task, f"{where}.sample_tokens[{i}]")
                     for i, t in enumerate(sample_tokens)]
    gold_best = record.get("best")
    if kind == "gold":
        if type(gold_best) is not int or not 0 <= gold_best < n:
            raise InvalidError(f"{where}.best: a gold comparison needs its known answer, an "
                               f"integer in [0, {n}), got {gold_best!r}")
    elif gold_best is not None:
        raise InvalidError(f"{where}.best: only gold comparisons carry an answer (kind={kind!r})")
    provenance = record.get("provenance")
    if provenance is not None:
        if not isinstance(provenance, list) or len(provenance) != n or not all(
                isinstance(p, Mapping) for p in provenance):
            raise InvalidError(f"{where}.provenance: expected {n} objects, one per sample "
                               "(e.g. {\"source\": \"policy\", \"step\": 120})")
    extra = record.get("extra")
    if extra is not None:
        if not isinstance(extra, Mapping):
            raise InvalidError(f"{where}.extra: expected an object, got {_type_name(extra)}")
        if len(json.dumps(extra)) > MAX_EXTRA_CHARS:
            raise InvalidError(f"{where}.extra: larger than {MAX_EXTRA_CHARS} characters of JSON")
    row = dict(key=key, kind=kind, round=round_, task=task_name, num_samples=n,
               query_text=query, query_tokens=query_tokens, samples=list(samples),
               sample_tokens=sample_tokens, provenance=provenance, extra=extra,
               gold_best=gold_best if kind == "gold" else None)
    content = {k: v for k, v in row.items() if k != "key"}
    row["content_hash"] = hashlib.sha256(
        json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return row


def validate_comparisons(records: Sequence, task: TaskIdentity, where: str = "comparisons",
                         names: Sequence[str] | None = None) -> list[dict]:
    """Validates a batch; the first bad record raises, so nothing of the batch is enqueued.

    Args:
        records: parsed comparison objects.
        task: the task identity.
        where: prefix of each record's name in errors (`{where}[i]`).
        names: optional explicit name per record (e.g. "samples.jsonl: line 7").

    Returns:
        The rows, in order.
    """
    if not isinstance(records, Sequence) or isinstance(records, (str, bytes)):
        raise InvalidError(f"{where}: expected an array of comparisons")
    rows, keys = [], {}
    for i, record in enumerate(records):
        name = names[i] if names is not None else f"{where}[{i}]"
        row = validate_comparison(record, task, name)
        if row["key"] in keys:
            raise InvalidError(f"{name}.key: {row['key']!r} repeats {keys[row['key']]}")
        keys[row["key"]] = name
        rows.append(row)
    return rows
