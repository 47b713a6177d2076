"""Tests for rlhf_jax.runtime: distributed init gate, logging, stop signals, atomic writes."""

import logging
import os
import re
import signal
import stat
import time

import jax
import pytest
from absl import logging as absl_logging

from rlhf_jax import runtime


def _wait_for(predicate, timeout=2.0):
    # A signal sent with os.kill is handled by the main thread at its next bytecode boundary;
    # with JAX's threads around, give it a moment rather than assuming it is synchronous.
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.01)
    return predicate()


@pytest.fixture
def fake_distributed(monkeypatch):
    calls = []
    state = {"up": False}

    def initialize():
        calls.append(1)
        state["up"] = True

    monkeypatch.setattr(jax.distributed, "initialize", initialize)
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: state["up"])
    monkeypatch.setattr(runtime, "_distributed_done", False)
    return calls


def test_distributed_not_initialized_without_env(monkeypatch, fake_distributed):
    monkeypatch.delenv(runtime.DISTRIBUTED_ENV, raising=False)
    assert runtime.maybe_initialize_distributed() is False
    monkeypatch.setenv(runtime.DISTRIBUTED_ENV, "0")
    assert runtime.maybe_initialize_distributed() is False
    assert fake_distributed == []


def test_distributed_initialized_once(monkeypatch, fake_distributed):
    monkeypatch.setenv(runtime.DISTRIBUTED_ENV, "1")
    assert runtime.maybe_initialize_distributed() is True
    assert runtime.maybe_initialize_distributed() is True
    assert fake_distributed == [1]


def test_is_primary_on_single_process():
    assert runtime.is_primary()


def test_setup_logging_writes_timestamped_file(tmp_path):
    try:
        runtime.setup_logging(tmp_path)
        runtime.setup_logging(tmp_path)  # Idempotent: still one file handler.
        # Libraries that log through absl (orbax: every stage of every save) stay at warnings;
        # our own modules log at INFO.
        absl_logging.info("library chatter")
        absl_logging.warning("library warning")
        logging.getLogger("rlhf_jax.test").info("hello from rlhf_jax")
    finally:
        runtime.setup_logging(None)  # Detach the file handler for the other tests.
    text = (tmp_path / runtime.LOG_FILE_NAME).read_text()
    assert text.count("hello from rlhf_jax") == 1
    assert "library chatter" not in text
    assert "library warning" in text
    # absl prefix: level letter, MMDD, HH:MM:SS.micros.
    assert re.search(r"^I\d{4} \d\d:\d\d:\d\d\.\d{6} .*hello from rlhf_jax", text, re.M)


def test_stop_signal_sigterm_sets_flag_and_restores_handlers():
    sentinel = lambda signum, frame: None  # noqa: E731
    before = signal.signal(signal.SIGTERM, sentinel)
    try:
        with runtime.StopSignal() as stop:
            assert not stop.requested and stop.reason is None
            os.kill(os.getpid(), signal.SIGTERM)
            assert _wait_for(lambda: stop.requested)
            assert stop.reason == "SIGTERM"
        assert signal.getsignal(signal.SIGTERM) is sentinel
    finally:
        signal.signal(signal.SIGTERM, before)


def test_stop_signal_second_sigint_interrupts():
    with runtime.StopSignal() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert _wait_for(lambda: stop.requested)
        assert stop.reason == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            _wait_for(lambda: False, timeout=1.0)


def test_stop_signal_leaves_sigterm_to_jax_when_distributed(monkeypatch):
    # JAX's preemption service owns SIGTERM once the distributed runtime is up.
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    before = signal.getsignal(signal.SIGTERM)
    with runtime.StopSignal():
        assert signal.getsignal(signal.SIGTERM) is before
        assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler


def test_atomic_write_creates_parents_and_replaces(tmp_path):
    path = tmp_path / "a" / "b" / "config.json"
    runtime.atomic_write_text(path, "one")
    runtime.atomic_write_text(path, "two")
    assert path.read_text() == "two"
    assert os.listdir(path.parent) == ["config.json"]  # No temp files left behind.
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    runtime.atomic_write_bytes(str(path), b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"


def test_atomic_write_failure_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "report.json"
    runtime.atomic_write_text(path, "old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        runtime.atomic_write_text(path, "new")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["report.json"]


def test_request_stop_reaches_open_stop_signals_only():
    with runtime.StopSignal() as first:
        runtime.request_stop("preemption")
        assert first.requested and first.reason == "preemption"
    second = runtime.StopSignal()
    second.close()
    runtime.request_stop("preemption")  # Closed: no longer listening.
    assert not second.requested
