"""The mock labelers' scorers by name (spec §5.1, §5.3: the programmatic judges behind mock labels).

One place maps `labeler.kind` to a scorer, for `label` (mock labels), the label worker and
anything else that picks a labeler by name.
"""

from __future__ import annotations

import ml_collections

from rlhf_jax import labelers, style_scorers, summary_scorers
from rlhf_jax.data import summarization, tasks

SCORER_KINDS = ("vader", "descriptiveness", "copying", "rouge")


def make_scorer(config: ml_collections.ConfigDict, tok=None, spec=None) -> labelers.Scorer:
    """The mock labeler's scorer named by `config.labeler.kind` (one of `SCORER_KINDS`).

    "vader": VADER compound sentiment of `labeler.field`. "descriptiveness": the share of vivid
    words (adjectives and adverbs) of `labeler.field` (`style_scorers.DescriptivenessScorer`).
    "copying": prefers responses made of sentences copied from the article
    (`summary_scorers.CopyingScorer`). "rouge": prefers responses closer to the article's
    reference summary by ROUGE-L (needs a summarization query dataset, and `tok` and `spec` to
    match decoded queries to their references).
    """
    kind = config.labeler.kind
    if kind == "vader":
        return labelers.VaderSentimentScorer(config.labeler.field)
    if kind == "descriptiveness":
        return style_scorers.DescriptivenessScorer(config.labeler.field)
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
    raise ValueError(f"labeler.kind={kind!r}: known kinds are {', '.join(SCORER_KINDS)}")
