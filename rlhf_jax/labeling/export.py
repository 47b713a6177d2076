"""Exporting the store's labels: the released label-file format, or JSONL with text and timing.

`released` is exactly the format of the paper's label files (spec §5.2) that
`rlhf_jax.data.labels.load_labels` reads, so

    python -m rlhf_jax.train_reward --config configs/sentiment.py --config.labels.path=labels.json

trains on human labels. Each label is one record {"query", "sample0", ..., "best"} (a comparison
labelled by two labelers gives two records, as each was a separate judgement), in label id
order. Before anything is written the records go through `data.labels.records_to_arrays`, the
loader's own validation, so a file that would not load is never written. Gold comparisons are
quality control and are left out by default.

`jsonl` keeps everything a person may want to audit: texts, labeler, seconds taken, timestamps,
provenance, flags. Both are written atomically (`runtime.atomic_write_text`).
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Sequence

import sqlalchemy as sa

from rlhf_jax.labeling.schema import StoreError, flags

FORMATS = ("released", "jsonl")
DEFAULT_KINDS = ("train", "validation")


class ExportError(StoreError):
    """Nothing to export, or an unknown format or kind."""

    status = 404


def _iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat(timespec="milliseconds")


def _all_labels(store, kinds, with_text) -> list[dict]:
    rows, after = [], 0
    while True:
        page = store.labels_after(after, 10_000, kinds=kinds, with_text=with_text)
        if not page:
            return rows
        rows += page
        after = page[-1]["id"]


def render_export(store, fmt: str = "released",
                  kinds: Sequence[str] = DEFAULT_KINDS) -> tuple[str, int]:
    """The export file's text and its number of records.

    Args:
        store: a LabelStore.
        fmt: "released" or "jsonl".
        kinds: comparison kinds to include (default train and validation).

    Returns:
        (text, number of labels).

    Raises:
        ExportError: an unknown format or kind, or no labels to export.
        rlhf_jax.data.labels.LabelFileError: the records would not load (a store bug).
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}: expected one of {list(FORMATS)}")
    bad = set(kinds) - {"train", "validation", "gold"}
    if bad or not kinds:
        raise ExportError(f"unknown kinds {sorted(bad)}: expected train, validation and/or gold")
    rows = _all_labels(store, list(kinds), with_text=fmt == "jsonl")
    if not rows:
        counts = store.counts()["labels"]
        raise ExportError(f"{store.where}: no labels to export (kinds {', '.join(kinds)}; the "
                          f"store holds {counts['total']} labels in all); nothing was written")
    if fmt == "released":
        return _released(store, rows), len(rows)
    with store.engine.connect() as conn:
        flagged = {}
        for f in conn.execute(sa.select(flags.c.comparison_id, flags.c.labeler_id, flags.c.reason)):
            flagged.setdefault(f.comparison_id, []).append(f.reason)
    lines = []
    for r in rows:
        lines.append(json.dumps({
            "label_id": r["id"], "comparison_id": r["comparison_id"], "key": r["key"],
            "kind": r["kind"], "round": r["round"], "task": r["task"], "labeler": r["labeler"],
            "best": r["best"], "gold_best": r["gold_best"], "seconds": round(r["seconds"], 3),
            "created": r["created"], "created_utc": _iso(r["created"]), "query": r["query"],
            "samples": r["samples"], "query_tokens": r["query_tokens"],
            "sample_tokens": r["sample_tokens"], "provenance": r["provenance"],
            "flags": flagged.get(r["comparison_id"], []),
        }, ensure_ascii=False))
    return "".join(line + "\n" for line in lines), len(rows)


def _released(store, rows: list[dict]) -> str:
    from rlhf_jax.data import labels as labels_lib
    from rlhf_jax.label_types import BestOfN

    task = store.task_identity()
    records = []
    for r in rows:
        record = {"query": r["query_tokens"]}
        for i, tokens in enumerate(r["sample_tokens"]):
            record[f"sample{i}"] = tokens
        record["best"] = r["best"]
        records.append(record)
    # The loader's own checks: the file this writes is one that train_reward reads.
    labels_lib.records_to_arrays(records, BestOfN(task.num_samples), name=store.where,
                                 query_length=task.query_length,
                                 response_length=task.response_length,
                                 vocab_size=task.vocab_size, pad_id=task.pad_id)
    return json.dumps(records, separators=(",", ":"))


def export_labels(store, output: str, fmt: str = "released",
                  kinds: Sequence[str] = DEFAULT_KINDS) -> int:
    """Writes the export atomically; returns the number of labels written.

    Args:
        store: a LabelStore.
        output: the file to write (local path or gs://).
        fmt: "released" or "jsonl".
        kinds: comparison kinds to include.

    Returns:
        The number of labels exported.
    """
    from rlhf_jax import runtime

    text, count = render_export(store, fmt, kinds)
    runtime.atomic_write_text(output, text)
    return count
