r"""Write mock preference labels, so the whole pipeline runs without humans.

  python -m rlhf_jax.label --config configs/sentiment.py:runlocal --output /tmp/labels.json \
      [--num_labels 96] [--config.labeler.temperature=0.2]

For each query of the task's query stream, N samples are drawn from the initial model ρ at the
task temperature (as the paper's labelers saw), post-processed exactly as in training (padded
after the truncation token), decoded and shown to a mock labeler (`config.labeler`), which picks
the best. The output is a JSON array in the released label files' format (spec §5.2), written
atomically; `train_reward` reads it back with full validation.

Your own preference data as text (JSONL or Parquet: best-of-N, prompt/chosen/rejected pairs,
summarize_from_feedback comparisons) becomes a label file with
  python -m rlhf_jax.label import --task configs/sentiment.py --input prefs.jsonl \
      --format pairs --output labels.json [--on_long truncate|error]
(see rlhf_jax/data/preference_import.py).
"""

from __future__ import annotations

import functools
import logging
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
    sharding,
    summary_scorers,
)
from rlhf_jax.data import labels as labels_lib
from rlhf_jax.data import summarization, tasks

logger = logging.getLogger(__name__)


def make_scorer(config: ml_collections.ConfigDict, tok=None, spec=None) -> labelers.Scorer:
    """The mock labeler's scorer named by `config.labeler.kind`.

    "vader": VADER compound sentiment of `labeler.field`. "copying": prefers responses made of
    sentences copied from the article (`summary_scorers.CopyingScorer`). "rouge": prefers
    responses closer to the article's reference summary by ROUGE-L (needs a summarization
    query dataset, and `tok` and `spec` to match decoded queries to their references).
    """
    kind = config.labeler.kind
    if kind == "vader":
        return labelers.VaderSentimentScorer(config.labeler.field)
    if kind == "copying":
        return summary_scorers.CopyingScorer(ngram=config.labeler.get("copy_ngram", 0))
    if kind == "rouge":
        t = config.task
        if not summarization.is_summarization_source(t.query_dataset):
            raise ValueError(f"labeler.kind='rouge' needs reference summaries, but "
                             f"task.query_dataset={t.query_dataset!r} has none; use tfds:..., "
                             "jsonl:... or builtin:lead")
        refs = {}
        items = summarization.texts_and_references(t.query_dataset, "train", t.query_data_dir,
                                                   t.query_max_texts)
        for article, ref in items:
            query = tasks.make_query(tok.encode(article), spec)
            if query is not None:  # keyed by the query as the labeler sees it: decoded tokens
                refs[labelers.decode_tokens(tok, query[None], spec.pad_id)[0]] = ref
        return summary_scorers.RougeToReferenceScorer(refs)
    raise ValueError(f"labeler.kind={kind!r}: known kinds are 'vader', 'copying' and 'rouge'")


def write_mock_labels(config: ml_collections.ConfigDict, output: str, num_labels: int = 0) -> dict:
    """Samples, labels and writes `num_labels` best-of-N records; returns summary stats.

    Args:
        config: an experiment config with `labeler`, `labels`, `task` and `model` sections.
        output: label file path (local or gs://).
        num_labels: records to write; 0 means labels.num_train + labels.num_valid.

    Returns:
        {"num_labels", "chosen_score", "mean_score"}: the labeler's mean score of the chosen
        samples and of all samples.
    """
    label_type = label_types.get_label_type(config.labels.type)
    if not isinstance(label_type, label_types.BestOfN):
        raise ValueError(f"labels.type={config.labels.type!r}: mock labelers write best_of_N labels")
    num_labels = num_labels or config.labels.num_train + config.labels.num_valid
    lab = config.labeler
    mesh, rules = experiment.mesh_and_rules(config)
    sharding.check_batch_divisible("labeler.rollout_batch_size", lab.rollout_batch_size, mesh)
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
    num_batches = -(-num_labels // lab.rollout_batch_size)
    with sharding.mesh_context(mesh, rules):
        for i in range(num_batches):
            queries = dataset.get_batch(lab.query_offset + i, lab.rollout_batch_size)
            ctx = contexts(sharding.host_batch_to_global(queries, mesh))
            resp = sample_fn(ref, ctx, jax.random.fold_in(rng, i))["responses"]
            samples = np.asarray(post(resp)).reshape(len(queries), n, -1)
            q_texts = labelers.decode_tokens(tok, queries, spec.pad_id)
            s_texts = [labelers.decode_tokens(tok, row, spec.pad_id) for row in samples]
            scores = labeler.scores(q_texts, s_texts)
            best = labeler.label(q_texts, s_texts)
            records.append(labelers.make_label_records(queries, samples, best))
            chosen.append(scores[np.arange(len(best)), best])
            everything.append(scores)
            logger.info("labelled %d/%d", min((i + 1) * lab.rollout_batch_size, num_labels),
                        num_labels)
    out = {k: np.concatenate([r[k] for r in records])[:num_labels] for k in records[0]}
    labels_lib.save_labels(output, out)
    stats = {
        "num_labels": num_labels,
        "chosen_score": float(np.concatenate(chosen)[:num_labels].mean()),
        "mean_score": float(np.concatenate(everything)[:num_labels].mean()),
    }
    logger.info("wrote %d %s labels to %s (labeler score: chosen %.3f, all samples %.3f)",
                num_labels, label_type.name, output, stats["chosen_score"], stats["mean_score"])
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
