"""Process-level plumbing for entry points: distributed init, logging, stop signals, file writes.

Nothing here touches model math. The train loops call these once at start-up (logging,
distributed runtime), poll `StopSignal` once per step, and use the atomic writers for every
small non-orbax file (config.json, reports, rewritten metrics) so a crash never leaves a torn
file behind.
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
import threading
import weakref
from collections.abc import Iterable

import jax
from absl import logging as absl_logging
from etils import epath

DISTRIBUTED_ENV = "RLHF_JAX_DISTRIBUTED"
# An explicit cluster (CPU/GPU hosts, or several processes on one machine in tests): the
# coordinator's host:port, the process count, this process's id and, optionally, the local
# device ids this process drives (comma-separated; GPU only, CPU takes its device count from
# XLA_FLAGS / jax_num_cpu_devices).
COORDINATOR_ENV = "RLHF_JAX_COORDINATOR"
NUM_PROCESSES_ENV = "RLHF_JAX_NUM_PROCESSES"
PROCESS_ID_ENV = "RLHF_JAX_PROCESS_ID"
LOCAL_DEVICES_ENV = "RLHF_JAX_LOCAL_DEVICES"
# Cross-process collectives for the CPU backend (JAX's default is "gloo" too, but an explicit
# setting keeps a changed default, or a site-wide `JAX_CPU_COLLECTIVES_IMPLEMENTATION`, from
# turning CPU collectives off silently).
CPU_COLLECTIVES = "gloo"
LOG_FILE_NAME = "train.log"
# Exit status of a training run that stopped early on request (SIGTERM, preemption, stop_after)
# after saving a checkpoint: rerunning the same command resumes it.
EXIT_STOPPED = 3

_distributed_lock = threading.Lock()
_umask_lock = threading.Lock()
_distributed_done = False
_file_handler: logging.Handler | None = None
_active_stops: weakref.WeakSet[StopSignal] = weakref.WeakSet()


def explicit_cluster_args() -> dict | None:
    """`jax.distributed.initialize` arguments from the RLHF_JAX_COORDINATOR/... variables.

    Returns:
        None when `RLHF_JAX_COORDINATOR` is unset (TPU auto-detection or no cluster), else
        the keyword arguments.

    Raises:
        ValueError: naming the variable, when one is missing or malformed.
    """
    coordinator = os.environ.get(COORDINATOR_ENV, "")
    if not coordinator:
        return None
    if ":" not in coordinator:
        raise ValueError(f"{COORDINATOR_ENV}={coordinator!r}: expected host:port")
    args: dict = {"coordinator_address": coordinator}
    for env, key in ((NUM_PROCESSES_ENV, "num_processes"), (PROCESS_ID_ENV, "process_id")):
        value = os.environ.get(env, "")
        try:
            args[key] = int(value)
        except ValueError:
            raise ValueError(f"{COORDINATOR_ENV} is set, so {env} must be an integer, "
                             f"got {value!r}") from None
    if not 0 <= args["process_id"] < args["num_processes"]:
        raise ValueError(f"{PROCESS_ID_ENV}={args['process_id']} not in "
                         f"[0, {NUM_PROCESSES_ENV}={args['num_processes']})")
    local = os.environ.get(LOCAL_DEVICES_ENV, "")
    if local:
        try:
            args["local_device_ids"] = [int(d) for d in local.split(",")]
        except ValueError:
            raise ValueError(f"{LOCAL_DEVICES_ENV}={local!r}: expected comma-separated "
                             "integers") from None
    return args


def maybe_initialize_distributed() -> bool:
    """Starts the JAX distributed runtime when asked to by the environment, at most once.

    Two ways, both set by a launcher:
    - `RLHF_JAX_DISTRIBUTED=1` (TPU VMs): `jax.distributed.initialize()` with no arguments,
      auto-detecting the cluster. TPU VMs need it on every worker, single-host ones too: it is
      what starts JAX's preemption service, which orbax's `reached_preemption` (and so
      save-on-preemption) depends on. `launch/run_tpu.sh` sets the variable.
    - `RLHF_JAX_COORDINATOR=host:port` with `RLHF_JAX_NUM_PROCESSES`, `RLHF_JAX_PROCESS_ID`
      and optionally `RLHF_JAX_LOCAL_DEVICES` (see `explicit_cluster_args`): an explicit
      CPU/GPU cluster; CPU cross-process collectives (gloo) are switched on first.
    Local single-process runs set neither. Must run before anything else touches JAX devices.

    Returns:
        True when the runtime is initialized (by this call or an earlier one), else False.
    """
    global _distributed_done
    explicit = explicit_cluster_args()
    if explicit is None and os.environ.get(DISTRIBUTED_ENV, "") != "1":
        return False
    with _distributed_lock:
        # `jax.distributed.initialize` raises when called twice; another library may also have
        # called it already, so check JAX's own state too.
        if not _distributed_done and not jax.distributed.is_initialized():
            if explicit is None:
                jax.distributed.initialize()
            else:
                # Read when the CPU backend is created, so it must be set before that.
                jax.config.update("jax_cpu_collectives_implementation", CPU_COLLECTIVES)
                jax.distributed.initialize(**explicit)
        _distributed_done = True
    return True


def is_primary() -> bool:
    """Whether this is process 0, the one that writes non-orbax files and prints progress."""
    return jax.process_index() == 0


def _is_local(path: str | os.PathLike) -> bool:
    return "://" not in os.fspath(path)


def setup_logging(workdir: str | os.PathLike | None = None, *, level: str = "info") -> None:
    """Routes absl and stdlib logging to stderr with timestamps, plus a log file on process 0.

    Idempotent: calling it again (a second run in the same test process) replaces the file
    handler rather than adding another. The file is `{workdir}/train.log`, appended to, so the
    attempts of a resumed run stay in one file. It is opened only once the trainer has created
    the workdir (after the config is validated); lines logged before are kept in memory and
    written first, and a start-up that fails validation leaves no directory behind. For `gs://`
    workdirs no file is written: an object cannot be appended to, and the launcher already
    captures stderr on each worker.

    Args:
        workdir: Run directory, or None for stderr only.
        level: absl verbosity name ("debug", "info", "warning", ...).
    """
    global _file_handler
    # The absl handler prefixes every line with level, date, time, thread id and file:line.
    absl_logging.use_absl_handler()
    # Libraries logging through absl (orbax logs every stage of every save at INFO) are kept at
    # warnings; our own modules log at `level`.
    absl_logging.set_verbosity(level if level == "debug" else "warning")
    logging.getLogger("rlhf_jax").setLevel(level.upper())
    # An entry point run with `python -m rlhf_jax.train_reward` logs as "__main__".
    logging.getLogger("__main__").setLevel(level.upper())
    root = logging.getLogger()
    if _file_handler is not None:
        root.removeHandler(_file_handler)
        _file_handler.close()
        _file_handler = None
    if workdir is None or not _is_local(workdir) or not is_primary():
        return
    handler = _WorkdirLogHandler(os.fspath(workdir))
    handler.setFormatter(absl_logging.PythonFormatter())
    root.addHandler(handler)
    _file_handler = handler


class _WorkdirLogHandler(logging.Handler):
    """Appends to `{workdir}/train.log` once the workdir exists; holds records until then."""

    _MAX_HELD = 10_000

    def __init__(self, workdir: str):
        super().__init__()
        self._workdir, self._held, self._file = workdir, [], None

    def emit(self, record: logging.LogRecord) -> None:
        if self._file is None:
            if not os.path.isdir(self._workdir):
                if len(self._held) < self._MAX_HELD:
                    self._held.append(record)
                return
            self._file = logging.FileHandler(os.path.join(self._workdir, LOG_FILE_NAME), "a",
                                             "utf-8")
            self._file.setFormatter(self.formatter)
            for held in self._held:
                self._file.emit(held)
            self._held = []
        self._file.emit(record)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        super().close()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes `data` so readers see the old file or the new one, never a partial one.

    Local paths: write a temp file in the same directory (same filesystem, so the rename is
    atomic), fsync, then `os.replace`. `gs://` and other remote paths: a single object write,
    which is atomic in GCS. Parent directories are created.

    Args:
        path: Destination file path.
        data: Full file contents.
    """
    if not _is_local(path):
        # One upload, atomic in GCS; no parent "directories" to make (GCS has none).
        epath.Path(path).write_bytes(data)
        return
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        # mkstemp creates the file 0600; give it the mode open() would, under the user's umask.
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # Leave no stray temp file when the write or rename fails.
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def current_umask() -> int:
    """The process's umask, read without changing it (Linux), else by setting and restoring."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    with _umask_lock:  # os.umask can only be read by setting it
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def apply_umask(path: str | os.PathLike) -> None:
    """Gives a file or directory the mode `open`/`os.makedirs` would have, under the umask.

    For what libraries create private (0600/0700): `tempfile.mkdtemp`, safetensors' writer.
    """
    base = 0o777 if os.path.isdir(path) else 0o666
    os.chmod(path, base & ~current_umask())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """UTF-8 text version of `atomic_write_bytes`.

    Args:
        path: Destination file path.
        text: Full file contents.
    """
    atomic_write_bytes(path, text.encode("utf-8"))


class StopSignal:
    """Turns SIGTERM/SIGINT into a flag so the train loop can checkpoint and exit cleanly.

    The handler only records the signal; the loop polls `requested` after each step, saves a
    checkpoint (`force=True`), waits for it and exits. A second SIGINT while a stop is
    already pending raises KeyboardInterrupt, so an impatient Ctrl-C still works.

    When the JAX distributed runtime is up, SIGTERM is left alone by default: JAX installs a
    native SIGTERM handler for its preemption service, and replacing it with a Python one would
    silently switch off orbax's `reached_preemption` (checked: the sync point then never
    fires). Instead `Checkpointer.save` calls `request_stop("preemption")` at the step where
    orbax saved for the preemption, so `requested` covers both paths.

    Usage:
        with runtime.StopSignal() as stop:
            for step in ...:
                ...
                ckpt.save(step, state, meta, force=stop.requested)
                if stop.requested: ...  # wait_until_finished(), exit
    """

    def __init__(self, signals: Iterable[int] | None = None):
        """Installs the handlers (main thread only).

        Args:
            signals: Signals to catch. Default: SIGINT, plus SIGTERM unless the JAX distributed
                runtime is initialized (see the class docstring).
        """
        if signals is None:
            signals = [signal.SIGINT]
            if not jax.distributed.is_initialized():
                signals.append(signal.SIGTERM)
        self._reason: str | None = None
        self._previous: dict[int, object] = {}
        for signum in signals:
            self._previous[signum] = signal.signal(signum, self._handle)
        _active_stops.add(self)

    def _handle(self, signum, frame):
        del frame
        if self._reason is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.request(signal.Signals(signum).name)

    def request(self, reason: str) -> None:
        """Asks the loop to stop, as a caught signal would.

        Args:
            reason: Shown in logs and `reason`, e.g. "SIGTERM" or "preemption".
        """
        if self._reason is None:
            self._reason = reason
            absl_logging.warning("Stop requested (%s): stopping after the current step.", reason)

    @property
    def requested(self) -> bool:
        """True once a caught signal (or `request`) has asked for a stop."""
        return self._reason is not None

    @property
    def reason(self) -> str | None:
        """What asked for the stop ("SIGTERM", "SIGINT", "preemption"), or None."""
        return self._reason

    def close(self) -> None:
        """Restores the handlers that were installed before this object."""
        for signum, previous in self._previous.items():
            # None means a handler not installed from Python; SIG_DFL is the closest we can do.
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}
        _active_stops.discard(self)

    def __enter__(self) -> StopSignal:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def request_stop(reason: str) -> None:
    """Sets `requested` on every open `StopSignal` (used on a preemption notice).

    Args:
        reason: Why, e.g. "preemption".
    """
    for stop in list(_active_stops):
        stop.request(reason)
