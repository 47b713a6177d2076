r"""Your own preference data, as text, into the released label-file format (spec §5.2, §9).

  python -m rlhf_jax.label import --task configs/sentiment.py --input prefs.jsonl \
      --format pairs --output labels.json [--on_long truncate|error] [--seed 0] [--split train]

Formats (one record per JSONL line, or per Parquet row):
- `best_of_n`: `{"query": str, "samples": [str, ...], "best": int}`; N is the same for every
  record and the file is `best_of_<N>` (train with `--config.labels.type=best_of_<N>`).
- `pairs`: `{"prompt": str, "chosen": str, "rejected": str}`, as TRL and Anthropic's hh-rlhf
  use. Without "prompt" (hh-rlhf), the prompt is the texts' common prefix, cut back to before
  its last whitespace so that the responses start on a word. Each pair becomes a `best_of_2`
  record whose sample order is drawn from `(seed, line)`, so `best` is not always 0 and the
  same input gives the same file. Pairs whose chosen equals rejected (as text, or after
  truncation) carry no preference: they are counted and dropped.
- `summarize_from_feedback`: the comparisons of Stiennon et al. 2020: `{"info": {"post" or
  "article", ...}, "summaries": [{"text", ...}, {"text", ...}], "choice": 0|1, "split", ...}`;
  the query is the post (or article) as in the task configs (`configs/tldr.py` adds the
  "TL;DR:" suffix itself), the two summaries keep the order the labeller saw.

Texts are tokenized as they are: the task's start/end trimming and truncation token shape the
model's samples, not human data. Queries (responses) longer than `task.query_length`
(`task.response_length`) tokens keep their first tokens with `--on_long=truncate` (counted per
field); with `--on_long=error` nothing is written and the error lists every long record with its
line. Any malformed record (bad JSON, a missing or mistyped field, `best` out of range, an
empty query) stops the import with its file, line and field. Nothing is written unless the
whole file is valid; the output is written atomically and checked by the same validation
`train_reward` applies when it loads it.
"""

from __future__ import annotations

import io
import json
import logging
import os
import sys

import ml_collections
import numpy as np

from rlhf_jax import label_types, paths
from rlhf_jax.data import labels as labels_lib
from rlhf_jax.data import sources

logger = logging.getLogger(__name__)

FORMATS = ("best_of_n", "pairs", "summarize_from_feedback")
ON_LONG = ("truncate", "error")
PARQUET_SUFFIXES = (".parquet", ".pq")


class PreferenceImportError(ValueError):
    """The input file is unusable; the message names the file, the line and the field."""


def read_records(path: str) -> list[tuple[str, int, dict]]:
    """Reads JSONL (one object per line) or Parquet (one object per row).

    Args:
        path: a local file or `gs://` (or `http(s)://` for JSONL) ending in .parquet/.pq for
            Parquet; anything else is read as JSONL.

    Returns:
        `(where, number, record)` triples: `where` is "file:N" for line N of a JSONL file
        (blank lines are skipped but counted) or "file:row N" for Parquet, `number` that N.

    Raises:
        PreferenceImportError: for an empty file, bad JSON or a line that is not an object.
    """
    name = str(path)
    if name.endswith(PARQUET_SUFFIXES):
        import pyarrow.parquet as pq

        # A gs:// file is read through the project's path layer (pyarrow's own GCS client
        # would not follow STORAGE_EMULATOR_HOST nor the same credentials).
        source = io.BytesIO(paths.read_bytes(name)) if paths.is_remote(name) else name
        rows = pq.read_table(source).to_pylist()
        records = [(f"{name}:row {i + 1}", i + 1, row) for i, row in enumerate(rows)]
    else:
        lines = sources.read_text(name).splitlines()
        records = [(where, n, record) for n, where, record
                   in sources.json_objects(lines, name, PreferenceImportError)]
    if not records:
        raise PreferenceImportError(f"{name}: the file holds no records")
    return records


def _text(record: dict, key: str, where: str, *, parent: str = "") -> str:
    field = f"{parent}{key}"
    if key not in record:
        raise PreferenceImportError(f"{where}: missing field {field!r}")
    value = record[key]
    if not isinstance(value, str):
        hint = (" (conversation lists are not supported: give text)"
                if isinstance(value, list) else "")
        raise PreferenceImportError(
            f"{where}: field {field!r}: expected a string, got {type(value).__name__}{hint}")
    return value


def _index(record: dict, key: str, n: int, where: str) -> int:
    if key not in record:
        raise PreferenceImportError(f"{where}: missing field {key!r}")
    value = record[key]
    if type(value) is not int or not 0 <= value < n:
        raise PreferenceImportError(
            f"{where}: field {key!r}: expected an integer in [0, {n}), got {value!r}")
    return value


def _common_prompt(chosen: str, rejected: str) -> str:
    """hh-rlhf's implicit prompt: the common prefix, cut back to before its last whitespace."""
    n = len(os.path.commonprefix([chosen, rejected]))
    while n > 0 and not chosen[n - 1].isspace():
        n -= 1
    while n > 0 and chosen[n - 1].isspace():  # the whitespace starts the responses
        n -= 1
    return chosen[:n]


def parse_record(record: dict, fmt: str, where: str,
                 order_key: tuple[int, int] = (0, 0)) -> tuple[str, list[str], int]:
    """One record as (query text, sample texts, index of the preferred sample).

    Args:
        record: the parsed JSON object (or Parquet row).
        fmt: one of FORMATS.
        where: "file:N" (the line), for error messages.
        order_key: (seed, line number): seeds the sample order of a `pairs` record, so the
            order of one record does not depend on which others were dropped.

    Returns:
        (query, samples, best).
    """
    if fmt == "best_of_n":
        query = _text(record, "query", where)
        samples = record.get("samples")
        if not isinstance(samples, list) or len(samples) < 2:
            raise PreferenceImportError(
                f"{where}: field 'samples': expected a list of at least 2 strings, got "
                f"{samples!r}"[:300])
        texts = [_text({"": s}, "", where, parent=f"samples[{i}]") for i, s in enumerate(samples)]
        return query, texts, _index(record, "best", len(texts), where)
    if fmt == "pairs":
        chosen, rejected = _text(record, "chosen", where), _text(record, "rejected", where)
        if "prompt" in record:
            prompt = _text(record, "prompt", where)
        else:
            prompt = _common_prompt(chosen, rejected)
            chosen, rejected = chosen[len(prompt):], rejected[len(prompt):]
        best = int(np.random.default_rng(order_key).integers(2))
        return prompt, ([chosen, rejected] if best == 0 else [rejected, chosen]), best
    if fmt == "summarize_from_feedback":
        info = record.get("info")
        if not isinstance(info, dict):
            raise PreferenceImportError(f"{where}: missing field 'info' (an object)")
        key = "post" if info.get("post") is not None else "article"
        query = _text(info, key, where, parent="info.")
        summaries = record.get("summaries")
        if not isinstance(summaries, list) or len(summaries) != 2:
            raise PreferenceImportError(
                f"{where}: field 'summaries': expected a list of 2 objects with 'text'")
        texts = [_text(s if isinstance(s, dict) else {}, "text", where, parent=f"summaries[{i}].")
                 for i, s in enumerate(summaries)]
        return query, texts, _index(record, "choice", 2, where)
    raise ValueError(f"format {fmt!r}: expected one of {FORMATS}")


def _pad(ids: list[int], length: int, pad_id: int) -> list[int]:
    return ids[:length] + [pad_id] * (length - len(ids))


def import_preferences(input_path: str, fmt: str, output: str, *, tokenizer, query_length: int,
                       response_length: int, vocab_size: int, pad_id: int,
                       on_long: str = "truncate", seed: int = 0, split: str = "") -> dict:
    """Tokenizes, validates and writes a preference file as a best-of-N label file.

    Args:
        input_path: JSONL or Parquet file (see the module docstring).
        fmt: one of FORMATS.
        output: the label file to write (JSON array, spec §5.2).
        tokenizer: the task's tokenizer (`encode`).
        query_length: tokens per query (`task.query_length`).
        response_length: tokens per sample (`task.response_length`).
        vocab_size: ids must lie below it (the model's).
        pad_id: right-padding id (50259 for GPT-2).
        on_long: "truncate" or "error" (see the module docstring).
        seed: seeds the sample order of `pairs` records.
        split: keep only records whose "split" field equals this ("" keeps all).

    Returns:
        The import summary: counts of records read, written, dropped and truncated.

    Raises:
        PreferenceImportError: on any unusable record or file (nothing is written then).
    """
    if fmt not in FORMATS or on_long not in ON_LONG:
        raise ValueError(f"format {fmt!r} / on_long {on_long!r}: expected one of {FORMATS} / "
                         f"{ON_LONG}")
    q_len, r_len, tok = query_length, response_length, tokenizer
    records = read_records(input_path)
    parsed = [(where, parse_record(rec, fmt, where, (seed, number)))
              for where, number, rec in records if not split or rec.get("split") == split]
    if not parsed:
        raise PreferenceImportError(f"{input_path}: no record has split == {split!r}")
    n_samples = {len(samples) for _, (_, samples, _) in parsed}
    if len(n_samples) > 1:
        where = next(w for w, (_, s, _) in parsed if len(s) != len(parsed[0][1][1]))
        raise PreferenceImportError(
            f"{where}: {len(n_samples)} different sample counts {sorted(n_samples)} in one file; "
            "a label file has one best_of_N type")
    stats = {"truncated_queries": 0, "truncated_responses": 0, "dropped_identical": 0,
             "dropped_identical_after_truncation": 0}
    long_records, queries, samples, best = [], [], [], []
    for where, (query, texts, choice) in parsed:
        if fmt in ("pairs", "summarize_from_feedback") and texts[0] == texts[1]:
            stats["dropped_identical"] += 1
            continue
        q_ids = tok.encode(query)
        if not q_ids:
            raise PreferenceImportError(f"{where}: the query is empty (a query needs >= 1 token)")
        s_ids = [tok.encode(t) for t in texts]
        too_long = ([f"query has {len(q_ids)} tokens > {q_len}"] if len(q_ids) > q_len else [])
        too_long += [f"response {i} has {len(ids)} tokens > {r_len}"
                     for i, ids in enumerate(s_ids) if len(ids) > r_len]
        if too_long:
            long_records.append(f"{where}: {'; '.join(too_long)}")
        stats["truncated_queries"] += len(q_ids) > q_len
        stats["truncated_responses"] += sum(len(ids) > r_len for ids in s_ids)
        rows = [_pad(ids, r_len, pad_id) for ids in s_ids]
        if fmt != "best_of_n" and rows[0] == rows[1]:
            stats["dropped_identical_after_truncation"] += 1
            continue
        queries.append(_pad(q_ids, q_len, pad_id))
        samples.append(rows)
        best.append(choice)
    if long_records and on_long == "error":
        raise PreferenceImportError(
            f"{input_path}: {len(long_records)} of {len(parsed)} records exceed the task's "
            f"query_length={q_len} / response_length={r_len} tokens (--on_long=error; use "
            "--on_long=truncate to keep their first tokens):\n  " + "\n  ".join(long_records))
    if not best:
        raise PreferenceImportError(f"{input_path}: every record was dropped ({stats})")
    label_type = label_types.get_label_type(f"best_of_{n_samples.pop()}")
    arrays = {"query": np.asarray(queries, np.int32)}
    for k, key in enumerate(label_type.sample_keys):
        arrays[key] = np.asarray([row[k] for row in samples], np.int32)
    arrays[label_type.label_key] = np.asarray(best, np.int32)
    # The checks train_reward's loader applies, before anything is written.
    text = json.dumps([{k: v[i].tolist() for k, v in arrays.items()} for i in range(len(best))])
    labels_lib.records_to_arrays(json.loads(text), label_type, name=output, query_length=q_len,
                                 response_length=r_len, vocab_size=vocab_size, pad_id=pad_id)
    labels_lib.save_labels(output, arrays)
    summary = {"input": str(input_path), "format": fmt, "output": str(output),
               "label_type": label_type.name, "records_read": len(records),
               "records_in_split": len(parsed), "labels_written": len(best),
               "records_truncated": len(long_records), **stats, "on_long": on_long,
               "seed": seed, "best_counts": np.bincount(best, minlength=label_type.num_samples)
               .tolist(), "query_length": q_len, "response_length": r_len}
    logger.info("imported %d %s labels from %s into %s: %s", len(best), label_type.name,
                input_path, output, json.dumps(summary))
    return summary


def import_for_task(config: ml_collections.ConfigDict, input_path: str, fmt: str, output: str,
                    **kwargs) -> dict:
    """`import_preferences` with the tokenizer, lengths and pad id of a task config.

    Args:
        config: an experiment config (`task.query_length`, `task.response_length`,
            `model.tokenizer`, `model.preset`).
        input_path, fmt, output: as `import_preferences`.
        **kwargs: `on_long`, `seed`, `split`.

    Returns:
        The import summary.
    """
    from rlhf_jax import experiment  # the config layer sits above data/

    gpt_cfg = experiment.gpt2_config(config)
    return import_preferences(input_path, fmt, output, tokenizer=experiment.tokenizer(config),
                              query_length=config.task.query_length,
                              response_length=config.task.response_length,
                              vocab_size=gpt_cfg.vocab_size, pad_id=gpt_cfg.pad_id, **kwargs)


def main() -> None:
    """`python -m rlhf_jax.label import ...`: flags are defined here, then absl runs."""
    from absl import flags
    from ml_collections import config_flags

    from rlhf_jax import cli, runtime

    config_flags.DEFINE_config_file("task", None, "Task config file (configs/*.py[:args]): "
                                    "lengths and tokenizer.", lock_config=True)
    flags.DEFINE_string("input", None, "JSONL or Parquet file of text preferences.")
    flags.DEFINE_enum("format", None, FORMATS, "Record schema of --input.")
    flags.DEFINE_string("output", None, "Label file to write (JSON array, spec §5.2).")
    flags.DEFINE_enum("on_long", "truncate", ON_LONG, "Over-long queries/responses: keep "
                      "their first tokens, or refuse the import listing every such record.")
    flags.DEFINE_integer("seed", 0, "Seed of the sample order of `pairs` records.")
    flags.DEFINE_string("split", "", "Keep only records whose 'split' equals this ('' = all).")
    flags.DEFINE_string("report", "", "Also write the import summary (JSON) here.")
    flags.mark_flags_as_required(["task", "input", "format", "output"])
    for name in ("task", "input", "format", "output", "on_long", "seed", "split", "report"):
        # --help lists the main module's key flags; the program is rlhf_jax/label.py.
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[name])

    def run(argv):
        del argv
        runtime.setup_logging()
        f = flags.FLAGS
        try:
            summary = import_for_task(f.task, f.input, f.format, f.output, on_long=f.on_long,
                                      seed=f.seed, split=f.split)
        except (PreferenceImportError, labels_lib.LabelFileError, OSError) as e:
            print(f"label import: {e}", file=sys.stderr)
            raise SystemExit(1) from None
        text = json.dumps(summary, indent=2)
        if f.report:
            runtime.atomic_write_text(f.report, text + "\n")
        print(text, flush=True)

    cli.run(run, flag_names=("task",))
