"""Benchmark: label server throughput, labels/s and latency of POST /api/v1/labels.

Not a test. N simulated labelers label over HTTP against a real server
(`python -m rlhf_jax.label_server serve`, uvicorn on 127.0.0.1) until a fixed number of labels
is stored. Each labeler is a thread with its own keep-alive connection (the standard library's
http.client, the lightest client at hand, since the clients share the cores with the server)
and its own token, running the loop a person's browser runs: `GET /api/v1/next`, then `POST
/api/v1/labels`, with no think time. Labelers are spread over `--client_procs` processes so the
client's GIL does not cap the rate. The store is a fresh SQLite file (WAL) or a fresh database
on a PostgreSQL cluster (`--postgres ADMIN_URL`; the benchmark creates and drops it).

Reported: labels/s (stored labels / wall time of the labelling phase), p50/p90/p99/max latency
of POST /api/v1/labels and of GET /api/v1/next (client-side wall time, loopback), CPU seconds
per label of the server processes, of the PostgreSQL backends (those alive at the end of the
run: with a pool smaller than the number of labelers, backends of closed overflow connections
are missed) and of the clients, and the load average before and after: the machine may be
shared, and the clients run on the same cores as the server.

There is no peer for this benchmark: the original lm-human-preferences code had no labeling
app (spec §5.3), and neither do the ports we compare against. The goal comes from the issue:
at least 500 labels/s with p99 < 50 ms on 2 cores (a person labels a few a minute, so this is
thousands of labelers).

    python bench/bench_label_server.py                           # SQLite, 16 labelers
    python bench/bench_label_server.py --labels 6000 --server_workers 2
    python bench/bench_label_server.py --postgres postgresql+psycopg://postgres@127.0.0.1:5432/postgres
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing as mp
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import httpx2  # noqa: E402
import sqlalchemy as sa  # noqa: E402

from rlhf_jax.labeling.records import TaskIdentity  # noqa: E402
from rlhf_jax.labeling.store import LabelStore  # noqa: E402

TASK = TaskIdentity("gpt2", query_length=64, response_length=24, num_samples=4)


def comparisons(n: int, run: str) -> list[dict]:
    """n comparisons of the released files' shapes (64-token query, 4 x 24-token samples)."""
    pad = TASK.pad_id
    return [{"key": f"{run}-{i}", "query": f"Passage {i}. " + "words " * 40,
             "query_tokens": [(i + k) % 50000 for k in range(40)] + [pad] * 24,
             "samples": [f"continuation {k} of {i}, " + "more " * 15 for k in range(4)],
             "sample_tokens": [[(i * 7 + k * 13 + t) % 50000 for t in range(20)] + [pad] * 4
                               for k in range(4)]} for i in range(n)]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def client_proc(url: str, tokens: list[str], quota, results, start_at: float) -> None:
    """One client process: a thread per labeler, until the shared quota is used up."""
    post_ms, next_ms, errors = [], [], []

    host, port = url.removeprefix("http://").split(":")

    def labeler(token):
        # http.client with keep-alive: the lightest client the standard library has, so that
        # the clients, which share the cores with the server, take as little CPU as they can.
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

        def call(method, path, body=None):
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            return response.status, response.read()

        while True:
            with quota.get_lock():
                if quota.value <= 0:
                    break
                quota.value -= 1
            t0 = time.perf_counter()
            status, body = call("GET", "/api/v1/next")
            t1 = time.perf_counter()
            if status != 200:
                errors.append(f"next: {status}")
                break
            cid = json.loads(body)["comparison_id"]
            label = json.dumps({"comparison_id": cid, "best": cid % 4})
            t2 = time.perf_counter()
            status, body = call("POST", "/api/v1/labels", label)
            t3 = time.perf_counter()
            if status != 201:
                errors.append(f"label: {status} {body[:200]!r}")
                break
            next_ms.append(1000 * (t1 - t0))
            post_ms.append(1000 * (t3 - t2))
        conn.close()

    while time.time() < start_at:  # every process starts together
        time.sleep(0.001)
    threads = [threading.Thread(target=labeler, args=(t,)) for t in tokens]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results.put((post_ms, next_ms, errors, time.process_time()))


def cpu_seconds(pid: int, database: str | None = None) -> tuple[float, float]:
    """User + system CPU seconds of the server (uvicorn and its workers) and, for
    PostgreSQL, of the backends serving `database` (their titles name the database)."""
    import psutil

    def total(procs):
        out = 0.0
        for p in procs:
            try:
                t = p.cpu_times()
                out += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return out

    proc = psutil.Process(pid)
    backends = [p for p in psutil.process_iter(["cmdline"]) if database and any(
        database in part for part in (p.info["cmdline"] or []))]
    return total([proc, *proc.children(recursive=True)]), total(backends)


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def run(args) -> dict:
    run_id = uuid.uuid4().hex[:8]
    admin_engine = None
    if args.postgres:
        admin_engine = sa.create_engine(args.postgres, isolation_level="AUTOCOMMIT")
        with admin_engine.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "bench_{run_id}"'))
        url = sa.engine.make_url(args.postgres).set(database=f"bench_{run_id}").render_as_string(
            hide_password=False)
    else:
        tmp = tempfile.mkdtemp(prefix="bench_labels_")
        url = f"sqlite:///{tmp}/labels.sqlite"
    store = LabelStore(url, synchronous=args.synchronous)
    store.enqueue(comparisons(args.labels + 100, run_id), TASK)
    tokens = [store.add_labeler(f"bench{i}") for i in range(args.labelers)]
    port = free_port()
    cmd = [sys.executable, "-m", "rlhf_jax.label_server", "serve", "--db", url, "--port",
           str(port), "--workers", str(args.server_workers), "--pool_size", str(args.pool_size),
           "--synchronous", args.synchronous, "--gold_every", "0"]
    log = open(os.path.join(tempfile.gettempdir(), f"bench_label_server_{run_id}.log"), "w")
    server = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx2.get(base + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx2.TransportError:
                time.sleep(0.1)
        # Warm-up: every server process imports, connects and compiles its statements.
        with httpx2.Client(base_url=base, headers={"Authorization": f"Bearer {tokens[0]}"}) as h:
            for _ in range(20 * args.server_workers):
                h.get("/api/v1/me")
        load_before = os.getloadavg()
        database = f"bench_{run_id}" if args.postgres else None
        server_cpu = cpu_seconds(server.pid, database)
        quota = mp.Value("i", args.labels)
        results = mp.Queue()
        start_at = time.time() + 1.0
        groups = [tokens[i::args.client_procs] for i in range(args.client_procs)]
        procs = [mp.Process(target=client_proc, args=(base, g, quota, results, start_at))
                 for g in groups if g]
        for p in procs:
            p.start()
        gathered = [results.get() for _ in procs]
        wall = time.time() - start_at
        server_cpu = [b - a for a, b in zip(server_cpu, cpu_seconds(server.pid, database))]
        for p in procs:
            p.join()
        load_after = os.getloadavg()
    finally:
        server.terminate()
        server.wait(30)
        log.close()
    post = [x for g in gathered for x in g[0]]
    nxt = [x for g in gathered for x in g[1]]
    errors = [x for g in gathered for x in g[2]]
    stored = store.counts()["labels"]["total"]
    store.close()
    if admin_engine is not None:
        with admin_engine.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE "bench_{run_id}" WITH (FORCE)'))
        admin_engine.dispose()
    return {
        "backend": "postgresql" if args.postgres else "sqlite", "labels": len(post),
        "stored": stored, "errors": errors[:5], "wall_s": wall, "labels_per_s": len(post) / wall,
        "post_p50_ms": percentile(post, 0.5), "post_p90_ms": percentile(post, 0.9),
        "post_p99_ms": percentile(post, 0.99), "post_max_ms": max(post),
        "next_p50_ms": percentile(nxt, 0.5), "next_p99_ms": percentile(nxt, 0.99),
        "post_mean_ms": statistics.fmean(post), "load_before": load_before,
        "server_cpu_ms_per_label": 1000 * server_cpu[0] / max(len(post), 1),
        "db_cpu_ms_per_label": 1000 * server_cpu[1] / max(len(post), 1),
        "client_cpu_ms_per_label": 1000 * sum(g[3] for g in gathered) / max(len(post), 1),
        "load_after": load_after,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--labels", type=int, default=4000, help="labels to store")
    parser.add_argument("--labelers", type=int, default=16, help="simulated labelers")
    parser.add_argument("--client_procs", type=int, default=2, help="client processes")
    parser.add_argument("--server_workers", type=int, default=1, help="uvicorn worker processes")
    parser.add_argument("--pool_size", type=int, default=8, help="DB connections per process")
    parser.add_argument("--synchronous", default="FULL", choices=["FULL", "NORMAL"],
                        help="SQLite durability (FULL: fsync at every commit)")
    parser.add_argument("--postgres", default=None,
                        help="admin URL of a PostgreSQL cluster (a fresh database is made)")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}, {platform.platform()}")
    print(f"command: python {' '.join(shlex.quote(a) for a in sys.argv)}")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}")
    for i in range(args.repeats):
        r = run(args)
        print(f"run {i + 1}: {r['backend']}, {args.labelers} labelers in {args.client_procs} "
              f"client processes, {args.server_workers} server process(es), "
              f"synchronous={args.synchronous if r['backend'] == 'sqlite' else 'n/a'}")
        print(f"  {r['labels']} labels in {r['wall_s']:.2f} s = {r['labels_per_s']:.0f} labels/s "
              f"(store holds {r['stored']}); errors: {r['errors'] or 'none'}")
        print(f"  POST /api/v1/labels ms: p50 {r['post_p50_ms']:.1f}  p90 {r['post_p90_ms']:.1f}  "
              f"p99 {r['post_p99_ms']:.1f}  max {r['post_max_ms']:.1f}  mean {r['post_mean_ms']:.1f}")
        print(f"  GET /api/v1/next ms:   p50 {r['next_p50_ms']:.1f}  p99 {r['next_p99_ms']:.1f}")
        server, db = r["server_cpu_ms_per_label"], r["db_cpu_ms_per_label"]
        client = r["client_cpu_ms_per_label"]
        backends = f", PostgreSQL backends {db:.2f} ms" if r["backend"] == "postgresql" else ""
        print(f"  CPU per label: server {server:.2f} ms{backends}, clients {client:.2f} ms; all "
              f"together would fill 2 idle cores at about {2000 / (server + db + client):.0f} "
              "labels/s")
        print(f"  load average before {r['load_before'][0]:.2f} {r['load_before'][1]:.2f} "
              f"{r['load_before'][2]:.2f}, after {r['load_after'][0]:.2f} "
              f"{r['load_after'][1]:.2f} {r['load_after'][2]:.2f}")


if __name__ == "__main__":
    main()
