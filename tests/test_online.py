"""Online RLHF (issue 13, spec §5.3): the schedule, label collection, start-up refusals, and a
whole online run on the tiny model (8-device mesh) with an in-process SQLite store and a mock
labeler thread: uninterrupted, and stopped after a reward-model round, killed -9 while waiting
for labels, and resumed to the same metrics."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from rlhf_jax import train_policy
from rlhf_jax.labeling import auth
from rlhf_jax.labeling.store import LabelStore
from rlhf_jax.labeling.worker import Judge
from rlhf_jax.online import schedule
from rlhf_jax.online.collect import LabelCollector
from rlhf_jax.online.store import DirectStore, HttpStore, OnlineStoreError
from rlhf_jax.runs.validation import ConfigError
from tests import labeling_util
from tests.test_train_reward import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# --- the schedule ---------------------------------------------------------------------------


def test_round_label_counts_are_evenly_spaced_whole_batches():
    assert schedule.round_label_counts(64, 128, 3, 8) == [64, 96, 128]
    assert schedule.round_label_counts(16, 40, 3, 8) == [16, 24, 40]  # 3 batches over 2 gaps
    assert schedule.round_label_counts(4992, 59_968, 20, 32)[-1] == 59_968
    assert schedule.round_label_counts(64, 64, 1, 8) == [64]
    counts = schedule.round_label_counts(4992, 45_984, 20, 32)
    assert len(counts) == 20 and all(c % 32 == 0 for c in counts)
    assert all(b > a for a, b in zip(counts, counts[1:]))


@pytest.mark.parametrize("args,field", [
    ((64, 128, 10, 8), "online.rm_rounds=10 is larger than the label batches"),
    ((60, 128, 3, 8), "online.initial_labels=60 is not divisible"),
    ((64, 100, 3, 8), "online.total_labels=100 is not divisible"),
    ((128, 64, 3, 8), "online.total_labels=64 is below"),
])
def test_round_label_counts_refuse_impossible_schedules(args, field):
    with pytest.raises(ValueError, match=field):
        schedule.round_label_counts(*args)


def test_labels_due_front_loaded_and_bounded():
    """l(0) = N0, l(N_pi) = N, never above N; the paper's (unverified) quadratic is ahead of the
    linear schedule everywhere in between."""
    for kind in schedule.SCHEDULES:
        assert schedule.labels_due(0, 1000, 100, 900, kind) == 100
        assert schedule.labels_due(1000, 1000, 100, 900, kind) == 900
        assert schedule.labels_due(5000, 1000, 100, 900, kind) == 900
        due = [schedule.labels_due(n, 1000, 100, 900, kind) for n in range(0, 1001, 10)]
        assert due == sorted(due)
    assert schedule.labels_due(500, 1000, 100, 900, "linear") == 500
    assert schedule.labels_due(500, 1000, 100, 900, "paper") == 700  # 100 + 800 * 0.75
    with pytest.raises(ValueError, match="online.schedule='cubic'"):
        schedule.labels_due(1, 2, 0, 1, "cubic")


def test_rounds_run_before_the_first_and_the_last_iteration():
    counts = [16, 24, 32]
    rounds = [schedule.iteration_round(i, 16, 64, counts, "linear") for i in range(4)]
    assert rounds == [0, 1, 1, 2]
    # 20 rounds over a paper-sized run: every round is reached, round 0 first, 19 last.
    counts = schedule.round_label_counts(4992, 45_984, 20, 32)
    seen = {schedule.iteration_round(i, 512, 1_000_000, counts, "paper") for i in range(1954)}
    assert seen == set(range(20))
    targets = [schedule.enqueue_target(i, 512, 1_000_000, 4992, 45_984, "paper", 1)
               for i in range(1954)]
    assert max(targets) == 45_984 and targets == sorted(targets)


# --- label collection and the store adapters ------------------------------------------------


def _labeler(store, name, **kw):
    return store.labeler_by_hash(auth.hash_token(store.add_labeler(name, **kw)))


class StoreWorker(threading.Thread):
    """A mock VADER labeler working on the store directly (what the HTTP worker does)."""

    def __init__(self, db, name, *, lease_s=600.0, seed=0):
        super().__init__(daemon=True)
        self.db, self.name, self.lease_s = db, name, lease_s
        self.judge = Judge("vader", seed=seed)
        self.stop, self.go = threading.Event(), threading.Event()
        self.go.set()
        self.labels = 0
        self.error = None

    def run(self):
        store = LabelStore.open(workdir=self.db)
        try:
            me = _labeler(store, self.name, bot=True)
            while not self.stop.is_set():
                if not self.go.wait(0.05):
                    continue
                c = store.next_comparison(me, lease_s=self.lease_s, gold_every=0)
                if c is None:
                    self.stop.wait(0.02)
                    continue
                best, _ = self.judge.pick({"comparison_id": c.comparison_id, "query": c.query,
                                           "samples": c.samples})
                store.submit_label(me.id, c.comparison_id, best)
                self.labels += 1
        except BaseException as e:  # reported by the test, never swallowed
            self.error = e
        finally:
            store.close()

    def finish(self):
        self.stop.set()
        self.join(timeout=30)
        assert self.error is None, self.error


def test_a_worker_dying_with_a_lease_does_not_stall_collection(tmp_path):
    """A labeler that leased a comparison and died: its lease expires, another labeler takes
    the comparison, and the wait for every label ends."""
    db = str(tmp_path / "store")
    store = DirectStore(db)
    records = [labeling_util.comparison(i, prefix="run-1/0/") for i in range(6)]
    records += [labeling_util.comparison(i, prefix="other-run/0/") for i in range(2)]
    store.enqueue(records, labeling_util.TASK, 0.0)
    raw = LabelStore.open(workdir=db)
    dead = _labeler(raw, "dies")
    held = raw.next_comparison(dead, lease_s=1.0, gold_every=0)  # then never answers
    assert held is not None
    worker = StoreWorker(db, "lives")
    worker.start()
    collector = LabelCollector(store, "run-1")
    t0 = time.monotonic()
    assert collector.wait_for(6, 0.05, show_every_s=0.5)
    assert time.monotonic() - t0 < 30
    worker.finish()
    assert len(collector.rows) == 6  # the other run's 2 labels are not this run's
    assert held.comparison_id in {r["comparison_id"] for r in collector.rows}
    assert collector.read() == 0  # nothing read twice
    raw.close()
    store.close()


def test_store_of_another_task_is_refused(tmp_path):
    store = DirectStore(str(tmp_path / "store"))
    store.enqueue([labeling_util.comparison(0)], labeling_util.TASK, 0.0)
    other = labeling_util.TASK.__class__("gpt2", query_length=64, response_length=24,
                                         num_samples=4)
    with pytest.raises(OnlineStoreError, match=r"query_length=64 \(store: 8\).*response_length"):
        store.check(other)
    store.close()


def test_server_refusing_or_missing_token_is_a_clear_error(tmp_path, monkeypatch):
    db = str(tmp_path / "store")
    raw = LabelStore.open(workdir=db)
    labeler_token = raw.add_labeler("person")
    raw.close()
    monkeypatch.delenv("RLHF_JAX_TEST_TOKEN", raising=False)
    with pytest.raises(OnlineStoreError, match="set the environment variable RLHF_JAX_TEST_TOKEN"):
        HttpStore("http://127.0.0.1:1", "RLHF_JAX_TEST_TOKEN")
    with labeling_util.LiveServer(f"sqlite:///{db}/labels.sqlite", tmp_path / "server.log") as s:
        for token, why in (("not-a-token", "refused the token"),
                           (labeler_token, "refused the token.*admin")):
            monkeypatch.setenv("RLHF_JAX_TEST_TOKEN", token)
            with pytest.raises(OnlineStoreError, match=why):
                HttpStore(s.url, "RLHF_JAX_TEST_TOKEN").check(labeling_util.TASK)


def test_label_services_label_over_http_and_stop_cleanly(tmp_path, monkeypatch):
    """The online quickstart's server and two mock workers: comparisons sent through the
    admin API are labelled by the workers and read back incrementally; on exit every process
    has stopped."""
    from rlhf_jax.online import services

    with services.label_services(str(tmp_path / "labels"), num_workers=2) as (url, token):
        monkeypatch.setenv("RLHF_JAX_TEST_TOKEN", token)
        store = HttpStore(url, "RLHF_JAX_TEST_TOKEN")
        assert store.check(labeling_util.TASK)["labels"]["total"] == 0
        records = [labeling_util.comparison(i, prefix="run-2/0/") for i in range(10)]
        assert store.enqueue(records, labeling_util.TASK, 0.0)["added"] == 10
        assert store.enqueue(records, labeling_util.TASK, 0.0)["added"] == 0  # idempotent
        collector = LabelCollector(store, "run-2")
        assert collector.wait_for(10, 0.1, show_every_s=1.0)
        assert sorted(r["key"] for r in collector.rows) == sorted(r["key"] for r in records)
        assert len({r["labeler"] for r in collector.rows}) >= 1
        store.close()
    logs = tmp_path / "labels" / "logs"
    assert sorted(os.listdir(logs)) == ["server.log", "worker0.log", "worker1.log"]
    for name in ("worker0.log", "worker1.log"):  # stopped by SIGTERM: counts on the last line
        assert '"labels":' in (logs / name).read_text().strip().splitlines()[-1]


# --- start-up refusals of train_policy --------------------------------------------------------

# The tiny online run of the tests below: 4 PPO iterations of 16 episodes; 16 labels on ρ's
# samples, then rounds at 24 and 32 labels (iterations 1 and 3). The rounds skip the reward
# normalisation (each would compile a sampler: minutes over the runs of this module; the
# rounds call train_reward, whose normalisation tests/test_train_reward.py covers).
ONLINE = {"ppo.batch_size": 16, "ppo.total_episodes": 64, "ppo.lr": 1e-3, "log_every": 1,
          "ckpt_every": 1, "rewards.normalize_before": False, "rewards.normalize_after": False,
          "rewards.verify_samples": 0,
          "online.enabled": True, "online.initial_labels": 16, "online.total_labels": 32,
          "online.rm_rounds": 3, "online.schedule": "linear", "online.invalid_samples": "keep",
          "online.validation_fraction": 0.5, "online.poll_s": 0.05}


def online_config(**kw):
    cfg = load_config()
    for path, value in {**ONLINE, **kw}.items():
        node = cfg
        *parents, leaf = path.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg


@pytest.mark.parametrize("kw,message", [
    ({"online.rm_rounds": 4}, "online.rm_rounds=4 is larger than the label batches"),
    ({"online.total_labels": 8}, "online.total_labels=8: must be >= online.initial_labels=16"),
    ({"online.schedule": "cubic"}, "online.schedule='cubic'"),
    ({"online.db": ""}, "give exactly one of --config.online.server"),
    ({"online.server": "127.0.0.1:8000"}, "exactly one of"),
    ({"online.validation_fraction": 1.5}, "online.validation_fraction=1.5: must be in"),
])
def test_bad_online_config_fails_at_start_up(tmp_path, kw, message):
    cfg = online_config(**{"online.db": str(tmp_path / "store"), **kw})
    with pytest.raises(ConfigError, match=message):
        train_policy.train_policy(cfg, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")


def test_unreachable_server_fails_before_training(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_JAX_LABEL_TOKEN", "some-token")
    cfg = online_config(**{"online.server": f"http://127.0.0.1:{labeling_util.free_port()}"})
    with pytest.raises(OnlineStoreError, match="cannot reach the label server"):
        train_policy.train_policy(cfg, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")


# --- whole online runs --------------------------------------------------------------------------

# Metrics that depend only on the seed, the config and the labels' answers (not on when the
# labels arrived): what a resumed run must reproduce.
DETERMINISTIC = ("objective/score", "objective/kl", "ppo/loss/total", "online/rm_round",
                 "online/rm_labels", "online/enqueued", "online/rm_accuracy_fresh")


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _store_with_worker(path):
    LabelStore.open(workdir=path).close()  # created before the worker opens it
    worker = StoreWorker(path, "mock-vader")
    worker.start()
    return worker


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("online_a")
    worker = _store_with_worker(str(root / "store"))
    cfg = online_config(**{"online.db": str(root / "store")})
    final = train_policy.train_policy(cfg, str(root / "run"))
    worker.finish()
    return root, final


@pytest.mark.slow
def test_online_run_trains_rounds_and_logs_online_metrics(uninterrupted):
    root, final = uninterrupted
    rows = _metrics(root / "run")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["online/rm_round"] for r in rows] == [0, 1, 1, 2]
    assert [r["online/rm_labels"] for r in rows] == [16, 24, 24, 32]
    assert rows[-1]["online/enqueued"] == 32 and rows[-1]["online/labels"] >= 32
    assert 0.0 <= rows[1]["online/rm_accuracy_fresh"] <= 1.0
    assert "online/policy_preferred" in rows[-1] and rows[-1]["online/policy_preferred_step"] >= 1
    for k in range(3):  # every round is a finished train_reward run on its label count
        meta = json.load(open(root / "run" / "online" / f"rm_round_{k:02d}" / "config.json"))
        assert meta["labels"]["num_train"] == [16, 24, 32][k]
        assert os.path.exists(root / "run" / "online" / f"rm_round_{k:02d}" / "reward_model.json")
    store = LabelStore.open(workdir=str(root / "store"))
    counts = store.counts()
    store.close()
    assert counts["comparisons"]["total"] == 32
    assert counts["comparisons"]["validation"] > 0
    assert final["online/rm_round"] == 2


def _cli_args(cfg_overrides):
    args = []
    for path, value in cfg_overrides.items():
        args.append(f"--config.{path}={value}")
    return args


@pytest.mark.slow
def test_killed_while_waiting_stopped_and_resumed_run_matches(uninterrupted, tmp_path):
    """A trainer (the CLI, in a subprocess) killed -9 while waiting for round 0's labels;
    the same command resumed and stopped after round 1 (stop_after), then resumed to the end:
    the same rounds, label counts and metrics as the uninterrupted run, and no comparison
    sent twice (the killed attempt's comparisons are re-sent under the same keys)."""
    root_a, _ = uninterrupted
    db, workdir = str(tmp_path / "store"), str(tmp_path / "run")
    worker = _store_with_worker(db)
    worker.go.clear()  # the labeler is away: round 0's labels do not come
    overrides = {"online.db": db}
    log = tmp_path / "attempt1.log"
    cmd = [sys.executable, "-m", "rlhf_jax.train_policy", "--config",
           os.path.join(ROOT, "configs", "sentiment.py:runlocal"), "--workdir", workdir,
           *_cli_args({**ONLINE, **overrides})]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while "waiting for labels: " not in log.read_text():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert "waiting for labels: 0/16, 0.0 labels/s" in log.read_text()
    store = LabelStore.open(workdir=db)
    assert store.counts()["comparisons"]["total"] == 24  # asked before the wait
    store.close()
    worker.go.set()
    with pytest.raises(SystemExit) as stop:
        train_policy.train_policy(online_config(**overrides, stop_after=2), workdir)
    assert stop.value.code == train_policy.EXIT_STOPPED
    assert os.path.exists(os.path.join(workdir, "online", "rm_round_01", "reward_model.json"))
    final = train_policy.train_policy(online_config(**overrides), workdir)
    worker.finish()
    a, b = _metrics(root_a / "run"), _metrics(workdir)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for key in DETERMINISTIC:
            assert (key in ra) == (key in rb), key
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-6), (ra["step"], key)
    assert final["online/rm_round"] == 2
    store = LabelStore.open(workdir=db)
    counts = store.counts()
    store.close()
    assert counts["comparisons"]["total"] == 32  # nothing asked twice
    assert counts["labels"]["total"] == 32
