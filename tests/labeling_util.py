"""Shared helpers of the labeling tests: comparisons, PostgreSQL databases, a live server.

PostgreSQL tests read RLHF_JAX_TEST_POSTGRES_URL (`.ci/run` starts a throwaway cluster, see
`.ci/postgres.sh`); the browser test needs /usr/bin/chromium. On a developer machine without
them those tests skip; with RLHF_JAX_CI=1 (set by `.ci/run`) they fail instead, so CI can
never skip them silently.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid

import httpx2
import pytest
import sqlalchemy as sa

from rlhf_jax.labeling.records import TaskIdentity

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PG_ENV = "RLHF_JAX_TEST_POSTGRES_URL"
CHROMIUM = "/usr/bin/chromium"
# A small synthetic task: token ids need only be in range (the store never decodes them).
TASK = TaskIdentity(tokenizer="gpt2", query_length=8, response_length=6, num_samples=4)
PAD = TASK.pad_id


def in_ci() -> bool:
    """True under `.ci/run`."""
    return os.environ.get("RLHF_JAX_CI") == "1"


def require(condition: bool, what: str) -> None:
    """Skips the test when `condition` is false, or fails it in CI."""
    if condition:
        return
    if in_ci():
        pytest.fail(f"{what} is missing, and RLHF_JAX_CI=1 forbids skipping (see .ci/run)")
    pytest.skip(f"{what} is missing")


def comparison(i: int, *, prefix: str = "c", kind: str = "train", best: int | None = None,
               samples: list[str] | None = None, extra: dict | None = None,
               query: str | None = None) -> dict:
    """A valid comparison record of TASK with key f"{prefix}{i}"."""
    record = {
        "key": f"{prefix}{i}", "kind": kind, "task": "sentiment",
        "query": query or f"Query number {i}.",
        "query_tokens": [10 + i % 1000, 11, 12, 13, PAD, PAD, PAD, PAD],
        "samples": samples or [f"sample {k} of {i}" for k in range(4)],
        "sample_tokens": [[100 + k, 101, 102, PAD, PAD, PAD] for k in range(4)],
        "provenance": [{"source": "policy" if k < 2 else "reference", "step": 3} for k in range(4)],
    }
    if best is not None:
        record["best"] = best
    if extra is not None:
        record["extra"] = extra
    return record


def postgres_admin_url() -> str | None:
    """The test cluster's URL, or None."""
    return os.environ.get(PG_ENV) or None


@contextlib.contextmanager
def fresh_postgres_db():
    """A new, empty PostgreSQL database for one test; dropped afterwards."""
    admin_url = postgres_admin_url()
    require(admin_url is not None, f"PostgreSQL ({PG_ENV})")
    name = "t_" + uuid.uuid4().hex[:12]
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield sa.engine.make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@contextlib.contextmanager
def store_url(backend: str, tmp_path):
    """A fresh store URL on "sqlite" (a file under tmp_path) or "postgres"."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'labels.sqlite'}"
    else:
        with fresh_postgres_db() as url:
            yield url


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """`python -m rlhf_jax.label_server serve` in a subprocess on 127.0.0.1."""

    def __init__(self, db: str, log_path, *, lease_s: float = 600.0, workers: int = 1,
                 gold_every: int = 10):
        self.db, self.log_path = db, str(log_path)
        self.lease_s, self.workers, self.gold_every = lease_s, workers, gold_every
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self, timeout: float = 60.0) -> LiveServer:
        """Starts the server and waits for /healthz."""
        cmd = [sys.executable, "-m", "rlhf_jax.label_server", "serve", "--db", self.db,
               "--port", str(self.port), "--lease_s", str(self.lease_s),
               "--workers", str(self.workers), "--gold_every", str(self.gold_every)]
        log = open(self.log_path, "a")
        # start_new_session: a kill -9 of the group takes uvicorn's worker processes too.
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"label server exited with {self.proc.returncode}:\n"
                                   + open(self.log_path).read()[-3000:])
            try:
                if httpx2.get(self.url + "/healthz", timeout=1.0).status_code == 200:
                    return self
            except httpx2.TransportError:
                pass
            time.sleep(0.1)
        self.kill()
        raise RuntimeError("label server did not start:\n" + open(self.log_path).read()[-3000:])

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Sends `sig` to the server's process group and waits for it."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=30)
        self.proc = None

    def __enter__(self) -> LiveServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.kill(signal.SIGTERM)
