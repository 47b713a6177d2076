r"""Sample continuations from a trained policy (or the base model) and write them as JSONL.

  python -m rlhf_jax.sample --workdir runs/sentiment --output samples.jsonl [--num_queries 64]
  python -m rlhf_jax.sample --config configs/sentiment.py --output base.jsonl   # base model
  python -m rlhf_jax.sample --workdir runs/sentiment --queries my_texts.txt --num_samples 4

With `--workdir`, the run's recorded config (the last line of `config_history.jsonl`, else
`config.json`) and its newest checkpoint that restores give the policy. The workdir is only
read: no directory is created, no temporary directory of a save in progress is cleaned up, and
nothing is moved, so sampling a live run is safe. With `--config` only, the initial model of that config is sampled (the "zero-shot" baseline). Queries
come from `--queries` (a text file, one passage per line, or JSONL) or else from the task's
query dataset (`--split test` by default), formatted exactly as in training (start/end trimming,
padding, prefix and suffix). Each response is post-processed as in training (cut after the
truncation token).

The default temperature is the task's training temperature: the trained policy's distribution is
softmax(logits / T_task), which is what PPO optimised. (The original `sample.py` silently
defaulted to 1.0.) Pass `--temperature` to override.

Each output row: {"query", "response", "response_tokens", "valid", "sample_index",
"temperature"}, plus "reference" (the reference summary) when the queries come from a
summarization source, so that `python -m rlhf_jax.evaluate --samples` can score ROUGE.
"""

from __future__ import annotations

import functools
import json
import logging

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from rlhf_jax import checkpointing, cli, experiment, labelers, paths, runtime, sampling, sharding
from rlhf_jax.data import sources, summarization, tasks
from rlhf_jax.runs import record, validation

logger = logging.getLogger(__name__)


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a run in `workdir` last ran with (see `runs.record.load_run_config`)."""
    return record.load_run_config(workdir)


def load_policy(workdir: str):
    """Policy params from the newest good checkpoint of a train_policy workdir, read-only."""
    ckpt_dir = paths.join(workdir, "checkpoints")
    if not paths.isdir(ckpt_dir):
        raise FileNotFoundError(f"{ckpt_dir}: no checkpoints to sample from")
    with checkpointing.Checkpointer(ckpt_dir, save_every=1, read_only=True) as ckpt:
        found = ckpt.restore_latest()
    if found is None:
        raise FileNotFoundError(f"{ckpt_dir}: no checkpoint to sample from")
    step, state, _ = found
    if "policy" not in state.get("params", {}):
        raise ValueError(f"{ckpt_dir}: step {step} holds no policy; --workdir must be a "
                         "train_policy run")
    logger.info("sampling the policy of %s at iteration %d", workdir, step)
    return state["params"]["policy"], step


def sample_texts(config: ml_collections.ConfigDict, params, query_texts: list[str], *,
                 num_samples: int = 1, temperature: float | None = None, top_k: int = 0,
                 top_p: float = 1.0, seed: int = 0, batch_size: int = 32,
                 references: list[str | None] | None = None) -> list[dict]:
    """Samples `num_samples` continuations per query text.

    Args:
        config: the run config (model, task).
        params: policy params (a value head is ignored).
        query_texts: raw passages; formatted with the task's query rules (skipped ones are
            logged and left out).
        num_samples: continuations per query.
        temperature: None = the task's training temperature.
        top_k, top_p: optional truncation of the sampling distribution.
        seed: PRNG seed.
        batch_size: rows per sampler call (rounded up to the device count).
        references: optional reference summary per query text, copied into its rows as
            "reference" (what `rlhf_jax.evaluate` scores ROUGE against).

    Returns:
        One dict per (query, sample).
    """
    gpt_cfg = experiment.gpt2_config(config)
    tok = experiment.tokenizer(config)
    spec = experiment.task_spec(config, tok, gpt_cfg)
    temperature = spec.temperature if temperature is None else temperature
    if references is not None and len(references) != len(query_texts):
        raise ValueError(f"{len(references)} references for {len(query_texts)} query texts")
    refs = dict(enumerate(references or []))
    rules = experiment.text_query_spec(config, spec)
    kept = [((t, refs.get(k)), q) for k, t in enumerate(query_texts)
            if (q := tasks.make_query(tok.encode(t), rules)) is not None]
    if len(kept) < len(query_texts):
        logger.warning("skipped %d of %d queries (start/end token rules of the task)",
                       len(query_texts) - len(kept), len(query_texts))
    if not kept:
        raise ValueError("no query survived the task's formatting rules")
    mesh = sharding.make_mesh(devices=jax.devices())
    n_dev = mesh.size
    batch_size = -(-batch_size // n_dev) * n_dev
    rows = [(q, i) for q in kept for i in range(num_samples)]
    fn = jax.jit(functools.partial(sampling.sample, config=gpt_cfg,
                                   response_length=spec.response_length,
                                   temperature=temperature, top_k=top_k, top_p=top_p))
    fmt = jax.jit(functools.partial(tasks.format_context, spec=spec))
    post = jax.jit(functools.partial(tasks.postprocess_responses, spec=spec))
    valid_fn = jax.jit(functools.partial(tasks.responses_valid, spec=spec))
    out = []
    rng = jax.random.key(seed)
    for b, start in enumerate(range(0, len(rows), batch_size)):
        chunk = rows[start : start + batch_size]
        queries = np.stack([q for (_, q), _ in chunk])
        pad = batch_size - len(chunk)  # fixed shapes: one compilation for every batch
        queries = np.concatenate([queries, np.repeat(queries[:1], pad, 0)])
        resp = fn(params, fmt(jnp.asarray(queries)), jax.random.fold_in(rng, b))["responses"]
        truncated, valid = np.asarray(post(resp)), np.asarray(valid_fn(resp))
        texts = labelers.decode_tokens(tok, truncated, spec.pad_id)
        for j, (((text, ref), _), i) in enumerate(chunk):
            row = {"query": text, "response": texts[j], "valid": bool(valid[j]),
                   "response_tokens": [int(t) for t in truncated[j] if t != spec.pad_id],
                   "sample_index": i, "temperature": temperature}
            if ref is not None:
                row["reference"] = ref
            out.append(row)
    return out


def main(argv):
    del argv
    runtime.setup_logging()
    f = flags.FLAGS
    validation.check_output_file(f.output)
    if f.workdir:  # gs:// inputs: bucket, credentials and permission, before any compute
        paths.check_readable(f.workdir, "--workdir")
    if f.queries:
        paths.check_readable(f.queries, "--queries")
    for name, minimum in (("num_queries", 1), ("num_samples", 1), ("top_k", 0)):
        validation.check_flag_count(name, getattr(f, name), minimum)
    if not 0.0 < f.top_p <= 1.0:
        raise validation.ConfigError(f"--top_p={f.top_p}: must be in (0, 1]")
    if f.temperature is not None and not f.temperature > 0:
        raise validation.ConfigError(f"--temperature={f.temperature}: must be > 0")
    if f.workdir:
        config = load_run_config(f.workdir)
        params, _ = load_policy(f.workdir)
    elif f.config is not None:
        config = f.config
        validation.validate(config, ("model", "task"))
        validation.check_storage(config, None, validation.MODEL_INPUTS)
        gpt_cfg = experiment.gpt2_config(config)
        params = {"transformer": experiment.initial_trunk(config, gpt_cfg)}
    else:
        raise app.UsageError("give --workdir (a trained policy) or --config (the base model)")
    if f.queries:
        texts, refs = sources.load_texts(f.queries)[: f.num_queries], None
    else:  # summarization sources come with their reference summaries
        t = config.task
        source = experiment.query_source(config)
        items = summarization.texts_and_references(source, f.split,
                                                   t.get("query_data_dir", ""), f.num_queries)
        texts = [text for text, _ in items]
        refs = [ref for _, ref in items] if summarization.is_summarization_source(
            source) else None
    rows = sample_texts(config, params, texts, num_samples=f.num_samples,
                        temperature=f.temperature, top_k=f.top_k, top_p=f.top_p, seed=f.seed,
                        references=refs)
    runtime.atomic_write_text(f.output, "".join(json.dumps(r) + "\n" for r in rows))
    logger.info("wrote %d samples to %s", len(rows), f.output)


if __name__ == "__main__":
    # Flags are defined only when run as a program, so entry modules import side by side.
    config_flags.DEFINE_config_file("config", None, "Config file, to sample the base model.",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "A train_policy workdir to sample the policy of.")
    flags.DEFINE_string("output", None, "JSONL file to write.")
    flags.DEFINE_string("queries", None, "Text file (one passage per line) or JSONL of queries.")
    flags.DEFINE_string("split", "test", "Split of the task's query dataset when no --queries.")
    flags.DEFINE_integer("num_queries", 32, "How many queries to use.")
    flags.DEFINE_integer("num_samples", 1, "Continuations per query.")
    flags.DEFINE_float("temperature", None, "Default: the task's training temperature.")
    flags.DEFINE_integer("top_k", 0, "Top-k truncation (0 = off, as in training).")
    flags.DEFINE_float("top_p", 1.0, "Nucleus truncation (1 = off, as in training).")
    flags.DEFINE_integer("seed", 0, "PRNG seed.")
    flags.mark_flags_as_required(["output"])
    cli.run(main)  # absl app.run; configs/... also found in the installed copy
