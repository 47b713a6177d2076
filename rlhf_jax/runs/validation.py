"""Start-up checks of a run's config, one function per config section, before any model is built.

Every entry point (train_reward, train_sft, train_policy, label, sample) calls the sections it
reads through `validate` first, so a bad value fails in a second, naming the `--config.` path
and the value, instead of as a ZeroDivisionError after minutes of sampling. Sizes and counts
must be positive, enumerations known, batches divisible over the mesh, and output locations
writable. Each section function takes the whole config (cross-section rules such as
`labels.num_train % rewards.batch_size` live with the section that divides). The original
validated its hyperparameters before launching too (spec §6.2 step 4: typeguard checks plus
class-specific asserts, e.g. >= 8 rollouts per whitening group, §4.1).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from typing import Any

import ml_collections

from rlhf_jax import label_types, models, optim, paths, scorers, sharding
from rlhf_jax.runs.errors import ConfigError
from rlhf_jax.runs.errors import config_value as _get
# The file and storage checks are imported from here by every entry point.
from rlhf_jax.runs.locations import (  # noqa: F401
    MODEL_INPUTS,
    check_flag_count,
    check_output_file,
    check_storage,
    check_workdir,
)

# How the mock labeler treats samples that fail the validity check (`labeler.invalid_samples`).
INVALID_SAMPLES = ("resample", "keep")

ConfigDict = ml_collections.ConfigDict


def _fail(path: str, value: Any, why: str) -> None:
    sep = " " if why.startswith("is ") else ": "  # "...=60 is not divisible", "...=0: must be"
    raise ConfigError(f"--config.{path}={value!r}{sep}{why}")


def _ints(config: ConfigDict, minimum: int, *paths: str) -> None:
    for path in paths:
        value = _get(config, path)
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(path, value, "must be an integer")
        if value < minimum:
            _fail(path, value, f"must be >= {minimum}")


def _floats(config: ConfigDict, low: float, high: float, *paths: str,
            low_open: bool = False) -> None:
    for path in paths:
        value = _get(config, path)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(
                value):
            _fail(path, value, "must be a finite number")
        if value < low or value > high or (low_open and value == low):
            _fail(path, value, f"must be in {'(' if low_open else '['}{low}, {high}]")


def _choice(config: ConfigDict, path: str, choices: Iterable[str]) -> None:
    value, choices = _get(config, path), tuple(choices)
    if value not in choices:
        _fail(path, value, f"expected one of {', '.join(map(repr, choices))}")


def _divisible(path: str, value: int, mesh) -> None:
    try:
        sharding.check_batch_divisible(path, value, mesh)
    except ValueError as err:
        raise ConfigError(f"--config.{err}") from None


# --- Sections -----------------------------------------------------------------------------------


def check_runtime(config: ConfigDict) -> None:
    """Logging, checkpoint cadence, stop_after and the mesh's axis sizes."""
    _ints(config, 1, "log_every", "ckpt_every", "ckpt_keep")
    _ints(config, 0, "samples_per_log", "stop_after")
    for axis in ("data", "fsdp"):
        value = config.mesh[axis]
        if not isinstance(value, int) or (value < 1 and value != -1):
            _fail(f"mesh.{axis}", value, "must be >= 1, or -1 for every remaining device")


def check_model(config: ConfigDict) -> None:
    """The GPT-2 preset, compute dtype and init seed."""
    try:
        models.preset(config.model.preset)
    except ValueError as err:
        _fail("model.preset", config.model.preset, str(err))
    try:  # GPT2Config knows the supported compute dtypes
        models.preset(config.model.preset, dtype=config.model.dtype)
    except ValueError as err:
        _fail("model.dtype", config.model.dtype, str(err))
    _ints(config, 0, "model.init_seed")


def check_task(config: ConfigDict) -> None:
    """Query and response lengths, truncation, temperature, query source sizes."""
    _ints(config, 1, "task.query_length", "task.response_length")
    _ints(config, 0, "task.truncate_after", "task.query_max_texts", "task.query_shuffle_seed")
    _floats(config, 0.0, math.inf, "task.temperature", low_open=True)
    _floats(config, -math.inf, math.inf, "task.penalty_reward_value")
    if config.task.truncate_token is not None:
        _ints(config, 0, "task.truncate_token")


def check_labels(config: ConfigDict, *, need_path: bool = True) -> None:
    """Label type, counts and (for reward training) the label file."""
    try:
        label_types.get_label_type(config.labels.type)
    except ValueError as err:
        _fail("labels.type", config.labels.type, str(err))
    _ints(config, 1, "labels.num_train")
    _ints(config, 0, "labels.num_valid")
    if need_path and not config.labels.path:
        _fail("labels.path", config.labels.path,
              "give a label file (see `python -m rlhf_jax.label`)")


def check_labeler(config: ConfigDict, mesh=None) -> None:
    """The mock labeler of `python -m rlhf_jax.label`."""
    check_labels(config, need_path=False)
    if not isinstance(label_types.get_label_type(config.labels.type), label_types.BestOfN):
        _fail("labels.type", config.labels.type, "mock labelers write best_of_N labels")
    _choice(config, "labeler.kind", scorers.SCORER_KINDS)
    _floats(config, 0.0, math.inf, "labeler.temperature")
    _ints(config, 1, "labeler.rollout_batch_size")
    _ints(config, 0, "labeler.query_offset", "labeler.seed", "labeler.copy_ngram")
    if "invalid_samples" in config.labeler:
        _choice(config, "labeler.invalid_samples", INVALID_SAMPLES)
        _ints(config, 0, "labeler.resample_rounds")
    if mesh is not None:
        _divisible("labeler.rollout_batch_size", config.labeler.rollout_batch_size, mesh)


def check_rewards(config: ConfigDict, mesh=None) -> None:
    """Reward-model training (also reads labels.num_train, which one epoch splits in batches)."""
    r = config.rewards
    check_reward_kind(config)
    _ints(config, 1, "rewards.batch_size", "rewards.rollout_batch_size", "rewards.log_every")
    _ints(config, 0, "rewards.normalize_samples", "rewards.verify_samples")
    if (r.normalize_before or r.normalize_after) and r.normalize_samples < 1:
        _fail("rewards.normalize_samples", r.normalize_samples,
              "must be >= 1 while rewards.normalize_before/after is on")
    _floats(config, 0.0, math.inf, "rewards.lr")
    _floats(config, 0.0, math.inf, "rewards.adam_eps", low_open=True)
    _choice(config, "rewards.adam_style", optim.ADAM_STYLES)
    _choice(config, "rewards.lr_schedule", optim.REWARD_LR_KINDS)
    # The label file is checked by who reads it (train_reward, or train_policy before its reward
    # stage): an online round gets its labels from a store instead.
    check_labels(config, need_path=False)
    if mesh is not None:
        _divisible("rewards.batch_size", r.batch_size, mesh)
        _divisible("rewards.rollout_batch_size", r.rollout_batch_size, mesh)
    if config.labels.num_train % r.batch_size:
        _fail("labels.num_train", config.labels.num_train,
              f"is not divisible by rewards.batch_size={r.batch_size} (one epoch uses every "
              "label exactly once)")


# What PPO maximises (`rewards.kind`): a learned reward model, or the mock labeler's scorer
# directly (`rlhf_jax.direct_reward`, the paper's baseline).
REWARD_KINDS = ("learned", "labeler")


def reward_kind(config: ConfigDict) -> str:
    """`config.rewards.kind`; "learned" in configs written before the field existed."""
    return config.rewards.get("kind", "learned")


def check_reward_kind(config: ConfigDict) -> None:
    """`rewards.kind` must be one of `REWARD_KINDS`."""
    if "kind" in config.rewards:
        _choice(config, "rewards.kind", REWARD_KINDS)


def check_direct_scorer(config: ConfigDict) -> None:
    """With `rewards.kind="labeler"`, the task must name a mock labeler scorer.

    Raises:
        ConfigError: naming `--config.rewards.kind`, `--config.labeler.kind` and the known
            scorers.
    """
    known = ", ".join(scorers.SCORER_KINDS)
    kind = config.labeler.get("kind") if "labeler" in config else None
    if kind not in scorers.SCORER_KINDS:
        where = ("the config has no labeler section" if "labeler" not in config
                 else f"--config.labeler.kind={kind!r} is not one")
        raise ConfigError(
            f"--config.rewards.kind='labeler' scores responses with the task's mock labeler "
            f"scorer, but {where}; known scorers: {known} (set --config.labeler.kind=..., or "
            f"--config.rewards.kind=learned for a reward model)")


def check_reward_source(config: ConfigDict) -> None:
    """What a PPO run scores with: an existing train_reward workdir, labels to train on, or
    (`rewards.kind="labeler"`) the task's mock labeler scorer directly."""
    check_reward_kind(config)
    if reward_kind(config) == "labeler":  # no reward model, no labels
        check_direct_scorer(config)
        return
    trained = config.rewards.trained_model
    if trained and not paths.is_remote(trained) and not os.path.isdir(trained):
        _fail("rewards.trained_model", trained, "does not exist")
    if not trained:  # train_policy trains a reward model from the label file first
        check_labels(config, need_path=True)


def check_ppo(config: ConfigDict, mesh=None) -> None:
    """PPO sizes, coefficients, the KL controller and the batch splits over the mesh."""
    from rlhf_jax import ppo_trainer  # imports the networks; only needed for the mesh rules

    _ints(config, 1, "ppo.total_episodes", "ppo.batch_size", "ppo.nminibatches",
          "ppo.noptepochs", "ppo.whiten_groups", "ppo.kl.horizon")
    _floats(config, 0.0, math.inf, "ppo.lr", "ppo.vf_coef", "ppo.max_grad_norm", "ppo.kl.coef",
            *(["ppo.ent_coef"] if "ent_coef" in config.ppo else []))
    _floats(config, 0.0, math.inf, "ppo.cliprange", "ppo.cliprange_value", "ppo.adam_eps",
            "ppo.kl.target", low_open=True)
    _floats(config, 0.0, 1.0, "ppo.gamma", "ppo.lam")
    _choice(config, "ppo.adam_style", optim.ADAM_STYLES)
    _choice(config, "ppo.value_model", ("shared", "separate"))
    if mesh is not None:
        try:
            ppo_trainer.check_ppo_config(config.ppo, mesh,
                                         config.model.get("micro_batch_size", 0))
        except ValueError as err:
            msg = str(err)  # the micro-batch checks name their --config. path themselves
            raise ConfigError(msg if msg.startswith("--config.") else f"--config.{msg}") from None


ONLINE_SCHEDULES = ("linear", "paper")
ONLINE_INVALID = ("drop", "keep")


def check_online(config: ConfigDict, mesh=None) -> None:
    """The online loop (spec §5.3): where the label store is, and a schedule that fits.

    Only when `online.enabled`; the label store itself is checked (reached, token, task) by
    `rlhf_jax.online` before any training.
    """
    if "online" not in config or not config.online.enabled:
        return
    o = config.online
    for path in ("online.server", "online.db", "online.token_env"):
        if not isinstance(_get(config, path), str):
            _fail(path, _get(config, path), "must be a string")
    if bool(o.server) == bool(o.db):
        _fail("online.server", o.server, "give exactly one of --config.online.server (a label "
              f"server's URL) and --config.online.db (a store), got db={o.db!r}")
    if o.server and not o.server.startswith(("http://", "https://")):
        _fail("online.server", o.server, "expected an http:// or https:// URL")
    if o.server and not o.token_env:
        _fail("online.token_env", o.token_env, "name the environment variable holding the "
              "label server's admin token")
    _choice(config, "online.schedule", ONLINE_SCHEDULES)
    _choice(config, "online.invalid_samples", ONLINE_INVALID)
    _ints(config, 1, "online.rm_rounds", "online.initial_labels", "online.total_labels",
          "online.query_every")
    _ints(config, 0, "online.query_offset")
    _floats(config, 0.0, 1.0, "online.validation_fraction", "online.overlap")
    _floats(config, 0.0, 3600.0, "online.poll_s", low_open=True)
    for path in ("online.wait", "online.warm"):
        if not isinstance(_get(config, path), bool):
            _fail(path, _get(config, path), "must be True or False")
    if not isinstance(label_types.get_label_type(config.labels.type), label_types.BestOfN):
        _fail("labels.type", config.labels.type, "online comparisons are best_of_N")
    if o.total_labels < o.initial_labels:
        _fail("online.total_labels", o.total_labels,
              f"must be >= online.initial_labels={o.initial_labels}")
    from rlhf_jax.online import schedule  # pure arithmetic: its errors name the fields

    try:
        schedule.round_label_counts(o.initial_labels, o.total_labels, o.rm_rounds,
                                    config.rewards.batch_size)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if mesh is not None:
        n = label_types.get_label_type(config.labels.type).num_samples
        if config.ppo.batch_size % n:
            _fail("ppo.batch_size", config.ppo.batch_size, f"is not divisible by {n}: online "
                  f"comparisons take ppo.batch_size / {n} fresh queries per sampling")


SFT_MODES = ("lm", "summarize")
SFT_LR_SCHEDULES = ("constant", "linear", "cosine")


def check_sft(config: ConfigDict, mesh=None) -> None:
    """Supervised fine-tuning: mode, schedule, sizes (the data source is checked when read)."""
    _choice(config, "sft.mode", SFT_MODES)
    _choice(config, "sft.lr_schedule", SFT_LR_SCHEDULES)
    _ints(config, 1, "sft.steps", "sft.batch_size", "sft.log_every", "sft.ckpt_every")
    _ints(config, 0, "sft.eval_batches", "sft.warmup_steps")
    _floats(config, 0.0, math.inf, "sft.lr")
    _floats(config, 0.0, math.inf, "sft.adam_eps", low_open=True)
    _choice(config, "sft.adam_style", optim.ADAM_STYLES)
    if mesh is not None:
        _divisible("sft.batch_size", config.sft.batch_size, mesh)
    if config.sft.mode == "lm":
        n_positions = models.preset(config.model.preset).n_positions
        if not 2 <= config.sft.seq_len <= n_positions:
            _fail("sft.seq_len", config.sft.seq_len, f"must be in [2, n_positions={n_positions}]")


SECTIONS = {"runtime": check_runtime, "model": check_model, "task": check_task,
            "labels": check_labels, "labeler": check_labeler, "rewards": check_rewards,
            "ppo": check_ppo, "sft": check_sft, "online": check_online}
_MESH_SECTIONS = ("labeler", "rewards", "ppo", "sft", "online")


def validate(config: ConfigDict, sections: Iterable[str], mesh=None) -> None:
    """Runs the named section checks in order.

    Args:
        config: the run config.
        sections: names from `SECTIONS` ("runtime", "model", "task", "rewards", ...).
        mesh: the device mesh, for the divisibility rules (None skips them).

    Raises:
        ConfigError: naming the first invalid `--config.` path and its value.
    """
    for name in sections:
        if name in _MESH_SECTIONS:
            SECTIONS[name](config, mesh)
        else:
            SECTIONS[name](config)


def validate_with_mesh(config: ConfigDict, sections: Iterable[str]):
    """`validate` with the run's mesh: checks the other sections, builds the mesh from
    `config.mesh`, then checks the sections with divisibility rules.

    Returns:
        (mesh, rules) as `experiment.mesh_and_rules` gives them.
    """
    from rlhf_jax import experiment  # builds the mesh; imports the models

    sections = list(sections)
    validate(config, [s for s in sections if s not in _MESH_SECTIONS])
    mesh, rules = experiment.mesh_and_rules(config)
    validate(config, [s for s in sections if s in _MESH_SECTIONS], mesh)
    return mesh, rules
