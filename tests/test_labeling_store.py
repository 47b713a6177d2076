"""The label store, on SQLite and on PostgreSQL: enqueue, leases, labels, QC, versions."""

import threading
import time

import pytest
import sqlalchemy as sa
from labeling_util import TASK, comparison, store_url

from rlhf_jax.labeling import auth, schema, stats
from rlhf_jax.labeling.records import TaskIdentity
from rlhf_jax.labeling.schema import (
    ConflictError,
    InvalidError,
    NotFoundError,
    SchemaVersionError,
    TaskMismatchError,
)
from rlhf_jax.labeling.store import LabelStore, overlap_slots


@pytest.fixture(params=["sqlite", "postgres"])
def store(request, tmp_path):
    with store_url(request.param, tmp_path) as url:
        s = LabelStore(url)
        yield s
        s.close()


def labeler(store, name, **kw):
    token = store.add_labeler(name, **kw)
    return store.labeler_by_hash(auth.hash_token(token))


def test_enqueue_is_atomic_idempotent_and_checks_every_field(store):
    good = [comparison(i) for i in range(5)]
    bad = [dict(r) for r in good]
    bad[3]["samples"] = ["a", "", "c", "d"]
    with pytest.raises(InvalidError, match=r"comparisons\[3\]\.samples\[1\]: empty sample"):
        store.enqueue(bad, TASK)
    assert store.counts()["comparisons"]["total"] == 0  # nothing of the batch was stored
    bad[3] = dict(good[3], sample_tokens=[[1, 2, 3]] * 4)
    with pytest.raises(InvalidError, match=r"comparisons\[3\]\.sample_tokens\[0\]: expected 6"):
        store.enqueue(bad, TASK)
    bad[3] = dict(good[3], query_tokens=[50258] * 8)
    with pytest.raises(InvalidError, match=r"query_tokens\[0\]: token id 50258 out of range"):
        store.enqueue(bad, TASK)
    bad[3] = dict(good[3], kind="gold")
    with pytest.raises(InvalidError, match=r"comparisons\[3\]\.best: a gold comparison needs"):
        store.enqueue(bad, TASK)

    first = store.enqueue(good, TASK)
    assert first["added"] == 5 and first["existing"] == 0
    # A trainer that crashed mid-enqueue resends the batch: nothing is duplicated.
    again = store.enqueue(good + [comparison(5)], TASK)
    assert again == {"added": 1, "existing": 5, "ids": first["ids"] + [again["ids"][-1]]}
    changed = dict(good[0], samples=["w", "x", "y", "z"])
    with pytest.raises(InvalidError, match="'c0' is already stored with different content"):
        store.enqueue([changed], TASK)
    assert store.counts()["comparisons"]["total"] == 6


def test_another_task_identity_is_refused(store):
    store.enqueue([comparison(0)], TASK)
    other = TaskIdentity("gpt2", query_length=16, response_length=6, num_samples=4)
    with pytest.raises(TaskMismatchError, match=r"query_length=16 \(store: 8\)"):
        store.enqueue([comparison(1)], other)
    assert store.task_identity() == TASK


def test_lease_label_repeat_and_refusals(store):
    store.enqueue([comparison(i) for i in range(3)], TASK)
    alice, bob = labeler(store, "alice"), labeler(store, "bob")
    a = store.next_comparison(alice, lease_s=60)
    assert a.query == "Query number 0." and len(a.samples) == 4 and a.extra is None
    # A reloaded page shows the same comparison: one open lease per labeler.
    assert store.next_comparison(alice, lease_s=60).comparison_id == a.comparison_id
    b = store.next_comparison(bob, lease_s=60)
    assert b.comparison_id != a.comparison_id
    with pytest.raises(InvalidError, match=r"best=4 out of range: comparison \d+ has 4 samples"):
        store.submit_label(alice.id, a.comparison_id, 4)
    with pytest.raises(ConflictError, match="is not leased to you"):
        store.submit_label(alice.id, b.comparison_id, 1)  # bob's comparison
    with pytest.raises(NotFoundError, match="comparison 999 does not exist"):
        store.submit_label(alice.id, 999, 1)
    label_id, created = store.submit_label(alice.id, a.comparison_id, 2)
    assert created
    assert store.submit_label(alice.id, a.comparison_id, 2) == (label_id, False)
    with pytest.raises(ConflictError, match="already labelled comparison .* with best=2"):
        store.submit_label(alice.id, a.comparison_id, 3)
    assert store.label_count(alice.id) == 1 and store.counts()["labels"]["total"] == 1


def test_an_expired_lease_is_offered_again(store):
    store.enqueue([comparison(0)], TASK)
    alice, bob = labeler(store, "alice"), labeler(store, "bob")
    leased = store.next_comparison(alice, lease_s=0.3)
    assert store.next_comparison(bob, lease_s=60) is None  # leased to alice
    time.sleep(0.4)
    again = store.next_comparison(bob, lease_s=60)
    assert again.comparison_id == leased.comparison_id
    with pytest.raises(ConflictError):
        store.submit_label(alice.id, leased.comparison_id, 0)  # too late: bob has it
    assert store.submit_label(bob.id, leased.comparison_id, 1)[1]
    assert store.counts()["slots"] == {"queued": 0, "leased": 0, "done": 1}


def test_skip_release_and_flags(store):
    store.enqueue([comparison(0), comparison(1)], TASK)
    alice = labeler(store, "alice")
    first = store.next_comparison(alice, lease_s=60)
    store.skip(alice.id, first.comparison_id, flag="offensive")
    second = store.next_comparison(alice, lease_s=60)
    assert second.comparison_id != first.comparison_id
    store.skip(alice.id, second.comparison_id, remember=False)  # a plain release
    assert store.next_comparison(alice, lease_s=60).comparison_id == second.comparison_id
    with pytest.raises(ConflictError, match="not leased to you"):
        store.skip(alice.id, first.comparison_id)
    bob = labeler(store, "bob")
    assert store.next_comparison(bob, lease_s=60).comparison_id == first.comparison_id
    assert store.counts()["flags"] == 1


def test_overlap_agreement_and_gold_accuracy(store):
    assert sum(overlap_slots(f"k{i}", 0.3) == 2 for i in range(2000)) == pytest.approx(600, abs=90)
    train = [comparison(i) for i in range(6)]
    gold = [comparison(i, prefix="g", kind="gold", best=1) for i in range(2)]
    store.enqueue(train, TASK, overlap=1.0)
    store.enqueue(gold, TASK)
    alice, bob = labeler(store, "alice"), labeler(store, "bob")
    # Alice always picks 0 (wrong on gold), Bob picks 0 on the first three comparisons and 3
    # after, and 1 on gold (right).
    seen = {"alice": [], "bob": []}
    for _ in range(20):
        for who in (alice, bob):
            leased = store.next_comparison(who, lease_s=60, gold_every=4)
            if leased is None:
                continue
            seen[who.name].append(leased.comparison_id)
            row = int(leased.query.split()[-1].rstrip("."))
            is_gold = leased.comparison_id > 6
            best = 0 if who is alice else 1 if is_gold else (0 if row < 3 else 3)
            store.submit_label(who.id, leased.comparison_id, best)
    for name, ids in seen.items():
        assert sorted(ids) == list(range(1, 9)), name  # everything once, gold included
    # The first question is gold, then one gold per 4 labels while any is left.
    assert seen["alice"][0] > 6 and seen["alice"][4] > 6
    s = stats.compute_stats(store)
    assert s["agreement"] == {"pairs": 6, "agree": 3, "rate": 0.5, "chance": 0.25}
    assert s["overlap"] == {"fraction": 1.0, "comparisons": 6, "fully_labeled": 6}
    rows = {r["name"]: r for r in s["labelers"]}
    assert rows["alice"]["gold_accuracy"] == 0.0 and rows["bob"]["gold_accuracy"] == 1.0
    assert rows["alice"]["agreement"] == 0.5 and rows["alice"]["labels"] == 8
    assert s["gold"] == {"questions": 2, "answers": 4, "accuracy": 0.5}
    assert sum(s["timeline"]["counts"]) == 16 and s["labels_per_hour"] == 16


def test_labels_after_reads_every_label_once_in_order(store):
    store.enqueue([comparison(i) for i in range(7)], TASK)
    alice = labeler(store, "alice")
    for _ in range(7):
        store.submit_label(alice.id, store.next_comparison(alice).comparison_id, 1)
    everything = store.labels_after(0, 100)
    assert [r["id"] for r in everything] == sorted(r["id"] for r in everything)
    paged, after = [], 0
    while page := store.labels_after(after, 3):
        paged += page
        after = page[-1]["id"]
    assert paged == everything and len(paged) == 7
    first = everything[0]
    assert first["query_tokens"] == comparison(0)["query_tokens"]
    assert first["provenance"][2] == {"source": "reference", "step": 3}
    assert first["labeler"] == "alice" and first["kind"] == "train" and first["best"] == 1
    with pytest.raises(InvalidError, match="after must be an integer >= 0"):
        store.labels_after(-1)


def test_two_stores_on_one_database_hand_out_each_slot_once(store):
    """Two engines (as two server processes) and 8 threads racing for 40 comparisons."""
    store.enqueue([comparison(i) for i in range(40)], TASK, overlap=0.5)
    other = LabelStore(store.url)
    people = [labeler(store, f"p{i}") for i in range(8)]
    errors = []

    def work(who, s):
        try:
            while (leased := s.next_comparison(who, lease_s=60)) is not None:
                s.submit_label(who.id, leased.comparison_id, who.id % 4)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(p, (store, other)[i % 2]))
               for i, p in enumerate(people)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    other.close()
    assert not errors, errors
    with store.engine.connect() as conn:
        slots = conn.execute(sa.select(sa.func.count()).select_from(schema.leases)).scalar()
        per = conn.execute(sa.select(schema.labels.c.comparison_id, sa.func.count())
                           .group_by(schema.labels.c.comparison_id)).all()
        done = conn.execute(sa.select(sa.func.count()).select_from(schema.leases)
                            .where(schema.leases.c.done)).scalar()
    expected = {i + 1: overlap_slots(f"c{i}", 0.5) for i in range(40)}
    assert dict(per) == expected and done == slots == sum(expected.values())


def test_schema_version_and_foreign_databases_are_refused(store):
    with store.engine.begin() as conn:
        conn.execute(schema.schema_info.update().values(version=99))
    with pytest.raises(SchemaVersionError, match="schema version 99, but this rlhf_jax reads "
                                                 "version 1"):
        LabelStore(store.url)
    with store.engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE schema_info"))
    with pytest.raises(SchemaVersionError, match="no schema_info table: not an rlhf_jax label"):
        LabelStore(store.url)


def test_an_empty_database_is_not_created_on_read(tmp_path):
    with pytest.raises(FileNotFoundError, match="no label store here"):
        LabelStore.open(str(tmp_path), create=False)


def test_a_refused_label_in_a_sqlite_batch_does_not_undo_the_others(tmp_path):
    """Group commit: labels waiting together commit together, each in its own savepoint."""
    from rlhf_jax.labeling import queue

    store = LabelStore(f"sqlite:///{tmp_path / 'labels.sqlite'}")
    store.enqueue([comparison(i) for i in range(4)], TASK)
    people = [labeler(store, f"p{i}") for i in range(4)]
    leased = [store.next_comparison(p) for p in people]
    runner = store._runner
    with runner._cv:  # hold the writer so that all four wait in one batch
        futures = [runner.submit(lambda tx, p=p, c=c, b=b: queue.submit_body(
            tx, False, p.id, c.comparison_id, b, None))
                   for p, c, b in zip(people, leased, [0, 9, 2, 3])]
    results = [f.exception() or f.result() for f in futures]
    assert isinstance(results[1], InvalidError)
    assert [r[1] for i, r in enumerate(results) if i != 1] == [True, True, True]
    assert sorted(r["best"] for r in store.labels_after(0)) == [0, 2, 3]
    store.close()
