"""Building a run from its config: model, weights, tokenizer, task, queries, mesh.

Shared by `train_reward`, `train_policy`, `label` and `sample`, so that every entry point
interprets a config the same way.
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from rlhf_jax import models, paths, sharding
from rlhf_jax.data import query_sources, summarization, tasks
from rlhf_jax.models import hf_import

logger = logging.getLogger(__name__)


def gpt2_config(config: ml_collections.ConfigDict) -> models.GPT2Config:
    """The GPT2Config of the run's initial model (shapes from the preset).

    Raises:
        ValueError: `model.dtype` is not "float32" or "bfloat16", naming the flag.
    """
    m = config.model
    if m.dtype not in models.gpt2.DTYPES:
        raise ValueError(f"--config.model.dtype={m.dtype!r}: expected one of "
                         f"{', '.join(models.gpt2.DTYPES)} (float32: true float32 matmuls as the "
                         "original; bfloat16: bfloat16 matmuls with float32 master params)")
    return models.preset(m.preset, dtype=m.dtype, remat=m.remat)


def initial_trunk(config: ml_collections.ConfigDict, gpt_cfg: models.GPT2Config):
    """The pretrained trunk params every network starts from (spec §1.4).

    From `config.model.checkpoint` (an HF GPT-2 directory or hub name), or, when it is "",
    a random GPT-2 init from `config.model.init_seed`. The seed is not the run seed, so the
    reward model and the policy of one experiment start from the same "pretrained" weights.

    Returns:
        The `transformer` sub-tree, float32 numpy arrays.
    """
    m = config.model
    if m.checkpoint:
        _, params = hf_import.load_hf_checkpoint(m.checkpoint, expected=gpt_cfg)
        logger.info("initial model: %s (%s)", m.checkpoint, m.preset)
        return params["transformer"]
    logger.info("initial model: random %s GPT-2 (init_seed=%d)", m.preset, m.init_seed)
    params = jax.jit(lambda k: models.init_params(gpt_cfg, k))(jax.random.key(m.init_seed))
    return jax.tree.map(_to_host, params["transformer"])


def _to_host(a: jax.Array) -> np.ndarray:
    """The whole value of `a` on every process. Traced under a multi-process mesh (an online
    run's reward round), the init's outputs span other processes' devices; every process runs
    this, so gathering them is one collective."""
    if a.is_fully_addressable:
        return np.asarray(a)
    return np.asarray(multihost_utils.process_allgather(a, tiled=True))


def reward_trunk(config: ml_collections.ConfigDict, gpt_cfg: models.GPT2Config, policy_trunk):
    """The trunk the reward model starts from: `config.rewards.init`.

    "policy" (the original): the policy's initial model (`policy_trunk`). "random": a random
    GPT-2 init (`model.init_seed`). Anything else: an HF GPT-2 directory of the same shapes.
    "random" is for tiny CPU models: a tiny model fine-tuned for a minute on books (the
    quickstart's initial policy) gives features from which a reward model learned nothing in
    our runs (held-out accuracy at chance), while a random trunk learned the labels.
    """
    init = config.rewards.get("init", "policy")
    if init == "policy":
        return policy_trunk
    m = config.model
    if init == "random":
        logger.info("reward model trunk: random %s GPT-2 (init_seed=%d)", m.preset, m.init_seed)
        params = jax.jit(lambda k: models.init_params(gpt_cfg, k))(jax.random.key(m.init_seed))
        return jax.tree.map(np.asarray, params["transformer"])
    _, params = hf_import.load_hf_checkpoint(init, expected=gpt_cfg)
    logger.info("reward model trunk: %s", init)
    return params["transformer"]


def with_heads(trunk, gpt_cfg: models.GPT2Config, heads, rng: jax.Array):
    """A param tree: the given trunk plus freshly initialised heads."""
    fresh = jax.jit(lambda k: models.init_params(gpt_cfg, k, heads))(rng)
    out = {k: v for k, v in fresh.items() if k != "transformer"}
    out["transformer"] = trunk
    return out


def tokenizer(config: ml_collections.ConfigDict):
    from rlhf_jax.tokenizer import get_tokenizer

    return get_tokenizer(config.model.tokenizer)


def _optional_text(value: str | None) -> str | None:
    # `--config.task.end_text=None` arrives as the string "None" (the field is typed str so
    # that it can be set from the command line at all); it means "no end text".
    return None if value in (None, "None") else value


def task_spec(config: ml_collections.ConfigDict, tok, gpt_cfg: models.GPT2Config) -> tasks.TaskSpec:
    """The token-level task settings; texts such as start_text are encoded here."""
    t = config.task
    spec = tasks.make_task_spec(
        tok,
        query_length=t.query_length,
        response_length=t.response_length,
        start_text=_optional_text(t.start_text),
        end_text=_optional_text(t.end_text),
        query_prefix=t.query_prefix,
        query_suffix=t.query_suffix,
        pad_id=gpt_cfg.pad_id,
        truncate_token=t.truncate_token,
        truncate_after=t.truncate_after,
        penalty_reward_value=t.penalty_reward_value,
        temperature=t.temperature,
    )
    total = spec.context_length + spec.response_length
    if total > gpt_cfg.n_positions:
        raise ValueError(
            f"task: context {spec.context_length} + response {spec.response_length} = {total} "
            f"tokens exceed the model's n_positions={gpt_cfg.n_positions}"
        )
    return spec


def query_source(config: ml_collections.ConfigDict) -> str:
    """`config.task.query_dataset`, with a bare "labels:" meaning the run's `labels.path`."""
    name = config.task.query_dataset
    if name == query_sources.LABELS_PREFIX:
        if not config.labels.path:
            raise ValueError("task.query_dataset='labels:' takes the queries of labels.path, "
                             "which is empty; set --config.labels.path or use labels:PATH")
        return name + config.labels.path
    return name


def text_query_spec(config: ml_collections.ConfigDict, spec: tasks.TaskSpec) -> tasks.TaskSpec:
    """The spec that turns `query_texts` into queries with `tasks.make_query`.

    A `labels:` source's texts are finished queries (the task's start/end rules were applied
    when the labels were made), so applying those rules again would cut them; they are off.
    """
    if query_source(config).startswith(query_sources.LABELS_PREFIX):
        return dataclasses.replace(spec, start_token=None, end_token=None)
    return spec


def query_texts(config: ml_collections.ConfigDict, split: str = "train") -> list[str]:
    """The raw texts of `config.task.query_dataset`: a book corpus, a file, the articles of
    a summarization source ("tfds:reddit", "tfds:cnn_dailymail", "jsonl:...", "builtin:lead"),
    a text corpus ("text:PATH") or a label file's decoded queries ("labels:PATH")."""
    t = config.task
    return summarization.corpus_texts(query_source(config), split, t.get("query_data_dir", ""),
                                      t.get("query_max_texts", 0))


def query_dataset(config: ml_collections.ConfigDict, tok, spec: tasks.TaskSpec,
                  split: str = "train") -> tasks.QueryDataset:
    """The query stream of `config.task.query_dataset`, a pure function of (seed, step).

    A `labels:` source's queries are used as the label file stores them (same token ids as the
    reward model was trained on); every other source's texts go through the task's rules.

    Raises:
        ValueError: naming `task.query_dataset` and the split when no text makes a query.
    """
    name, seed = query_source(config), config.task.query_shuffle_seed
    if name.startswith(query_sources.LABELS_PREFIX):
        queries = query_sources.label_file_queries(
            name[len(query_sources.LABELS_PREFIX):], split, query_length=spec.query_length,
            vocab_size=len(tok), pad_id=spec.pad_id)
        return tasks.QueryDataset.from_queries(queries, spec, shuffle_seed=seed)
    texts = query_texts(config, split)
    try:
        return tasks.QueryDataset(texts, tok, spec, shuffle_seed=seed)
    except ValueError as e:
        raise ValueError(f"task.query_dataset={name!r} (split {split!r}): {e}") from e


def mesh_and_rules(config: ml_collections.ConfigDict):
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    rules = sharding.rules_from_config(config.sharding_rules)
    logger.info("mesh %s over %d devices (%s)", dict(mesh.shape), mesh.size,
                jax.devices()[0].platform)
    return mesh, rules


def ensure_workdir(workdir: str) -> str:
    paths.makedirs(workdir)
    return workdir


def spec_dict(spec: tasks.TaskSpec) -> dict:
    """A JSON-able view of a TaskSpec, stored with checkpoints for compatibility checks."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(spec).items()}
