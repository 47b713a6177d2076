"""`python -m rlhf_jax.label_server`: add-labeler, enqueue (both row formats), export, errors."""

import hashlib
import json
import os

import numpy as np
import pytest
import sqlalchemy as sa
from labeling_util import ROOT

from rlhf_jax.data import labels as labels_lib
from rlhf_jax.data import tasks
from rlhf_jax.labeling import auth, cli, schema
from rlhf_jax.labeling.store import LabelStore
from rlhf_jax.tokenizer import PAD_ID, get_tokenizer

TASK = os.path.join(ROOT, "configs", "sentiment.py") + ":runlocal"
QUERIES = ["It rained all week. She opened the door and looked at the garden for a while.",
           "The letter came late. He read it twice and put it on the table.",
           "Nobody spoke. The children ran down to the river to see the boats."]
SAMPLES = [" The sun came out and everyone smiled.", " It was awful.", " The end.",
           " They laughed and sang all the way home."]


def run(capsys, *args):
    """Runs the CLI in-process; returns (status, stdout, stderr)."""
    status = cli.main([str(a) for a in args])
    out = capsys.readouterr()
    return status, out.out, out.err


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_add_labeler_prints_the_token_once_and_stores_only_its_hash(tmp_path, capsys):
    status, out, _ = run(capsys, "add-labeler", "alice", "--admin", "--workdir", tmp_path)
    assert status == 0
    token = out.strip().splitlines()[-1]
    assert token.startswith("rlhf_") and len(token) == 48
    store = LabelStore.open(str(tmp_path))
    with store.engine.connect() as conn:
        stored = conn.execute(sa.select(schema.labelers.c.token_hash)).scalar()
    assert stored == hashlib.sha256(token.encode()).hexdigest()
    assert store.labeler_by_hash(auth.hash_token(token)).is_admin
    store.close()
    assert token.encode() not in (tmp_path / "labels.sqlite").read_bytes()
    status, _, err = run(capsys, "add-labeler", "alice", "--workdir", tmp_path)
    assert status == 2 and "labeler 'alice' already exists" in err


def test_enqueue_accepts_comparison_rows_and_sample_rows(tmp_path, capsys):
    rows = [{"query": q, "samples": SAMPLES} for q in QUERIES]
    rows[0]["reference"] = "A summary."
    comparisons_file = write_jsonl(tmp_path / "comparisons.jsonl", rows)
    # The rows `python -m rlhf_jax.sample --num_samples 4` writes: one per sample.
    sample_rows = [{"query": q, "response": s, "valid": not (j == 1 and k == 2),
                    "sample_index": k, "temperature": 0.7}
                   for j, q in enumerate(QUERIES[1::-1]) for k, s in enumerate(SAMPLES)]
    samples_file = write_jsonl(tmp_path / "samples.jsonl", sample_rows)
    args = ("enqueue", "--workdir", tmp_path, "--task", TASK, "--overlap", "0")
    status, out, err = run(capsys, *args, "--samples", comparisons_file)
    assert status == 0, err
    assert "3 comparison(s) added, 0 already in" in out
    status, out, _ = run(capsys, *args, "--samples", comparisons_file)
    assert "0 comparison(s) added, 3 already in" in out  # enqueueing twice adds nothing
    status, out, _ = run(capsys, *args, "--samples", samples_file)
    # QUERIES[1] with these samples is already stored; QUERIES[0] has an invalid sample.
    assert "0 comparison(s) added, 1 already in" in out and "1 with an invalid sample" in out

    store = LabelStore.open(str(tmp_path))
    tok = get_tokenizer("gpt2")
    with store.engine.connect() as conn:
        stored = conn.execute(sa.select(schema.comparisons).order_by(schema.comparisons.c.id)).all()
    assert len(stored) == 3 and stored[0].task == "sentiment" and stored[0].kind == "train"
    spec = tasks.make_task_spec(tok, query_length=64, response_length=24, start_text=".",
                                end_text=".", pad_id=PAD_ID)
    expected = tasks.make_query(tok.encode(QUERIES[0]), spec)
    assert stored[0].query_tokens == expected.tolist()
    # People see the query the model saw: after the first '.', as the task formats it.
    assert stored[0].query_text == " She opened the door and looked at the garden for a while."
    assert stored[0].sample_tokens[1] == tok.encode(SAMPLES[1]) + [PAD_ID] * (
        24 - len(tok.encode(SAMPLES[1])))
    assert stored[0].extra == {"reference": "A summary."} and stored[1].extra is None
    assert store.task_identity().as_dict() == {"tokenizer": "gpt2", "query_length": 64,
                                               "response_length": 24, "num_samples": 4,
                                               "vocab_size": 50257, "pad_id": PAD_ID}
    store.close()


GOOD = {"query": QUERIES[2], "samples": SAMPLES}


@pytest.mark.parametrize("rows,message", [
    ([GOOD, {"query": QUERIES[1], "samples": SAMPLES[:3]}],
     "2: field 'samples': expected 4 samples (the task is best_of_4), got 3"),
    ([GOOD, {"query": QUERIES[0], "samples": SAMPLES[:2] + ["", SAMPLES[3]]}],
     "2: sample 2 is empty"),
    ([GOOD, "", '{"query": "x", "samples": [}'], "3: malformed JSON"),
    ([{"query": QUERIES[0], "response": s} for s in SAMPLES[:3]],
     "1: query has 3 samples, expected 4 (write the file with `python -m rlhf_jax.sample "
     "--num_samples 4`)"),
    ([GOOD, {"query": QUERIES[0], "samples": SAMPLES[:3] + [" word" * 30]}],
     "2: sample 3 has 30 tokens, more than response_length=24"),
    ([GOOD, {"query": "no full stop here", "samples": SAMPLES}],
     "2: the query does not survive the task's formatting rules"),
    ([GOOD, {"query": QUERIES[1], "response": "x"}], "2: mixes comparison rows"),
    ([GOOD, {"query": QUERIES[0], "samples": SAMPLES, "kind": "gold"}],
     "2.best: a gold comparison needs its known answer"),
])
def test_a_bad_samples_file_is_refused_with_its_line_and_nothing_is_enqueued(
        tmp_path, capsys, rows, message):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    status, _, err = run(capsys, "enqueue", "--workdir", tmp_path, "--task", TASK, "--samples", path)
    assert status == 2
    assert f"{path}:{message}" in err
    store = LabelStore.open(str(tmp_path))
    assert store.counts()["comparisons"]["total"] == 0
    store.close()


def test_another_task_in_the_same_store_is_refused(tmp_path, capsys):
    path = write_jsonl(tmp_path / "c.jsonl", [{"query": QUERIES[0], "samples": SAMPLES}])
    assert run(capsys, "enqueue", "--workdir", tmp_path, "--task", TASK, "--samples", path)[0] == 0
    tldr = os.path.join(ROOT, "configs", "tldr.py") + ":runlocal"
    status, _, err = run(capsys, "enqueue", "--workdir", tmp_path, "--task", tldr, "--samples", path)
    assert status == 2
    assert "holds comparisons of another task: query_length=128 (store: 64)" in err
    assert "response_length=32 (store: 24)" in err


def test_export_released_round_trips_and_jsonl_keeps_text(tmp_path, capsys):
    out = tmp_path / "labels.json"
    status, _, err = run(capsys, "export", "--workdir", tmp_path, "--output", out)
    assert status == 2 and "no label store here" in err
    path = write_jsonl(tmp_path / "c.jsonl", [{"query": q, "samples": SAMPLES} for q in QUERIES])
    run(capsys, "enqueue", "--workdir", tmp_path, "--task", TASK, "--samples", path,
        "--overlap", "1")
    status, _, err = run(capsys, "export", "--workdir", tmp_path, "--output", out)
    assert status == 2 and "no labels to export" in err and not out.exists()
    store = LabelStore.open(str(tmp_path))
    people = [store.labeler_by_hash(auth.hash_token(store.add_labeler(n))) for n in ("a", "b")]
    for who in people * 3:
        leased = store.next_comparison(who)
        store.submit_label(who.id, leased.comparison_id, who.id % 4)
    status, stdout, _ = run(capsys, "export", "--workdir", tmp_path, "--output", out)
    assert status == 0 and "wrote 6 labels (released)" in stdout
    loaded = labels_lib.load_labels(str(out), "best_of_4", query_length=64, response_length=24,
                                    vocab_size=50257)
    assert loaded["best"].tolist() == [1, 2] * 3
    assert np.array_equal(loaded["query"][0], store.labels_after(0, 1)[0]["query_tokens"])
    status, stdout, _ = run(capsys, "export", "--workdir", tmp_path, "--output",
                            tmp_path / "labels.jsonl", "--format", "jsonl")
    rows = [json.loads(line) for line in open(tmp_path / "labels.jsonl")]
    assert len(rows) == 6 and rows[0]["samples"] == SAMPLES and rows[0]["labeler"] == "a"
    assert {"seconds", "created", "created_utc", "query", "kind", "round"} <= set(rows[0])
    with store.engine.begin() as conn:
        conn.execute(schema.schema_info.update().values(version=2))
    store.close()
    status, _, err = run(capsys, "stats", "--workdir", tmp_path)
    assert status == 2 and "label store schema version 2, but this rlhf_jax reads version 1" in err
