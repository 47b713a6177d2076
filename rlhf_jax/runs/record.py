"""The record of what ran in a workdir, and the resume check against it.

`config.json` is the config a workdir was started with; it is written once and never
overwritten. Every start and every resume appends one line to `config_history.jsonl`: the time,
the trainer, the step it resumed from, the full config and the fields that changed. A resume
compares the new config with the last recorded one (the history's last line, else config.json)
field by field. Only the fields in `MUTABLE_ON_RESUME` may differ; any other difference refuses
the run with the list of `--config.` paths and values, unless `--config.allow_config_change=True`
says the change is meant, and then the change is recorded. Any field not listed there, including
fields added to the configs later, counts as changing the run's meaning. (The original saved
its hyperparameters once beside its checkpoints, spec §3.2 step 6 and §6.2, and `sample.py`
reloaded them from there.)
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any

import ml_collections
from etils import epath

from rlhf_jax import runtime

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
HISTORY_FILE = "config_history.jsonl"
ALLOW_FIELD = "allow_config_change"

# Fields that may differ between the start of a run and a resume. A name ending in ".*" covers
# a whole section. Everything else must match.
MUTABLE_ON_RESUME = (
    # What is logged and when, and where it goes: not what is computed.
    "log_every", "samples_per_log", "tensorboard", "rewards.log_every", "sft.log_every",
    "wandb.*",
    # Checkpoint cadence and time slicing.
    "ckpt_every", "ckpt_keep", "stop_after", "sft.ckpt_every",
    # The same data at another place (copied to a local disk, or to a bucket). The run cannot
    # tell whether it is the same data; a change is logged and recorded in the history.
    "task.query_data_dir", "sft.data_dir", "labels.path", "model.checkpoint",
    "rewards.trained_model",
    # The label store of an online run at another address (the store itself is the record of
    # what was asked and answered), and how often it is polled.
    "online.server", "online.db", "online.token_env", "online.poll_s",
    # The device layout: checkpoints restore onto any mesh, and rematerialisation trades memory
    # for compute without changing the maths.
    "mesh.*", "sharding_rules", "model.remat",
    # The override itself.
    ALLOW_FIELD,
)
_PATH_FIELDS = ("task.query_data_dir", "sft.data_dir", "labels.path", "model.checkpoint",
                "rewards.trained_model")
_ABSENT = "<absent>"
_KNOWN_SECTIONS = ("model", "task", "rewards", "labels", "labeler", "ppo", "sft")


class ConfigChangedError(ValueError):
    """A resume asked for a config that differs from the recorded one in meaningful fields."""


class RunRecordError(ValueError):
    """config.json or config_history.jsonl cannot be read; the message names the file."""


@dataclasses.dataclass(frozen=True)
class Change:
    """One differing field: its dotted path and the recorded and new values (or `_ABSENT`)."""

    path: str
    stored: Any
    current: Any

    def __str__(self) -> str:
        return f"--config.{self.path}: {self.stored!r} recorded, {self.current!r} now"

    def to_json(self) -> dict:
        return {"field": self.path, "recorded": self.stored, "now": self.current}


def _jsonable(value: Any) -> Any:
    if isinstance(value, ml_collections.ConfigDict):
        value = value.to_dict()

    def default(x):
        if hasattr(x, "__array__") or hasattr(x, "item"):
            import numpy as np

            return np.asarray(x).tolist()
        raise TypeError(f"not JSON serializable: {type(x).__name__}")

    return json.loads(json.dumps(value, default=default))


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as {"ppo.kl.coef": value}; lists are values, not sections."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def is_mutable(path: str) -> bool:
    """Whether `path` may change on resume (see `MUTABLE_ON_RESUME`)."""
    return any(path == m or (m.endswith(".*") and path.startswith(m[:-1]))
               for m in MUTABLE_ON_RESUME)


@functools.cache
def _defaults() -> dict[str, tuple]:
    """Every default value a field can have, from the section builders of `config_lib`."""
    from rlhf_jax import config_lib

    top = ml_collections.ConfigDict()
    config_lib.runtime_config(top)
    sections = {"model": [config_lib.model_config()],  # the keys are _KNOWN_SECTIONS
                "task": [config_lib.books_task(), config_lib.summarize_task()],
                "rewards": [config_lib.reward_config()], "labels": [config_lib.labels_config()],
                "labeler": [config_lib.labeler_config()], "ppo": [config_lib.ppo_config()],
                "sft": [config_lib.sft_config()]}
    out: dict[str, list] = {}
    for path, value in flatten(_jsonable(top)).items():
        out.setdefault(path, []).append(value)
    for name, builders in sections.items():
        for built in builders:
            for path, value in flatten(_jsonable(built), f"{name}.").items():
                out.setdefault(path, []).append(value)
    return {k: tuple(v) for k, v in out.items()}


def _section_default(path: str) -> tuple:
    """Defaults of a section `config_lib` builds as `<section>_config()` (e.g. a later
    `online_config`), for sections the table in `_defaults` does not name."""
    from rlhf_jax import config_lib

    section, _, rest = path.partition(".")
    builder = getattr(config_lib, f"{section}_config", None)
    if not rest or builder is None or section in _KNOWN_SECTIONS:
        return ()
    try:
        built = flatten(_jsonable(builder()))
    except TypeError:  # a builder that needs arguments
        return ()
    return (built[rest],) if rest in built else ()


def is_default(path: str, value: Any) -> bool:
    """Whether `value` is a default of field `path` in the current code."""
    return value in _defaults().get(path, ()) or value in _section_default(path)


def config_changes(stored: Mapping[str, Any], current: Mapping[str, Any],
                   ignore_sections: Iterable[str] = ()) -> list[Change]:
    """The fields of `current` that differ from `stored` and may not change on resume.

    A field absent from the stored config but present now with its default value counts as
    equal: it was added to the code after the run started, and its default keeps the old
    behaviour (the rule for new options in this project), so the run means the same. A field
    absent now but recorded (removed or renamed in the code) counts as a change.

    Args:
        stored: the recorded config (nested dicts, as read from JSON).
        current: this run's config (nested dicts or a ConfigDict).
        ignore_sections: top-level sections this trainer does not read (e.g. "ppo" for
            train_reward); their changes cannot change its run.

    Returns:
        The differing fields, sorted by path.
    """
    a, b = flatten(_jsonable(stored)), flatten(_jsonable(current))
    ignore = set(ignore_sections)
    out = []
    for path in sorted(set(a) | set(b)):
        if is_mutable(path) or path.split(".")[0] in ignore:
            continue
        if path not in a:
            if not is_default(path, b[path]):
                out.append(Change(path, _ABSENT, b[path]))
        elif path not in b:
            out.append(Change(path, a[path], _ABSENT))
        elif a[path] != b[path]:
            out.append(Change(path, a[path], b[path]))
    return out


def _read(path: epath.Path) -> str | None:
    return path.read_text() if path.exists() else None


def recorded_config(workdir: str) -> dict | None:
    """The last recorded config of `workdir` (history's last line, else config.json), or None.

    Raises:
        RunRecordError: naming the file and line that cannot be parsed.
    """
    history = epath.Path(workdir) / HISTORY_FILE
    text = _read(history)
    if text and text.strip():
        last_line = text.rstrip("\n").rsplit("\n", 1)[-1]
        lineno = text.rstrip("\n").count("\n") + 1
        try:
            return json.loads(last_line)["config"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise RunRecordError(f"{history}:{lineno}: not a config record ({err}); fix or "
                                 f"remove the line to resume this workdir") from None
    path = epath.Path(workdir) / CONFIG_FILE
    text = _read(path)
    if text is None:
        return None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as err:
        raise RunRecordError(f"{path}: not valid JSON (line {err.lineno}: {err.msg}); it records "
                             "the config this workdir was started with") from None
    if not isinstance(config, dict):
        raise RunRecordError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a run in `workdir` last ran with, for readers such as `sample`.

    Raises:
        FileNotFoundError: when the workdir holds no config record.
        RunRecordError: when the record cannot be read.
    """
    config = recorded_config(workdir)
    if config is None:
        raise FileNotFoundError(f"{os.path.join(workdir, CONFIG_FILE)}: not found; --workdir must "
                                "be a run directory of train_policy, train_reward or train_sft")
    return ml_collections.ConfigDict(config)


def check_resume(workdir: str, config: ml_collections.ConfigDict, *, trainer: str,
                 ignore_sections: Iterable[str] = ()) -> list[Change]:
    """Compares `config` with the workdir's record before anything is restored or written.

    Args:
        workdir: the run directory.
        config: this run's config.
        trainer: the entry point, for messages.
        ignore_sections: sections this trainer does not read.

    Returns:
        The meaningful changes (empty for a new workdir or an unchanged config); non-empty only
        when `config.allow_config_change` is True.

    Raises:
        ConfigChangedError: listing every differing `--config.` field, unless allowed.
    """
    stored = recorded_config(workdir)
    if stored is None:
        return []
    current = _jsonable(config)
    for path in _PATH_FIELDS:
        old, new = flatten(stored).get(path, _ABSENT), flatten(current).get(path, _ABSENT)
        if old != _ABSENT and old != new:
            logger.warning("%s: --config.%s changed from %r to %r; resuming on the "
                                         "understanding that it holds the same data", trainer,
                                         path, old, new)
    changes = config_changes(stored, current, ignore_sections)
    if changes and not config.get(ALLOW_FIELD, False):
        listed = "\n  ".join(map(str, changes))
        raise ConfigChangedError(
            f"{trainer}: {workdir} was run with another config; these fields differ from its "
            f"record ({CONFIG_FILE} / {HISTORY_FILE}):\n  {listed}\nRerun with the recorded "
            f"values, use a new --workdir, or pass --config.{ALLOW_FIELD}=True to resume with "
            f"these changes (they are recorded in {HISTORY_FILE}). Fields that may change on "
            f"resume: {', '.join(MUTABLE_ON_RESUME)}")
    if changes:
        logger.warning("%s: resuming with changed fields (%s=True): %s", trainer,
                                     ALLOW_FIELD, "; ".join(map(str, changes)))
    return changes


def record_start(workdir: str, config: ml_collections.ConfigDict, *, trainer: str,
                 step: int | None, changes: list[Change]) -> None:
    """Writes config.json if absent and appends this start to config_history.jsonl.

    Only process 0 writes. Both files are written atomically (the history is rewritten whole,
    which also works on object stores that cannot append).

    Args:
        workdir: the run directory (it exists).
        config: this run's config.
        trainer: the entry point ("train_reward", ...).
        step: the checkpoint step resumed from, or None for a fresh start.
        changes: the allowed changes (from `check_resume`).
    """
    if not runtime.is_primary():
        return
    current = _jsonable(config)
    root = epath.Path(workdir)
    if not (root / CONFIG_FILE).exists():
        runtime.atomic_write_text(str(root / CONFIG_FILE),
                                  json.dumps(current, indent=2, sort_keys=True) + "\n")
    entry = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "trainer": trainer, "event": "start" if step is None else "resume", "step": step,
             "changes": [c.to_json() for c in changes], "config": current}
    text = _read(root / HISTORY_FILE) or ""
    runtime.atomic_write_text(str(root / HISTORY_FILE), text + json.dumps(entry, sort_keys=True) + "\n")
