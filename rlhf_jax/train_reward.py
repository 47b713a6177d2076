r"""Reward-model training from human (or mock) preference labels (spec §3).

  python -m rlhf_jax.train_reward --config configs/sentiment.py --workdir runs/sentiment_rm \
      [--config.labels.path=labels.json] [--config.rewards.lr=5e-5]

Stages, as the original `RewardModelTrainer.train`:
1. normalise before: on samples of the initial model ρ (untruncated, no penalty), set the reward
   gain and bias so rewards have the label type's target mean and std;
2. one epoch over `labels.num_train` labels in a random order, with the label type's loss and
   TF1-style Adam, the learning rate decayed linearly to zero per batch;
3. normalise after: reset gain 1, bias 0, then fit mean 0 / std 1 on ρ samples, so the KL
   coefficient means the same across tasks;
4. verify on fresh ρ samples that rewards have mean 0 and std 1 (logged), and report held-out
   label accuracy.

The workdir gets `config.json` and `config_history.jsonl` (the run record, see
`rlhf_jax.runs.record`), `metrics.jsonl`, TensorBoard events (`tb/`), orbax checkpoints
(`checkpoints/`, resumable) and the final model (`reward_model/`, loaded by train_policy).

Resume order: (1) the newest checkpoint in the workdir that restores; (2) otherwise the initial
model of `config.model` plus a fresh reward head. A non-finite loss, gradient or parameter stops
the run before the next save (`rlhf_jax.runs.nonfinite`). `train_reward(...)` is also the entry
of train_policy's reward stage and of one reward-model round of an online run, with the same
checks.
"""

from __future__ import annotations

import functools
import logging
import math
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import flags
from jax.experimental import multihost_utils
from ml_collections import config_flags

from rlhf_jax import (
    checkpointing,
    cli,
    compile_cache,
    experiment,
    flops,
    label_types,
    models,
    networks,
    optim,
    reward_modeling,
    runtime,
    sampling,
    sharding,
)
from rlhf_jax import metrics as metrics_lib
from rlhf_jax.data import labels as labels_lib
from rlhf_jax.data import tasks
from rlhf_jax.reward_store import (  # noqa: F401 - the reward model's on-disk API, re-exported
    REWARD_MODEL_DIR,
    REWARD_MODEL_META,
    load_reward_model,
    save_reward_model,
)
from rlhf_jax.runs import loop, nonfinite, validation

logger = logging.getLogger(__name__)

SECTIONS = ("runtime", "model", "task", "rewards")  # validated at start-up
IGNORED_SECTIONS = ("ppo", "sft", "labeler", "online")  # not read: no resume conflict


class RewardSetup:
    """Everything a reward run (or train_policy's reward stage) needs, validated up front.

    Args:
        config: the run config.
        labels: the label arrays (an online run's labels so far); None reads `labels.path`.
    """

    def __init__(self, config: ml_collections.ConfigDict, labels: dict | None = None):
        self.config = config
        self.mesh, self.rules = validation.validate_with_mesh(config, SECTIONS)
        self.label_type = label_types.get_label_type(config.labels.type)
        self.gpt_cfg = experiment.gpt2_config(config)
        self.tok = experiment.tokenizer(config)
        self.spec = experiment.task_spec(config, self.tok, self.gpt_cfg)
        if labels is None:
            validation.check_labels(config, need_path=True)
            labels = labels_lib.load_labels(
                config.labels.path, self.label_type, query_length=self.spec.query_length,
                response_length=self.spec.response_length, vocab_size=self.gpt_cfg.vocab_size,
                pad_id=self.gpt_cfg.pad_id)
        self.train_labels, self.valid_labels = labels_lib.split_labels(
            labels, config.labels.num_train, config.labels.num_valid or None
        )
        self.dataset = experiment.query_dataset(config, self.tok, self.spec)
        self.num_steps = config.labels.num_train // config.rewards.batch_size


def _stack_samples(labels, label_type) -> dict[str, np.ndarray]:
    return {
        "query": np.asarray(labels["query"], np.int32),
        "samples": np.stack([labels[k] for k in label_type.sample_keys], axis=1).astype(np.int32),
        "label": np.asarray(labels[label_type.label_key]),
    }


def _global_batch(arrays: dict[str, np.ndarray], rows: np.ndarray, mesh) -> dict[str, jax.Array]:
    """Global arrays for `rows` of the label set; each process contributes only its slice."""
    n, p = len(rows), jax.process_count()
    mine = rows[jax.process_index() * n // p : (jax.process_index() + 1) * n // p]
    return {k: sharding.host_batch_to_global(v[mine], mesh) for k, v in arrays.items()}


class RewardTrainer:
    """Jitted pieces of reward-model training over one mesh."""

    def __init__(self, setup: RewardSetup):
        self.s = setup
        cfg, gpt_cfg, mesh = setup.config, setup.gpt_cfg, setup.mesh
        r = cfg.rewards
        self.schedule = optim.reward_lr_schedule(r.lr, setup.num_steps, kind=r.lr_schedule)
        self.tx = optim.make_optimizer(self.schedule, adam_style=r.adam_style, eps=r.adam_eps)
        self.param_sharding = sharding.param_shardings(gpt_cfg, ("reward",), mesh, setup.rules)
        self.trunk_sharding = {"transformer": self.param_sharding["transformer"]}
        abstract = jax.eval_shape(lambda: models.init_params(gpt_cfg, jax.random.key(0), ("reward",)))
        sharding.assert_sufficiently_sharded(self.param_sharding, abstract)
        self.opt_sharding = sharding.opt_state_shardings(self.tx, abstract, self.param_sharding, mesh)
        self.state_sharding = {"params": self.param_sharding, "opt_state": self.opt_sharding,
                               "step": sharding.replicated(mesh)}
        batch = sharding.batch_sharding(mesh)
        self.sample_fn = sampling.make_sampler(
            gpt_cfg, response_length=setup.spec.response_length, temperature=setup.spec.temperature,
            params_sharding=self.trunk_sharding, batch_sharding=batch,
        )
        self.score_fn = jax.jit(
            functools.partial(networks.reward, config=gpt_cfg),
            in_shardings=(self.param_sharding, batch, batch), out_shardings=batch,
        )
        self.format_fn = jax.jit(functools.partial(tasks.format_context, spec=setup.spec),
                                 in_shardings=batch, out_shardings=batch)
        self.train_step = jax.jit(self._train_step, in_shardings=(self.state_sharding, None),
                                  out_shardings=(self.state_sharding, None, None),
                                  donate_argnums=(0,))
        self.eval_step = jax.jit(self._eval_step, in_shardings=(self.param_sharding, None))

    def abstract_state(self):
        """Shapes and dtypes of the train state, for restoring a checkpoint."""
        params = jax.eval_shape(
            lambda: models.init_params(self.s.gpt_cfg, jax.random.key(0), ("reward",)))
        return {"params": params, "opt_state": jax.eval_shape(self.tx.init, params),
                "step": jax.ShapeDtypeStruct((), jnp.int32)}

    def init_state(self, params):
        with sharding.mesh_context(self.s.mesh, self.s.rules):
            params = jax.device_put(params, self.param_sharding)
            opt_state = jax.jit(self.tx.init, out_shardings=self.opt_sharding)(params)
        step = jax.device_put(jnp.zeros((), jnp.int32), sharding.replicated(self.s.mesh))
        return {"params": params, "opt_state": opt_state, "step": step}

    def _loss(self, params, batch):
        rewards = networks.rewards_of_samples(params, batch["query"], batch["samples"],
                                              self.s.gpt_cfg)
        return self.s.label_type.loss(rewards, batch["label"])

    def _train_step(self, state, batch):
        """One Adam step; returns (state, stats, non-finite flags of loss, grads, params)."""
        (loss, stats), grads = jax.value_and_grad(self._loss, has_aux=True)(state["params"], batch)
        updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        stats = {f"train/{k}": v for k, v in stats.items()}
        stats["train/lr"] = self.schedule(state["step"])
        stats["train/gain"] = params["reward_norm"]["gain"]
        flags = nonfinite.step_flags(loss, grads, params)
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, stats, flags

    def _eval_step(self, params, batch):
        return self._loss(params, batch)[1]

    def ref_rewards(self, params, ref_trunk, num_batches: int, stream_offset: int, rng):
        """Rewards of ρ samples on `num_batches` rollout batches of training queries.

        Responses are raw: not truncated, no penalty (spec §10.5).
        """
        bsz = self.s.config.rewards.rollout_batch_size
        out = []
        with sharding.mesh_context(self.s.mesh, self.s.rules):
            for i in range(num_batches):
                local = self.s.dataset.get_batch(
                    stream_offset + i, bsz, process_index=jax.process_index(),
                    process_count=jax.process_count(),
                )
                queries = sharding.host_batch_to_global(local, self.s.mesh)
                context = self.format_fn(queries)
                resp = self.sample_fn(ref_trunk, context, jax.random.fold_in(rng, stream_offset + i))
                out.append(np.asarray(multihost_utils.process_allgather(
                    self.score_fn(params, queries, resp["responses"]), tiled=True)))
        return np.concatenate(out)

    def normalize(self, params, ref_trunk, target, num_samples, stream_offset, rng, check):
        """Resets gain/bias, measures ρ rewards and fits gain/bias to `target` (mean, std).

        `check(values)` sees the rewards' mean and std first (the non-finite rule).
        """
        nb = reward_modeling.normalization_num_batches(
            num_samples, self.s.config.rewards.rollout_batch_size)
        params = _set_norm(params, 1.0, 0.0, self.param_sharding)
        rewards = self.ref_rewards(params, ref_trunk, nb, stream_offset, rng)
        stats = reward_modeling.reward_stats(rewards)
        check({"normalization reward mean": stats["mean"], "normalization reward std": stats["std"]})
        gain, bias = reward_modeling.fit_gain_bias(rewards, *target)
        return _set_norm(params, gain, bias, self.param_sharding), stats, (gain, bias)

    def evaluate(self, params, arrays) -> dict[str, float]:
        """Mean label-type stats over whole batches of `arrays` (the held-out labels)."""
        bsz = self.s.config.rewards.batch_size
        n = len(arrays["label"]) // bsz * bsz
        if n == 0:
            return {}
        totals: dict[str, float] = {}
        with sharding.mesh_context(self.s.mesh, self.s.rules):
            for start in range(0, n, bsz):
                batch = _global_batch(arrays, np.arange(start, start + bsz), self.s.mesh)
                for k, v in self.eval_step(params, batch).items():
                    totals[k] = totals.get(k, 0.0) + float(v) * bsz / n
        return {f"valid/{k}": v for k, v in totals.items()} | {"valid/num_labels": float(n)}


def _set_norm(params, gain, bias, param_sharding):
    params = dict(params)
    norm = {"gain": jnp.float32(gain), "bias": jnp.float32(bias)}
    params["reward_norm"] = jax.device_put(norm, param_sharding["reward_norm"])
    return params


def train_reward(config: ml_collections.ConfigDict, workdir: str, *,
                 labels: dict | None = None, init_params=None) -> dict:
    """Trains, normalises and saves a reward model; returns the final metrics.

    The same call on the same workdir resumes, and returns at once when the run is done.

    Args:
        config: the run config (validated here before anything is built).
        workdir: the run directory.
        labels: label arrays to train on instead of reading `labels.path` (an online round).
        init_params: reward-model params to start from instead of the initial model with a
            fresh head (an online round with `online.warm`); copied, never donated.
    """
    setup = RewardSetup(config, labels)  # every input is validated before any compute
    compile_cache.enable_from_config(config)
    run = loop.TrainRun(config, workdir, trainer="train_reward", ignore_sections=IGNORED_SECTIONS)
    trainer = RewardTrainer(setup)
    r = config.rewards
    rng_init, rng_shuffle, rng_sample = jax.random.split(jax.random.key(config.seed), 3)
    nb = reward_modeling.normalization_num_batches(r.normalize_samples, r.rollout_batch_size)
    with run.starting():  # a failed start in a new workdir leaves none behind
        run.open(save_every=config.ckpt_every, keep=config.ckpt_keep)
        trunk = experiment.initial_trunk(config, setup.gpt_cfg)
        ref_trunk = jax.device_put({"transformer": trunk}, trainer.trunk_sharding)
        restored = run.restore(checkpointing.abstract_state(trainer.abstract_state(),
                                                            trainer.state_sharding))
        if restored is not None:  # (1) resume from the workdir
            state, meta = restored
            if meta.get("phase") == "done":
                run.close()
                return meta.get("final", {})
        else:  # (2) the initial model plus a fresh reward head
            state = _fresh_state(run, trainer, trunk, ref_trunk, rng_init, rng_sample,
                                 init_params)
    state = _train_loop(run, trainer, state, rng_shuffle)

    params = state["params"]
    final = trainer.evaluate(params, _stack_samples(setup.valid_labels, setup.label_type))
    check_final = functools.partial(run.guard.check_values, setup.num_steps)
    if r.normalize_after:
        params, stats, (gain, bias) = trainer.normalize(params, ref_trunk, (0.0, 1.0),
                                                        r.normalize_samples, nb, rng_sample,
                                                        check_final)
        logger.info("normalize after: ρ rewards %.4f ± %.4f (gain %.4f, bias %.4f)",
                    stats["mean"], stats["std"], gain, bias)
        final |= {"normalize/after_raw_mean": stats["mean"], "normalize/after_raw_std": stats["std"],
                  "normalize/after_gain": gain, "normalize/after_bias": bias}
    if r.verify_samples:
        vb = reward_modeling.normalization_num_batches(r.verify_samples, r.rollout_batch_size)
        check = reward_modeling.reward_stats(
            trainer.ref_rewards(params, ref_trunk, vb, 2 * nb, rng_sample))
        n = vb * r.rollout_batch_size
        logger.info("verify on %d fresh ρ samples: reward mean %.4f (±%.4f s.e.), std %.4f",
                    n, check["mean"], check["std"] / math.sqrt(n), check["std"])
        final |= {"verify/mean": check["mean"], "verify/std": check["std"],
                  "verify/num_samples": float(n)}
    check_final(final)
    run.log(setup.num_steps, final)
    save_reward_model(workdir, params, setup.gpt_cfg, setup.spec, setup.label_type.name,
                      {"final": final})
    state["params"] = params
    run.save(setup.num_steps, state, {"phase": "done", "final": final}, force=True,
             total=setup.num_steps)
    run.close()
    if "valid/accuracy" in final:
        logger.info("held-out accuracy %.3f on %d labels", final["valid/accuracy"],
                    int(final["valid/num_labels"]))
    return final


def _fresh_state(run: loop.TrainRun, trainer: RewardTrainer, trunk, ref_trunk, rng_init,
                 rng_sample, init_params=None):
    """The initial model plus a fresh reward head (or a copy of `init_params`), normalised
    before training if asked."""
    setup, r = trainer.s, trainer.s.config.rewards
    if init_params is not None:
        # A copy: the train step donates its state, and the caller still scores with these.
        params = jax.tree.map(jnp.copy, init_params)
    else:
        rm_trunk = experiment.reward_trunk(setup.config, setup.gpt_cfg, trunk)
        params = experiment.with_heads(rm_trunk, setup.gpt_cfg, ("reward",), rng_init)
    state = trainer.init_state(params)
    if r.normalize_before:
        target = label_types.target_mean_std(setup.label_type, setup.train_labels)
        params, stats, (gain, bias) = trainer.normalize(
            state["params"], ref_trunk, target, r.normalize_samples, 0, rng_sample,
            functools.partial(run.guard.check_values, 0))
        state["params"] = params
        logger.info("normalize before: ρ rewards %.4f ± %.4f -> target %s (gain %.4f, bias %.4f)",
                    stats["mean"], stats["std"], target, gain, bias)
        run.log(0, {"normalize/before_mean": stats["mean"], "normalize/before_std": stats["std"],
                    "normalize/before_gain": gain, "normalize/before_bias": bias})
    return state


def _train_loop(run: loop.TrainRun, trainer: RewardTrainer, state, rng_shuffle):
    """One epoch over the training labels, from the restored step; returns the last state."""
    setup, config = trainer.s, trainer.s.config
    r = config.rewards
    arrays = _stack_samples(setup.train_labels, setup.label_type)
    # One random permutation of the training labels for the single epoch (same on every host).
    order = np.asarray(jax.random.permutation(rng_shuffle, config.labels.num_train))
    start = int(state["step"])
    progress = metrics_lib.Progress(setup.num_steps, start=start, desc="train_reward",
                                    items_per_step={"labels": r.batch_size})
    logger.info("training on %d labels in %d batches of %d", config.labels.num_train,
                setup.num_steps, r.batch_size)
    spec, n = setup.spec, setup.label_type.num_samples
    throughput = flops.Throughput(
        flops.reward_step_flops(setup.gpt_cfg, r.batch_size, spec.query_length,
                                spec.response_length, n),
        r.batch_size * n * (spec.query_length + spec.response_length),
        jax.devices()[0].device_kind, setup.mesh.size, config.model.dtype)
    t_log, step_log = time.time(), start
    with run.loop(start, sharding.mesh_context(setup.mesh, setup.rules)):
        for step in range(start, setup.num_steps):
            rows = order[step * r.batch_size : (step + 1) * r.batch_size]
            state, stats, flags = trainer.train_step(state, _global_batch(arrays, rows, setup.mesh))
            done = step + 1
            run.check(done, flags)
            if done % r.log_every == 0 or done == setup.num_steps:
                run.guard.flush()
                stats = {k: float(v) for k, v in jax.device_get(stats).items()}
                stats |= throughput((time.time() - t_log) / (done - step_log))
                t_log, step_log = time.time(), done
                run.log(done, stats)
                progress.update(done, loss=stats["train/loss"])
            if done < setup.num_steps:  # the last step is saved by the caller, marked "done"
                run.save(done, state, {"phase": "train"}, total=setup.num_steps)
                run.exit_if_stopped(done)
    return state


FLAGS = flags.FLAGS


def main(argv):
    del argv
    validation.check_workdir(FLAGS.workdir)
    runtime.maybe_initialize_distributed()
    runtime.setup_logging(FLAGS.workdir)
    train_reward(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    # Flags are defined only when run as a program, so entry modules import side by side.
    config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:args]).",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and the model go.")
    flags.mark_flags_as_required(["config", "workdir"])
    cli.run(main)  # absl app.run; configs/... also found in the installed copy
