"""Summarization data: the original's cleaning rules, tfds reading offline, JSONL errors."""

import json
import logging
import subprocess
import sys
import textwrap

import pytest
import tensorflow_datasets as tfds

from rlhf_jax.data import summarization as S


# ---------------------------------------------------------------- clean_cnndm, one rule each


def article(story):
    return S.clean_cnndm(story)[0]


def test_byline_drops_first_two_lines():
    assert article("By Jane Doe\n\nThe story starts here.") == "The story starts here."


def test_byline_rule_needs_the_word_by():
    # The original tested text[:2] == "By"; "Byron" is not a byline.
    assert article("Byron won the race.\n\nMore.") == "Byron won the race.\n\nMore."


def test_cnn_dash_prefix_with_dateline():
    assert article("LONDON, England (CNN)  -- The queen spoke.") == "The queen spoke."


def test_cnn_prefix_only_in_first_100_chars():
    assert article("(CNN)The queen spoke.") == "The queen spoke."
    late = "x" * 120 + " as (CNN) reported."
    assert article(late) == late


def test_leading_and_header():
    assert article("and Reuters\nThe text.") == "The text."
    # Only at the very start.
    assert article("Text.\nand Reuters\nMore.") == "Text.\nand Reuters\nMore."


def test_updated_header_dropped_through_its_line():
    story = "PUBLISHED: 12:00 EST, 1 May 2013 | UPDATED: 13:45 EST, 1 May 2013\n\nBody."
    assert article(story) == "Body."
    # The stamp's time may sit on a later line than "UPDATED:" (\s+ spans newlines).
    assert article("UPDATED:\n\n13:45 EST, 1 May 2013\n\nBody.") == "Body."


def test_curly_quotes_ftfy_and_newlines():
    assert article("It\u2019s \u2018fine\u2019.") == "It's 'fine'."
    assert article("A caf\u00c3\u00a9 opened.") == "A caf\u00e9 opened."  # mojibake fixed
    assert article("A.\n\n\n\n\nB.") == "A.\n\nB."


def test_highlights_cut_and_returned_as_reference():
    story = "Body text.\n\n@highlight\n\nFirst point\n\n@highlight\n\nSecond point!\n"
    body, ref = S.clean_cnndm(story)
    assert body == "Body text."
    assert ref == "First point.\nSecond point!"  # missing period added, as tfds does
    assert S.clean_cnndm("No highlights.") == ("No highlights.", "")


def test_full_daily_mail_story():
    story = (
        "By\nDaily Mail Reporter\n\nPUBLISHED: 12:00 EST, 1 May 2013 | UPDATED: 13:45 EST, "
        "1 May 2013\n\nIt\u2019s a story.\n\n\n\nSecond paragraph.\n\n@highlight\n\nOne"
    )
    assert S.clean_cnndm(story) == ("It's a story.\n\nSecond paragraph.", "One.")


# ---------------------------------------------------------------- tfds-flattened cnn_dailymail


def test_tfds_daily_mail_header_and_sentence_breaks():
    text = (
        "By . Daily Mail Reporter . PUBLISHED: . 15:49 EST, 10 February 2014 . | . UPDATED: . "
        "15:53 EST, 10 February 2014 . Mr. Smith met J. R. Jones in the U.S. on Monday. "
        "He said: \u2018It was great.\u2019 Then 3 people left ."
    )
    assert S.clean_cnndm_tfds(text) == (
        "Mr. Smith met J. R. Jones in the U.S. on Monday.\n\nHe said: 'It was great.'\n\n"
        "Then 3 people left ."
    )
    assert "\n" not in S.clean_cnndm_tfds(text, sentence_breaks=False)


def test_tfds_cnn_markers_and_plain_by():
    assert S.clean_cnndm_tfds("WASHINGTON (CNN) -- A vote. It failed!") == "A vote.\n\nIt failed!"
    assert S.clean_cnndm_tfds("(CNN)The vote failed.") == "The vote failed."
    # "By" without tfds's " . " byline form is ordinary text.
    assert S.clean_cnndm_tfds("By noon it rained.") == "By noon it rained."


def test_clean_tldr():
    assert S.clean_tldr("  Hi caf\u00c3\u00a9\n\n\n\nbye \n") == "Hi caf\u00e9\n\nbye"


# ---------------------------------------------------------------- task settings


def test_task_settings_match_the_original():
    cnndm, tldr = S.SUMMARIZATION_TASKS["cnndm"], S.SUMMARIZATION_TASKS["tldr"]
    for task in (cnndm, tldr):
        assert (task["query_length"], task["response_length"]) == (500, 75)
        assert (task["truncate_token"], task["truncate_after"]) == (198, 55)
        assert task["query_suffix"] == "\n\nTL;DR:" and task["start_text"] is None
    assert (cnndm["query_prefix"], cnndm["end_text"], cnndm["temperature"]) == (
        "Article:\n\n", "\n", 0.5)
    assert (tldr["query_prefix"], tldr["end_text"], tldr["temperature"]) == ("", None, 0.7)
    copy = S.summarization_task("cnndm")
    copy["query_length"] = 1
    assert S.SUMMARIZATION_TASKS["cnndm"]["query_length"] == 500
    with pytest.raises(KeyError, match="books"):
        S.summarization_task("books")


# ---------------------------------------------------------------- tfds sources, offline


@pytest.mark.parametrize("name", ["cnn_dailymail", "reddit", "cnndm", "tldr"])
def test_tfds_source_with_random_mock(name):
    # Random records with the builders' real feature specs: the feature names must exist.
    with tfds.testing.mock_data(num_examples=3):
        src = S.tfds_source(name, "train", data_dir="/nonexistent")
        pairs = list(src)
    assert len(src) == 3 and len(pairs) + src.n_skipped == 3
    assert all(isinstance(a, str) and isinstance(r, str) for a, r in pairs)


def _fixed_records(records):
    def as_data_source(self, split, **kwargs):
        del self, split, kwargs
        return records
    return as_data_source


def test_tfds_cnn_dailymail_cleaned_pairs():
    records = [{"article": "(CNN) -- One. Two.", "highlights": b"Ref one.\nRef two."}]
    with tfds.testing.mock_data(as_data_source_fn=_fixed_records(records)):
        src = S.tfds_source("cnndm", "validation")
    assert src[0] == ("One.\n\nTwo.", "Ref one.\nRef two.")


def test_tfds_reddit_empty_record_named_and_skipped(caplog):
    records = [
        {"content": "Post\n\n\n\nbody ", "summary": " tl;dr "},
        {"content": "   ", "summary": "x"},
    ]
    with tfds.testing.mock_data(as_data_source_fn=_fixed_records(records)):
        src = S.tfds_source("reddit", "train[:10%]")
    assert src[0] == ("Post\n\nbody", "tl;dr")
    with pytest.raises(S.RecordError, match=r"reddit\[train\[:10%\]\] record 1: empty"):
        src[1]
    with caplog.at_level(logging.WARNING):
        assert list(src) == [("Post\n\nbody", "tl;dr")]
    assert src.n_skipped == 1 and "record 1" in caplog.text


def test_tfds_source_rejects_other_datasets():
    with pytest.raises(ValueError, match="unsupported"):
        S.tfds_source("xsum", "train")


def test_tfds_reading_does_not_import_tensorflow():
    # A fresh interpreter, so that no other test's imports can hide or cause a TF import.
    code = textwrap.dedent("""
        import sys
        import tensorflow_datasets as tfds
        from rlhf_jax.data import summarization as S
        with tfds.testing.mock_data(num_examples=2):
            for name in ("cnn_dailymail", "reddit"):
                list(S.tfds_source(name, "train"))
        print("tensorflow" in sys.modules)
    """)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip().splitlines()[-1] == "False"


# ---------------------------------------------------------------- JSONL source


def write_lines(tmp_path, lines):
    path = tmp_path / "articles.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_reads_and_cleans(tmp_path):
    path = write_lines(tmp_path, [
        json.dumps({"article": "First\n\n\n\narticle ", "summary": "S1", "id": 3}),
        "",
        json.dumps({"article": "Second", "summary": ""}),
    ])
    assert S.jsonl_source(path) == [("First\n\narticle", "S1"), ("Second", "")]
    other = write_lines(tmp_path, [json.dumps({"text": "Only text"})])
    assert S.jsonl_source(other, text_field="text", summary_field=None) == [("Only text", "")]


@pytest.mark.parametrize("bad, message", [
    ("{not json", r"articles\.jsonl:2: malformed JSON"),
    ('["a list"]', r"articles\.jsonl:2: expected a JSON object"),
    ('{"summary": "s"}', r"articles\.jsonl:2: missing field 'article'"),
    ('{"article": "a"}', r"articles\.jsonl:2: missing field 'summary'"),
    ('{"article": 5, "summary": "s"}', r"articles\.jsonl:2: field 'article' is not a string"),
    ('{"article": " \\n ", "summary": "s"}', r"articles\.jsonl:2: empty article"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, bad, message):
    path = write_lines(tmp_path, [json.dumps({"article": "ok", "summary": "s"}), bad])
    with pytest.raises(S.RecordError, match=message):
        S.jsonl_source(path)


def test_jsonl_empty_file(tmp_path):
    with pytest.raises(S.RecordError, match="no records"):
        S.jsonl_source(write_lines(tmp_path, [""]))


# ---------------------------------------------------------------- truncation accounting


def test_truncation_is_counted_and_logged(caplog):
    tokens = [[1] * 499, [1] * 500, [1] * 501, [1] * 900]
    assert S.count_truncated(tokens, 500) == 2
    with caplog.at_level(logging.INFO, logger=S.__name__):
        assert S.log_truncated(tokens, 500, what="cnndm articles") == 2
    assert "truncated 2 of 4 cnndm articles to the 500-token query window" in caplog.text
