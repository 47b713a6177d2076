"""Human label files: load, validate, split and save (spec §5.2).

A label file is one JSON array of records. For `best_of_4` (every released file) a record is

    {"query": [64 ids], "sample0": [24 ids], ..., "sample3": [24 ids], "best": 2}

with GPT-2 BPE ids, queries right-padded with 50259 and samples padded with 50259 after the
truncation token. Extra keys are ignored. Every record is checked, because a bad id would
otherwise be clamped silently by the embedding lookup on device.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

import numpy as np

from rlhf_jax import runtime
from rlhf_jax.data.sources import SourceError, read_text
from rlhf_jax.label_types import LabelType, get_label_type

GPT2_PAD_ID = 50259

Labels = dict[str, np.ndarray]


class LabelFileError(ValueError):
    """A label file is malformed; the message names the file, the record and the field."""


def load_labels(
    path: str,
    label_type: LabelType | str,
    *,
    query_length: int,
    response_length: int,
    vocab_size: int,
    pad_id: int = GPT2_PAD_ID,
) -> Labels:
    """Reads and validates a label file.

    Args:
        path: local path, `gs://...` or `http(s)://...`.
        label_type: a LabelType or its name ("best_of_4", ...).
        query_length: expected tokens per query.
        response_length: expected tokens per sample.
        vocab_size: ids must be in [0, vocab_size) or equal `pad_id`.
        pad_id: the padding id allowed outside the vocabulary.

    Returns:
        `{"query": int32[n, query_length], "sample<k>": int32[n, response_length], ...,
        label_key: [n]}` (int32 for best_of_N, float32 for the scalar types).

    Raises:
        LabelFileError: for any malformed content, naming file, record index and field.
    """
    if isinstance(label_type, str):
        label_type = get_label_type(label_type)
    name = str(path)
    try:
        records = json.loads(read_text(name))
    except json.JSONDecodeError as e:
        raise LabelFileError(f"{name}: invalid JSON at line {e.lineno}: {e.msg}") from e
    except SourceError as e:  # not UTF-8 text (a binary file)
        raise LabelFileError(str(e)) from e
    return records_to_arrays(
        records,
        label_type,
        name=name,
        query_length=query_length,
        response_length=response_length,
        vocab_size=vocab_size,
        pad_id=pad_id,
    )


def records_to_arrays(
    records,
    label_type: LabelType,
    *,
    name: str,
    query_length: int,
    response_length: int,
    vocab_size: int,
    pad_id: int = GPT2_PAD_ID,
) -> Labels:
    """Validates parsed JSON records and stacks them into arrays (see `load_labels`).

    Args:
        records: the parsed JSON value (must be a list of objects).
        label_type: the label type the records must follow.
        name: file name used in error messages.
        query_length: expected tokens per query.
        response_length: expected tokens per sample.
        vocab_size: size of the tokenizer vocabulary.
        pad_id: padding id allowed outside the vocabulary.

    Returns:
        The label dict of numpy arrays.
    """
    if not isinstance(records, list):
        raise LabelFileError(f"{name}: expected a JSON array of records, got {_json_type(records)}")
    lengths = {"query": query_length, **{k: response_length for k in label_type.sample_keys}}
    columns: dict[str, list] = {key: [] for key in (*lengths, label_type.label_key)}
    for index, record in enumerate(records):
        where = f"{name}: record {index}"
        if not isinstance(record, dict):
            raise LabelFileError(f"{where}: expected a JSON object, got {_json_type(record)}")
        for key, length in lengths.items():
            columns[key].append(_check_token_list(record, key, length, where))
        columns[label_type.label_key].append(_check_label(record, label_type, where))

    out = {}
    for key, length in lengths.items():
        ids = np.asarray(columns[key], np.int64).reshape(len(records), length)
        bad = (ids < 0) | ((ids >= vocab_size) & (ids != pad_id))
        if bad.any():
            index, pos = np.argwhere(bad)[0]
            raise LabelFileError(
                f"{name}: record {index}: field {key!r}[{pos}]: token id {ids[index, pos]} "
                f"out of range: expected 0 <= id < {vocab_size} or the pad id {pad_id}"
            )
        out[key] = ids.astype(np.int32)
    out[label_type.label_key] = np.asarray(
        columns[label_type.label_key], label_type.label_dtype
    ).reshape(len(records))
    return out


def _json_type(value) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _check_token_list(record: dict, key: str, length: int, where: str) -> list:
    if key not in record:
        raise LabelFileError(f"{where}: missing field {key!r}")
    ids = record[key]
    if not isinstance(ids, list):
        raise LabelFileError(
            f"{where}: field {key!r}: expected a list of token ids, got {_json_type(ids)}"
        )
    if len(ids) != length:
        raise LabelFileError(
            f"{where}: field {key!r}: wrong length: expected {length} tokens, got {len(ids)}"
        )
    # set(map(type, ...)) runs in C, which keeps validation of 60k-record files fast.
    if set(map(type, ids)) - {int}:
        pos = next(i for i, t in enumerate(ids) if type(t) is not int)
        raise LabelFileError(
            f"{where}: field {key!r}[{pos}]: expected an integer token id, "
            f"got {ids[pos]!r} ({_json_type(ids[pos])})"
        )
    if any(abs(t) >= 2**31 for t in (min(ids, default=0), max(ids, default=0))):
        pos = next(i for i, t in enumerate(ids) if abs(t) >= 2**31)
        raise LabelFileError(f"{where}: field {key!r}[{pos}]: token id {ids[pos]} out of range")
    return ids


def _check_label(record: dict, label_type: LabelType, where: str):
    key = label_type.label_key
    if key not in record:
        raise LabelFileError(f"{where}: missing field {key!r}")
    value = record[key]
    if np.dtype(label_type.label_dtype).kind == "i":
        if type(value) is not int:
            raise LabelFileError(
                f"{where}: field {key!r}: expected an integer, got {value!r} ({_json_type(value)})"
            )
        if not 0 <= value < label_type.num_samples:
            raise LabelFileError(
                f"{where}: field {key!r}: {value} out of range [0, {label_type.num_samples})"
            )
        return value
    if type(value) not in (int, float):
        raise LabelFileError(
            f"{where}: field {key!r}: expected a number, got {value!r} ({_json_type(value)})"
        )
    if not math.isfinite(value):
        raise LabelFileError(f"{where}: field {key!r}: non-finite value {value!r}")
    return value


def split_labels(
    labels: Mapping[str, np.ndarray], num_train: int, num_valid: int | None = None
) -> tuple[Labels, Labels]:
    """Splits labels into a training prefix and a held-out rest.

    The first `num_train` records train the reward model, exactly as the original keeps
    `results[:num_train]`; the held-out part is an addition (spec §3.4).

    Args:
        labels: label dict of arrays with equal leading dimension.
        num_train: number of training records.
        num_valid: number of held-out records after them; None means all the rest.

    Returns:
        (train, valid) label dicts; `valid` may have zero records.

    Raises:
        ValueError: when the file has fewer records than requested (says both numbers).
    """
    total = num_records(labels)
    needed = num_train + (num_valid or 0)
    if num_train < 0 or (num_valid is not None and num_valid < 0):
        raise ValueError(f"num_train and num_valid must be >= 0, got {num_train}, {num_valid}")
    if total < needed:
        extra = f" + num_valid={num_valid}" if num_valid else ""
        raise ValueError(
            f"not enough labels: found {total}, but num_train={num_train}{extra} needs {needed}"
        )
    end = total if num_valid is None else needed
    train = {k: np.asarray(v)[:num_train] for k, v in labels.items()}
    valid = {k: np.asarray(v)[num_train:end] for k, v in labels.items()}
    return train, valid


def num_records(labels: Mapping[str, np.ndarray]) -> int:
    """Number of records in a label dict, checking that all fields agree."""
    sizes = {k: len(v) for k, v in labels.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"label fields have different numbers of records: {sizes}")
    return next(iter(sizes.values()), 0)


def save_labels(path: str, labels: Mapping[str, np.ndarray]) -> None:
    """Writes labels in the released JSON format, atomically.

    Local files are written to a temporary file in the same directory and moved into place
    with `os.replace` (`runtime.atomic_write_text`, with the user's umask), so a reader never
    sees a half-written file. `gs://` paths are one object upload, atomic by itself.

    Args:
        path: destination path.
        labels: label dict of arrays with equal leading dimension.
    """
    n = num_records(labels)
    columns = {k: np.asarray(v).tolist() for k, v in labels.items()}
    records = [{k: col[i] for k, col in columns.items()} for i in range(n)]
    # allow_nan=False: a NaN label would be written as the non-standard token NaN.
    text = json.dumps(records, allow_nan=False, separators=(",", ":"))
    runtime.atomic_write_text(str(path), text)


def zero_labels(
    label_type: LabelType | str, *, num: int = 50, query_length: int, response_length: int
) -> Labels:
    """All-zero records, like the original's `source='test'` (50 records by default).

    Args:
        label_type: a LabelType or its name.
        num: number of records.
        query_length: tokens per query.
        response_length: tokens per sample.

    Returns:
        A label dict of zeros with the label type's dtypes and shapes.
    """
    if isinstance(label_type, str):
        label_type = get_label_type(label_type)
    schemas = label_type.schemas(query_length=query_length, response_length=response_length)
    return {k: np.zeros((num, *shape), dtype) for k, (dtype, shape) in schemas.items()}
