"""Comparisons from sample files, tokenized with the task's tokenizer (spec §5.2, §5.3).

`label_server enqueue --task CONFIG --samples FILE.jsonl` reads either kind of row:

- `{"query": str, "samples": [str, ...]}`, one comparison per line, with optional
  `query_tokens`, `sample_tokens` (token ids; tokenized when absent), `key`, `kind`, `best`
  (gold answer), `round`, `provenance`, `extra` and `reference` (kept in `extra`, for the
  `rouge` mock worker);
- the rows `python -m rlhf_jax.sample --num_samples N` writes: `{"query", "response",
  "response_tokens", "valid", "sample_index", ...}`, one per sample; N consecutive rows of one
  query make one comparison.

The query text is the raw passage, formatted with the task's rules exactly as in training
(`tasks.make_query`: start/end text, `query_length` tokens, right padding), and labelers see the
decoded query tokens. Samples are padded with the pad id to `response_length` tokens, as in the
released label files. The paper's labelers saw only samples that passed the truncation check,
so a comparison with a sample that `rlhf_jax.sample` marked `"valid": false` is left out
(counted) unless `keep_invalid`. A bad row raises with its line number, before anything is
enqueued. Keys default to a hash of the content, so enqueueing a file twice adds nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os

from rlhf_jax.labeling.records import TaskIdentity
from rlhf_jax.labeling.schema import InvalidError


@dataclasses.dataclass
class TaskContext:
    """What tokenizing a sample file needs from an experiment config."""

    identity: TaskIdentity
    name: str
    tokenizer: object
    spec: object


def load_config(path_and_arg: str):
    """Loads `configs/x.py[:arg]` like `--config` does (`get_config(arg)`).

    Args:
        path_and_arg: the config file, optionally followed by ':' and its argument.

    Returns:
        The ConfigDict.
    """
    path, sep, arg = path_and_arg.partition(".py:")
    path = path + ".py" if sep else path_and_arg
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--task {path_and_arg}: config file {path} not found")
    spec = importlib.util.spec_from_file_location("rlhf_jax_task_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"--task {path_and_arg}: {path} defines no get_config()")
    return module.get_config(arg or None)


def task_context(config, name: str) -> TaskContext:
    """The task identity, tokenizer and task spec of a config.

    Args:
        config: an experiment config (model, task, labels sections).
        name: the instructions to show ("sentiment", "tldr", ...).
    """
    from rlhf_jax import experiment, label_types

    label_type = label_types.get_label_type(config.labels.type)
    if not isinstance(label_type, label_types.BestOfN):
        raise ValueError(f"labels.type={config.labels.type!r}: people label best_of_N "
                         "comparisons only")
    gpt_cfg = experiment.gpt2_config(config)
    tok = experiment.tokenizer(config)
    spec = experiment.task_spec(config, tok, gpt_cfg)
    identity = TaskIdentity(tokenizer=str(config.model.tokenizer),
                            query_length=spec.query_length, response_length=spec.response_length,
                            num_samples=label_type.num_samples, vocab_size=gpt_cfg.vocab_size,
                            pad_id=gpt_cfg.pad_id)
    return TaskContext(identity, name, tok, spec)


def _fail(where: str, message: str):
    raise InvalidError(f"{where}: {message}")


def _pad(ids, ctx: TaskContext, where: str, what: str) -> list[int]:
    length = ctx.identity.response_length
    if not isinstance(ids, list) or set(map(type, ids)) - {int}:
        _fail(where, f"{what}: expected a list of integer token ids")
    ids = [t for t in ids if t != ctx.identity.pad_id]
    if len(ids) > length:
        _fail(where, f"{what} has {len(ids)} tokens, more than response_length={length}")
    return ids + [ctx.identity.pad_id] * (length - len(ids))


def _query(row: dict, ctx: TaskContext, where: str) -> tuple[str, list[int]]:
    from rlhf_jax import labelers
    from rlhf_jax.data import tasks

    text = row.get("query")
    if not isinstance(text, str) or not text.strip():
        _fail(where, "field 'query': expected a non-empty string")
    if "query_tokens" in row:
        return text, row["query_tokens"]
    query = tasks.make_query(ctx.tokenizer.encode(text), ctx.spec)
    if query is None:
        _fail(where, "the query does not survive the task's formatting rules (its start/end "
                     "text is missing, or nothing is left)")
    return labelers.decode_tokens(ctx.tokenizer, query[None], ctx.identity.pad_id)[0], \
        [int(t) for t in query]


def _sample_tokens(texts, given, ctx: TaskContext, where: str) -> list[list[int]]:
    out = []
    for i, text in enumerate(texts):
        if given is not None:
            out.append(_pad(given[i], ctx, where, f"sample {i}"))
        elif not isinstance(text, str) or not text:
            _fail(where, f"sample {i} is empty")
        else:
            out.append(_pad(ctx.tokenizer.encode(text), ctx, where, f"sample {i}"))
    return out


def _key(record: dict) -> str:
    # The whole content: the same comparison from two files is one comparison.
    digest = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()
    return "sha256:" + digest[:40]


def _from_comparison_row(row: dict, ctx: TaskContext, where: str, defaults: dict) -> dict:
    n = ctx.identity.num_samples
    samples = row.get("samples")
    if not isinstance(samples, list) or len(samples) != n:
        got = len(samples) if isinstance(samples, list) else type(samples).__name__
        _fail(where, f"field 'samples': expected {n} samples (the task is best_of_{n}), got {got}")
    given = row.get("sample_tokens")
    if given is not None and (not isinstance(given, list) or len(given) != n):
        _fail(where, f"field 'sample_tokens': expected {n} lists of token ids")
    query_text, query_tokens = _query(row, ctx, where)
    extra = row.get("extra")
    if "reference" in row:
        if extra is not None and not isinstance(extra, dict):
            _fail(where, "field 'extra': expected an object")
        extra = dict(extra or {}, reference=row["reference"])
    record = dict(defaults, query=query_text, query_tokens=query_tokens, samples=samples,
                  sample_tokens=_sample_tokens(samples, given, ctx, where))
    for field in ("kind", "best", "round", "provenance", "task"):
        if field in row:
            record[field] = row[field]
    if extra is not None:
        record["extra"] = extra
    record["key"] = row.get("key") or _key(record)
    return record


def _from_sample_rows(group: list[dict], ctx: TaskContext, where: str, defaults: dict) -> dict:
    query_text, query_tokens = _query(group[0], ctx, where)
    texts = [r.get("response") for r in group]
    given = [r["response_tokens"] for r in group] if all("response_tokens" in r for r in group) \
        else None
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text:
            _fail(where, f"sample {i} (field 'response') is empty")
    record = dict(defaults, query=query_text, query_tokens=query_tokens, samples=texts,
                  sample_tokens=_sample_tokens(texts, given, ctx, where))
    if group[0].get("reference") is not None:
        record["extra"] = {"reference": group[0]["reference"]}
    record["key"] = _key(record)
    return record


def read_sample_file(path: str, ctx: TaskContext, *, kind: str = "train", round_: int = 0,
                     keep_invalid: bool = False) -> tuple[list[dict], list[str], dict]:
    """Parses a sample file into comparison records (see the module docstring).

    Args:
        path: the JSONL file.
        ctx: the task (from `task_context`).
        kind: the default kind of its comparisons.
        round_: the default round.
        keep_invalid: keep comparisons with a sample `rlhf_jax.sample` marked invalid.

    Returns:
        (records, names for error messages, {"invalid": n, "duplicates": n}).

    Raises:
        InvalidError: naming the file and line of the first bad row.
    """
    from rlhf_jax.data import sources

    defaults = {"kind": kind, "round": round_, "task": ctx.name}
    n = ctx.identity.num_samples
    records, names, skipped, seen = [], [], {"invalid": 0, "duplicates": 0}, set()
    group, group_where, style = [], "", None

    def add(record, where):
        if record["key"] in seen:
            skipped["duplicates"] += 1
            return
        seen.add(record["key"])
        records.append(record)
        names.append(where)

    def close_group():
        nonlocal group
        where = group_where
        if len(group) != n:
            _fail(where, f"query has {len(group)} samples, expected {n} (write the file with "
                         f"`python -m rlhf_jax.sample --num_samples {n}`)")
        if not keep_invalid and any(r.get("valid") is False for r in group):
            skipped["invalid"] += 1
        else:
            add(_from_sample_rows(group, ctx, where, defaults), where)
        group = []

    for _, where, row in sources.json_objects(sources.read_text(path).splitlines(), path,
                                               InvalidError):
        row_style = "comparison" if "samples" in row else "sample" if "response" in row else None
        if row_style is None:
            _fail(where, "expected fields 'query' and 'samples' (one comparison per line), or "
                         "the rows of `python -m rlhf_jax.sample` ('query', 'response', ...)")
        if style not in (None, row_style):
            _fail(where, "mixes comparison rows ('samples') with rlhf_jax.sample rows "
                         "('response') in one file")
        style = row_style
        if style == "comparison":
            add(_from_comparison_row(row, ctx, where, defaults), where)
            continue
        if group and (row.get("query") != group[0].get("query") or len(group) == n):
            close_group()
        if not group:
            group_where = where
        group.append(row)
    if group:
        close_group()
    if not records and not any(skipped.values()):
        _fail(path, "no comparisons in the file")
    return records, names, skipped
