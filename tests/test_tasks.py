"""Query construction, context layout, truncation, QueryDataset and text sources."""

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.data import sources, tasks
from rlhf_jax.data.tasks import TaskSpec

PAD = 27
DOT = 26


class CharTokenizer:
    """The original 'test' encoding: a..z -> 0..25, '.' -> 26, pad 27; unknown -> '.'."""

    def encode(self, text):
        return [ord(c) - ord("a") if "a" <= c <= "z" else DOT for c in text]

    def decode(self, ids):
        return "".join("." if i == DOT else chr(ord("a") + i) for i in ids if i != PAD)


TOK = CharTokenizer()


def spec(**kw):
    base = dict(query_length=8, response_length=6, pad_id=PAD)
    return TaskSpec(**{**base, **kw})


def q(text, s):
    out = tasks.make_query(TOK.encode(text), s)
    return None if out is None else TOK.decode(out.tolist())


def padded(out):
    return out.tolist()


# ---------------------------------------------------------------- make_query


def test_make_query_books_rules():
    s = spec(start_token=DOT, end_token=DOT)
    assert q("abc.defgh.ij", s) == "defgh."  # start after first '.', end at the last '.'
    out = tasks.make_query(TOK.encode("abc.defgh.ij"), s)
    assert out.dtype == np.int32 and out.shape == (8,)
    assert padded(out) == TOK.encode("defgh.") + [PAD, PAD]


def test_make_query_start_token_absent_skips():
    assert q("abcdefgh", spec(start_token=DOT)) is None


def test_make_query_start_token_last_keeps_whole_text():
    assert q("abc.", spec(start_token=DOT)) == "abc."
    assert q(".", spec(start_token=DOT)) == "."


def test_make_query_start_token_first_occurrence_only():
    assert q("a.b.c", spec(start_token=DOT)) == "b.c"


def test_make_query_truncates_to_query_length():
    assert q("x.abcdefghijkl", spec(start_token=DOT)) == "abcdefgh"
    assert q("abcdefghijkl", spec()) == "abcdefgh"


def test_make_query_end_token_last_occurrence_within_window():
    # window "a.b.cdef" (the '.' after 'h' lies outside it)
    assert q("a.b.cdefgh.", spec(end_token=DOT)) == "a.b."


def test_make_query_end_token_absent_in_window_skips():
    assert q("x.abcdefghij.", spec(start_token=DOT, end_token=DOT)) is None
    assert q("abc", spec(end_token=DOT)) is None


def test_make_query_right_pads():
    out = tasks.make_query(TOK.encode("ab"), spec())
    assert padded(out) == [0, 1] + [PAD] * 6


def test_make_query_empty_text_skipped():
    assert tasks.make_query([], spec()) is None


def test_make_task_spec_encodes_texts():
    s = tasks.make_task_spec(
        TOK,
        query_length=4,
        response_length=3,
        start_text=".",
        end_text=None,
        query_prefix="a",
        query_suffix="bc",
        pad_id=PAD,
    )
    assert s.start_token == DOT and s.end_token is None
    assert s.query_prefix_tokens == (0,) and s.query_suffix_tokens == (1, 2)
    assert s.context_length == 7
    with pytest.raises(ValueError, match="exactly one token"):
        tasks.make_task_spec(TOK, query_length=4, response_length=3, start_text="ab")


def test_task_spec_validation():
    with pytest.raises(ValueError, match="truncate_after"):
        spec(truncate_token=DOT, truncate_after=6)
    with pytest.raises(ValueError, match="temperature"):
        spec(temperature=0.0)
    hash(spec(query_prefix_tokens=[1, 2]))  # lists become tuples: usable as a static arg


# ------------------------------------------------------------ format_context


def test_format_context_layout():
    s = spec(query_length=4, query_prefix_tokens=(0,), query_suffix_tokens=(1, 2))
    queries = np.array([[5, 6, PAD, PAD], [7, 8, 9, 10]], np.int32)
    ctx = tasks.format_context(queries, s)
    assert isinstance(ctx, np.ndarray)  # numpy stays on the host
    np.testing.assert_array_equal(ctx, [[0, 5, 6, PAD, PAD, 1, 2], [0, 7, 8, 9, 10, 1, 2]])
    jitted = jax.jit(tasks.format_context, static_argnums=1)(jnp.asarray(queries), s)
    np.testing.assert_array_equal(jitted, ctx)
    assert ctx.shape[1] == s.context_length


def test_format_context_without_affixes_is_identity():
    queries = np.array([[1, 2, PAD]], np.int32)
    np.testing.assert_array_equal(tasks.format_context(queries, spec(query_length=3)), queries)


# ---------------------------------------------------------------- truncation

TRUNC = spec(truncate_token=DOT, truncate_after=2)


def _post(rows, s=TRUNC):
    r = np.array(rows, np.int32)
    return tasks.postprocess_responses(r, s).tolist(), tasks.responses_valid(r, s).tolist()


def test_truncation_token_before_truncate_after_is_ignored():
    out, valid = _post([[DOT, 1, 2, DOT, 4, 5]])
    assert out == [[DOT, 1, 2, DOT, PAD, PAD]] and valid == [True]
    out, valid = _post([[1, DOT, 2, 3, 4, 5]])
    assert out == [[1, DOT, 2, 3, 4, 5]] and valid == [False]


def test_truncation_token_at_truncate_after_counts():
    out, valid = _post([[1, 2, DOT, DOT, 4, 5]])
    assert out == [[1, 2, DOT, PAD, PAD, PAD]] and valid == [True]


def test_truncation_token_at_last_index():
    out, valid = _post([[1, 2, 3, 4, 5, DOT]])
    assert out == [[1, 2, 3, 4, 5, DOT]] and valid == [True]


def test_no_truncation_token_is_invalid_and_unchanged():
    out, valid = _post([[1, 2, 3, 4, 5, 6]])
    assert out == [[1, 2, 3, 4, 5, 6]] and valid == [False]


def test_truncation_keeps_first_token_pads_everything_after():
    out, _ = _post([[0, 1, 2, DOT, 4, DOT]])
    assert out == [[0, 1, 2, DOT, PAD, PAD]]


def test_truncation_jit_matches_numpy():
    rng = np.random.default_rng(0)
    r = rng.integers(20, 27, size=(64, 6)).astype(np.int32)
    post = jax.jit(tasks.postprocess_responses, static_argnums=1)
    valid = jax.jit(tasks.responses_valid, static_argnums=1)
    np.testing.assert_array_equal(
        post(jnp.asarray(r), TRUNC), tasks.postprocess_responses(r, TRUNC)
    )
    np.testing.assert_array_equal(valid(jnp.asarray(r), TRUNC), tasks.responses_valid(r, TRUNC))
    # reference: a plain loop over rows
    for row, out in zip(r, tasks.postprocess_responses(r, TRUNC), strict=True):
        hits = [i for i in range(2, 6) if row[i] == DOT]
        expect = row.copy()
        if hits:
            expect[hits[0] + 1 :] = PAD
        np.testing.assert_array_equal(out, expect)


def test_no_truncate_token_means_identity_and_all_valid():
    r = np.array([[1, 2, 3, 4, 5, 6], [DOT] * 6], np.int32)
    out, valid = _post(r, spec())
    assert out == r.tolist() and valid == [True, True]


def test_penalize_invalid_replaces_score():
    r = np.array([[1, 2, DOT, 0, 0, 0], [1, 2, 3, 4, 5, 6]], np.int32)
    scores = np.array([0.3, 5.0], np.float32)
    np.testing.assert_allclose(tasks.penalize_invalid(scores, r, TRUNC), [0.3, -1.0])


# -------------------------------------------------------------- QueryDataset

TEXTS = [f"x.{chr(97 + i % 26) * (1 + i % 5)}." for i in range(13)] + ["nodot", "a.bcdefghijklm"]
BOOKS = spec(start_token=DOT, end_token=DOT)


def test_query_dataset_filters_and_counts(caplog):
    with caplog.at_level(logging.INFO, logger="rlhf_jax.data.tasks"):
        ds = tasks.QueryDataset(TEXTS, TOK, BOOKS)
    assert len(ds) == 13
    assert ds.skipped == {"no start token": 1, "no end token in the query window": 1}
    assert "kept 13 of 15" in caplog.text


def test_query_dataset_no_survivors():
    with pytest.raises(ValueError, match="no query survived"):
        tasks.QueryDataset(["abc", "def"], TOK, BOOKS)


def test_get_batch_is_pure_function_of_step():
    a = tasks.QueryDataset(TEXTS, TOK, BOOKS)
    b = tasks.QueryDataset(TEXTS, TOK, BOOKS)
    later = [a.get_batch(s, 4) for s in (7, 3, 0)]  # any order, any step
    np.testing.assert_array_equal(later[0], b.get_batch(7, 4))
    np.testing.assert_array_equal(later[2], b.get_batch(0, 4))
    np.testing.assert_array_equal(a.get_batch(3, 4), later[1])
    assert later[0].dtype == np.int32 and later[0].shape == (4, 8)


def test_process_slices_concatenate_to_global_batch():
    ds = tasks.QueryDataset(TEXTS, TOK, BOOKS)
    for step in (0, 5):
        full = ds.get_batch(step, 8)
        parts = [ds.get_batch(step, 8, process_index=p, process_count=4) for p in range(4)]
        assert all(p.shape == (2, 8) for p in parts)
        np.testing.assert_array_equal(np.concatenate(parts), full)


def test_epochs_cover_every_query_once_and_reshuffle():
    ds = tasks.QueryDataset(TEXTS, TOK, BOOKS)
    n = len(ds)
    stream = np.concatenate([ds.get_batch(s, 1) for s in range(3 * n)])
    epochs = stream.reshape(3, n, -1)
    key = lambda rows: sorted(map(tuple, rows.tolist()))  # noqa: E731
    for e in range(3):
        assert key(epochs[e]) == key(ds.queries)
    assert not np.array_equal(epochs[0], epochs[1])
    # batches that straddle an epoch boundary read the same stream
    np.testing.assert_array_equal(
        np.concatenate([ds.get_batch(s, 3) for s in range(13)]), stream[:39]
    )


def test_shuffle_seed_changes_order():
    a = tasks.QueryDataset(TEXTS, TOK, BOOKS).get_batch(0, 13)
    b = tasks.QueryDataset(TEXTS, TOK, BOOKS, shuffle_seed=1).get_batch(0, 13)
    assert not np.array_equal(a, b)
    assert sorted(map(tuple, a.tolist())) == sorted(map(tuple, b.tolist()))


def test_get_batch_errors():
    ds = tasks.QueryDataset(TEXTS, TOK, BOOKS)
    with pytest.raises(ValueError, match="not divisible by process_count=3"):
        ds.get_batch(0, 8, process_index=0, process_count=3)
    with pytest.raises(ValueError, match="process_index"):
        ds.get_batch(0, 8, process_index=2, process_count=2)


# ------------------------------------------------------------------- sources


def test_builtin_corpus_with_books_rules():
    train = sources.load_texts("builtin", "train")
    test = sources.load_texts("builtin", "test")
    assert len(train) >= 250 and len(test) >= 30
    assert not set(train) & set(test)

    class SentenceTokenizer(CharTokenizer):
        # Only real full stops map to DOT, so the start/end rules see true sentence ends.
        def encode(self, text):
            return [
                DOT if c == "." else ord(c) - 97 if "a" <= c <= "z" else 0 for c in text.lower()
            ]

    # 64 GPT-2 tokens of English prose are roughly 250 characters.
    books = spec(query_length=250, start_token=DOT, end_token=DOT)
    for texts in (train, test):
        ds = tasks.QueryDataset(texts, SentenceTokenizer(), books)
        assert len(ds) == len(texts)  # every passage has several sentences
    with pytest.raises(sources.SourceError, match="valid"):
        sources.load_texts("builtin", "valid")


def test_jsonl_strings_and_objects(tmp_path):
    path = tmp_path / "data_train.jsonl"
    path.write_text('"first passage."\n\n{"text": "second.", "id": 3}\n')
    assert sources.load_texts(str(tmp_path / "data_{split}.jsonl"), "train") == [
        "first passage.",
        "second.",
    ]
    path.write_text('{"body": "x."}\n')
    assert sources.load_texts(str(path), field="body") == ["x."]


@pytest.mark.parametrize(
    "line, problem",
    [
        ("{not json", "malformed JSON"),
        ("[1, 2]", "got list"),
        ('{"title": "x"}', "no field 'text'"),
        ('{"text": 5}', "got int"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, line, problem):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps("ok.") + "\n" + line + "\n")
    with pytest.raises(sources.SourceError) as err:
        sources.load_texts(str(path))
    assert "broken.jsonl:2:" in str(err.value) and problem in str(err.value)


def test_plain_text_source(tmp_path):
    path = tmp_path / "lines.txt"
    path.write_text("one. two.\n\n  \nthree.\n")
    assert sources.load_texts(str(path)) == ["one. two.", "three."]


def test_test_source_is_random_but_reproducible():
    a = sources.load_texts("test", "train")
    assert a == sources.load_texts("test", "train")
    assert a != sources.load_texts("test", "test")
    assert all(len(t) == 40 and set(t) <= set("abcdefghijklmnopqrstuvwxyz.") for t in a)
