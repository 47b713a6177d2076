r"""A mock experiment end to end on a CPU, from nothing: SFT, mock labels, reward model, PPO.

  python -m rlhf_jax.quickstart --workdir /tmp/quickstart              # sentiment (VADER)
  python -m rlhf_jax.quickstart --task tldr --workdir /tmp/qs_tldr     # summaries ("copying")
  python -m rlhf_jax.quickstart --online --workdir /tmp/qs_online      # online labels (§5.3)
  python -m rlhf_jax.quickstart --task descriptiveness --workdir /tmp/qs_desc  # vivid words
  python -m rlhf_jax.quickstart --reward labeler --workdir /tmp/qs_direct  # direct reward

`--reward labeler` is the paper's "direct" baseline (spec §8): stages 2 and 3 are skipped and
PPO maximises the mock labeler's own score (`rewards.kind="labeler"`), with the same PPO
budget, seed and before/after measurement as the learned-reward run.

Stages (each resumable; rerunning the command skips what is done):
1. `sft/`: a tiny random GPT-2 (real GPT-2 vocabulary) is fine-tuned on the bundled book
   passages so that it writes words and sentences: for `sentiment` as a language model (the
   paper's style tasks started from a book-fine-tuned model), for `tldr` as a summarizer of the
   passages ("builtin:lead": the first sentence is the reference summary);
2. `labels.json`: mock best-of-4 labels: a scorer picks the best of 4 samples of that model, as
   the paper's mock sentiment experiment did with a classifier. `sentiment`: VADER sentiment;
   `descriptiveness`: the share of vivid words (`style_scorers.DescriptivenessScorer`);
   `tldr`: the "copying" labeler, which prefers sentences copied from the article, as the
   paper's human labelers of summaries ended up doing (spec §8);
3. `reward/`: the reward model, trained on those labels and normalised;
4. `policy/`: PPO against the reward model;
5. `before_after.md`, `summary.json`: samples of the initial and the trained policy on held-out
   queries, judged by the mock labeler's own metric (not by the learned reward): the mean VADER
   or descriptiveness score, or the novelty of the summaries' n-grams (lower = more copying) and their copying
   score, with ROUGE against the references.

`--online` replaces stages 2 and 3 by the online loop (spec §5.3, `rlhf_jax.online`): a label
server and two mock label workers start in the background (`labels/`, logs in `labels/logs/`),
PPO asks them for labels on its own samples as it trains and retrains the reward model on the
schedule (`policy/online/rm_round_KK`), and the summary adds `online/policy_preferred` and the
reward model's accuracy on fresh labels over time. The services are stopped at the end.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os

import ml_collections
import numpy as np
from absl import app, flags

from rlhf_jax import (
    cli,
    experiment,
    label,
    labelers,
    paths,
    runtime,
    sample,
    style_scorers,
    summary_metrics,
    summary_scorers,
    train_policy,
    train_reward,
    train_sft,
)
from rlhf_jax.data import summarization

logger = logging.getLogger(__name__)
TASKS = ("sentiment", "descriptiveness", "tldr")
REWARDS = ("learned", "labeler")  # rewards.kind
# The books tasks' mock labelers, judged by the same scorer (name, scorer class).
BOOKS_JUDGES = {"sentiment": ("vader", labelers.VaderSentimentScorer),
                "descriptiveness": ("descriptiveness", style_scorers.DescriptivenessScorer)}


def quickstart_config(workdir: str, task: str = "sentiment",
                      online: bool = False,
                      reward: str = "learned") -> ml_collections.ConfigDict:
    """`configs/{task}.py:runlocal` with CPU-sized labels, reward model and PPO (and, with
    `online`, the online loop's schedule: 1,024 labels of ρ, then 3 retrains up to 2,048).

    Args:
        workdir: where every stage writes.
        task: one of `TASKS`.
        online: collect the labels online from mock workers (sentiment only).
        reward: "learned" (mock labels, a reward model, PPO against it) or "labeler" (PPO
            directly against the mock labeler's score: `rewards.kind="labeler"`).
    """
    if task not in TASKS:
        raise ValueError(f"quickstart task {task!r}: known tasks are {', '.join(TASKS)}")
    if reward not in REWARDS:
        raise ValueError(f"quickstart reward {reward!r}: known rewards are {', '.join(REWARDS)}")
    if online and task != "sentiment":
        raise ValueError("--online runs the sentiment experiment (its mock workers judge with "
                         "VADER); drop --task or --online")
    if online and reward == "labeler":
        raise ValueError("--online collects labels for a reward model; --reward labeler uses "
                         "none: drop one")
    # The repo's configs/, or the copy a non-editable install puts in rlhf_jax/configs/.
    path = os.path.join(cli.configs_dir() or "configs", f"{task}.py")
    spec = importlib.util.spec_from_file_location(f"{task}_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("runlocal")
    config.labels.path = paths.join(workdir, "labels.json")
    config.labels.num_train, config.labels.num_valid = 4096, 256
    config.labeler.rollout_batch_size = 64
    config.rewards.batch_size = 16
    # The tiny book-tuned model is a poor starting point for a reward model: from it, one
    # epoch of these labels left held-out accuracy at chance (0.26-0.28 on 128-256 labels, for
    # lr 3e-4 to 3e-3, 512 to 4096 labels); from a random trunk the same run reached 0.54.
    config.rewards.init = "random"
    config.rewards.trained_model = paths.join(workdir, "reward")
    config.rewards.kind = reward
    # PPO sized for two CPU cores; a random-init tiny model needs a much larger step than the
    # original's 1e-5 for pretrained GPT-2.
    config.ppo.batch_size = 32
    config.ppo.total_episodes = 32 * 60
    config.ppo.lr = 3e-4
    config.log_every = 5
    config.ckpt_every = 20
    if task == "tldr":
        # The tiny summarizer never copies a whole sentence, so the paper's sentence rule
        # scores nearly every sample 0 (chosen 0.002 in our run: labels without information);
        # the share of copied word bigrams is a graded version of the same preference.
        config.labeler.copy_ngram = 2
    if online:
        # The server's URL is set when it has started (`run_quickstart`). The tiny model rarely
        # ends a sample with '.', so every sample is shown (as the offline labeler does).
        config.online.update(dict(enabled=True, initial_labels=1024, total_labels=2048,
                                  rm_rounds=4, schedule="paper", query_every=1,
                                  validation_fraction=0.25, invalid_samples="keep", poll_s=0.5))
        config.labels.num_valid = 0
    return config


def judge(task: str, rows: list[dict], copy_ngram: int = 0) -> dict:
    """The mock labeler's own metric of samples (adds per-row scores to `rows`)."""
    queries, responses = [r["query"] for r in rows], [r["response"] for r in rows]
    if task in BOOKS_JUDGES:
        name, scorer = BOOKS_JUDGES[task]
        scores = scorer("response")(queries, responses)
        for row, score in zip(rows, scores):
            row["score"] = float(score)
        return {name: float(np.mean(scores)),
                f"{name}_stderr": float(np.std(scores) / np.sqrt(len(scores)))}
    scores = summary_scorers.CopyingScorer(ngram=copy_ngram)(queries, responses)
    for row, score in zip(rows, scores):
        row["score"] = float(score)
    refs = [r.get("reference") for r in rows]
    report = summary_metrics.summary_report(responses, queries,
                                            refs if all(refs) else None)
    out = {"copying_score": float(np.mean(scores)),
           "novelty": report["novelty"], "copy_from_start_rate": report["copy_from_start_rate"],
           "mean_words": report["mean_words"]}
    if "rouge" in report:
        out["rouge"] = report["rouge"]
    return out


def _clean(text: str) -> str:
    """Markdown-table-safe text: no pipes or newlines; GPT-2's end of text shown as [EOT]."""
    text = text.replace("<|endoftext|>", " [EOT] ")
    return text.replace("|", "/").replace("\n", " ").strip()


def _table(before: list[dict], after: list[dict], metric: str, n: int = 6) -> str:
    lines = [f"| query (end) | initial policy | {metric} | trained policy | {metric} |",
             "|---|---|---|---|---|"]
    clean = _clean
    for b, a in zip(before[:n], after[:n]):
        lines.append(f"| …{clean(b['query'][-60:])} | {clean(b['response'])} | {b['score']:.2f} "
                     f"| {clean(a['response'])} | {a['score']:.2f} |")
    return "\n".join(lines) + "\n"


def _novelty_text(judged: dict) -> str:
    return ", ".join(f"{k.removeprefix('novel_').removesuffix('_pct')} "
                     + ("n/a" if v is None else f"{v:.1f}%") for k, v in judged["novelty"].items())


def _headline(task: str, before: dict, after: dict, n: int) -> str:
    if task in BOOKS_JUDGES:
        name = BOOKS_JUDGES[task][0]
        label = "VADER compound" if name == "vader" else "descriptiveness"
        return (f"Mean {label} score of {n} samples on held-out queries: "
                f"**{before[name]:.3f} ± {before[name + '_stderr']:.3f} → "
                f"{after[name]:.3f} ± {after[name + '_stderr']:.3f}** (± one standard error).")
    return (f"{n} summaries of held-out passages. Copying score (the labeler's): "
            f"**{before['copying_score']:.3f} → {after['copying_score']:.3f}**. Novelty (% of the "
            f"summaries' n-grams not in the article; lower = more copied):\n\n- initial: "
            f"{_novelty_text(before)}\n- trained: {_novelty_text(after)}")


def run_quickstart(workdir: str, task: str = "sentiment", num_queries: int = 64,
                   config: ml_collections.ConfigDict | None = None,
                   samples_per_query: int = 8, online: bool = False) -> dict:
    """Runs every stage; returns the summary (the labeler's metric before and after PPO).

    Args:
        workdir: where every stage writes.
        task: one of `TASKS`.
        num_queries: held-out queries to sample before and after.
        samples_per_query: samples of each query, before and after.
        config: overrides `quickstart_config(workdir, task)` (tests shrink it).
        online: collect the labels online from mock workers through a label server.
    """
    paths.makedirs(workdir)
    config = config or quickstart_config(workdir, task, online=online)
    sft_dir = paths.join(workdir, "sft")
    logger.info("[1/5] supervised fine-tuning of a tiny GPT-2 (%s)", config.sft.mode)
    train_sft.train_sft(config, sft_dir)
    config.model.checkpoint = paths.join(sft_dir, train_sft.HF_MODEL_DIR)
    direct = config.rewards.get("kind", "learned") == "labeler"
    policy_dir = paths.join(workdir, "policy")
    if online:
        logger.info("[2-4/5] online: PPO with labels from mock workers, reward model retrained "
                    "on the schedule")
        last, rm_final = _run_online(config, workdir, policy_dir), {}
    elif direct:
        logger.info("[2-3/5] skipped: PPO maximises the %r labeler's score directly",
                    config.labeler.kind)
        logger.info("[4/5] PPO")
        last, rm_final = train_policy.train_policy(config, policy_dir), {}
    else:
        if not paths.exists(config.labels.path):
            logger.info("[2/5] mock labels: the %r labeler picks the best of 4 samples",
                        config.labeler.kind)
            label.write_mock_labels(config, config.labels.path)
        logger.info("[3/5] reward model")
        rm_final = train_reward.train_reward(config, config.rewards.trained_model)
        logger.info("[4/5] PPO")
        last = train_policy.train_policy(config, policy_dir)
    logger.info("[5/5] samples of the initial and the trained policy on held-out queries")
    t = config.task
    items = summarization.texts_and_references(experiment.query_source(config), "test",
                                               t.query_data_dir, num_queries)
    texts = [text for text, _ in items]
    refs = [ref for _, ref in items] if all(ref is not None for _, ref in items) else None
    gpt_cfg = experiment.gpt2_config(config)
    initial = {"transformer": experiment.initial_trunk(config, gpt_cfg)}
    before = sample.sample_texts(config, initial, texts, num_samples=samples_per_query, seed=1,
                                 references=refs)
    trained, _ = sample.load_policy(policy_dir)
    after = sample.sample_texts(config, trained, texts, num_samples=samples_per_query, seed=1,
                                references=refs)
    ngram = config.labeler.get("copy_ngram", 0)
    judged_before, judged_after = judge(task, before, ngram), judge(task, after, ngram)
    summary = {
        "task": task,
        "reward": "labeler" if direct else "learned",
        "before": judged_before,
        "after": judged_after,
        "num_samples": len(after),
        "reward_model_valid_accuracy": rm_final.get("valid/accuracy"),
        "final_objective_score": last.get("objective/score"),
        "final_objective_kl": last.get("objective/kl"),
    }
    if online:
        summary["online"] = _online_summary(policy_dir)
    metric = {"sentiment": "VADER", "descriptiveness": "descriptiveness"}.get(task, "copying")
    extra = _online_text(summary["online"]) if online else ""
    against = "the labeler's score directly" if direct else "a learned reward model"
    md = (f"# Quickstart ({task}): before and after PPO against {against}\n\n"
          f"{_headline(task, judged_before, judged_after, len(after))}\n\n{extra}"
          + _table(before[::samples_per_query], after[::samples_per_query], metric))
    runtime.atomic_write_text(paths.join(workdir, "before_after.md"), md)
    runtime.atomic_write_text(paths.join(workdir, "summary.json"), json.dumps(summary, indent=2))
    runtime.atomic_write_text(paths.join(workdir, "samples_before_after.jsonl"), "".join(
        json.dumps({"stage": stage, **row}) + "\n"
        for stage, rows in (("before", before), ("after", after)) for row in rows))
    print(md, flush=True)
    print(json.dumps(summary, indent=2), flush=True)
    return summary


def _run_online(config, workdir: str, policy_dir: str) -> dict:
    """PPO with online labels from a label server and mock workers run for the occasion."""
    from rlhf_jax.online import services

    with services.label_services(os.path.join(workdir, "labels"), labeler="vader") as (url,
                                                                                     token):
        config.online.server = url
        os.environ[config.online.token_env] = token  # the config never holds the token
        return train_policy.train_policy(config, policy_dir)


def _online_summary(policy_dir: str) -> dict:
    """online/policy_preferred and the fresh-label accuracy over PPO iterations."""
    from rlhf_jax import metrics as metrics_lib

    rows = metrics_lib.read_jsonl(os.path.join(policy_dir, "metrics.jsonl"))
    series = {k: [[r["step"], r[k]] for r in rows if k in r]
              for k in ("online/policy_preferred", "online/rm_accuracy_fresh")}
    return {"policy_preferred": series["online/policy_preferred"],
            "rm_accuracy_fresh": series["online/rm_accuracy_fresh"],
            "labels": int(rows[-1].get("online/labels", 0)) if rows else 0,
            "rm_rounds": int(rows[-1].get("online/rm_round", -1)) + 1 if rows else 0}


def _online_text(online: dict) -> str:
    pref = online["policy_preferred"]
    shown = ", ".join(f"{v:.2f} (iteration {s})" for s, v in pref[::max(1, len(pref) // 6)])
    acc = ", ".join(f"{v:.2f}" for _, v in online["rm_accuracy_fresh"])
    return (f"Online: {online['labels']} labels, {online['rm_rounds']} reward-model rounds. "
            f"Labelers preferred the policy's sample to the reference's in "
            f"{shown or 'no validation comparison yet'} (chance 0.5); reward-model accuracy on "
            f"fresh labels before each retrain: {acc or 'n/a'} (chance 0.25).\n\n")


def main(argv):
    del argv
    runtime.setup_logging(flags.FLAGS.workdir)
    f = flags.FLAGS
    run_quickstart(f.workdir, f.task, online=f.online,
                   config=quickstart_config(f.workdir, f.task, f.online, f.reward))


if __name__ == "__main__":
    flags.DEFINE_string("workdir", None, "Where every stage writes its outputs.")
    flags.DEFINE_enum("task", "sentiment", TASKS, "Which mock experiment to run.")
    flags.DEFINE_bool("online", False, "Collect labels online from mock label workers.")
    flags.DEFINE_enum("reward", "learned", REWARDS,
                      "learned: mock labels and a reward model; labeler: PPO directly against "
                      "the mock labeler's score (the paper's baseline).")
    flags.mark_flags_as_required(["workdir"])
    app.run(main)
