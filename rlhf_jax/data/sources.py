"""Raw text sources for query datasets, and reading files from local disk, GCS or HTTP.

Formats (spec §5.1):
- plain text: one passage per line, blank lines skipped;
- JSONL: one JSON value per line, either a string (the original `book_passages/*.jsonl`
  format) or an object whose `field` (default "text") holds the passage.

Built-in names:
- "builtin": the small books-style corpus shipped in `rlhf_jax/data/assets/` (the original
  books corpus is lost, spec §5.1); splits "train" and "test".
- "test": random 40-character strings over a-z and '.', like the original `test` dataset,
  for unit tests with a character-level tokenizer.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Iterable, Iterator
from typing import Any
import urllib.error
import urllib.request

import numpy as np

ASSETS_DIR = pathlib.Path(__file__).resolve().parent / "assets"
BUILTIN_SPLITS = {"train": "books_train.jsonl", "test": "books_test.jsonl"}
# How many random strings the "test" source yields; the original's generator is infinite, but
# QueryDataset repeats its texts forever anyway.
NUM_TEST_TEXTS = 256
HTTP_TIMEOUT_S = 120


class SourceError(ValueError):
    """A text source is missing or malformed; the message names the file and line."""


def read_text(path: str) -> str:
    """Reads a whole UTF-8 file from a local path, `gs://` or `http(s)://`.

    Args:
        path: local path (optionally `file://`), `gs://bucket/obj` or an http(s) URL.

    Returns:
        The decoded file contents.

    Raises:
        ImportError: for `gs://` when no GCS backend is installed (says what to install).
        OSError: when the file cannot be read (the message names it).
    """
    path = str(path)
    if path.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(path, timeout=HTTP_TIMEOUT_S) as response:
                return response.read().decode("utf-8")
        except urllib.error.HTTPError as e:
            raise OSError(f"cannot download {path}: HTTP {e.code} {e.reason}") from e
        except urllib.error.URLError as e:
            raise OSError(f"cannot download {path}: {e.reason}") from e
    if path.startswith("gs://"):
        return _read_gcs(path)
    if path.startswith("file://"):
        path = path[len("file://") :]
    with open(path, encoding="utf-8") as f:
        return f.read()


def _gcs_missing(path: str, cause: Exception) -> ImportError:
    return ImportError(
        f"reading {path} needs a Google Cloud Storage backend: install etils with gcsfs "
        f"(`pip install 'etils[epath]' gcsfs`), or copy the file locally ({cause})"
    )


def _read_gcs(path: str) -> str:
    try:
        from etils import epath  # comes with orbax
    except ImportError as e:
        raise _gcs_missing(path, e) from e
    try:
        return epath.Path(path).read_text(encoding="utf-8")
    except ImportError as e:  # etils raises this lazily when gcsfs/tensorflow are absent
        raise _gcs_missing(path, e) from e


def load_texts(
    path_or_name: str, split: str = "train", *, field: str = "text", fmt: str = "auto"
) -> list[str]:
    """Loads the raw passages of a query dataset.

    Args:
        path_or_name: "builtin", "test", or a path/URL. A "{split}" in the path is replaced
            by `split` (e.g. "gs://bucket/book_passages/{split}.jsonl").
        split: "train" or "test" for the built-in sources; substituted into paths.
        field: the object key holding the text in JSONL objects.
        fmt: "auto" (JSONL for .jsonl/.json names, else plain text), "jsonl" or "text".

    Returns:
        The passages, in file order.

    Raises:
        SourceError: on an unknown split, an unknown format or a malformed line.
    """
    if path_or_name == "builtin":
        if split not in BUILTIN_SPLITS:
            raise SourceError(
                f"builtin corpus has splits {sorted(BUILTIN_SPLITS)}, got split {split!r}"
            )
        path = str(ASSETS_DIR / BUILTIN_SPLITS[split])
        return parse_jsonl(read_text(path), path, field=field)
    if path_or_name == "test":
        return random_texts(NUM_TEST_TEXTS, seed=0 if split == "train" else 1)
    path = str(path_or_name).replace("{split}", split)
    if fmt == "auto":
        fmt = "jsonl" if path.endswith((".jsonl", ".json")) else "text"
    if fmt == "jsonl":
        return parse_jsonl(read_text(path), path, field=field)
    if fmt == "text":
        return [line for line in read_text(path).splitlines() if line.strip()]
    raise SourceError(f"unknown text format {fmt!r} for {path}: expected 'jsonl' or 'text'")


def json_values(lines: Iterable[str], name: str,
                error: type[Exception] = SourceError) -> Iterator[tuple[int, str, Any]]:
    """Parses JSON-lines: one JSON value per non-blank line.

    Args:
        lines: the file's lines (an open file, or `text.splitlines()`).
        name: the file name, for error messages.
        error: the exception class to raise.

    Yields:
        `(line number, "name:line", value)`, 1-based, blank lines skipped.

    Raises:
        error: naming the file and line of malformed JSON.
    """
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{name}:{lineno}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise error(f"{where}: malformed JSON ({err.msg})") from None
        yield lineno, where, value


def json_objects(lines: Iterable[str], name: str,
                 error: type[Exception] = SourceError) -> Iterator[tuple[int, str, dict]]:
    """Parses JSON-lines whose every non-blank line is an object.

    Args:
        lines: the file's lines (an open file, or `text.splitlines()`).
        name: the file name, for error messages.
        error: the exception class to raise.

    Yields:
        `(line number, "name:line", object)`, 1-based, blank lines skipped.

    Raises:
        error: naming the file and line of malformed JSON or a value that is not an object.
    """
    for lineno, where, record in json_values(lines, name, error):
        if not isinstance(record, dict):
            raise error(f"{where}: expected a JSON object, got {type(record).__name__}")
        yield lineno, where, record


def parse_jsonl(text: str, name: str, *, field: str = "text") -> list[str]:
    """Parses JSONL whose lines are strings or objects with a string `field`.

    Args:
        text: the file contents.
        name: the file name, for error messages.
        field: the key holding the passage in object lines.

    Returns:
        One passage per non-blank line.

    Raises:
        SourceError: naming the file and the 1-based line of the first bad line.
    """
    texts = []
    for _, where, value in json_values(text.splitlines(), name):
        if isinstance(value, dict):
            if field not in value:
                raise SourceError(f"{where}: object has no field {field!r}")
            value = value[field]
        if not isinstance(value, str):
            raise SourceError(
                f"{where}: expected a JSON string or an object with a string "
                f"field {field!r}, got {type(value).__name__}"
            )
        texts.append(value)
    return texts


def random_texts(num: int, *, length: int = 40, seed: int = 0) -> list[str]:
    """Random strings over a-z and '.', like the original `test` dataset.

    Args:
        num: number of strings.
        length: characters per string.
        seed: numpy seed, so the strings are reproducible.

    Returns:
        `num` strings of `length` characters.
    """
    alphabet = np.array(list("abcdefghijklmnopqrstuvwxyz."))
    chars = np.random.default_rng(seed).choice(alphabet, size=(num, length))
    return ["".join(row) for row in chars]
