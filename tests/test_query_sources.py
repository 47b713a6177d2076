"""Query sources `labels:PATH` (a label file's queries) and `text:PATH` (own books)."""

import json

import numpy as np
import pytest

from rlhf_jax import experiment
from rlhf_jax.data import query_sources, sources, summarization, tasks
from tests.test_train_reward import load_config


@pytest.fixture(scope="module")
def setup():
    cfg = load_config()  # sentiment:runlocal, books task (query 64)
    tok = experiment.tokenizer(cfg)
    spec = experiment.task_spec(cfg, tok, experiment.gpt2_config(cfg))
    return cfg, tok, spec


def _label_file(tmp_path, spec, tok, name="labels.json", query_length=None, drop_query=None):
    """A released-format best-of-4 file whose queries are the builtin passages' (plus one
    duplicate), as the original made them: start/end rules, right padding with 50259."""
    queries = [q for t in sources.load_texts("builtin", "train")
               if (q := tasks.make_query(tok.encode(t), spec)) is not None][:120]
    queries.append(queries[3])  # the same query labelled twice
    records = []
    for i, q in enumerate(queries):
        q = [int(t) for t in q][:query_length or len(q)]
        rec = {"query": q, **{f"sample{k}": [13] * 24 for k in range(4)}, "best": i % 4}
        if drop_query == i:
            del rec["query"]
        records.append(rec)
    path = tmp_path / name
    path.write_text(json.dumps(records))
    return str(path), np.stack(queries[:-1])


def test_labels_source_gives_the_files_distinct_queries_split_by_content(setup, tmp_path):
    cfg, tok, spec = setup
    path, queries = _label_file(tmp_path, spec, tok)
    train = query_sources.label_file_queries(path, "train", query_length=64)
    test = query_sources.label_file_queries(path, "test", query_length=64)
    assert len(train) + len(test) == len(queries) == 120  # the duplicate counted once
    assert 0 < len(test) < len(train)
    assert {tuple(r) for r in train} | {tuple(r) for r in test} == {tuple(r) for r in queries}
    assert not {tuple(r) for r in train} & {tuple(r) for r in test}
    # The split depends on content, not order: a reversed file splits the same way.
    reversed_path = tmp_path / "reversed.json"
    reversed_path.write_text(json.dumps(json.loads(open(path).read())[::-1]))
    assert {tuple(r) for r in query_sources.label_file_queries(str(reversed_path), "test")} == \
        {tuple(r) for r in test}
    # task.query_dataset=labels:PATH streams those exact token ids; a bare "labels:" reads
    # the run's labels.path.
    cfg.task.query_dataset = f"labels:{path}"
    ds = experiment.query_dataset(cfg, tok, spec)
    np.testing.assert_array_equal(ds.queries, train)
    assert ds.get_batch(0, 8).shape == (8, 64)
    cfg.task.query_dataset, cfg.labels.path = "labels:", path
    np.testing.assert_array_equal(experiment.query_dataset(cfg, tok, spec, "test").queries, test)
    # Text consumers (sample.py, SFT) get the decoded queries; the task's rules, switched off for
    # this source, map each text back to its stored ids.
    texts = experiment.query_texts(cfg, "test")
    assert texts == query_sources.decode_queries(test, tok, spec.pad_id)
    assert summarization.texts_and_references(cfg.task.query_dataset.replace(
        "labels:", f"labels:{path}"), "test")[0] == (texts[0], None)
    rules = experiment.text_query_spec(cfg, spec)
    assert rules.start_token is None and experiment.text_query_spec(load_config(), spec) == spec
    np.testing.assert_array_equal(
        np.stack([tasks.make_query(tok.encode(t), rules) for t in texts]), test)


def test_labels_source_bad_input(setup, tmp_path):
    cfg, tok, spec = setup
    path, _ = _label_file(tmp_path, spec, tok, "noquery.json", drop_query=5)
    with pytest.raises(query_sources.QuerySourceError,
                       match=r"noquery.json: record 5: no 'query' field"):
        query_sources.label_file_queries(path, "train", query_length=64)
    path, _ = _label_file(tmp_path, spec, tok, "short.json", query_length=32)
    cfg.task.query_dataset = f"labels:{path}"
    with pytest.raises(query_sources.QuerySourceError,
                       match=r"short.json: record 0: the query has 32 tokens but "
                             r"task.query_length=64"):
        experiment.query_dataset(cfg, tok, spec)
    bad = tmp_path / "pad_first.json"
    bad.write_text(json.dumps([{"query": [50259, 5]}]))
    with pytest.raises(query_sources.QuerySourceError, match=r"record 0: query\[0\] = 50259"):
        query_sources.label_file_queries(str(bad))
    cfg.task.query_dataset, cfg.labels.path = "labels:", ""
    with pytest.raises(ValueError, match="'labels:' takes the queries of labels.path, which is "
                                         "empty"):
        experiment.query_dataset(cfg, tok, spec)
    with pytest.raises(query_sources.QuerySourceError, match="split 'valid'"):
        query_sources.label_file_queries(str(bad), "valid")


def test_text_corpus_paragraphs_lines_and_splits(setup, tmp_path):
    cfg, tok, spec = setup
    wrapped = tmp_path / "book.txt"
    wrapped.write_text("It was late. The lamp\nflickered on the wall.\n\n  \nShe waited.\n"
                       "Nobody came.\n\n\nThe end.\n")
    assert query_sources.passages(wrapped.read_text()) == [
        "It was late. The lamp flickered on the wall.", "She waited. Nobody came.", "The end."]
    assert query_sources.passages("One.\nTwo.\n\n") == ["One.", "Two."]
    # A corpus of many one-line passages: a deterministic, disjoint split by content.
    lines = sources.load_texts("builtin", "train")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(lines + lines[:5]) + "\n")
    train = query_sources.text_corpus(str(corpus), "train")
    test = query_sources.text_corpus(str(corpus), "test")
    assert sorted(train + test) == sorted(set(lines)) and not set(train) & set(test)
    cfg.task.query_dataset = f"text:{corpus}"
    assert experiment.query_texts(cfg, "test") == test
    assert len(experiment.query_dataset(cfg, tok, spec)) > 0
    # One file per split.
    (tmp_path / "b_train.txt").write_text("A. B.\n")
    (tmp_path / "b_test.txt").write_text("C. D.\n")
    assert query_sources.text_corpus(str(tmp_path / "b_{split}.txt"), "test") == ["C. D."]


def test_text_corpus_bad_input(setup, tmp_path):
    cfg, tok, spec = setup
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(query_sources.QuerySourceError, match="empty.txt: no text passage"):
        query_sources.text_corpus(str(empty))
    # Passages with no sentence after the first (the books rules start after a '.') make no
    # query: the error names the source.
    short = tmp_path / "short_{split}.txt"
    for split in ("train", "test"):
        (tmp_path / f"short_{split}.txt").write_text("Hello there\nNo full stop at all\n")
    cfg.task.query_dataset = f"text:{short}"
    with pytest.raises(ValueError, match=r"task.query_dataset='text:.*short_\{split\}.txt' "
                                         r"\(split 'train'\): no query survived"):
        experiment.query_dataset(cfg, tok, spec)
