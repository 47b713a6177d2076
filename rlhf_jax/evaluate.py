r"""Summary evaluation of sampled summaries: ROUGE, novelty and copying (spec §8).

  python -m rlhf_jax.evaluate --samples samples.jsonl --output report.json [--plot report.png] \
      [--step 100]

`samples.jsonl` has one JSON object per line with "query" (the article text), "response" (the
summary) and, optionally, "reference" (its reference summary): the output of
`python -m rlhf_jax.sample`, and the `samples.jsonl` of train_sft / train_policy workdirs (whose
rows also carry a "step"; `--step` keeps one step's rows). Other fields are ignored. Either every
row has a "reference" or none does.

The report (`summary_metrics.summary_report`) holds the number of summaries, mean length,
novelty of 1-4-grams and of sentences in percent (the paper's Fig. 5), the copy-from-start rate
and, with references, ROUGE-1/2/L F-measures plus the references' own novelty. With references
(a summarization task) the report also holds "lead3": the same metrics for the lead-3 baseline
(the first three sentences of each distinct article, `summary_metrics.lead`), the paper's
strongest simple baseline on CNN/DM; `--nolead3` leaves it out. The report is written
atomically (JSON has no NaN: a percentage with nothing to count is null). `--plot` draws the
novelty per n as bars, beside the references' and lead-3's when present.
"""

from __future__ import annotations

import io
import json
import math
import os
from typing import Any

from absl import app, flags

from rlhf_jax import paths, runtime, summary_metrics
from rlhf_jax.data import sources
from rlhf_jax.runs import validation

FIELDS = ("query", "response")


class SamplesError(ValueError):
    """A malformed samples file; the message names the file and the 1-based line."""


def read_samples(path: str, step: int | None = None) -> dict[str, list[str] | None]:
    """Reads and validates a samples JSONL file.

    Args:
        path: the file (local or `gs://`; blank lines are skipped).
        step: keep only rows whose "step" equals this; None keeps every row.

    Returns:
        {"query": [...], "response": [...], "reference": [...] or None}.

    Raises:
        SamplesError: naming file and line for bytes that are not UTF-8, malformed JSON, a
            non-object row, a missing or non-string field, a "reference" on some rows only, a
            missing "step" when `step` is given, or no rows at all.
    """
    out: dict[str, list[str]] = {"query": [], "response": [], "reference": []}
    first_ref_line = first_plain_line = None
    with _open_binary(path) as f:
        lines = sources.utf8_lines(f, path, SamplesError)
        for lineno, where, row in sources.json_objects(lines, path, SamplesError):
            for field in FIELDS + (("reference",) if "reference" in row else ()):
                if field not in row:
                    raise SamplesError(f"{where}: missing field {field!r}; has {sorted(row)}")
                if not isinstance(row[field], str):
                    raise SamplesError(f"{where}: field {field!r} is "
                                       f"{type(row[field]).__name__}, not a string")
            if "reference" in row:
                first_ref_line = first_ref_line or lineno
            else:
                first_plain_line = first_plain_line or lineno
            if first_ref_line and first_plain_line:
                raise SamplesError(
                    f"{path}: line {first_ref_line} has a 'reference' but line "
                    f"{first_plain_line} has none; give references on every row or on none")
            if step is not None:
                if "step" not in row:
                    raise SamplesError(f"{where}: no 'step' field, but step={step} was asked for")
                if row["step"] != step:
                    continue
            for field in FIELDS + (("reference",) if "reference" in row else ()):
                out[field].append(row[field])
    if not out["response"]:
        raise SamplesError(f"{path}: no samples" + (f" with step {step}" if step is not None
                                                    else ""))
    return {"query": out["query"], "response": out["response"],
            "reference": out["reference"] if first_ref_line else None}


def _open_binary(path: str):
    """A local file opened for reading, or a `gs://` object read whole (samples are small)."""
    return io.BytesIO(paths.read_bytes(path)) if paths.is_remote(path) else open(path, "rb")


def lead3_report(queries: list[str], references: list[str]) -> dict[str, Any]:
    """The summary report of the lead-3 baseline on the distinct (article, reference) pairs.

    Args:
        queries: the articles of the samples (repeated when a query has several samples).
        references: their reference summaries, aligned with `queries`.

    Returns:
        `summary_metrics.summary_report` of the first three sentences of each distinct article:
        the same ROUGE, novelty and copying metrics as the model's samples get.
    """
    pairs = list(dict.fromkeys(zip(queries, references)))
    articles = [a for a, _ in pairs]
    leads = [summary_metrics.lead(a, 3) for a in articles]
    return summary_metrics.summary_report(leads, articles, [r for _, r in pairs])


def evaluate_samples(samples: str, output: str, plot: str | None = None,
                     step: int | None = None, lead3: bool = True) -> dict[str, Any]:
    """Computes the summary report of a samples file and writes it (and the plot).

    Args:
        samples: the samples JSONL (see the module docstring).
        output: the JSON report to write (atomically).
        plot: optional PNG path for the novelty bar plot.
        step: as `read_samples`.
        lead3: add the lead-3 baseline's report as "lead3" when the samples have references.

    Returns:
        The report, with "samples" (the input path) and "step" added.
    """
    rows = read_samples(samples, step)
    report = summary_metrics.summary_report(rows["response"], rows["query"], rows["reference"])
    report = {"samples": os.fspath(samples), "step": step, **report}
    if lead3 and rows["reference"] is not None:
        report["lead3"] = lead3_report(rows["query"], rows["reference"])
    runtime.atomic_write_text(output, json.dumps(report, indent=2) + "\n")
    if plot:
        plot_novelty(report, plot)
    return report


def _novelty_values(novelty: dict[str, float | None]) -> tuple[list[str], list[float]]:
    keys = sorted(k for k in novelty if k.endswith("gram_pct"))
    keys.append("novel_sentence_pct")
    labels = [k.removeprefix("novel_").removesuffix("_pct").replace("gram", "-gram") for k in keys]
    values = [math.nan if novelty.get(k) is None else novelty[k] for k in keys]
    return labels, values


def plot_novelty(report: dict[str, Any], path: str, title: str | None = None) -> str:
    """Bar plot of novelty per n-gram order and for sentences, written atomically as PNG.

    Uses matplotlib's object API with the Agg canvas (no display, no pyplot state). Bars
    with nothing to count (null in the report) are drawn at 0 and labelled "n/a".

    Args:
        report: a `summary_metrics.summary_report` dict.
        path: destination PNG.
        title: figure title; defaults to the sample count and copy-from-start rate.

    Returns:
        The PNG path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    series = [("summaries", report["novelty"])]
    if "reference_novelty" in report:
        series.append(("references", report["reference_novelty"]))
    if "lead3" in report:
        series.append(("lead-3", report["lead3"]["novelty"]))
    fig = Figure(figsize=(6.4, 3.6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / len(series)
    for i, (name, novelty) in enumerate(series):
        labels, values = _novelty_values(novelty)
        xs = [x + (i - (len(series) - 1) / 2) * width for x in range(len(labels))]
        bars = ax.bar(xs, [0.0 if math.isnan(v) else v for v in values], width, label=name)
        ax.bar_label(bars, ["n/a" if math.isnan(v) else f"{v:.1f}" for v in values], fontsize=8)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel("novel (% not in the article)")
    ax.set_ylim(0, 110)
    ax.legend(loc="lower right")
    ax.set_title(title or f"novelty of {report['n']} summaries "
                          f"(copy-from-start {100 * report['copy_from_start_rate']:.1f}%)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    runtime.atomic_write_bytes(path, buf.getvalue())
    return path


FLAGS = flags.FLAGS


def main(argv):
    del argv
    paths.check_readable(FLAGS.samples, "--samples")  # gs://: before any work
    validation.check_output_file(FLAGS.output)
    if FLAGS.plot:
        validation.check_output_file(FLAGS.plot, "plot")
    report = evaluate_samples(FLAGS.samples, FLAGS.output, FLAGS.plot, FLAGS.step, FLAGS.lead3)
    brief = {k: report[k] for k in ("n", "mean_words", "copy_from_start_rate")}
    brief |= {"novelty": report["novelty"], "rouge": report.get("rouge")}
    if "lead3" in report:
        brief["lead3_rouge"] = report["lead3"].get("rouge")
    print(json.dumps(brief))


if __name__ == "__main__":
    # Flags are defined only when run as a program, so entry modules import side by side.
    flags.DEFINE_string("samples", None, "Samples JSONL with query/response[/reference] fields.")
    flags.DEFINE_string("output", None, "Report JSON to write.")
    flags.DEFINE_string("plot", None, "Optional PNG bar plot of novelty per n.")
    flags.DEFINE_integer("step", None, "Keep only rows with this 'step' (workdir samples files).")
    flags.DEFINE_bool("lead3", True, "With references, also score the lead-3 baseline.")
    flags.mark_flags_as_required(["samples", "output"])
    app.run(main)
