r"""Supervised fine-tuning (SFT) of the initial model with next-token cross-entropy.

  python -m rlhf_jax.train_sft --config configs/tldr.py --workdir runs/tldr_sft \
      [--config.sft.steps=2000] [--config.sft.mode=lm]

Modes (`config.sft.mode`):
- "lm": a text corpus (`sft.dataset`, default the task's query dataset), each text tokenised and
  followed by EOT (50256), all joined and cut into windows of `sft.seq_len` tokens; the loss is
  on every token. This is the paper's BookCorpus-fine-tuned initial model of the style tasks
  (spec §2.4), which the public code skipped.
- "summarize": (article, reference) pairs, each laid out exactly as the policy sees it: prefix ‖
  right-padded, truncated query ‖ suffix (`tasks.format_context`), then " " + the reference on
  one line + "\n", padded or truncated to `task.response_length`. The loss is only on the summary
  tokens: the paper's "supervised" baselines (spec §8).

Dataset names (`summarization.corpus_texts`): anything `sources.load_texts` reads ("builtin",
a text/JSONL path), plus the summarization sources "tfds:<cnn_dailymail|reddit>", "jsonl:<path>"
(fields article, summary) and "builtin:lead" (the builtin passages, one sentence per paragraph,
the first sentence as the reference: a self-contained, offline stand-in for CNN/DM or TL;DR).

Data order is a pure function of (config.seed, step), so a resumed run sees the same batches.
The workdir gets `config.json`, `metrics.jsonl` (+ `plot.png`), `samples.jsonl` (samples of the
task before and after training), orbax checkpoints (`checkpoints/`) and the final model as an HF
GPT-2 directory, `hf_model/`, usable as `--config.model.checkpoint={workdir}/hf_model` for
label, train_reward and train_policy (initial policy and reference of a PPO run).

Resume order: (1) the newest checkpoint in the workdir that restores; (2) the initial model of
`config.model`. A non-finite loss, gradient or parameter stops the run before the next save; the
workdir's config record (`config.json`, `config_history.jsonl`) is checked on every resume
(`rlhf_jax.runs`).
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import os
import shutil
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import flags
from jax.experimental import multihost_utils
from ml_collections import config_flags

from rlhf_jax import checkpointing, cli, compile_cache, experiment, flops, labelers, models
from rlhf_jax import metrics as metrics_lib
from rlhf_jax import optim, runtime, sampling, sharding
from rlhf_jax.data import summarization, tasks
from rlhf_jax.data.sft import SFTData, summary_example  # noqa: F401 - re-exported
from rlhf_jax.models import hf_import
from rlhf_jax.runs import loop, nonfinite, validation

logger = logging.getLogger(__name__)

HF_MODEL_DIR = "hf_model"
EXIT_STOPPED = runtime.EXIT_STOPPED
MODES = validation.SFT_MODES
SECTIONS = ("runtime", "model", "task", "sft")  # validated at start-up
IGNORED_SECTIONS = ("ppo", "rewards", "labels", "labeler", "online")  # not read by SFT


def sft_loss(params, batch, *, config: models.GPT2Config, target_start: int):
    """Mean next-token cross-entropy over the masked target tokens.

    Args:
        params: `{"transformer": ...}`.
        batch: "tokens" int32[B, T], "mask" bool[B, T] (True where a token is a target).
        config: static model config.
        target_start: targets are tokens [target_start, T), predicted from [target_start-1, T-1).

    Returns:
        (loss, stats with "loss", "accuracy" (top-1) and "target_tokens").
    """
    tokens = batch["tokens"]
    hidden, _, _ = models.forward(params, tokens, config)
    logits = models.logits_from_hidden(params, hidden[:, target_start - 1 : -1], config)
    mask = batch["mask"][:, target_start:]
    targets = jnp.where(mask, tokens[:, target_start:], 0)  # pad ids are outside the vocab
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    weight = mask.astype(jnp.float32)
    count = jnp.maximum(weight.sum(), 1.0)
    loss = (nll * weight).sum() / count
    # Top-1 as "the target's logit is the largest": cheaper than an argmax over the vocabulary.
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    accuracy = ((target_logit >= logits.max(axis=-1)) * weight).sum() / count
    return loss, {"loss": loss, "accuracy": accuracy, "target_tokens": weight.sum()}


# --- Setup ------------------------------------------------------------------------------------


class SFTSetup:
    """Everything an SFT run needs, validated (and the first batch built) before any compute."""

    def __init__(self, config: ml_collections.ConfigDict):
        s = config.sft
        self.config = config
        self.mesh, self.rules = validation.validate_with_mesh(config, SECTIONS)
        self.gpt_cfg = experiment.gpt2_config(config)
        self.tok = experiment.tokenizer(config)
        self.spec = experiment.task_spec(config, self.tok, self.gpt_cfg)
        if s.dataset:
            self.dataset, data_dir = s.dataset, s.data_dir
        else:
            self.dataset = experiment.query_source(config)
            data_dir = config.task.get("query_data_dir", "")
        if s.mode == "summarize" and not summarization.is_summarization_source(self.dataset):
            raise validation.ConfigError(
                f"--config.sft.mode='summarize' needs (article, reference) pairs, but dataset "
                f"{self.dataset!r} has no references; use tfds:..., jsonl:... or builtin:lead")
        self.data = self._load(s.split, data_dir)
        self.data.get_batch(0, s.batch_size)  # fails now, naming the problem, if unusable
        use_eval = s.eval_batches and s.eval_split
        self.eval_data = self._load(s.eval_split, data_dir) if use_eval else None
        self.prompts = self._prompts(s.eval_split or s.split, data_dir, config.samples_per_log)

    def _load(self, split: str, data_dir: str) -> SFTData:
        s, seed = self.config.sft, self.config.seed
        if s.mode == "lm":
            texts = summarization.corpus_texts(self.dataset, split, data_dir)
            return SFTData.lm(texts, self.tok, s.seq_len, seed)
        pairs = summarization.summarization_pairs(self.dataset, split, data_dir)
        return SFTData.summarize(pairs, self.tok, self.spec, seed)

    def _prompts(self, split: str, data_dir: str, n: int):
        """Up to `n` task queries (and references) to sample from before and after training."""
        queries, refs = [], []
        if n == 0:
            return queries, refs
        items = summarization.texts_and_references(self.dataset, split, data_dir, 50 * n)
        rules = experiment.text_query_spec(self.config, self.spec)
        for article, ref in items:
            query = tasks.make_query(self.tok.encode(article), rules)
            if query is not None:
                queries.append(query)
                refs.append(ref)
            if len(queries) == n:
                break
        if not queries:
            logger.warning("no text of %s[%s] makes a task query: no samples", self.dataset, split)
        return queries, refs


# --- Training ---------------------------------------------------------------------------------


class SFTTrainer:
    """The jitted SFT step, evaluation and sampling over one mesh (FSDP params)."""

    def __init__(self, setup: SFTSetup):
        self.s = setup
        gpt_cfg, mesh, s = setup.gpt_cfg, setup.mesh, setup.config.sft
        if s.lr_schedule == "constant":
            self.schedule = lambda step: jnp.float32(s.lr)  # noqa: E731
        else:
            self.schedule = optim.reward_lr_schedule(s.lr, s.steps, kind=s.lr_schedule)
        if s.warmup_steps:
            decay = self.schedule
            self.schedule = lambda step: decay(step) * jnp.minimum(  # noqa: E731
                (jnp.asarray(step, jnp.float32) + 1) / s.warmup_steps, 1.0)
        self.tx = optim.make_optimizer(self.schedule, adam_style=s.adam_style, eps=s.adam_eps)
        self.param_sharding = sharding.param_shardings(gpt_cfg, (), mesh, setup.rules)
        abstract = jax.eval_shape(lambda: models.init_params(gpt_cfg, jax.random.key(0)))
        sharding.assert_sufficiently_sharded(self.param_sharding, abstract)
        self.abstract_params = abstract
        opt_sharding = sharding.opt_state_shardings(self.tx, abstract, self.param_sharding, mesh)
        self.state_sharding = {"params": self.param_sharding, "opt_state": opt_sharding,
                               "step": sharding.replicated(mesh)}
        loss_fn = functools.partial(sft_loss, config=gpt_cfg, target_start=setup.data.target_start)
        self._loss = loss_fn
        self.train_step = jax.jit(self._train_step, in_shardings=(self.state_sharding, None),
                                  out_shardings=(self.state_sharding, None, None),
                                  donate_argnums=(0,))
        self.eval_step = jax.jit(lambda params, batch: loss_fn(params, batch)[1],
                                 in_shardings=(self.param_sharding, None))
        self.sample_fn = sampling.make_sampler(
            gpt_cfg, response_length=setup.spec.response_length,
            temperature=setup.spec.temperature, params_sharding=self.param_sharding,
            batch_sharding=sharding.batch_sharding(mesh))

    def _train_step(self, state, batch):
        """One Adam step; returns (state, stats, non-finite flags of loss, grads, params)."""
        (loss, stats), grads = jax.value_and_grad(self._loss, has_aux=True)(state["params"], batch)
        updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        stats["lr"] = self.schedule(state["step"])
        flags = nonfinite.step_flags(loss, grads, params)
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, stats, flags

    def abstract_state(self):
        return {"params": self.abstract_params,
                "opt_state": jax.eval_shape(self.tx.init, self.abstract_params),
                "step": jax.ShapeDtypeStruct((), jnp.int32)}

    def init_state(self, params):
        params = jax.device_put(params, self.param_sharding)
        opt_state = jax.jit(self.tx.init, out_shardings=self.state_sharding["opt_state"])(params)
        step = jax.device_put(jnp.zeros((), jnp.int32), sharding.replicated(self.s.mesh))
        return {"params": params, "opt_state": opt_state, "step": step}

    def global_batch(self, data: SFTData, step: int):
        local = data.get_batch(step, self.s.config.sft.batch_size, jax.process_index(),
                               jax.process_count())
        return {k: sharding.host_batch_to_global(v, self.s.mesh) for k, v in local.items()}

    def evaluate(self, params) -> dict[str, float]:
        """Token-weighted loss and accuracy on `sft.eval_batches` batches of the eval split."""
        if self.s.eval_data is None:
            return {}
        sums = {"loss": 0.0, "accuracy": 0.0, "target_tokens": 0.0}
        for i in range(self.s.config.sft.eval_batches):
            stats = jax.device_get(self.eval_step(params, self.global_batch(self.s.eval_data, i)))
            for k in ("loss", "accuracy"):
                sums[k] += float(stats[k]) * float(stats["target_tokens"])
            sums["target_tokens"] += float(stats["target_tokens"])
        n = max(sums["target_tokens"], 1.0)
        return {"valid/loss": sums["loss"] / n, "valid/accuracy": sums["accuracy"] / n,
                "valid/target_tokens": sums["target_tokens"]}

    def samples(self, params, step: int) -> list[dict]:
        """Task-formatted samples of the current model, truncated as in training (spec §2.3)."""
        queries, refs = self.s.prompts
        if not queries:
            return []
        spec, n = self.s.spec, len(queries)
        devices = sharding.batch_size_per_device(self.s.mesh)
        rows = np.stack([queries[i % n] for i in range(-(-n // devices) * devices)])
        local = np.split(tasks.format_context(rows, spec), jax.process_count())[jax.process_index()]
        context = sharding.host_batch_to_global(local, self.s.mesh)
        rng = jax.random.fold_in(jax.random.key(self.s.config.seed), step)
        resp = _to_host(self.sample_fn(params, context, rng)["responses"])
        resp = tasks.postprocess_responses(np.asarray(resp)[:n], spec)
        q_text = labelers.decode_tokens(self.s.tok, np.stack(queries), spec.pad_id)
        r_text = labelers.decode_tokens(self.s.tok, resp, spec.pad_id)
        return [{"query": q, "response": r} | ({"reference": ref} if ref is not None else {})
                for q, r, ref in zip(q_text, r_text, refs)]


def _to_host(tree):
    """Global arrays as numpy; across hosts every process must take part."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)


def export_hf_model(params, gpt_cfg: models.GPT2Config, tok, workdir: str) -> str:
    """Writes `{workdir}/hf_model` (HF GPT-2 + tokenizer files); replaces a stale one."""
    path = os.path.join(workdir, HF_MODEL_DIR)
    host = _to_host(params)
    if runtime.is_primary():
        if os.path.exists(path):  # left by a crash after the export, before the final checkpoint
            shutil.rmtree(path)
        hf_import.save_hf_checkpoint(host, gpt_cfg, path)
        tok.save_pretrained(path)  # a complete directory for transformers users
    return path


def _run_meta(setup: SFTSetup) -> dict:
    s = setup.config.sft
    return {"mode": s.mode, "dataset": setup.dataset, "seq_len": setup.data.seq_len,
            "batch_size": s.batch_size, "steps": s.steps, "seed": setup.config.seed,
            "model": setup.config.model.preset}


def train_sft(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Fine-tunes `config.model` as `config.sft` says; returns the final metrics.

    Writes `{workdir}/hf_model` at the end (see the module docstring); the same call on the
    same workdir resumes, and returns at once when the run is already done.
    """
    setup = SFTSetup(config)  # every input is validated before any compute
    compile_cache.enable_from_config(config)
    run = loop.TrainRun(config, workdir, trainer="train_sft", ignore_sections=IGNORED_SECTIONS)
    trainer = SFTTrainer(setup)
    s = config.sft
    run_meta = _run_meta(setup)
    with sharding.mesh_context(setup.mesh, setup.rules):
        with run.starting():  # a failed start in a new workdir leaves none behind
            run.open(save_every=s.ckpt_every, keep=config.ckpt_keep)
            restored = run.restore(checkpointing.abstract_state(trainer.abstract_state(),
                                                                trainer.state_sharding))
            if restored is not None:  # (1) resume from the workdir
                state, meta = restored
                checkpointing.check_compatible(meta, run_meta, list(run_meta))
                if meta.get("phase") == "done":
                    if not os.path.isdir(os.path.join(workdir, HF_MODEL_DIR)):
                        export_hf_model(state["params"], setup.gpt_cfg, setup.tok, workdir)
                    run.close()
                    return meta.get("final", {})
            else:  # (2) the initial model of config.model
                trunk = experiment.initial_trunk(config, setup.gpt_cfg)
                state = trainer.init_state({"transformer": trunk})
                before = trainer.evaluate(state["params"])
                if before:
                    run.log(0, before)
                run.writer.write_samples(0, trainer.samples(state["params"], 0))
        final = _train_loop(run, trainer, state, run_meta, workdir)
    run.close()
    if runtime.is_primary():
        metrics_lib.plot_metrics(os.path.join(workdir, metrics_lib.METRICS_FILE),
                                 os.path.join(workdir, "plot.png"),
                                 ys=("train/loss", "valid/loss"),
                                 title=f"SFT ({s.mode}) {os.path.normpath(workdir)}")
    return final


def _train_loop(run: loop.TrainRun, trainer: SFTTrainer, state, run_meta: dict,
                workdir: str) -> dict:
    setup, s = trainer.s, trainer.s.config.sft
    start = int(state["step"])
    tokens_per_step = s.batch_size * setup.data.seq_len
    progress = metrics_lib.Progress(s.steps, start=start, desc="train_sft",
                                    items_per_step={"tokens": tokens_per_step})
    seq = setup.data.seq_len
    throughput = flops.Throughput(  # the loss covers every position of the window: 3x forward
        3.0 * s.batch_size * flops.forward_flops(setup.gpt_cfg, seq, seq, seq), tokens_per_step,
        jax.devices()[0].device_kind, setup.mesh.size, setup.config.model.dtype)
    pending: list[dict] = []
    last: dict[str, float] = {}
    t_log = time.time()
    # The next batch is built on a host thread while the device runs the current step.
    pool = concurrent.futures.ThreadPoolExecutor(1)
    with run.loop(start, pool):
        future = pool.submit(trainer.global_batch, setup.data, start)
        for step in range(start, s.steps):
            batch = future.result()
            if step + 1 < s.steps:
                future = pool.submit(trainer.global_batch, setup.data, step + 1)
            state, stats, flags = trainer.train_step(state, batch)
            pending.append(stats)
            done = step + 1
            run.check(done, flags)
            if done % s.log_every == 0 or done == s.steps:
                run.guard.flush()
                # Means over the steps since the last log line, read from the device once.
                got = jax.device_get(pending)
                pending = []
                last = {f"train/{k}": float(np.mean([g[k] for g in got])) for k in got[0]}
                last |= throughput((time.time() - t_log) / len(got))
                t_log = time.time()
                run.log(done, last)
                progress.update(done, loss=last["train/loss"])
            if done < s.steps:  # the last step is saved below, marked "done"
                run.save(done, state, run_meta | {"phase": "train"}, total=s.steps)
                run.exit_if_stopped(done)
    after = trainer.evaluate(state["params"])
    if after:
        run.log(s.steps, after)
    final = last | after
    run.writer.write_samples(s.steps, trainer.samples(state["params"], s.steps))
    export_hf_model(state["params"], setup.gpt_cfg, setup.tok, workdir)
    run.save(s.steps, state, run_meta | {"phase": "done", "final": final}, force=True,
             total=s.steps)
    logger.info("SFT done: train loss %.4f%s; model in %s", final.get("train/loss", float("nan")),
                f", valid loss {final['valid/loss']:.4f}" if "valid/loss" in final else "",
                os.path.join(workdir, HF_MODEL_DIR))
    return final


FLAGS = flags.FLAGS


def main(argv):
    del argv
    validation.check_workdir(FLAGS.workdir)
    runtime.maybe_initialize_distributed()
    runtime.setup_logging(FLAGS.workdir)
    train_sft(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    # Flags are defined only when run as a program, so entry modules import side by side.
    config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:args]).",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and the model go.")
    flags.mark_flags_as_required(["config", "workdir"])
    cli.run(main)  # absl app.run; configs/... also found in the installed copy
