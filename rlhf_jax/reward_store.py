"""A finished reward model on disk (spec §3): `reward_model/` (params) + `reward_model.json`.

Written by train_reward at the end of a run and read by train_policy (and the quickstart). The
JSON holds the GPT-2 config, the task settings the model was trained for, the label type, the
final metrics and the params' checksums, which a load verifies. Loading is read-only.
"""

from __future__ import annotations

import json

import jax
from jax.experimental import multihost_utils

from rlhf_jax import checkpointing, experiment, models, paths, runtime, sharding
from rlhf_jax.data import tasks

REWARD_MODEL_DIR = "reward_model"
REWARD_MODEL_META = "reward_model.json"
_REQUIRED = ("gpt2_config", "task_spec", "label_type")


class RewardModelError(ValueError):
    """A reward model directory is missing or malformed; the message names the file."""


def save_reward_model(workdir: str, params, gpt_cfg: models.GPT2Config, spec: tasks.TaskSpec,
                      label_type: str, extra: dict | None = None) -> str:
    """Writes a final reward model (params only) and its metadata, as train_policy loads it.

    Args:
        workdir: the train_reward workdir.
        params: the reward model's params (sharded jax arrays).
        gpt_cfg: its GPT-2 config.
        spec: the task settings it was trained for.
        label_type: the label type's name.
        extra: more JSON fields (the final metrics).

    Returns:
        The params directory.
    """
    path = paths.join(workdir, REWARD_MODEL_DIR)
    digests = checkpointing.save_params(path, params)
    meta = {
        "gpt2_config": dict(vars(gpt_cfg)),
        "task_spec": experiment.spec_dict(spec),
        "label_type": label_type,
        "checksums": digests,
        **(extra or {}),
    }
    if runtime.is_primary():  # the params above are saved by every process (orbax needs all)
        runtime.atomic_write_text(paths.join(workdir, REWARD_MODEL_META),
                                  json.dumps(meta, indent=2, sort_keys=True))
    if jax.process_count() > 1:  # no process may load the model before the metadata exists
        multihost_utils.sync_global_devices("save_reward_model")
    return path


def read_meta(path: str) -> dict:
    """The `reward_model.json` of a train_reward workdir, checked for its required fields.

    Raises:
        FileNotFoundError: when the workdir holds no finished reward model.
        RewardModelError: naming the file when it is not valid JSON or lacks a field.
    """
    meta_path = paths.join(path, REWARD_MODEL_META)
    if not paths.isfile(meta_path):
        raise FileNotFoundError(
            f"rewards.trained_model={path!r}: no trained reward model there (expected "
            f"{REWARD_MODEL_META} and {REWARD_MODEL_DIR}/ written by train_reward)")
    try:
        meta = json.loads(paths.read_text(meta_path))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RewardModelError(f"{meta_path}: not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise RewardModelError(f"{meta_path}: expected a JSON object, got {type(meta).__name__}")
    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
        raise RewardModelError(f"{meta_path}: missing field(s) {missing}")
    return meta


def load_reward_model(path: str, mesh, rules, expected_spec: tasks.TaskSpec | None = None):
    """Loads a train_reward workdir's final model onto `mesh` (FSDP-sharded), read-only.

    Args:
        path: the train_reward workdir (holding `reward_model/` and `reward_model.json`).
        mesh, rules: where to put the params.
        expected_spec: if given, the reward model's task settings must match (as the original
            asserts the RM's task hparams equal the policy's).

    Returns:
        (params, GPT2Config, meta dict).

    Raises:
        FileNotFoundError, RewardModelError: for a missing or malformed model (naming the file).
        ValueError: when the task settings differ from `expected_spec`.
        checkpointing.CheckpointCorruptError: when the params do not restore or verify.
    """
    meta = read_meta(path)
    meta_path = paths.join(path, REWARD_MODEL_META)
    try:
        gpt_cfg = models.GPT2Config(**meta["gpt2_config"])
    except (TypeError, ValueError) as err:
        raise RewardModelError(f"{meta_path}: bad gpt2_config ({err})") from None
    if expected_spec is not None:
        got, want = meta["task_spec"], experiment.spec_dict(expected_spec)
        diff = {k: (got.get(k), want[k]) for k in want if got.get(k) != want[k]}
        if diff:
            raise ValueError(
                f"rewards.trained_model={path!r} was trained for other task settings: "
                + ", ".join(f"{k}: reward model {a!r} vs policy {b!r}" for k, (a, b) in diff.items()))
    shardings = sharding.param_shardings(gpt_cfg, ("reward",), mesh, rules)
    abstract = jax.eval_shape(lambda: models.init_params(gpt_cfg, jax.random.key(0), ("reward",)))
    params = checkpointing.load_params(paths.join(path, REWARD_MODEL_DIR),
                                       checkpointing.abstract_state(abstract, shardings),
                                       checksums=meta.get("checksums"))
    return params, gpt_cfg, meta
