"""A real label server on 127.0.0.1: concurrent labelers, kill -9 and restart, label workers."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import httpx2
import numpy as np
import pytest
import sqlalchemy as sa
from labeling_util import ROOT, TASK, LiveServer, comparison, store_url

from rlhf_jax import labelers
from rlhf_jax.labeling import schema
from rlhf_jax.labeling.client import ApiError, LabelClient
from rlhf_jax.labeling.store import LabelStore, overlap_slots


def label_until_empty(client, acked, errors, stop=None, pause_s=0.0):
    """One labeler's loop: next, label, until 204 (or a stop / a dead server)."""
    try:
        while stop is None or not stop.is_set():
            got = client.next()
            if got is None:
                return
            time.sleep(pause_s)
            status, body = client.label(got["comparison_id"], got["comparison_id"] % 4)
            acked.append((status, got["comparison_id"], client.name, body["label_id"]))
    except httpx2.TransportError:
        if stop is None or not stop.is_set():
            errors.append("server went away")
    except ApiError as e:
        errors.append(e)


def labelers_for(store, n, prefix):
    out = []
    for i in range(n):
        name = f"{prefix}{i}"
        out.append((name, store.add_labeler(name)))
    return out


def run_labelers(server, people, acked, errors, **kw):
    clients = []
    for name, token in people:
        client = LabelClient(server.url, token, timeout=30)
        client.name = name
        clients.append(client)
    threads = [threading.Thread(target=label_until_empty, args=(c, acked, errors), kwargs=kw)
               for c in clients]
    for t in threads:
        t.start()
    return threads, clients


@pytest.mark.parametrize("backend,workers", [("sqlite", 2), ("postgres", 2)])
def test_eight_labelers_over_http_store_every_label_exactly_once(backend, workers, tmp_path):
    with store_url(backend, tmp_path) as url:
        store = LabelStore(url)
        records = [comparison(i) for i in range(80)]
        store.enqueue(records, TASK, overlap=0.25)
        people = labelers_for(store, 8, "p")
        acked, errors = [], []
        with LiveServer(url, tmp_path / "server.log", workers=workers) as server:
            threads, clients = run_labelers(server, people, acked, errors)
            for t in threads:
                t.join(300)
            for c in clients:
                c.close()
        assert not errors, errors
        slots = {i + 1: overlap_slots(f"c{i}", 0.25) for i in range(80)}
        assert all(status == 201 for status, *_ in acked)
        labelled = Counter(cid for _, cid, _, _ in acked)
        assert labelled == Counter(slots)  # every slot once: none lost, none twice
        pairs = [(cid, who) for _, cid, who, _ in acked]
        assert len(set(pairs)) == len(pairs)  # never the same labeler twice on one comparison
        stored = store.labels_after(0, 1000)
        assert sorted(r["id"] for r in stored) == sorted(label_id for *_, label_id in acked)
        assert len({who for _, _, who, _ in acked}) > 1  # the work was shared
        store.close()


def test_kill_9_loses_no_acknowledged_label_and_leases_come_back(tmp_path):
    url = f"sqlite:///{tmp_path / 'labels.sqlite'}"
    store = LabelStore(url)
    store.enqueue([comparison(i) for i in range(120)], TASK, overlap=0.2)
    people = labelers_for(store, 8, "p")
    server = LiveServer(url, tmp_path / "server.log", lease_s=1.5).start()
    acked, errors, stop = [], [], threading.Event()
    threads, clients = run_labelers(server, people, acked, errors, stop=stop, pause_s=0.005)
    # A person who took a comparison and walked away: a lease that is never answered.
    walker = LabelClient(server.url, store.add_labeler("walker"))
    dangling = walker.next()["comparison_id"]
    deadline = time.monotonic() + 60
    while len(acked) < 40 and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    server.kill(signal.SIGKILL)  # mid-labelling: requests are in flight
    walker.close()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert 40 <= len(acked) < 140
    held = LabelStore(url)
    now = time.time()
    with held.engine.connect() as conn:
        open_leases = conn.execute(sa.select(schema.leases.c.comparison_id).where(
            ~schema.leases.c.done, schema.leases.c.expires_at > now - 10)).scalars().all()
    stored = {(r["comparison_id"], r["labeler"]): r["id"] for r in held.labels_after(0, 10_000)}
    for _, cid, who, label_id in acked:
        assert stored[(cid, who)] == label_id  # every 201 survived the kill -9
    assert dangling in open_leases  # labelers held comparisons when the server died
    # Restart on the same file. Fresh labelers get the dead leases once they expire.
    server.start()
    time.sleep(1.6)
    others = labelers_for(held, 8, "q")
    acked2, errors2 = [], []
    threads, clients2 = run_labelers(server, others, acked2, errors2)
    for t in threads:
        t.join(120)
    server.kill(signal.SIGTERM)
    for c in clients + clients2:
        c.close()
    assert not errors2, errors2
    assert set(open_leases) <= {cid for _, cid, _, _ in acked2}
    final = held.labels_after(0, 10_000)
    per = Counter(r["comparison_id"] for r in final)
    assert per == Counter({i + 1: overlap_slots(f"c{i}", 0.2) for i in range(120)})
    assert held.counts()["slots"]["queued"] == 0
    held.close()
    store.close()


SENTENCES = ["I love this wonderful, happy day!", "This is terrible, awful and sad.",
             "The table is brown.", "It was good, I guess."]


def sentiment_comparisons(n, seed=0):
    """Comparisons whose four samples have distinct VADER scores, in shuffled order."""
    rng = np.random.default_rng(seed)
    return [comparison(i, samples=[SENTENCES[k] for k in rng.permutation(4)]) for i in range(n)]


def start_worker(server, token, *args):
    env = dict(os.environ, RLHF_JAX_LABEL_TOKEN=token)
    return subprocess.Popen([sys.executable, "-m", "rlhf_jax.label_worker", "--server",
                             server.url, "--labeler", "vader", *map(str, args)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_workers_label_everything_at_their_noise_rate(tmp_path):
    url = f"sqlite:///{tmp_path / 'labels.sqlite'}"
    store = LabelStore(url)
    records = sentiment_comparisons(300)
    store.enqueue(records, TASK)
    careful, noisy = store.add_labeler("careful", bot=True), store.add_labeler("noisy", bot=True)
    scores = labelers.VaderSentimentScorer()([""] * 4, SENTENCES)
    assert len(set(scores)) == 4  # no ties: the noiseless choice is unique
    best_of = {r["key"]: int(np.argmax([scores[SENTENCES.index(s)] for s in r["samples"]]))
               for r in records}
    with LiveServer(url, tmp_path / "server.log") as server:
        procs = [start_worker(server, careful, "--delay_s", 0, "--idle_exit_s", 1.5),
                 start_worker(server, noisy, "--delay_s", 0, "--idle_exit_s", 1.5,
                              "--noise", 0.5, "--seed", 3)]
        outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    counts = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    rows = store.labels_after(0, 10_000)
    assert len(rows) == 300 and counts[0]["labels"] + counts[1]["labels"] == 300
    wrong = Counter(r["labeler"] for r in rows if r["best"] != best_of[r["key"]])
    n_noisy = counts[1]["labels"]
    assert wrong["careful"] == 0 and n_noisy >= 60
    # A random pick is wrong 3 times in 4: P(wrong) = 0.5 * 0.75. Within 4 standard errors.
    for observed, p in ((wrong["noisy"] / n_noisy, 0.375), (counts[1]["noisy"] / n_noisy, 0.5)):
        assert abs(observed - p) < 4 * np.sqrt(p * (1 - p) / n_noisy), (observed, p, n_noisy)
    store.close()


def test_a_worker_killed_holding_a_lease_does_not_stall_the_others(tmp_path):
    url = f"sqlite:///{tmp_path / 'labels.sqlite'}"
    store = LabelStore(url)
    store.enqueue(sentiment_comparisons(6), TASK)
    tokens = [store.add_labeler(n, bot=True) for n in ("slow", "polite", "fast")]
    with LiveServer(url, tmp_path / "server.log", lease_s=2.0) as server:
        slow = start_worker(server, tokens[0], "--delay_s", 600)
        polite = start_worker(server, tokens[1], "--delay_s", 600)
        deadline = time.monotonic() + 60
        while store.counts()["slots"]["leased"] < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert store.counts()["slots"]["leased"] == 2
        slow.kill()  # kill -9 while it holds a lease
        slow.communicate(timeout=30)
        polite.send_signal(signal.SIGTERM)  # a clean stop gives its comparison back at once
        out, err = polite.communicate(timeout=30)
        assert polite.returncode == 0, err
        assert json.loads(out.strip().splitlines()[-1])["labels"] == 0
        assert store.counts()["slots"]["leased"] == 1
        refused = start_worker(server, "rlhf_not-a-token", "--delay_s", 0)
        _, err = refused.communicate(timeout=60)
        assert refused.returncode == 2 and "refused the token: unknown access token" in err
        fast = start_worker(server, tokens[2], "--delay_s", 0, "--idle_exit_s", 4, "--poll_s", 0.2)
        out, err = fast.communicate(timeout=120)
        assert fast.returncode == 0, err[-2000:]
    assert json.loads(out.strip().splitlines()[-1])["labels"] == 6
    assert Counter(r["labeler"] for r in store.labels_after(0, 100)) == {"fast": 6}
    store.close()


def test_judges_pick_as_their_scorers_say():
    from rlhf_jax.labeling.worker import Judge

    article = "The council approved the new bridge on Monday. Work starts in May."
    copying = {"comparison_id": 1, "query": article,
               "samples": ["Cats are nice.", "The council approved the new bridge on Monday.",
                           "Nothing happened.", "A bridge."]}
    assert Judge("copying").pick(copying) == (1, False)
    rouge = dict(copying, samples=["bridge approved by council", "cats", "dogs", "weather"],
                 extra={"reference": "The council approved a bridge."})
    assert Judge("rouge").pick(rouge) == (0, False)
    with pytest.raises(ValueError, match="has no extra.reference"):
        Judge("rouge").pick(dict(rouge, extra=None))
    with pytest.raises(ValueError, match="--labeler 'bleu'"):
        Judge("bleu")
    picks = [Judge("vader", noise=1.0, seed=s).pick(copying) for s in range(40)]
    assert all(noisy for _, noisy in picks) and len({p for p, _ in picks}) == 4


def test_people_labels_train_the_reward_model(tmp_path):
    """The README flow: rlhf_jax.sample rows -> enqueue -> label over HTTP -> export ->
    `python -m rlhf_jax.train_reward` on the export (tiny config)."""
    from rlhf_jax import experiment, sample
    from rlhf_jax.data import sources
    from rlhf_jax.labeling import cli, ingest
    from rlhf_jax.labeling.worker import Judge, MockWorker

    config_path = os.path.join(ROOT, "configs", "sentiment.py") + ":runlocal"
    config = ingest.load_config(config_path)
    params = {"transformer": experiment.initial_trunk(config, experiment.gpt2_config(config))}
    rows = sample.sample_texts(config, params, sources.load_texts("builtin", "test")[:32],
                               num_samples=4, seed=0, batch_size=128)
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps(r) + "\n" for r in rows))  # as sample.main writes
    workdir = str(tmp_path / "store")
    # The tiny random model rarely ends a sample with '.', so keep samples that fail the check.
    assert cli.main(["enqueue", "--workdir", workdir, "--task", config_path, "--samples",
                     str(samples), "--overlap", "0", "--keep_invalid"]) == 0
    store = LabelStore.open(workdir)
    num = store.counts()["comparisons"]["total"]
    assert num >= 24
    token = store.add_labeler("vader-bot", bot=True)
    with LiveServer(store.url, tmp_path / "server.log") as server, \
            LabelClient(server.url, token) as client:
        counts = MockWorker(client, Judge("vader"), delay_s=0, idle_exit_s=0.5,
                            poll_s=0.1).run()
    assert counts["labels"] == num
    labels_path = str(tmp_path / "labels.json")
    assert cli.main(["export", "--workdir", workdir, "--output", labels_path]) == 0
    store.close()
    cmd = [sys.executable, "-m", "rlhf_jax.train_reward", "--config", config_path,
           "--workdir", str(tmp_path / "rm"), f"--config.labels.path={labels_path}",
           "--config.labels.num_train=16", "--config.labels.num_valid=8",
           "--config.rewards.log_every=1", "--config.rewards.rollout_batch_size=16",
           "--config.rewards.normalize_samples=16", "--config.rewards.verify_samples=16"]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "train_reward 2/2" in out.stdout + out.stderr
    final = [json.loads(line) for line in open(tmp_path / "rm" / "metrics.jsonl")][-1]
    assert 0.0 <= final["valid/accuracy"] <= 1.0
