"""Optional Weights & Biases logging, beside metrics.jsonl and TensorBoard (architecture §3.8).

Turned on by `--config.wandb.project=NAME` (empty, the default, means off); `wandb` is an
optional dependency (`pip install 'rlhf_jax[wandb]'`). `metrics.MetricWriter` hands every row it
writes to `WandbRun.log` with the same metric names and step, and the run's whole config goes
to the W&B run's config. `config.wandb.mode` ("online", "offline", "disabled"; empty = wandb's
default or WANDB_MODE) and WANDB_* environment variables work as wandb documents.

Resuming: the run id is kept in `{workdir}/wandb_run_id.txt`, so a resumed training run
continues the same W&B run (`resume="allow"`). W&B accepts only increasing steps, so rows the
resumed run writes again for steps it had already logged before the interruption are dropped
by W&B; they equal the dropped ones, since a resumed run reproduces the uninterrupted metrics.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from typing import Any

from etils import epath

from rlhf_jax import paths, runtime

RUN_ID_FILE = "wandb_run_id.txt"


def enabled(config: Mapping | None) -> bool:
    """Whether a run config asks for W&B logging (`config.wandb.project` non-empty)."""
    section = (config or {}).get("wandb") or {}
    return bool(section.get("project"))


class WandbRun:
    """One W&B run for one workdir (process 0 only; `MetricWriter` decides that)."""

    def __init__(self, workdir: str, config: Mapping[str, Any], *, resume_step: int | None):
        """Starts (or resumes) the W&B run of `workdir`.

        Args:
            workdir: the run directory; local workdirs also hold W&B's own files (`wandb/`).
            config: the run's config as a dict, with a `wandb` section (project, entity,
                name, group, mode); all of it is logged as the W&B config.
            resume_step: as `MetricWriter`: None or >= 0 continues the run id kept in the
                workdir; -1 (a fresh start) begins a new W&B run.

        Raises:
            ImportError: when wandb is not installed, saying how to install it or turn it off.
        """
        try:
            import wandb
        except ImportError as e:
            raise ImportError(
                "config.wandb.project is set but wandb is not installed: "
                "pip install 'rlhf_jax[wandb]', or pass --config.wandb.project= to turn W&B "
                "logging off") from e
        settings = dict(config["wandb"])
        id_path = epath.Path(workdir) / RUN_ID_FILE
        if id_path.exists() and (resume_step is None or resume_step >= 0):
            run_id = id_path.read_text().strip()
        else:
            run_id = secrets.token_hex(4)  # W&B ids: lowercase letters and digits
            runtime.atomic_write_text(os.fspath(id_path), run_id + "\n")
        local = "://" not in os.fspath(workdir)
        self.run = wandb.init(
            project=settings["project"],
            entity=settings.get("entity") or None,
            name=settings.get("name") or paths.basename(workdir),
            group=settings.get("group") or None,
            mode=settings.get("mode") or None,
            id=run_id,
            resume="allow",
            dir=os.fspath(workdir) if local else None,
            config=dict(config),
        )
        self.run_id = run_id

    def log(self, step: int, values: Mapping[str, float]) -> None:
        """Logs one metrics row under its training step."""
        self.run.log(dict(values), step=int(step))

    def close(self) -> None:
        """Finishes the run (flushes it to the server, or to the offline run directory)."""
        self.run.finish()
