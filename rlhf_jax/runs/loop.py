"""The run-directory side of every training loop, shared by train_reward, train_sft and
train_policy (and so by the online loop's reward rounds).

A `TrainRun` is one attempt at a run in a workdir:
1. created after the config is validated: checks the config against the workdir's record
   (`record.check_resume`) before anything is created or restored;
2. `open(...)`: creates the workdir and opens its checkpoints; `starting()` wraps the start-up
   and removes a workdir this attempt created when the start-up fails;
3. `restore(...)`: the newest checkpoint that restores (broken newer ones are set aside), then
   the start is recorded (config.json once, a config_history.jsonl line each time) and the
   metric writer opened, trimmed to the restored step;
4. in the loop, `check` (each step's non-finite flags), `log`, `save` and `exit_if_stopped`
   apply the same rules everywhere: nothing is logged or saved before its step's check, a
   requested stop (SIGTERM, preemption, `stop_after`) saves and exits with `EXIT_STOPPED`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import jax
import ml_collections

from rlhf_jax import checkpointing, metrics as metrics_lib, paths, runtime
from rlhf_jax.runs import nonfinite, record

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"


class TrainRun:
    """One attempt at a training run in `workdir` (see the module docstring).

    Args:
        config: the validated run config.
        workdir: the run directory (local or `gs://`).
        trainer: the entry point's name, for messages and the history.
        ignore_sections: config sections this trainer does not read (their changes are not
            resume conflicts).

    Raises:
        record.ConfigChangedError: when the config differs from the workdir's record.
    """

    def __init__(self, config: ml_collections.ConfigDict, workdir: str, *, trainer: str,
                 ignore_sections: Iterable[str] = ()):
        self.config, self.workdir, self.trainer = config, workdir, trainer
        self.changes = record.check_resume(workdir, config, trainer=trainer,
                                           ignore_sections=ignore_sections)
        self.guard = nonfinite.NonFiniteGuard(trainer)
        self.ckpt: checkpointing.Checkpointer | None = None
        self.writer: metrics_lib.MetricWriter | None = None
        self.stop: runtime.StopSignal | None = None
        self.start_step = 0
        self._created: str | None = None

    def open(self, *, save_every: int, keep: int) -> checkpointing.Checkpointer:
        """Creates the workdir and opens `{workdir}/checkpoints`."""
        paths.makedirs(self.workdir)
        self.ckpt = checkpointing.Checkpointer(paths.join(self.workdir, CHECKPOINT_DIR),
                                               save_every=save_every, keep=keep)
        self.guard.checkpoint_dir = str(self.ckpt.directory)
        return self.ckpt

    @contextlib.contextmanager
    def starting(self) -> Iterator[None]:
        """Wraps the start-up (open, restore, initial state): when it fails in a workdir this
        attempt created, the directory is removed again, so a failed start leaves nothing.

        What "created" means is decided on entry: the topmost directory of the workdir's path
        that does not exist yet (none if the workdir exists, e.g. made by a reward stage that
        ran first and holds a model that must not be lost).
        """
        self._created = None
        if "://" not in self.workdir:
            top = os.path.abspath(self.workdir)
            while not os.path.exists(os.path.dirname(top)):
                top = os.path.dirname(top)
            self._created = None if os.path.exists(top) else top
        try:
            yield
        except BaseException:
            if self._created is not None:
                self.close()
                shutil.rmtree(self._created, ignore_errors=True)
                logger.info("%s: start-up failed; removed %s, which it had created",
                            self.trainer, self._created)
            raise
        self._created = None  # from here on the directory holds a run

    def restore(self, abstract_state: Any) -> tuple[Any, dict] | None:
        """Restores the newest good checkpoint, records this start and opens the metrics.

        Args:
            abstract_state: the restore target (`checkpointing.abstract_state(...)`).

        Returns:
            (state, meta) of the restored step, or None for a fresh start.
        """
        found = self.ckpt.restore_latest(abstract_state)
        step = None if found is None else found[0]
        record.record_start(self.workdir, self.config, trainer=self.trainer, step=step,
                            changes=self.changes)
        # A fresh run (-1) drops rows a crashed earlier attempt wrote before its first save.
        self.writer = metrics_lib.MetricWriter(
            self.workdir, tensorboard=self.config.get("tensorboard", True),
            resume_step=-1 if step is None else step, config=self.config)
        if found is None:
            return None
        logger.info("%s: resumed from step %d", self.trainer, step)
        return found[1], found[2]

    @contextlib.contextmanager
    def loop(self, start_step: int, *extra: contextlib.AbstractContextManager) -> Iterator[None]:
        """Wraps the step loop: stop signals, committing saves on error, the final check.

        Args:
            start_step: the step the loop starts from (for `stop_after`).
            *extra: more context managers to enter (a mesh context, a thread pool).
        """
        self.start_step = start_step
        try:
            with contextlib.ExitStack() as stack:
                stack.enter_context(self.ckpt.commit_on_error())
                self.stop = stack.enter_context(runtime.StopSignal())
                for cm in extra:
                    stack.enter_context(cm)
                yield
                self.guard.flush()
        except SystemExit:
            raise
        except BaseException:
            # Rows of the steps that passed their check reach the file before the error does.
            self.writer.close()
            raise

    def check(self, step: int, flags: jax.Array) -> None:
        """Records step `step`'s non-finite flags; checks the previous step's (one step late)."""
        self.guard.push(step, flags)

    def log(self, step: int, stats: Mapping[str, float]) -> None:
        """Writes metrics of step `step` after its non-finite check."""
        self.guard.flush()
        self.writer.write(step, stats)

    def save(self, step: int, state: Any, meta: Mapping[str, Any], *, force: bool = False,
             total: int | None = None) -> bool:
        """Saves on the interval, on a requested stop, or when forced; checks first.

        Also turns `stop_after` into a stop request once this attempt has run that many steps
        (unless `step` is the last, `total`).
        """
        stop_after = self.config.get("stop_after", 0)
        if stop_after and step - self.start_step >= stop_after and step != total:
            self.stop.request(f"stop_after={stop_after}")
        return self.ckpt.save(step, state, meta, force=force or self.stop.requested,
                              before_write=self.guard.flush)

    def exit_if_stopped(self, step: int) -> None:
        """After a requested stop was saved: waits for the write, closes and exits 3."""
        if not self.stop.requested:
            return
        self.ckpt.wait_until_finished()
        self.close()
        logger.warning("%s: stopped at step %d on %s; rerun the same command to resume",
                       self.trainer, step, self.stop.reason)
        raise SystemExit(runtime.EXIT_STOPPED)

    def close(self) -> None:
        """Waits for pending saves and closes the checkpoints and the metric writer."""
        if self.ckpt is not None:
            self.ckpt.close()
        if self.writer is not None:
            self.writer.close()
