"""Host-side metrics: JSONL + TensorBoard (+ optional W&B) writer, progress, and plots.

Jitted steps return flat dicts of scalar arrays keyed like the original repo
(`objective/kl`, `ppo/loss/policy`, ...). The loop fetches them on log steps and hands them to
`MetricWriter.write`, which refuses non-finite values before anything is written. Files live
in the workdir and are read through `etils.epath`, so `gs://` workdirs work too.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import io
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging
from etils import epath

from rlhf_jax import paths, runtime, wandb_logging

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"
TENSORBOARD_DIR = "tb"


class NonFiniteMetricError(FloatingPointError):
    """A metric was NaN or infinite; training should stop rather than log garbage."""


def _parse_lines(text: str, name: str) -> list[tuple[str, dict | None]]:
    """Splits JSONL text into (line, row) pairs; a torn last line gives row None.

    A last line without its newline that does not parse is an append cut short by a crash; it
    is kept out with a warning. Any other bad line raises, since that is real corruption.
    """
    lines = text.split("\n")
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append((line, json.loads(line)))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise ValueError(f"{name}: bad JSON on line {i + 1}: {line[:80]!r}") from None
            logging.warning("%s: ignoring a torn last line (%d chars)", name, len(line))
            out.append((line, None))
    return out


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Reads a JSON-lines file (skipping a torn last line, see `_parse_lines`).

    Args:
        path: Local or `gs://` path.

    Returns:
        One dict per line, in file order.
    """
    pairs = _parse_lines(epath.Path(path).read_text(), os.fspath(path))
    return [row for _, row in pairs if row is not None]


def _to_float(name: str, value: Any) -> float:
    array = np.asarray(value)  # Works for Python, numpy and (fetched) jax scalars alike.
    if array.size != 1:
        raise ValueError(f"metric {name!r} must be a scalar, got shape {array.shape}")
    return float(array.reshape(()))


def _json_default(obj: Any) -> Any:
    # numpy/jax scalars and arrays that end up in configs or reports.
    if hasattr(obj, "__array__"):
        return np.asarray(obj).tolist()
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


class _JsonlFile:
    """An append-only JSONL file that can be cut back to a step when a run resumes.

    Local files are appended to. An object store cannot append, so for `gs://` the whole
    text is kept in memory and rewritten (one atomic object write) on every append.
    """

    def __init__(self, path: str, resume_step: int | None):
        self._path, self._local, self._text = path, "://" not in path, ""
        exists = epath.Path(path).exists()
        if exists and (resume_step is not None or not self._local):
            self._text = epath.Path(path).read_text()
        if exists and resume_step is not None:
            pairs = _parse_lines(self._text, path)
            kept = [line for line, row in pairs if row is not None and row["step"] <= resume_step]
            text = "".join(line + "\n" for line in kept)
            if text != self._text:
                logging.info(
                    "%s: resuming after step %d: kept %d of %d rows",
                    path,
                    resume_step,
                    len(kept),
                    len(pairs),
                )
                runtime.atomic_write_text(path, text)
                self._text = text

    def append(self, lines: Sequence[str]) -> None:
        chunk = "".join(line + "\n" for line in lines)
        if self._local:
            with open(self._path, "a", encoding="utf-8") as f:
                f.write(chunk)
        else:
            self._text += chunk
            runtime.atomic_write_text(self._path, self._text)


class MetricWriter:
    """Writes scalar metrics to `{workdir}/metrics.jsonl` and TensorBoard (process 0 only).

    Values are converted and checked on every process, so a NaN stops all hosts alike; file
    writes happen on process 0 in a one-thread pool so a slow `gs://` write never stalls a
    step. `flush()` waits for the pool and re-raises any write error.

    Resuming: pass `resume_step` = the restored checkpoint's step (or -1 to start over in a
    workdir with no checkpoint). Rows with a larger step are removed, so the resumed run's
    files equal those of a run that was never interrupted, and TensorBoard hides its events.

    Args:
        workdir: Run directory (local or `gs://`), created if missing.
        tensorboard: Also write TensorBoard scalars to `{workdir}/tb`.
        resume_step: Keep only rows with `step <= resume_step`; None keeps everything.
        check_finite: Raise `NonFiniteMetricError` on NaN/inf values.
        log_metrics: Also log each row through absl at INFO.
        config: The run's config; a non-empty `config.wandb.project` also logs every row to
            Weights & Biases, with the whole config (see `wandb_logging`).
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        tensorboard: bool = True,
        resume_step: int | None = None,
        check_finite: bool = True,
        log_metrics: bool = True,
        config: Mapping[str, Any] | None = None,
    ):
        self._workdir = os.fspath(workdir)
        self._check_finite = check_finite
        self._log_metrics = log_metrics
        self._active = runtime.is_primary()
        self._tb = None
        self._wandb = None
        self._pending: list[concurrent.futures.Future] = []
        if not self._active:
            return
        paths.makedirs(self._workdir)  # GCS: nothing to make
        self._metrics = _JsonlFile(self._path(METRICS_FILE), resume_step)
        self._samples = _JsonlFile(self._path(SAMPLES_FILE), resume_step)
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="metrics")
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter

                purge = None if resume_step is None else resume_step + 1
                self._tb = SummaryWriter(
                    self._path(TENSORBOARD_DIR), purge_step=purge, flush_secs=30
                )
            except Exception as e:  # e.g. gs:// without google-cloud-storage installed.
                logging.warning("TensorBoard disabled: %s", e)
        config = config.to_dict() if hasattr(config, "to_dict") else config
        if wandb_logging.enabled(config):
            self._wandb = wandb_logging.WandbRun(self._workdir, config, resume_step=resume_step)

    def _path(self, name: str) -> str:
        return os.fspath(epath.Path(self._workdir) / name)

    def _submit(self, fn: Callable[..., None], *args: Any) -> None:
        done = [f for f in self._pending if f.done()]
        self._pending = [f for f in self._pending if not f.done()]
        for f in done:
            f.result()  # Surfaces an error from the writer thread at the next write.
        self._pending.append(self._pool.submit(fn, *args))

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Appends one row `{"step": step, **metrics}`.

        Args:
            step: Training step the values belong to.
            metrics: Name -> scalar (Python, numpy or jax); converted to float.

        Raises:
            NonFiniteMetricError: If a value is NaN or inf; nothing is written then.
        """
        step = int(step)
        values = {name: _to_float(name, v) for name, v in metrics.items()}
        if self._check_finite:
            bad = {k: v for k, v in values.items() if not math.isfinite(v)}
            if bad:
                raise NonFiniteMetricError(f"non-finite metrics at step {step}: {bad}")
        if not self._active:
            return
        if self._log_metrics:
            logging.info("step %d: %s", step, " ".join(f"{k}={v:.4g}" for k, v in values.items()))
        self._submit(self._metrics.append, [json.dumps({"step": step, **values})])
        if self._tb is not None:
            for name, value in values.items():
                self._tb.add_scalar(name, value, step)
        if self._wandb is not None:
            self._wandb.log(step, values)

    def write_samples(self, step: int, rows: Sequence[Mapping[str, Any]]) -> None:
        """Appends decoded query/response samples, one JSON line per row with its step.

        Args:
            step: Training step the samples come from.
            rows: Dicts such as `{"query": ..., "response": ..., "score": ...}`.
        """
        if not self._active:
            return
        lines = [json.dumps({"step": int(step), **row}, default=_json_default) for row in rows]
        self._submit(self._samples.append, lines)

    def write_json(self, name: str, obj: Any) -> str:
        """Writes `{workdir}/{name}` atomically (config.json, reports), on process 0.

        Args:
            name: File name inside the workdir.
            obj: JSON-serializable object (numpy/jax values are converted).

        Returns:
            The file's path.
        """
        path = self._path(name)
        if self._active:
            text = json.dumps(obj, indent=2, default=_json_default) + "\n"
            runtime.atomic_write_text(path, text)
        return path

    def flush(self) -> None:
        """Waits for pending writes (re-raising their errors) and flushes TensorBoard."""
        if not self._active:
            return
        for f in self._pending:
            f.result()
        self._pending = []
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        """Flushes and releases the writer; safe to call twice."""
        if not self._active:
            return
        try:
            self.flush()
        finally:
            self._pool.shutdown(wait=True)
            if self._tb is not None:
                self._tb.close()
                self._tb = None
            if self._wandb is not None:
                self._wandb.close()
                self._wandb = None
            self._active = False

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _fmt(value: Any) -> str:
    if isinstance(value, (bool, np.bool_, int, np.integer, str)):
        return str(value)
    try:
        return f"{float(value):.3g}"
    except (TypeError, ValueError):
        return str(value)


class Progress:
    """Prints plain progress lines with rate and ETA, fit for non-TTY logs (no carriage return).

    The rate counts only steps done since this object was created, so a resumed run reports
    its real speed rather than (restored step / a few seconds). Only process 0 prints.
    Example: `train_policy 120/1954 (6.1%) | 2.31 step/s | 1.18e+03 episodes/s | ETA 0:13:14`.

    Args:
        total: Step count at which the run is done.
        start: Step the run starts (or resumes) from.
        desc: Prefix of each line, e.g. "train_policy".
        unit: Name of one step in the rate ("step" gives "step/s").
        log_every_seconds: Minimum seconds between lines (the last step always prints).
        print_fn: Where lines go; default `print(..., flush=True)`.
        items_per_step: Extra rates, e.g. `{"episodes": 512}` adds "... episodes/s".
        clock: Seconds source; tests pass a fake one.
    """

    def __init__(
        self,
        total: int,
        *,
        start: int = 0,
        desc: str = "",
        unit: str = "step",
        log_every_seconds: float = 10.0,
        print_fn: Callable[[str], None] | None = None,
        items_per_step: Mapping[str, float] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.total, self._start, self._desc, self._unit = int(total), int(start), desc, unit
        self._every = float(log_every_seconds)
        self._print = print_fn or (lambda line: print(line, flush=True))
        self._items = dict(items_per_step or {})
        self._clock = clock
        self._t0 = self._now = clock()
        self._step = self._start
        self._last_print: float | None = None
        self._primary = runtime.is_primary()

    @property
    def rate(self) -> float | None:
        """Steps per second since start, or None before any step has been timed."""
        elapsed = self._now - self._t0
        done = self._step - self._start
        return done / elapsed if done > 0 and elapsed > 0 else None

    @property
    def eta_seconds(self) -> float | None:
        """Seconds left at the current rate (0 when done), or None if the rate is unknown."""
        if self._step >= self.total:
            return 0.0
        rate = self.rate
        return None if rate is None else (self.total - self._step) / rate

    def format_line(self, **extra: Any) -> str:
        """The line for the last `update`, with `extra` appended as `key=value`."""
        pct = 100.0 * self._step / self.total if self.total else 100.0
        head = f"{self._step}/{self.total} ({pct:.1f}%)"
        parts = [f"{self._desc} {head}" if self._desc else head]
        rate = self.rate
        parts.append(f"{'?' if rate is None else _fmt(rate)} {self._unit}/s")
        for name, per_step in self._items.items():
            parts.append(f"{'?' if rate is None else _fmt(rate * per_step)} {name}/s")
        eta = self.eta_seconds
        parts.append("ETA " + ("?" if eta is None else str(datetime.timedelta(seconds=round(eta)))))
        if extra:
            parts.append(" ".join(f"{k}={_fmt(v)}" for k, v in extra.items()))
        return " | ".join(parts)

    def update(self, step: int, **extra: Any) -> bool:
        """Records that `step` steps are done and prints a line if one is due.

        Args:
            step: Steps completed so far (absolute, not since resume).
            **extra: Metrics to show at the end of the line, e.g. `score=0.41`.

        Returns:
            Whether a line was printed.
        """
        self._step, self._now = int(step), self._clock()
        last = self._last_print
        due = last is None or self._now - last >= self._every or self._step >= self.total
        if not (due and self._primary):
            return False
        self._last_print = self._now
        self._print(self.format_line(**extra))
        return True


def plot_metrics(
    metrics_path: str | os.PathLike,
    out_png: str | os.PathLike,
    *,
    x: str = "step",
    ys: Sequence[str] = ("objective/score", "objective/kl"),
    title: str | None = None,
) -> str:
    """Plots curves from a metrics.jsonl into a PNG, one subplot per metric.

    Uses matplotlib's object API with the Agg canvas, so no display or global pyplot state is
    involved. Keys missing from the file are skipped.

    Args:
        metrics_path: A JSONL file as written by `MetricWriter`.
        out_png: Destination PNG (written atomically).
        x: Key for the x axis.
        ys: Keys to plot.
        title: Figure title; defaults to the metrics file name.

    Returns:
        The PNG path.

    Raises:
        ValueError: If none of `ys` occurs in the file.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = read_jsonl(metrics_path)
    present = [y for y in ys if any(y in row and x in row for row in rows)]
    if not present:
        raise ValueError(f"none of {list(ys)} (with x={x!r}) found in {metrics_path}")
    fig = Figure(figsize=(6.4, 2.6 * len(present)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(present), 1, sharex=True, squeeze=False)[:, 0]
    for ax, y in zip(axes, present, strict=True):
        xs, vs = zip(*[(row[x], row[y]) for row in rows if x in row and y in row], strict=True)
        ax.plot(xs, vs, marker="." if len(xs) < 50 else None)
        ax.set_ylabel(y)
        ax.grid(True, alpha=0.3)
    axes[-1].set_xlabel(x)
    fig.suptitle(title if title is not None else os.fspath(metrics_path))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    runtime.atomic_write_bytes(out_png, buf.getvalue())
    return os.fspath(out_png)
