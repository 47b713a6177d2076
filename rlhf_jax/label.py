r"""Write mock preference labels, so the whole pipeline runs without humans.

  python -m rlhf_jax.label --config configs/sentiment.py:runlocal --output /tmp/labels.json \
      [--num_labels 96] [--config.labeler.temperature=0.2]

For each query of the task's query stream, N samples are drawn from the initial model ρ at the
task temperature (as the paper's labelers saw), post-processed exactly as in training (padded
after the truncation token), decoded and shown to a mock labeler (`config.labeler`), which picks
the best. As in the paper, the labeler sees only samples that pass the task's validity check
(`labeler.invalid_samples="resample"`: invalid samples are re-drawn, a query that finds no N
valid samples is dropped; the counts are logged and returned). The output is a JSON array in
the released label files' format (spec §5.2), written atomically; `train_reward` reads it back
with full validation.

Your own preference data as text (JSONL or Parquet: best-of-N, prompt/chosen/rejected pairs,
summarize_from_feedback comparisons) becomes a label file with
  python -m rlhf_jax.label import --task configs/sentiment.py --input prefs.jsonl \
      --format pairs --output labels.json [--on_long truncate|error]
(see rlhf_jax/data/preference_import.py).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags
from ml_collections import config_flags

from rlhf_jax import (
    cli,
    experiment,
    label_types,
    labelers,
    runtime,
    sampling,
    scorers,
    sharding,
)
from rlhf_jax.data import labels as labels_lib
from rlhf_jax.data import tasks
from rlhf_jax.runs import validation

logger = logging.getLogger(__name__)

SCORER_KINDS = scorers.SCORER_KINDS  # kept importable from here
make_scorer = scorers.make_scorer

# How the labeler treats samples that fail the task's validity check (`labeler.invalid_samples`).
INVALID_SAMPLES = validation.INVALID_SAMPLES


def draw_valid_samples(draw: Callable[[int], np.ndarray], num_queries: int, n: int,
                       spec: tasks.TaskSpec, rounds: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """Rejection sampling of N valid samples per query, as the paper showed its labelers.

    The paper kept only continuations with the truncation token in the allowed window (a '.'
    between tokens 16 and 24 for the books tasks) by rejection sampling (spec §2.3). Each round
    draws N fresh samples per query; a query's invalid slots take its fresh valid samples in
    order. All draws are independent samples of ρ, so every filled slot is a sample of ρ
    conditioned on validity. After `rounds` extra rounds a query still short of N valid samples
    is dropped.

    Args:
        draw: `draw(round)` returns int[num_queries * N, L] fresh samples of round `round`,
            query-major (the N samples of query 0 first).
        num_queries: queries in the batch.
        n: samples per query.
        spec: the task settings (truncation token and window).
        rounds: extra rounds after the first draw.

    Returns:
        samples: int[num_queries, N, L], valid wherever `keep`.
        keep: bool[num_queries], whether the query got N valid samples.
        counts: {"drawn": samples drawn, "invalid": invalid ones among them (never shown)}.
    """
    samples = np.array(draw(0)).reshape(num_queries, n, -1)
    valid = tasks.responses_valid(samples.reshape(num_queries * n, -1), spec).reshape(
        num_queries, n)
    counts = {"drawn": valid.size, "invalid": int((~valid).sum())}
    for r in range(1, rounds + 1):
        if valid.all():
            break
        fresh = np.asarray(draw(r)).reshape(num_queries, n, -1)
        fresh_valid = tasks.responses_valid(fresh.reshape(num_queries * n, -1), spec).reshape(
            num_queries, n)
        counts["drawn"] += fresh_valid.size
        counts["invalid"] += int((~fresh_valid).sum())
        for q in np.flatnonzero(~valid.all(axis=1)):
            holes, donors = np.flatnonzero(~valid[q]), np.flatnonzero(fresh_valid[q])
            k = min(len(holes), len(donors))
            samples[q, holes[:k]] = fresh[q, donors[:k]]
            valid[q, holes[:k]] = True
    return samples, valid.all(axis=1), counts


def write_mock_labels(config: ml_collections.ConfigDict, output: str, num_labels: int = 0) -> dict:
    """Samples, labels and writes `num_labels` best-of-N records; returns summary stats.

    With `labeler.invalid_samples="resample"` (the default) the labeler sees only samples that
    pass the task's validity check (`draw_valid_samples`); queries that found no N valid
    samples are dropped and more queries are read until `num_labels` records are written.

    Args:
        config: an experiment config with `labeler`, `labels`, `task` and `model` sections.
        output: label file path (local or gs://).
        num_labels: records to write; 0 means labels.num_train + labels.num_valid.

    Returns:
        {"num_labels", "chosen_score", "mean_score", "samples_drawn", "invalid_samples",
        "queries_dropped"}: the labeler's mean score of the chosen samples and of all samples
        shown; how many samples were drawn from ρ, how many of them were invalid (re-drawn
        with "resample"; shown with "keep") and how many queries were dropped.

    Raises:
        validation.ConfigError: before any sampling, for a bad config value (including
            `labeler.invalid_samples`), a negative `num_labels` or an output directory that is
            missing or not writable.
        ValueError: when a whole batch of queries got no N valid samples (the model almost
            never emits the truncation token).
    """
    validation.check_flag_count("num_labels", num_labels, 0)
    validation.check_output_file(output)
    mesh, rules = validation.validate_with_mesh(config, ("model", "task", "labeler"))
    label_type = label_types.get_label_type(config.labels.type)
    num_labels = num_labels or config.labels.num_train + config.labels.num_valid
    lab = config.labeler
    mode = lab.get("invalid_samples", "resample")
    rounds = lab.get("resample_rounds", 8) if mode == "resample" else 0
    gpt_cfg = experiment.gpt2_config(config)
    tok = experiment.tokenizer(config)
    spec = experiment.task_spec(config, tok, gpt_cfg)
    dataset = experiment.query_dataset(config, tok, spec)
    labeler = labelers.BestOfNLabeler(make_scorer(config, tok, spec), lab.temperature, seed=lab.seed)
    n = label_type.num_samples
    trunk_sharding = {"transformer": sharding.param_shardings(gpt_cfg, (), mesh, rules)["transformer"]}
    ref = jax.device_put({"transformer": experiment.initial_trunk(config, gpt_cfg)}, trunk_sharding)
    batch = sharding.batch_sharding(mesh)
    sample_fn = sampling.make_sampler(gpt_cfg, response_length=spec.response_length,
                                      temperature=spec.temperature,
                                      params_sharding=trunk_sharding, batch_sharding=batch)

    @functools.partial(jax.jit, in_shardings=batch, out_shardings=batch)
    def contexts(queries):
        return jnp.repeat(tasks.format_context(queries, spec), n, axis=0)

    post = jax.jit(functools.partial(tasks.postprocess_responses, spec=spec))
    rng = jax.random.key(lab.seed)
    records, chosen, everything = [], [], []
    totals = {"drawn": 0, "invalid": 0, "dropped": 0}
    kept, i = 0, 0
    with sharding.mesh_context(mesh, rules):
        while kept < num_labels:
            queries = dataset.get_batch(lab.query_offset + i, lab.rollout_batch_size)
            ctx = contexts(sharding.host_batch_to_global(queries, mesh))
            key = jax.random.fold_in(rng, i)

            def draw(r, ctx=ctx, key=key):
                # Round 0 is the key of the labels written before rejection sampling existed.
                k = key if r == 0 else jax.random.fold_in(key, r)
                return np.asarray(post(sample_fn(ref, ctx, k)["responses"]))

            samples, keep, counts = draw_valid_samples(draw, len(queries), n, spec, rounds)
            if mode == "keep":
                keep = np.ones_like(keep)
            totals["drawn"] += counts["drawn"]
            totals["invalid"] += counts["invalid"]
            totals["dropped"] += int((~keep).sum())
            i += 1
            if not keep.any():
                raise ValueError(
                    f"labeler: none of {len(queries)} queries got {n} valid samples (the "
                    f"truncation token {spec.truncate_token} at index >= {spec.truncate_after}) "
                    f"in {rounds + 1} draws; {counts['drawn'] - counts['invalid']} of "
                    f"{counts['drawn']} samples were valid. The initial model rarely ends a "
                    "response there: fine-tune it first (train_sft), or show invalid samples too "
                    "with --config.labeler.invalid_samples=keep")
            queries, samples = queries[keep], samples[keep]
            q_texts = labelers.decode_tokens(tok, queries, spec.pad_id)
            s_texts = [labelers.decode_tokens(tok, row, spec.pad_id) for row in samples]
            scores = labeler.scores(q_texts, s_texts)
            best = labeler.label(q_texts, s_texts)
            records.append(labelers.make_label_records(queries, samples, best))
            chosen.append(scores[np.arange(len(best)), best])
            everything.append(scores)
            kept += len(queries)
            logger.info("labelled %d/%d (queries dropped so far: %d)", min(kept, num_labels),
                        num_labels, totals["dropped"])
    out = {k: np.concatenate([r[k] for r in records])[:num_labels] for k in records[0]}
    labels_lib.save_labels(output, out)
    stats = {
        "num_labels": num_labels,
        "chosen_score": float(np.concatenate(chosen)[:num_labels].mean()),
        "mean_score": float(np.concatenate(everything)[:num_labels].mean()),
        "samples_drawn": totals["drawn"],
        "invalid_samples": totals["invalid"],
        "queries_dropped": totals["dropped"],
    }
    shown = "re-drawn, never shown" if mode == "resample" else "shown to the labeler"
    logger.info("wrote %d %s labels to %s (labeler score: chosen %.3f, all samples %.3f); "
                "%d of %d samples drawn were invalid (%s), %d queries dropped", num_labels,
                label_type.name, output, stats["chosen_score"], stats["mean_score"],
                totals["invalid"], totals["drawn"], shown, totals["dropped"])
    return stats


FLAGS = flags.FLAGS


def main(argv):
    del argv
    runtime.maybe_initialize_distributed()
    runtime.setup_logging()
    write_mock_labels(FLAGS.config, FLAGS.output, FLAGS.num_labels)


if __name__ == "__main__" and sys.argv[1:2] == ["import"]:
    # `python -m rlhf_jax.label import --task ... --input ... --format ...`: your own text
    # preferences into a label file (rlhf_jax/data/preference_import.py has its flags).
    from rlhf_jax.data import preference_import

    del sys.argv[1]
    preference_import.main()
elif __name__ == "__main__":
    # Flags are defined only when run as a program, so entry modules import side by side.
    config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:args]).",
                                    lock_config=True)
    flags.DEFINE_string("output", None, "Label file to write (JSON array).")
    flags.DEFINE_integer("num_labels", 0, "Records to write; 0 = num_train + num_valid.")
    flags.mark_flags_as_required(["config", "output"])
    cli.run(main)  # absl app.run; configs/... also found in the installed copy
