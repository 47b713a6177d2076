"""Config helpers shared by the files in `configs/`.

Config files define `get_config(arg)` and are loaded by path through ml_collections'
`config_flags.DEFINE_config_file(..., lock_config=True)`; `arg` is the text after ':' in
`--config configs/sentiment.py:model=774M,runlocal`, parsed by `parse_arg` (typed, strict, bare
names mean True). Every field is then overridable as `--config.ppo.lr=2e-5`, and typos fail at
start-up because the config is locked.

Defaults reproduce the original lm-human-preferences `launch.py` experiments (spec §2.4, §3.2,
§4.1). Modern improvements are options whose defaults keep the original behaviour.

A config file states only what its experiment sets (the paper's table: task, labels, KL, batch
sizes) and builds the rest with `books_experiment` or `summarize_experiment`; both share
`experiment_config`, which also applies the paper's per-size settings (`PAPER_SIZES`) and the
`:runlocal` variant.
"""

from __future__ import annotations

from typing import Any

import ml_collections
from ml_collections import config_dict

from rlhf_jax import sharding

# The original ran on 8 MPI ranks (8x V100); batch sizes in its configs are global.
ORIGINAL_RANKS = 8
# Where `launch.py` reads the released label files (spec §5.2).
LABELS_URL = "https://openaipublic.blob.core.windows.net/lm-human-preferences/labels/"

# The paper's settings for its human-label experiments with GPT-2 774M (Ziegler et al. 2019,
# appendix, as spec.md §3.2 and §4.1 give them): reward model batch 8 (style) / 32
# (summarisation) at lr 1.77e-5; PPO for 2M episodes at batch 1024 / 512 and lr 1.41e-5 /
# 7.07e-6. The paper trained no other size with these experiments, so `:model=355M` and
# `:model=1.5B` keep the 124M (`launch.py`) values: nothing verifiable to set them to.
PAPER_SIZES = {
    "774M": {
        "books": dict(rewards=dict(batch_size=8, lr=1.77e-5),
                      ppo=dict(total_episodes=2_000_000, batch_size=1024, lr=1.41e-5)),
        # 46,000 labels do not split into batches of 32 (one epoch uses every label exactly
        # once, train_reward checks it): 45,984 = 1,437 x 32 is the nearest count below.
        "summarize": dict(rewards=dict(batch_size=32, lr=1.77e-5),
                          labels=dict(num_train=45_984),
                          ppo=dict(total_episodes=2_000_000, batch_size=512, lr=7.07e-6)),
    },
}


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """Parses "k=v,flag" into a ConfigDict typed by `defaults`.

    Args:
        arg: the text after ':' in `--config file.py:arg`, or None.
        **defaults: every allowed key with its default; the default's type parses the value.

    Returns:
        A ConfigDict with every key of `defaults`.

    Raises:
        ValueError: on an unknown key or a value that does not parse, naming both.
    """
    out = ml_collections.ConfigDict(dict(defaults))
    if not arg:
        return out
    for item in arg.split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        if key not in defaults:
            raise ValueError(
                f"unknown config argument {key!r} in {arg!r}; known: {', '.join(sorted(defaults))}"
            )
        default = defaults[key]
        if not sep:
            if not isinstance(default, bool):
                raise ValueError(f"config argument {key!r} needs a value ({key}=...)")
            out[key] = True
            continue
        try:
            if isinstance(default, bool):
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(value)
                out[key] = value.lower() in ("true", "1")
            elif default is None:
                out[key] = value
            else:
                out[key] = type(default)(value)
        except ValueError as e:
            raise ValueError(f"config argument {key}={value!r} is not a {type(default).__name__}") from e
    return out


def hf_name(preset: str) -> str:
    """The Hugging Face hub name of a GPT-2 size ("124M" -> "gpt2"), for the default weights."""
    names = {"124M": "gpt2", "355M": "gpt2-medium", "774M": "gpt2-large", "1.5B": "gpt2-xl"}
    if preset not in names:
        raise ValueError(f"unknown GPT-2 size {preset!r}; known: {', '.join(names)}")
    return names[preset]


# Sizes that run in bfloat16 with rematerialisation by default: in float32 without remat, the
# 774M PPO update at batch 512 needs 18.6 GiB per device on a v5e-8 (15.75 usable).
LARGE_PRESETS = ("774M", "1.5B")


def model_config(preset: str = "124M", checkpoint: str = "gpt2", **kw) -> ml_collections.ConfigDict:
    """The initial model: a size preset, where its weights come from, and how it is run.

    `checkpoint` is an HF GPT-2 directory (config.json + model.safetensors, e.g. staged on a TPU
    VM or in GCS and copied locally) or a hub name where a network exists; "" means random
    initialisation from `init_seed` (tests and the tiny CPU quickstart).

    How it runs (none of these change the maths beyond rounding):
    - dtype: "float32" (true float32 matmuls on every backend, as the original) or "bfloat16"
      (bfloat16 matmuls, float32 master params, Adam state, layer norms, softmaxes, log-probs
      and losses). Default: bfloat16 for the 774M and 1.5B presets, float32 otherwise.
    - remat: rematerialise each block in the backward pass. Default: on for 774M and 1.5B.
    - micro_batch_size: rows per forward/backward pass. The PPO rollout stages (sampling,
      reference, reward) run in chunks of this many rows and each PPO minibatch's gradient is
      accumulated over chunks of this many, independently of ppo.batch_size and
      ppo.nminibatches; it must divide the minibatch. 0 = no split.
    - compilation_cache: where compiled programs are kept across runs (`runtime.
      enable_compilation_cache`): "auto" (a per-user cache directory), a path, or "" (off).
    """
    large = preset in LARGE_PRESETS
    return ml_collections.ConfigDict(
        dict(
            preset=preset,
            checkpoint=checkpoint,
            init_seed=0,
            dtype="bfloat16" if large else "float32",
            remat=large,
            micro_batch_size=0,
            compilation_cache="auto",
            tokenizer="gpt2",
            **kw,
        )
    )


def books_task(**kw) -> ml_collections.ConfigDict:
    """The original's books task (sentiment, descriptiveness), spec §2.4."""
    task = dict(
        query_length=64,
        response_length=24,
        start_text=".",
        end_text=".",
        query_prefix="",
        query_suffix="",
        truncate_token=13,
        truncate_after=16,
        penalty_reward_value=-1.0,
        temperature=0.7,
        query_dataset="builtin",
        query_data_dir="",
        query_max_texts=0,
        query_shuffle_seed=0,
    )
    task.update(kw)
    return _task_dict(task)


def _task_dict(task: dict) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict(task)
    # Optional fields: a placeholder keeps the type, so `--config.task.end_text=None` works.
    for key, typ in (("start_text", str), ("end_text", str), ("truncate_token", int)):
        if cfg[key] is None:
            cfg[key] = config_dict.placeholder(typ)
    return cfg


def summarize_task(**kw) -> ml_collections.ConfigDict:
    """The original's summarisation task skeleton (tldr / cnndm), spec §2.4."""
    task = dict(
        query_length=500,
        response_length=75,
        start_text=None,
        end_text=None,
        query_prefix="",
        query_suffix="\n\nTL;DR:",
        truncate_token=198,
        truncate_after=55,
        penalty_reward_value=-1.0,
        temperature=0.7,
        query_dataset="",
        # tfds data_dir of the prepared array_record dataset ("" = tfds's default).
        query_data_dir="",
        # Queries come from the first this many usable texts (0 = all). Every host encodes them
        # all once at start-up, which for TL;DR's 3.6M posts would take hours.
        query_max_texts=200_000,
        query_shuffle_seed=0,
    )
    task.update(kw)
    return _task_dict(task)


def reward_config(**kw) -> ml_collections.ConfigDict:
    """Reward-model training (spec §3.2); defaults are the books experiments'."""
    cfg = dict(
        batch_size=32,
        lr=5e-5,
        lr_schedule="linear",
        adam_style="tf",
        adam_eps=1e-5,
        rollout_batch_size=512,
        normalize_samples=256,
        normalize_before=True,
        normalize_after=True,
        # Fresh ρ samples drawn after training to verify mean 0 / std 1 (the original's
        # debug_normalize, on by default here).
        verify_samples=256,
        log_every=10,
        # The reward model's initial trunk: "policy" (the policy's initial model, the
        # original), "random" (tiny CPU runs, see experiment.reward_trunk) or an HF directory.
        init="policy",
        # Used by train_policy: train a new reward model first (the original's
        # train_new_model), or load the one in this train_reward workdir.
        trained_model="",
        # What PPO maximises: "learned" (the reward model above) or "labeler" (the task's
        # mock labeler scorer, `labeler.kind`, applied to each response on the host: the
        # paper's "direct" baseline, spec §8; no reward model or labels are used).
        kind="learned",
    )
    cfg.update(kw)
    return ml_collections.ConfigDict(cfg)


def labels_config(path: str = "", type: str = "best_of_4", num_train: int = 4992, **kw):
    """Label file settings (spec §5.2). `num_valid` labels after the training ones are held out."""
    return ml_collections.ConfigDict(dict(path=path, type=type, num_train=num_train, num_valid=0, **kw))


def labeler_config(kind: str = "vader", **kw) -> ml_collections.ConfigDict:
    """A mock labeler for `python -m rlhf_jax.label` (no humans needed).

    kind (`scorers.SCORER_KINDS`): "vader" (VADER compound sentiment of the response),
    "descriptiveness" (share of vivid words: adjectives and adverbs of lemminflect's lexicon,
    `style_scorers.DescriptivenessScorer`), "copying" (prefers sentences copied from the
    article, as the paper's summary labelers did) or "rouge" (prefers ROUGE-L closeness to the
    reference summary; summarization sources only). temperature 0 picks the argmax; > 0 chooses
    like a Boltzmann-rational human (softmax of score / temperature).
    Queries are read from the task's query stream starting at step `query_offset`, away from the
    steps that reward normalisation and PPO read first. copy_ngram (kind "copying"): 0 scores
    whole copied sentences; n > 0 the share of n-grams found in the article (tiny models).
    invalid_samples: "resample" shows the labeler only samples that pass the task's validity
    check (the truncation token), as the paper did by rejection sampling (spec §2.3): an invalid
    sample is re-drawn from ρ, up to `resample_rounds` more draws of the batch, and a query still
    short of N valid samples is dropped (counted). "keep" shows every sample (random tiny models,
    which almost never emit the truncation token).
    """
    cfg = dict(kind=kind, temperature=0.0, field="response", seed=0, rollout_batch_size=64,
               query_offset=100_000, copy_ngram=0, invalid_samples="resample",
               resample_rounds=8)
    cfg.update(kw)
    return ml_collections.ConfigDict(cfg)


def online_config(**kw) -> ml_collections.ConfigDict:
    """Online RLHF (spec §5.3, `rlhf_jax.online`): labels collected on the policy's samples
    while PPO runs, the reward model retrained on a schedule. Off by default (offline runs).

    - enabled: turn the online loop on (train_policy then ignores labels.path and
      rewards.trained_model).
    - server: a label server's URL ("http://host:8000"); its admin token is read from the
      environment variable named by `token_env`, never from the config (config.json is
      written to the workdir). Or:
    - db: the label store itself (a SQLAlchemy URL, or a directory holding labels.sqlite) for
      one-machine runs. Exactly one of server and db.
    - rm_rounds: reward-model trainings in all (the paper: 20), the first before PPO.
    - schedule: "linear" or "paper" (front-loaded): the label count the run should have reached
      at each PPO episode (`online.schedule`).
    - initial_labels: labels on ρ's samples that train the first reward model.
    - total_labels: labels of the whole run; the last reward-model round trains on them all.
    - query_every: every this many PPO iterations, the current policy's samples on fresh
      queries become comparisons.
    - validation_fraction: share of those that are validation comparisons (2 ρ + 2 π samples,
      shuffled); their labels also train the reward model.
    - invalid_samples: "drop" sends only queries whose samples all pass the task's validity
      check (the truncation token), as the paper's labelers saw; "keep" sends every sample
      (random tiny models almost never emit the truncation token).
    - wait: when PPO runs ahead of the label schedule, wait for the labels (True), or go on with
      the current reward model and retrain when they arrive (False).
    - warm: each retrain continues from the last reward model instead of the reference model
      with a fresh head (the paper re-initialised).
    - poll_s: seconds between reads of the store while waiting.
    - query_offset: the fresh queries come from the query stream from this batch index on, away
      from the batches PPO and the reward normalisation read.
    - overlap: share of comparisons labelled twice (quality control, the store's agreement).
    """
    cfg = dict(enabled=False, server="", token_env="RLHF_JAX_LABEL_TOKEN", db="",
               rm_rounds=20, schedule="paper", initial_labels=4992, total_labels=60_000,
               query_every=1, validation_fraction=0.1, invalid_samples="drop", wait=True,
               warm=False, poll_s=2.0, query_offset=200_000, overlap=0.0)
    cfg.update(kw)
    return ml_collections.ConfigDict(cfg)


# The books experiments' KL controller (spec §4.2): adaptive, from 0.15 towards 6 nats.
KL_DEFAULTS = dict(coef=0.15, adaptive=True, target=6.0, horizon=10000)


def ppo_config(**kw) -> ml_collections.ConfigDict:
    """PPO (spec §4.1); defaults are the books experiments'."""
    cfg = dict(
        total_episodes=1_000_000,
        batch_size=512,
        nminibatches=1,
        noptepochs=4,
        lr=1e-5,
        vf_coef=0.1,
        cliprange=0.2,
        cliprange_value=0.2,
        gamma=1.0,
        lam=0.95,
        whiten_rewards=True,
        # Whiten rewards and advantages within this many equal groups of the batch, emulating
        # the original's per-rank whitening on its 8 MPI ranks. 1 = over the whole minibatch.
        whiten_groups=ORIGINAL_RANKS,
        adam_style="tf",
        adam_eps=1e-5,
        max_grad_norm=0.0,  # 0 = no clipping, as the original
        # "shared": value head on the policy trunk (original). "separate": a separate value
        # network initialised from the reward model (summarize-from-feedback).
        value_model="shared",
        # Entropy bonus: loss -= ent_coef * mean token entropy (the paper's ablation, Table 10;
        # 0 = none, as the original).
        ent_coef=0.0,
        # End each episode at the truncation token, summarize-from-feedback style (spec §9):
        # positions after it are masked out of the KL penalty, the whitening, the GAE (values
        # there count as 0) and every loss and statistic, and the score goes on the stop token
        # instead of index L-1. Off in the original, which trains on every response token.
        mask_after_stop=False,
        kl=dict(KL_DEFAULTS),
    )
    cfg.update(kw)
    return ml_collections.ConfigDict(cfg)


def runtime_config(config: ml_collections.ConfigDict) -> None:
    """Adds mesh, sharding, logging and checkpoint fields to `config` in place."""
    config.mesh = dict(data=1, fsdp=-1)
    config.sharding_rules = [list(rule) for rule in sharding.DEFAULT_RULES]
    config.log_every = 10
    config.samples_per_log = 3
    config.ckpt_every = 50
    config.ckpt_keep = 3
    config.tensorboard = True
    # Weights & Biases (optional, `pip install 'rlhf_jax[wandb]'`): project "" = off; mode
    # "online", "offline" or "disabled" ("" = wandb's default / WANDB_MODE).
    config.wandb = dict(project="", entity="", name="", group="", mode="")
    # Stop (checkpoint, exit 3) after this many iterations of one process; 0 = run to the end.
    # For time-sliced jobs; the same command resumes.
    config.stop_after = 0
    # A resume refuses a config that differs from the workdir's record in any field that changes
    # the run's meaning (runs/record.py lists the fields that may change); True resumes anyway
    # and records the change in config_history.jsonl.
    config.allow_config_change = False


def tiny_overrides(config: ml_collections.ConfigDict) -> None:
    """The `:runlocal` variant: a tiny random GPT-2 and small batches, minutes on a CPU."""
    config.model.preset = "tiny"
    config.model.checkpoint = ""
    if "rewards" in config:
        # A randomly initialised tiny model needs a far larger step than pretrained GPT-2.
        config.rewards.lr = 1e-3
        config.rewards.batch_size = 8
        config.rewards.rollout_batch_size = 32
        config.rewards.normalize_samples = 64
        config.rewards.verify_samples = 64
        config.rewards.log_every = 5
    if "labels" in config:
        config.labels.num_train = 64
        config.labels.num_valid = 32
    if "labeler" in config:
        config.labeler.rollout_batch_size = 32
        # A random tiny GPT-2 spreads its samples over all 50,257 tokens, so almost none holds
        # the truncation token: rejection sampling would drop every query.
        config.labeler.invalid_samples = "keep"
    if "ppo" in config:
        config.ppo.total_episodes = 256
        config.ppo.batch_size = 32
        config.ppo.whiten_groups = 1
        config.ppo.kl.horizon = 1000
    config.log_every = 2
    config.ckpt_every = 4


def sft_config(**kw) -> ml_collections.ConfigDict:
    """Supervised fine-tuning (`python -m rlhf_jax.train_sft`, see its docstring).

    The original released no SFT code or settings; these defaults are a plain choice for 124M:
    TF-style Adam at 5e-5 decayed linearly to 0 over `steps`, batch 32.

    mode: "lm" (next-token loss on windows of `seq_len` tokens of a corpus: the paper's
    book-fine-tuned initial model) or "summarize" (loss on reference summaries laid out as the
    policy's context + response: the paper's supervised baselines). dataset "" means the task's
    query dataset (`task.query_dataset`, `task.query_data_dir`); `data_dir` is a tfds data_dir.
    seq_len is the window of "lm" mode ("summarize" uses the task's context + response).
    eval_split "" (or eval_batches 0) turns off the held-out loss. SFT steps are much cheaper
    than PPO iterations, hence its own checkpoint interval `ckpt_every`.
    """
    cfg = dict(mode="lm", dataset="", data_dir="", split="train", eval_split="test",
               eval_batches=4, steps=2000, batch_size=32, lr=5e-5, lr_schedule="linear",
               warmup_steps=0, adam_style="tf", adam_eps=1e-5, seq_len=512, log_every=20,
               ckpt_every=500)
    cfg.update(kw)
    return ml_collections.ConfigDict(cfg)


def sft_tiny_overrides(config: ml_collections.ConfigDict) -> None:
    """`:runlocal` SFT sizes: the tiny random GPT-2 learns words and periods in ~1-2 min on CPU.

    A random model needs a far larger step than pretrained GPT-2: 3e-3 with a short warm-up
    (on the builtin corpus, 150k tokens: 2e-3 and 5e-3 ended 0.2-0.3 nats worse on held-out text,
    6e-3 and 1e-2 stalled at the unigram level). Batch 8 x 300 steps beat 16 x 150 by 0.15 nats.
    """
    if "sft" in config:
        config.sft.update(dict(steps=300, batch_size=8, seq_len=64, lr=3e-3, warmup_steps=20,
                               log_every=20, eval_batches=4, ckpt_every=100))


def _merged(section: ml_collections.ConfigDict, values: dict) -> None:
    """Sets nested `values` into `section` in place (dicts merge into sub-sections)."""
    for key, value in values.items():
        if isinstance(value, dict):
            _merged(section[key], value)
        else:
            section[key] = value


def experiment_config(arg: str | None, *, family: str, task: ml_collections.ConfigDict,
                      labels: ml_collections.ConfigDict, labeler: ml_collections.ConfigDict,
                      rewards: ml_collections.ConfigDict, ppo: ml_collections.ConfigDict,
                      sft: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A whole experiment config from its sections, with the `model=` and `runlocal` arguments.

    Args:
        arg: the text after ':' in `--config file.py:arg` ("model=774M", "runlocal", ...).
        family: "books" or "summarize": which of the paper's per-size settings apply.
        task, labels, labeler, rewards, ppo, sft: the sections, as built by the `*_config`
            helpers above.

    Returns:
        The config. `model=<size>` picks the GPT-2 size and, where the paper gives them
        (`PAPER_SIZES`), its reward-model and PPO settings for that size; `runlocal` swaps in
        the tiny random GPT-2 and CPU-sized batches (the size's settings then do not apply).
    """
    arg = parse_arg(arg, model="124M", runlocal=False)
    config = ml_collections.ConfigDict()
    config.seed = 1
    config.model = model_config(arg.model, hf_name(arg.model))
    config.task, config.labels, config.labeler = task, labels, labeler
    config.rewards, config.ppo, config.sft = rewards, ppo, sft
    config.online = online_config()
    runtime_config(config)
    if arg.runlocal:
        tiny_overrides(config)
        sft_tiny_overrides(config)
    elif arg.model in PAPER_SIZES:
        _merged(config, PAPER_SIZES[arg.model][family])
    return config


def books_experiment(arg: str | None, *, labels: str, num_train: int, labeler: str, kl: dict,
                     rewards: dict, ppo: dict) -> ml_collections.ConfigDict:
    """A books (style) experiment: continue a 64-token passage with 24 tokens (spec §2.4, §6.1).

    Args:
        arg: the config argument (see `experiment_config`).
        labels: the best-of-4 label file (path or URL; "" = none yet).
        num_train: labels that train the reward model.
        labeler: the mock labeler's kind (`labeler_config`).
        kl: the KL controller (`ppo.kl`: coef, adaptive, target, horizon).
        rewards: reward-model settings that differ from `reward_config`'s defaults.
        ppo: PPO settings that differ from `ppo_config`'s defaults.

    Returns:
        The experiment config; queries come from `task.query_dataset` ("builtin" by default).
    """
    return experiment_config(
        arg, family="books", task=books_task(),
        labels=labels_config(labels, num_train=num_train), labeler=labeler_config(labeler),
        rewards=reward_config(**rewards), ppo=ppo_config(kl=_kl(kl), **ppo),
        sft=sft_config(mode="lm"))


def summarize_experiment(arg: str | None, *, task: dict, labels: str, num_train: int,
                         labeler: str, kl: dict, rewards: dict,
                         ppo: dict) -> ml_collections.ConfigDict:
    """A summarisation experiment: 500-token article, 75-token summary (spec §2.4, §6.1).

    Args:
        arg: the config argument (see `experiment_config`); `runlocal` also shrinks the task
            to the tiny model's 256 positions (query 128, response 32, truncate after 8) over
            the "builtin:lead" passages.
        task: task fields that differ from `summarize_task`'s (query_dataset, prefix, ...).
        labels, num_train, labeler, kl, rewards, ppo: as `books_experiment`.

    Returns:
        The experiment config, with `sft.mode="summarize"` (the supervised baseline).
    """
    config = experiment_config(
        arg, family="summarize", task=summarize_task(**task),
        labels=labels_config(labels, num_train=num_train), labeler=labeler_config(labeler),
        rewards=reward_config(**rewards), ppo=ppo_config(kl=_kl(kl), **ppo),
        sft=sft_config(mode="summarize"))
    if parse_arg(arg, model="124M", runlocal=False).runlocal:
        config.task.update(dict(query_dataset="builtin:lead", query_length=128,
                                response_length=32, truncate_after=8, query_max_texts=0))
    return config


def _kl(kl: dict) -> dict:
    return dict(KL_DEFAULTS, **kl)
