"""Summarization query data: CNN/Daily Mail and Reddit TL;DR, cleaned as the original did.

Three sources give ``(article_text, reference_summary)`` pairs:

- :func:`tfds_source` reads ``cnn_dailymail`` or ``reddit`` (Webis-TLDR-17) through
  ``tfds.data_source``. Random access on ``array_record`` files needs no TensorFlow, and this
  module never imports it. Preparing the real datasets does need TensorFlow and the network
  (their tfds generators use ``tf.io.gfile``), so prepare them once elsewhere with
  ``file_format="array_record"`` and pass ``data_dir``.
- :func:`jsonl_source` reads a user's own articles, one JSON object per line.
- :func:`clean_cnndm` cleans a raw ``.story`` file, the input the original read.

Article truncation to the query window is done by the shared query pipeline; use
:func:`count_truncated` / :func:`log_truncated` there so that no truncation goes unreported.
"""

from __future__ import annotations

import importlib
import io
import itertools
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import ftfy

from rlhf_jax import paths
from rlhf_jax.data import query_sources, sources

logger = logging.getLogger(__name__)

# Task settings of the original launch.py (spec §2.4), keyed by the original's dataset names.
# Keys follow the original TaskHParams field names so a task spec can be built from them.
_CNNDM_TASK: dict[str, Any] = {
    "query_dataset": "cnndm",
    "query_length": 500,
    "response_length": 75,
    "start_text": None,
    "end_text": "\n",
    "query_prefix": "Article:\n\n",
    "query_suffix": "\n\nTL;DR:",
    "truncate_token": 198,  # GPT-2 BPE id of "\n"
    "truncate_after": 55,
    "penalty_reward_value": -1.0,
    "temperature": 0.5,
}
SUMMARIZATION_TASKS: dict[str, dict[str, Any]] = {
    "cnndm": _CNNDM_TASK,
    "tldr": {**_CNNDM_TASK, "query_dataset": "tldr", "end_text": None, "query_prefix": "",
             "temperature": 0.7},
}

# The original's dataset names, mapped to tfds names.
TFDS_NAMES = {"cnndm": "cnn_dailymail", "tldr": "reddit"}

# (article feature, summary feature) per tfds dataset. Checked against the installed tfds
# builders: summarization/cnn_dailymail.py (article, highlights, plus publisher and id) and
# datasets/reddit/reddit_dataset_builder.py (content, summary, plus author, body,
# normalizedBody, subreddit, subreddit_id and id). Reddit has only a "train" split.
TFDS_FEATURES = {"cnn_dailymail": ("article", "highlights"), "reddit": ("content", "summary")}

# Legacy builders register only when their module is imported; importing the whole catalogue
# (tfds.list_builders) would try to import TensorFlow.
_TFDS_MODULES = {"cnn_dailymail": "tensorflow_datasets.summarization.cnn_dailymail"}


def summarization_task(name: str) -> dict[str, Any]:
    """Returns a fresh copy of the original task settings for "cnndm" or "tldr".

    Args:
        name: "cnndm" or "tldr".

    Returns:
        A plain dict that the caller may modify without touching ``SUMMARIZATION_TASKS``.
    """
    if name not in SUMMARIZATION_TASKS:
        raise KeyError(f"unknown summarization task {name!r}; known: {sorted(SUMMARIZATION_TASKS)}")
    return dict(SUMMARIZATION_TASKS[name])


# --- Cleaning ---------------------------------------------------------------------------------

_MANY_NEWLINES = re.compile(r"\n{3,}")
_CNN_DASH = re.compile(r"\(CNN\) +--")
_AND_HEADER = re.compile(r"^and \w+\n")
_UPDATED = re.compile(r"UPDATED:\s+\d{2}:\d{2}")
# Characters after which the tfds builder and abisee's scripts consider a line finished.
_END_CHARS = (".", "!", "?", "'", "`", '"', "\u2019", "\u201d", ")")


def _common_tail(text: str) -> str:
    """Steps every cleaner shares: straight single quotes, ftfy, at most one blank line."""
    text = text.replace("\u2019", "'").replace("\u2018", "'").strip()
    text = ftfy.fix_text(text)
    return _MANY_NEWLINES.sub("\n\n", text).strip()


def _strip_cnn_markers(text: str) -> str:
    """Drops text through the last "(CNN) --", then through a "(CNN)" in the first 100 chars."""
    # Like the original, the dash form is searched in the whole text: a dateline such as
    # "WASHINGTON (CNN) --" is dropped with everything before it.
    last = None
    for last in _CNN_DASH.finditer(text):
        pass
    if last is not None:
        text = text[last.end():]
    head, tail = text[:100], text[100:]
    pos = head.rfind("(CNN)")
    if pos >= 0:
        head = head[pos + len("(CNN)"):]
    return head + tail


def _drop_through_updated_line(text: str) -> str:
    """Drops everything up to the end of the line holding the last "UPDATED: hh:mm" stamp.

    The original used a regex whose year part was a character class by mistake; it ends at the
    last digit 0-5 on the stamp's line, which for real stamps ("... 10 February 2014") is the
    end of that line, as here.
    """
    last = None
    for last in _UPDATED.finditer(text):
        pass
    if last is None:
        return text
    newline = text.find("\n", last.end())
    return "" if newline < 0 else text[newline:]


def _clean_cnndm_article(text: str) -> str:
    """Applies the original cnndm.py start-of-story rules to the text before "@highlight"."""
    # A Daily Mail story opens with a one-paragraph byline; paragraphs are separated by a blank
    # line, so the original drops the first two lines. It tested text[:2] == "By"; the word
    # boundary here also keeps a first paragraph that starts with e.g. "Byron".
    if re.match(r"By\b", text):
        text = "\n".join(text.split("\n")[2:])
    text = _strip_cnn_markers(text)
    text = _AND_HEADER.sub("", text)
    text = _drop_through_updated_line(text)
    return _common_tail(text)


def _fix_missing_period(line: str) -> str:
    """Adds "." to a highlight that does not end a sentence, as the tfds builder does."""
    return line if not line or line.endswith(_END_CHARS) else line + "."


def clean_cnndm(text: str) -> tuple[str, str]:
    """Cleans a raw CNN/Daily Mail ``.story`` file as the original cnndm.py did.

    Rules, in order (spec §5.1): if the story starts with the word "By", drop its first two
    lines (byline paragraph and the blank line after it); drop everything through the last
    "(CNN) --"; drop everything through a "(CNN)" found in the first 100 characters; drop a
    leading "and X" line; drop everything through the line of the last "UPDATED: hh:mm" stamp;
    turn curly single quotes into "'"; ``ftfy.fix_text``; collapse 3+ newlines to 2; strip.
    The article is the text before the first "@highlight".

    Args:
        text: the whole story file, highlights included.

    Returns:
        ``(article, reference)``: the cleaned article, and the highlights (the lines after
        each "@highlight" marker) with a final "." added where missing, joined by "\\n" as in
        tfds's ``highlights`` feature. The reference is "" when the story has no highlights.
    """
    body, _, rest = text.partition("@highlight")
    highlights = [
        _fix_missing_period(_common_tail(line))
        for line in (s.strip() for s in rest.split("\n"))
        if line and not line.startswith("@highlight")
    ]
    return _clean_cnndm_article(body), "\n".join(highlights)


# tfds's cnn_dailymail article is the story's lines joined by single spaces, each line ended by
# "." when it lacked an end character, so the Daily Mail header reads
# "By . Daily Mail Reporter . PUBLISHED: . 15:49 EST, 10 February 2014 . | . UPDATED: . ...".
_STAMP = r"\d{1,2}:\d{2}\s+\w+,\s+\d{1,2}\s+\w+\s+\d{4}"
_TFDS_BYLINE = re.compile(r"By \.\s+[^.]{1,80}?\s\.\s*")
_TFDS_COAUTHOR = re.compile(r"and\s[^.]{1,80}?\s\.\s*")
_TFDS_HEADER_PARTS = [
    re.compile(r"(?:PUBLISHED|UPDATED):\s*\.?\s*" + _STAMP + r"\s*\.?\s*"),
    re.compile(r"\|\s*\.?\s*"),
    re.compile(r"Last updated at \d{1,2}:\d{2} [AP]M on \d{1,2}(?:st|nd|rd|th)? \w+ \d{4}"
               r"\s*\.?\s*"),
]
# A sentence end: ".", "!" or "?", maybe a closing quote or bracket, whitespace, then a capital,
# digit or opening quote.
_SENTENCE_END = re.compile(r"[.!?]['\"\u2019\u201d)]?\s+(?=[\"'\u2018\u201c(]?[A-Z0-9])")
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr st jr sr prof gen gov sen rep lt col sgt capt cmdr rev no co inc corp ltd "
    "vs v mt ft jan feb mar apr jun jul aug sep sept oct nov dec".split()
)


def _strip_tfds_header(text: str) -> str:
    """Removes a leading "By . Name ." byline and the PUBLISHED/UPDATED stamps after it."""
    match = _TFDS_BYLINE.match(text)
    if match:
        text = text[match.end():]
        match = _TFDS_COAUTHOR.match(text)
        if match:
            text = text[match.end():]
    progress = True
    while progress:
        progress = False
        for part in _TFDS_HEADER_PARTS:
            match = part.match(text)
            if match and match.end() > 0:
                text = text[match.end():]
                progress = True
    return text


def _split_sentences_to_paragraphs(text: str) -> str:
    """Puts a blank line after each sentence end that is not an abbreviation or an initial."""
    pieces, start = [], 0
    for match in _SENTENCE_END.finditer(text):
        before = text[start:match.start()].rsplit(None, 1)
        bare = before[-1].strip("\"'(\u2018\u201c").lower() if before else ""
        # "U.S." or "J." before the period: an acronym or an initial, not a sentence end.
        if bare in _ABBREVIATIONS or re.fullmatch(r"(?:[a-z]\.)*[a-z]", bare):
            continue
        end = match.start() + len(match.group(0).rstrip())
        pieces.append(text[start:end])
        start = match.end()
    pieces.append(text[start:])
    return "\n\n".join(p.strip() for p in pieces if p.strip())


def clean_cnndm_tfds(article: str, sentence_breaks: bool = True) -> str:
    """Cleans tfds's flattened ``cnn_dailymail`` article in the spirit of :func:`clean_cnndm`.

    tfds has already cut the highlights and joined the story's lines with spaces, so the
    line-based byline and "UPDATED" rules cannot apply as written. Instead a leading
    "By . Name ." byline (plus "and Name .") and the "PUBLISHED: . hh:mm ..." / "| ." /
    "UPDATED: . hh:mm ..." / "Last updated at ..." stamps after it are removed; then the
    "(CNN)" rules, quote normalisation and ftfy apply as in the original.

    Args:
        article: the ``article`` feature.
        sentence_breaks: put a blank line after each sentence. The original's stories had
            one paragraph per line and the cnndm task cuts the query after the last "\\n" in
            its window (``end_text``); without breaks every tfds article would be skipped.
            Sentences stand in for the lost paragraphs; abbreviations and initials are kept.

    Returns:
        The cleaned article.
    """
    text = _strip_tfds_header(article.strip())
    text = _strip_cnn_markers(text).strip()
    if sentence_breaks:
        text = _split_sentences_to_paragraphs(text)
    return _common_tail(text)


def clean_tldr(text: str) -> str:
    """Cleans a Reddit post as the original tldr.py did: ftfy, 3+ newlines to 2, strip.

    Args:
        text: the post body (Webis-TLDR-17 ``content``).

    Returns:
        The cleaned text.
    """
    return _MANY_NEWLINES.sub("\n\n", ftfy.fix_text(text)).strip()


# --- Sources ----------------------------------------------------------------------------------


class RecordError(ValueError):
    """An empty or malformed record; the message names the file (or dataset) and the record."""


def _as_text(value: Any) -> str:
    """tfds gives str under mocking and may give bytes or 0-d numpy arrays from real files."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class TfdsSummarySource:
    """Random-access ``(article, reference)`` pairs over a tfds data source, cleaned lazily.

    ``len()`` counts the raw records. Indexing raises :class:`RecordError` for a record whose
    article is empty after cleaning; iteration skips such records, logs each, and counts them
    in ``n_skipped``.
    """

    def __init__(
        self,
        records: Sequence[dict[str, Any]],
        where: str,
        keys: tuple[str, str],
        cleaners: tuple[Callable[[str], str], Callable[[str], str]],
    ):
        """Wraps ``records``; ``where`` names them in errors; ``keys`` and ``cleaners`` are
        the (article, summary) feature names and cleaning functions."""
        self._records, self.where, self._keys, self._clean = records, where, keys, cleaners
        self.n_skipped = 0

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> tuple[str, str]:
        record = self._records[index]
        try:
            article, summary = (_as_text(record[k]) for k in self._keys)
        except KeyError as err:
            raise RecordError(
                f"{self.where} record {index}: no feature {err}; has {sorted(record)}"
            ) from None
        article = self._clean[0](article)
        if not article:
            raise RecordError(f"{self.where} record {index}: empty article after cleaning")
        return article, self._clean[1](summary)

    def __iter__(self) -> Iterator[tuple[str, str]]:
        for index in range(len(self)):
            try:
                yield self[index]
            except RecordError as err:
                self.n_skipped += 1
                logger.warning("skipping (%d skipped so far): %s", self.n_skipped, err)


def tfds_source(
    name: str,
    split: str,
    data_dir: str | Path | None = None,
    *,
    clean: bool = True,
    sentence_breaks: bool = True,
    download: bool = False,
) -> TfdsSummarySource:
    """Opens ``cnn_dailymail`` or ``reddit`` with ``tfds.data_source`` (no TensorFlow).

    Args:
        name: "cnn_dailymail" or "reddit", or the original's names "cnndm" / "tldr".
        split: a tfds split, slices included ("train", "validation", "train[:1%]"). Reddit
            has only "train"; the original used its own curated subsets of it.
        data_dir: where the prepared ``array_record`` dataset lives (tfds's default if None).
        clean: apply :func:`clean_cnndm_tfds` / :func:`clean_tldr` to articles and a light
            clean (ftfy, newlines, strip) to summaries. If False, only strip both.
        sentence_breaks: passed to :func:`clean_cnndm_tfds` (cnn_dailymail only).
        download: let tfds download and prepare the dataset if it is missing (needs the
            network, and TensorFlow for these builders). Off by default: this project works
            offline.

    Returns:
        A :class:`TfdsSummarySource` of ``(article, reference)`` pairs.
    """
    name = TFDS_NAMES.get(name, name)
    if name not in TFDS_FEATURES:
        raise ValueError(f"unsupported tfds dataset {name!r}; use one of {sorted(TFDS_FEATURES)}")
    import tensorflow_datasets as tfds  # Deferred: ~0.5 s, and only this function needs it.

    if name in _TFDS_MODULES:
        importlib.import_module(_TFDS_MODULES[name])
    try:
        records = tfds.data_source(name, split=split, data_dir=data_dir, download=download)
    except Exception as err:  # tfds raises several types; all mean "not usable here".
        raise RuntimeError(
            f"cannot open tfds {name!r} split {split!r} (data_dir={data_dir}): {err}. Prepare "
            "it once with file_format='array_record' (e.g. `tfds build "
            f"{name} --file_format=array_record`) where TensorFlow and the network are "
            "available, then pass its data_dir."
        ) from err
    if not clean:
        clean_article = clean_summary = str.strip
    elif name == "cnn_dailymail":
        def clean_article(text: str) -> str:
            return clean_cnndm_tfds(text, sentence_breaks=sentence_breaks)
        clean_summary = clean_tldr
    else:
        clean_article = clean_summary = clean_tldr
    return TfdsSummarySource(
        records, f"tfds {name}[{split}]", TFDS_FEATURES[name], (clean_article, clean_summary)
    )


def _open_text(path: str | Path):
    """A local UTF-8 file opened for reading, or a `gs://` object read whole."""
    if paths.is_remote(path):
        return io.StringIO(paths.read_text(path))
    return Path(path).open(encoding="utf-8")


def jsonl_source(
    path: str | Path,
    text_field: str = "article",
    summary_field: str | None = "summary",
    *,
    clean: Callable[[str], str] | None = clean_tldr,
) -> list[tuple[str, str]]:
    """Reads ``(article, reference)`` pairs from a JSONL file of the user's own articles.

    Each non-blank line must be a JSON object whose ``text_field`` is a non-empty string (after
    ``clean``) and, unless ``summary_field`` is None, whose ``summary_field`` is a string.
    Blank lines are skipped. The whole file is checked up front, so a bad record fails before
    training starts.

    Args:
        path: the JSONL file.
        text_field: key of the article text.
        summary_field: key of the reference summary, or None when there are none (the
            reference is then "").
        clean: cleaning applied to the article and summary (default :func:`clean_tldr`:
            ftfy, newlines, strip); None to keep the text as is.

    Returns:
        The list of pairs, in file order.

    Raises:
        RecordError: naming the file and 1-based line for malformed JSON, a non-object, a
            missing or non-string field, or an empty article.
    """
    fix = clean or (lambda s: s)
    pairs = []
    with _open_text(path) as f:
        name = path if paths.is_remote(path) else str(Path(path))
        for _, where, record in sources.json_objects(f, name, RecordError):
            fields = [text_field] + ([summary_field] if summary_field is not None else [])
            for field in fields:
                if field not in record:
                    raise RecordError(f"{where}: missing field {field!r}; has {sorted(record)}")
                if not isinstance(record[field], str):
                    raise RecordError(f"{where}: field {field!r} is not a string")
            article = fix(record[text_field])
            if not article:
                raise RecordError(f"{where}: empty article in field {text_field!r}")
            summary = fix(record[summary_field]) if summary_field is not None else ""
            pairs.append((article, summary))
    if not pairs:
        raise RecordError(f"{path}: no records")
    return pairs


# --- Source names ----------------------------------------------------------------------------

# tfds names for the splits the pipeline asks for. Reddit (TL;DR) has only "train": hold out its
# last 5% as the original held out its own "valid" subset. Other split strings pass through.
TFDS_SPLITS = {
    "reddit": {"train": "train[:95%]", "test": "train[95%:]", "valid": "train[95%:]"},
    "cnn_dailymail": {"valid": "validation"},
}
_LEAD_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\u201d]?\s+")


def is_summarization_source(name: str) -> bool:
    """Whether `name` gives (article, reference) pairs: "tfds:...", "jsonl:...", "builtin:lead"."""
    return name.startswith(("tfds:", "jsonl:")) or name == "builtin:lead"


def summarization_pairs(name: str, split: str = "train", data_dir: str = ""):
    """(article, reference) pairs of a summarization source, cleaned as the original did.

    Args:
        name: "tfds:<cnn_dailymail|reddit|cnndm|tldr>", "jsonl:<path>" ("{split}" in the path is
            replaced) or "builtin:lead".
        split: "train", "test", "valid" or a tfds split string.
        data_dir: tfds data_dir of the prepared array_record dataset ("" = tfds's default).

    Returns:
        A random-access sequence of pairs; tfds sources are read lazily and raise
        `RecordError` for an empty record.
    """
    if name.startswith("tfds:"):
        ds = TFDS_NAMES.get(name[5:], name[5:])
        split = TFDS_SPLITS.get(ds, {}).get(split, split)
        return tfds_source(ds, split, data_dir or None)
    if name.startswith("jsonl:"):
        return jsonl_source(name[6:].replace("{split}", split))
    if name == "builtin:lead":
        pairs = []
        for text in sources.load_texts("builtin", split):
            sents = [s.strip() for s in _LEAD_SENTENCE_END.split(text) if s.strip()]
            pairs.append(("\n\n".join(sents), sents[0]))
        return pairs
    raise ValueError(f"{name!r} is not a summarization source (tfds:..., jsonl:..., builtin:lead)")


def summarization_texts(name: str, split: str = "train", data_dir: str = "",
                        max_texts: int = 0) -> list[str]:
    """The articles of a summarization source, for a task's query stream.

    Args:
        name, split, data_dir: as `summarization_pairs`.
        max_texts: keep the first this many usable articles (0 = all; tfds reddit has 3.8M).

    Returns:
        The cleaned articles, skipping empty records.
    """
    pairs = iter(summarization_pairs(name, split, data_dir))
    return [article for article, _ in itertools.islice(pairs, max_texts or None)]


def texts_and_references(name: str, split: str = "train", data_dir: str = "",
                         max_texts: int = 0) -> list[tuple[str, str | None]]:
    """(text, reference) of any dataset name; the reference is None for a non-summary corpus.

    Args:
        name, split, data_dir: as `corpus_texts`.
        max_texts: keep the first this many usable items (0 = all); unusable (empty) records
            of a tfds source are skipped and logged.
    """
    if is_summarization_source(name):
        items = iter(summarization_pairs(name, split, data_dir))
    elif query_sources.is_query_source(name):
        items = ((text, None) for text in query_sources.source_texts(name, split))
    else:
        items = ((text, None) for text in sources.load_texts(name, split))
    return list(itertools.islice(items, max_texts or None))


def corpus_texts(name: str, split: str = "train", data_dir: str = "",
                 max_texts: int = 0) -> list[str]:
    """Texts of any dataset name: a summarization source's articles, else `sources.load_texts`.

    This is how every entry point turns `task.query_dataset` (or `sft.dataset`) into texts.

    Args:
        name: a summarization source (`is_summarization_source`), a `labels:` or `text:`
            source (`query_sources`), or anything `sources.load_texts` reads ("builtin",
            "test", a text or JSONL path or URL).
        split: "train", "test", "valid" or a tfds split string.
        data_dir: tfds data_dir for "tfds:..." sources ("" = tfds's default).
        max_texts: keep the first this many texts (0 = all).
    """
    if is_summarization_source(name):
        return summarization_texts(name, split, data_dir, max_texts)
    if query_sources.is_query_source(name):
        texts = query_sources.source_texts(name, split)
    else:
        texts = sources.load_texts(name, split)
    return texts[:max_texts] if max_texts else texts


# --- Truncation accounting --------------------------------------------------------------------


def count_truncated(token_lists: Sequence[Sequence[int]], query_length: int) -> int:
    """Counts encoded articles longer than the query window (the pipeline truncates them).

    Args:
        token_lists: BPE ids of each article, before truncation.
        query_length: the query window in tokens.

    Returns:
        How many articles have more than ``query_length`` tokens.
    """
    return sum(len(tokens) > query_length for tokens in token_lists)


def log_truncated(token_lists: Sequence[Sequence[int]], query_length: int,
                  what: str = "articles", log: logging.Logger | None = None) -> int:
    """Logs (INFO) and returns how many of ``token_lists`` the query window truncates.

    Args:
        token_lists: BPE ids of each article, before truncation.
        query_length: the query window in tokens.
        what: noun for the log line, e.g. "cnndm train articles".
        log: logger to use (this module's if None).

    Returns:
        The count, as :func:`count_truncated`.
    """
    n = count_truncated(token_lists, query_length)
    (log or logger).info(
        "truncated %d of %d %s to the %d-token query window", n, len(token_lists), what,
        query_length,
    )
    return n
