r"""PPO fine-tuning of a GPT-2 policy against a learned reward model (spec §4).

  python -m rlhf_jax.train_policy --config configs/sentiment.py --workdir runs/sentiment \
      [--config.rewards.trained_model=runs/sentiment_rm] [--config.ppo.lr=2e-5]
  python -m rlhf_jax.train_policy --config configs/sentiment.py --workdir runs/direct \
      --config.rewards.kind=labeler        # the paper's "direct" baseline (spec §8)

Without `rewards.trained_model`, a reward model is trained first into `{workdir}/reward` (the
original's `train_new_model`); with it, that train_reward workdir's model is loaded and its task
settings must equal the policy's. With `rewards.kind=labeler` (the paper's "direct" baseline,
spec §8) there is no reward model: the task's mock labeler scorer (`labeler.kind`) scores each
decoded response on the host (`rlhf_jax.direct_reward`, timed as `time/rollout/labeler`).
Each iteration: rollout (sample, reference log-probs, score with penalty, KL-penalised
rewards), then `noptepochs` x `nminibatches` PPO steps, then the KL controller update (after
the update, fed the batch's sampling-time KL, spec §10.10).

The same command on the same workdir resumes, after checking the config against the workdir's
record (`config.json`, `config_history.jsonl`; see `rlhf_jax.runs.record`). Resume order: (1)
the newest checkpoint in `{workdir}/checkpoints` that restores (broken newer ones are moved to
`checkpoints/corrupt/`); (2) otherwise the initial model of `config.model` (policy, with a zero
value head, and reference), the reward model from (1) or (2) above. SIGTERM writes a checkpoint
and exits with status 3 ("stopped, resumable"); a non-finite loss, gradient, parameter or score
stops the run before it is saved, so the last good checkpoint stays intact.

Outputs: `metrics.jsonl` (the original's metric names), TensorBoard events, `samples.jsonl`,
`config.json`, `config_history.jsonl`, `plot.png` and orbax checkpoints.
"""

from __future__ import annotations

import logging
import math
import time

import jax
import jax.numpy as jnp
import ml_collections
from absl import flags
from jax.experimental import multihost_utils
from ml_collections import config_flags

from rlhf_jax import (
    checkpointing,
    cli,
    compile_cache,
    direct_reward,
    experiment,
    flops,
    kl_control,
    labelers,
    metrics as metrics_lib,
    paths,
    ppo_trainer,
    runtime,
    sharding,
    train_reward,
)
from rlhf_jax.online import loop as online
from rlhf_jax.runs import loop, nonfinite, validation

logger = logging.getLogger(__name__)

EXIT_STOPPED = runtime.EXIT_STOPPED
# One exception type for every trainer's non-finite stop; the old name stays importable.
NonFiniteLossError = nonfinite.NonFiniteError
SECTIONS = ("runtime", "model", "task", "ppo", "rewards", "online")  # validated at start-up
IGNORED_SECTIONS = ("sft", "labeler")  # not read by PPO with a learned reward


def ignored_sections(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """Sections a resume may change: the direct reward reads the labeler's."""
    if direct_reward.reward_kind(config) == "labeler":
        return tuple(s for s in IGNORED_SECTIONS if s != "labeler")
    return IGNORED_SECTIONS


def _kl_settings(p: ml_collections.ConfigDict) -> dict:
    return dict(adaptive=p.kl.adaptive, target=p.kl.target, horizon=p.kl.horizon)


def reward_model_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Trains a reward model into {workdir}/reward unless rewards.trained_model names one."""
    if config.rewards.trained_model:
        return config.rewards.trained_model
    rm_dir = paths.join(workdir, "reward")
    logger.info("rewards.trained_model is empty: training a reward model in %s first", rm_dir)
    train_reward.train_reward(config, rm_dir)
    return rm_dir


def train_policy(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs PPO to `ppo.total_episodes`; returns the last iteration's metrics."""
    p = config.ppo
    online_on = "online" in config and config.online.enabled
    # gs:// inputs readable and the workdir writable, before any compute (an online run's
    # labels come from its label store, not labels.path).
    reward_inputs = (("rewards.trained_model",) if config.rewards.trained_model
                     else () if online_on else ("labels.path",))
    validation.check_storage(config, workdir, validation.MODEL_INPUTS + reward_inputs)
    mesh, rules = validation.validate_with_mesh(config, SECTIONS)
    if not online_on:  # online: the reward model comes from the rounds of the online loop
        validation.check_reward_source(config)
    micro = config.model.get("micro_batch_size", 0)
    settings = ppo_trainer.PPOSettings.from_config(p, micro)
    compile_cache.enable_from_config(config)
    gpt_cfg = experiment.gpt2_config(config)
    tok = experiment.tokenizer(config)
    spec = experiment.task_spec(config, tok, gpt_cfg)
    dataset = experiment.query_dataset(config, tok, spec)
    direct = direct_reward.reward_kind(config) == "labeler"
    if direct and online_on:
        raise validation.ConfigError(
            "--config.rewards.kind='labeler' scores with the mock labeler directly, but "
            "--config.online.enabled=True collects labels for a reward model: choose one")
    # Built before anything is written: a scorer that cannot be built is a start-up error.
    host_reward = direct_reward.make_host_reward(config, tok, spec) if direct else None
    # Refuses a resume with another config before the reward stage or anything else runs.
    run = loop.TrainRun(config, workdir, trainer="train_policy",
                        ignore_sections=ignored_sections(config))
    if direct:  # no reward model; a separate value network has the policy's shapes
        rm_params, rm_cfg = host_reward, gpt_cfg
    elif online_on:  # the label store is reached and checked before anything trains
        store = online.connect(config, online.task_identity(config, gpt_cfg, spec))
        rm_params, rm_cfg = None, gpt_cfg  # round 0 trains it, below
    else:
        # The reward stage is a run of its own (in {workdir}/reward) with its own checks.
        rm_params, rm_cfg, _ = train_reward.load_reward_model(
            reward_model_dir(config, workdir), mesh, rules, expected_spec=spec)
    with run.starting():  # a failed start in a new workdir leaves none behind
        num_updates = math.ceil(p.total_episodes / p.batch_size)
        tx = ppo_trainer.make_optimizer(p, num_updates)
        layout = ppo_trainer.build_layout(gpt_cfg, rm_cfg, settings, tx, mesh, rules)
        heads, repl = layout.heads, sharding.replicated(mesh)
        to_rollout = layout.to_rollout()
        fns = layout.functions(gpt_cfg, rm_cfg, spec, settings, tx, mesh)
        model_flops = flops.ppo_config_flops(gpt_cfg, p, spec, rm_cfg)
        throughput = flops.Throughput(
            model_flops["total"] - (model_flops["reward"] if direct else 0.0),
            flops.ppo_iteration_tokens(p.batch_size, spec.context_length,
                                       spec.response_length),
            jax.devices()[0].device_kind, mesh.size, config.model.dtype)

        rng_init, rng_sample, rng_shuffle = jax.random.split(jax.random.key(config.seed), 3)
        trunk = experiment.initial_trunk(config, gpt_cfg)
        ref_params = jax.device_put({"transformer": trunk}, layout.ref)

        def fresh_state():
            trainable = {"policy": experiment.with_heads(trunk, gpt_cfg, heads, rng_init)}
            if settings.separate_value and direct:  # the initial trunk and a fresh value head
                trainable["value"] = experiment.with_heads(
                    jax.tree.map(jnp.copy, trunk), gpt_cfg, ("value",), rng_init)
            elif settings.separate_value:
                trainable["value"] = ppo_trainer.value_params_from_reward(rm_params)
            with sharding.mesh_context(mesh, rules):
                trainable = jax.device_put(trainable, layout.trainable)
                opt_state = jax.jit(tx.init, out_shardings=layout.opt_state)(trainable)
            return {"params": trainable, "opt_state": opt_state,
                    "step": jax.device_put(jnp.zeros((), jnp.int32), repl),
                    "kl_coef": jax.device_put(jnp.float32(p.kl.coef), repl)}

        run.open(save_every=config.ckpt_every, keep=config.ckpt_keep)
        live = None
        if online_on:
            live = online.OnlineRun(config, workdir, store, online.task_identity(config, gpt_cfg,
                                                                                spec),
                                    spec=spec, tok=tok, mesh=mesh, rules=rules, fns=fns,
                                    layout=layout, dataset=dataset, rm_cfg=rm_cfg,
                                    ref_params=ref_params,
                                    stop=lambda: run.stop is not None and run.stop.requested)
        run_meta = {"gpt2_config": dict(vars(gpt_cfg)),
                    "task_spec": experiment.spec_dict(spec), "value_model": p.value_model}
        restored = run.restore(checkpointing.abstract_state(layout.abstract_state,
                                                            layout.state))
        if restored is not None:  # (1) resume
            state, meta = restored
            checkpointing.check_compatible(meta, run_meta, list(run_meta))
            last = meta.get("final", {})  # a finished run returns its final metrics again
            if live is not None:
                rm_params = live.restore(meta.get("online", {}))
        else:
            state, last = None, {}
    if state is None:  # (2) the initial model; online: round 0 first, on ρ's samples
        if live is not None:  # (outside `starting`: a failed wait must not remove its labels)
            init_policy = jax.device_put(
                experiment.with_heads(trunk, gpt_cfg, heads, rng_init), layout.rollout)
            rm_params, _ = live.before_iteration(0, init_policy)
            del init_policy
        state = fresh_state()

    start = int(state["step"])
    progress = metrics_lib.Progress(num_updates, start=start, desc="train_policy",
                                    items_per_step={"episodes": p.batch_size})
    t_start = time.time()
    with run.loop(start, sharding.mesh_context(mesh, rules)):
        for it in range(start, num_updates):
            t0 = time.time()
            local = dataset.get_batch(it, p.batch_size, process_index=jax.process_index(),
                                      process_count=jax.process_count())
            queries = sharding.host_batch_to_global(local, mesh)
            policy = to_rollout(state["params"]["policy"])
            online_stats = {}
            if live is not None:  # enqueue the policy's samples, maybe a new reward model
                rm_params, online_stats = live.before_iteration(it, policy)
            value_params = state["params"].get("value")
            timings = {}
            data, stats, extras = fns.rollout(policy, value_params, ref_params, rm_params,
                                              queries, state["kl_coef"],
                                              jax.random.fold_in(rng_sample, it), timings)
            del policy  # the replicated copy: not needed by the update (aot_check counts so)
            t_update = time.time()
            state, train_stats, flags = fns.update(state, data,
                                                   jax.random.fold_in(rng_shuffle, it))
            done = it + 1
            stats = {k: float(v) for k, v in jax.device_get({**stats, **train_stats}).items()}
            stats |= online_stats
            # Every stat is on the host already, so the iteration is checked at once.
            run.check(done, flags)
            run.guard.flush()
            run.guard.check_values(done, {k: stats[k] for k in ("objective/score",
                                                                 "objective/kl")})
            # Wall seconds per stage (the first iteration's include compiling).
            stats |= {f"time/rollout/{k}": v for k, v in timings.items()}
            stats |= {"time/rollout": sum(timings.values()), "time/update": time.time() - t_update}
            # Adaptive KL: updated after the PPO epochs with the batch's sampling-time KL.
            new_coef = kl_control.update_kl_coef(stats["objective/kl_coef"], stats["objective/kl"],
                                                 p.batch_size, **_kl_settings(p))
            state["kl_coef"] = jax.device_put(jnp.float32(new_coef), repl)
            stats |= {"elapsed/updates": done, "elapsed/episodes": done * p.batch_size,
                      "elapsed/steps/serial": done * spec.response_length,
                      "elapsed/steps/total": done * p.batch_size * spec.response_length,
                      "elapsed/fps": p.batch_size / max(time.time() - t0, 1e-9),
                      "elapsed/time": time.time() - t_start} | throughput(time.time() - t0)
            last = stats
            if done % config.log_every == 0 or done == num_updates:
                run.log(done, stats)
                run.writer.write_samples(done, _sample_rows(tok, extras, spec, config, p.kl.coef))
                progress.update(done, score=stats["objective/score"], kl=stats["objective/kl"])
            final = {"final": stats} if done == num_updates else {}
            if live is not None:
                final["online"] = live.checkpoint_meta()
            run.save(done, state, run_meta | final, force=done == num_updates, total=num_updates)
            del data, extras  # free this iteration's rollout before the next one starts
            if done < num_updates:
                run.exit_if_stopped(done)
    run.close()
    if live is not None:
        live.close()
    if runtime.is_primary():
        metrics_lib.plot_metrics(paths.join(workdir, metrics_lib.METRICS_FILE),
                                 paths.join(workdir, "plot.png"), x="elapsed/episodes",
                                 ys=("objective/score", "objective/kl", "objective/kl_coef",
                                     *online.PLOTTED),
                                 title=f"PPO {paths.basename(workdir)}")
    return last


def _sample_rows(tok, extras, spec, config, kl_coef_init: float) -> list[dict]:
    """A few decoded samples, as the original printed them every log step (rank 0)."""
    n = config.samples_per_log
    # The rows are batch-sharded over every process's devices: gather them (a collective, so
    # every process calls this). `device_get` works only while the slice happens to come back
    # replicated, and fails on multi-host once n reaches the batch size.
    ex = multihost_utils.process_allgather({k: v[:n] for k, v in extras.items()}, tiled=True)
    queries = labelers.decode_tokens(tok, ex["queries"], spec.pad_id)
    responses = labelers.decode_tokens(tok, ex["truncated"], spec.pad_id)
    return [{"query": q, "response": r, "score": float(s), "kl": float(k),
             # The original's "total" uses the initial kl_coef, not the adaptive one.
             "total": float(s) - kl_coef_init * float(k)}
            for q, r, s, k in zip(queries, responses, ex["scores"], ex["kl_sum"])]


FLAGS = flags.FLAGS


def main(argv):
    del argv
    validation.check_workdir(FLAGS.workdir)
    runtime.maybe_initialize_distributed()
    runtime.setup_logging(FLAGS.workdir)
    train_policy(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    # Flags are defined only when run as a program, so entry modules import side by side.
    config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:args]).",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and samples go.")
    flags.mark_flags_as_required(["config", "workdir"])
    cli.run(main)  # absl app.run; configs/... also found in the installed copy
