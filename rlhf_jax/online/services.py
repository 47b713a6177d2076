"""A label server and mock label workers as background processes, for the online quickstart
(spec §5.3): the whole online loop on one machine through the same HTTP API people use.

`label_services(...)` adds an admin labeler (the trainer) and one bot per worker to the store,
starts `python -m rlhf_jax.label_server serve` on a free loopback port, waits for `/healthz`,
starts the workers (`python -m rlhf_jax.label_worker`, tokens passed in the environment, never
on the command line), and on exit stops them with SIGTERM (a worker gives back the comparison it
holds) and then the server, waiting for each.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

logger = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen, name: str, timeout: float = 30.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        logger.warning("%s did not stop in %.0f s after SIGTERM: killing it", name, timeout)
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def label_services(store_dir: str, *, labeler: str = "vader", num_workers: int = 2,
                   delay_s: float = 0.0, noise: float = 0.0,
                   timeout_s: float = 60.0) -> Iterator[tuple[str, str]]:
    """Runs a label server on `store_dir` and `num_workers` mock labelers.

    Args:
        store_dir: the store's directory (labels.sqlite in it; created if missing).
        labeler: the workers' mock labeler ("vader", "copying", "rouge").
        num_workers: mock workers, each its own bot labeler.
        delay_s: each worker's reading time per comparison.
        noise: each worker's probability of a random pick.
        timeout_s: how long to wait for the server to answer /healthz.

    Yields:
        (the server's URL, an admin token for the trainer).
    """
    import httpx2

    from rlhf_jax.labeling.store import LabelStore

    store = LabelStore.open(workdir=store_dir)
    tag = uuid.uuid4().hex[:6]  # a rerun adds new labelers: old tokens were shown only once
    try:
        admin = store.add_labeler(f"trainer-{tag}", admin=True)
        bots = [store.add_labeler(f"mock-{labeler}-{i}-{tag}", bot=True)
                for i in range(num_workers)]
    finally:
        store.close()
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log_dir = os.path.join(store_dir, "logs")
    os.makedirs(log_dir, exist_ok=True)
    procs: list[tuple[str, subprocess.Popen]] = []

    def start(name: str, cmd: list[str], env: dict | None = None) -> subprocess.Popen:
        with open(os.path.join(log_dir, f"{name}.log"), "a") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                    env={**os.environ, **(env or {})})
        procs.append((name, proc))
        return proc

    try:
        server = start("server", [sys.executable, "-m", "rlhf_jax.label_server", "serve",
                                  "--workdir", store_dir, "--port", str(port)])
        deadline = time.monotonic() + timeout_s
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"the label server exited ({server.returncode}); see "
                                   f"{log_dir}/server.log")
            with contextlib.suppress(httpx2.TransportError):
                if httpx2.get(url + "/healthz", timeout=1.0).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the label server did not answer in {timeout_s:.0f} s; see "
                                   f"{log_dir}/server.log")
            time.sleep(0.2)
        for i, token in enumerate(bots):
            start(f"worker{i}", [sys.executable, "-m", "rlhf_jax.label_worker", "--server", url,
                                 "--labeler", labeler, "--delay_s", str(delay_s), "--noise",
                                 str(noise), "--seed", str(i), "--poll_s", "0.2"],
                  env={"RLHF_JAX_LABEL_TOKEN": token})
        logger.info("label server %s with %d mock %s workers (logs in %s)", url, num_workers,
                    labeler, log_dir)
        yield url, admin
    finally:
        for name, proc in reversed(procs):  # workers first, then the server
            _stop(proc, name)
