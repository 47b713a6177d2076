"""Comparisons from the policy's samples, and label rows back into label arrays (spec §5.3).

Pure numpy and text, no store and no devices:
- `build_comparisons`: queries and N samples per query become comparison records for the label
  store. Only queries whose samples all pass the task's validity check (the truncation token,
  spec §2.3) are sent, as the paper's labelers saw them (`online.invalid_samples="drop"`). A
  validation comparison holds 2 samples of ρ and 2 of the current policy π, shuffled, with
  each slot's source recorded in `provenance` (the paper's validation questions).
- Keys are `{run_id}/{draw}/{row}`: a function of the run and of the deterministic sampling
  counter, so a resumed run that re-draws the same samples re-sends the same keys, and the
  store (idempotent by key) adds nothing twice.
- `label_arrays`: label rows read from the store become the best-of-N label dict that
  `train_reward` takes (`labels=`); `policy_preferred` and `accuracy` are the online metrics.
"""

from __future__ import annotations

import numpy as np

from rlhf_jax import labelers
from rlhf_jax.data import tasks

POLICY, REFERENCE = "policy", "reference"


def comparison_key(run_id: str, draw: int, row: int) -> str:
    """The store key of row `row` of sampling draw `draw` of run `run_id`."""
    return f"{run_id}/{draw}/{row}"


def validation_rows(num_rows: int, fraction: float, seed: int, draw: int) -> np.ndarray:
    """bool[num_rows]: which rows of a draw become validation comparisons (deterministic)."""
    if fraction <= 0.0:
        return np.zeros(num_rows, bool)
    return np.random.default_rng([seed, draw, 7]).random(num_rows) < fraction


def mix_validation(policy: np.ndarray, reference: np.ndarray, seed: int, draw: int,
                   row: int) -> tuple[np.ndarray, list[str]]:
    """2 ρ and 2 π samples of one query in a shuffled order (the paper's validation question).

    Args:
        policy: int[N, L] samples of π for the query.
        reference: int[N, L] samples of ρ for the query.
        seed, draw, row: make the order deterministic.

    Returns:
        (int[N, L] the mixed samples, the source of each slot).
    """
    n = policy.shape[0]
    half = n // 2
    samples = np.concatenate([reference[:half], policy[:n - half]])
    sources = [REFERENCE] * half + [POLICY] * (n - half)
    order = np.random.default_rng([seed, draw, row, 11]).permutation(n)
    return samples[order], [sources[i] for i in order]


def build_comparisons(tok, spec: tasks.TaskSpec, queries: np.ndarray, samples: np.ndarray, *,
                      sources: list[list[str]], kinds: list[str], keys: list[str], step: int,
                      rm_round: int, task_name: str, drop_invalid: bool) -> tuple[list[dict], dict]:
    """Comparison records for the label store.

    Args:
        tok: the tokenizer (decodes what people read).
        spec: the task settings (validity check, pad id).
        queries: int[Q, query_length] raw right-padded queries (what the reward model sees).
        samples: int[Q, N, response_length] post-processed samples (padded after the
            truncation token, as in the released files).
        sources: per query, each slot's source ("policy" or "reference").
        kinds: per query, "train" or "validation".
        keys: per query, its store key.
        step: the PPO iteration whose policy drew the samples.
        rm_round: the reward-model round in use (recorded as the comparison's round).
        task_name: which instructions the labeling page shows ("sentiment", ...).
        drop_invalid: leave out queries with an invalid sample.

    Returns:
        (records, {"queries": Q, "invalid": queries left out for an invalid sample,
        "empty": queries left out because a sample decodes to no text}).
    """
    q, n, length = samples.shape
    valid = np.asarray(tasks.responses_valid(samples.reshape(q * n, length), spec)).reshape(q, n)
    q_texts = labelers.decode_tokens(tok, queries, spec.pad_id)
    s_texts = labelers.decode_tokens(tok, samples.reshape(q * n, length), spec.pad_id)
    records, counts = [], {"queries": q, "invalid": 0, "empty": 0}
    for i in range(q):
        if drop_invalid and not valid[i].all():
            counts["invalid"] += 1
            continue
        texts = s_texts[i * n:(i + 1) * n]
        if not q_texts[i].strip() or not all(texts):
            counts["empty"] += 1  # the store refuses empty texts: nothing to show a person
            continue
        records.append({
            "key": keys[i], "kind": kinds[i], "round": int(rm_round), "task": task_name,
            "query": q_texts[i], "query_tokens": [int(t) for t in queries[i]],
            "samples": texts, "sample_tokens": [[int(t) for t in s] for s in samples[i]],
            "provenance": [{"source": src, "step": int(step)} if src == POLICY
                           else {"source": src} for src in sources[i]],
        })
    return records, counts


def label_arrays(rows: list[dict], num_samples: int) -> dict[str, np.ndarray]:
    """Label rows of the store (`labels_after`) as the label dict `train_reward` takes."""
    query = np.asarray([r["query_tokens"] for r in rows], np.int32)
    samples = np.asarray([r["sample_tokens"] for r in rows], np.int32)
    best = np.asarray([r["best"] for r in rows], np.int32)
    if samples.ndim != 3 or samples.shape[1] != num_samples:
        raise ValueError(f"label rows hold {samples.shape[1:2]} samples, expected {num_samples}")
    return labelers.make_label_records(query, samples, best)


def chose_policy(row: dict) -> bool | None:
    """Whether a validation label picked a policy sample (None for other labels)."""
    prov = row.get("provenance")
    if row.get("kind") != "validation" or not prov:
        return None
    return prov[row["best"]].get("source") == POLICY


def policy_preferred(rows: list[dict]) -> tuple[float, int, int] | None:
    """How often labelers preferred π to ρ on the latest policy step's validation labels.

    Returns:
        (fraction, policy step, labels it is computed on), or None without validation labels.
    """
    by_step: dict[int, list[bool]] = {}
    for r in rows:
        picked = chose_policy(r)
        if picked is None:
            continue
        steps = [p.get("step") for p in r["provenance"] if p.get("source") == POLICY]
        by_step.setdefault(int(steps[0]), []).append(picked)
    if not by_step:
        return None
    step = max(by_step)
    return float(np.mean(by_step[step])), step, len(by_step[step])


def accuracy(rewards: np.ndarray, best: np.ndarray) -> float:
    """Share of labels whose chosen sample has the highest reward (ties count as wrong)."""
    top = rewards.max(axis=1)
    chosen = rewards[np.arange(len(best)), best]
    unique = (rewards == top[:, None]).sum(axis=1) == 1
    return float(np.mean((chosen == top) & unique)) if len(best) else float("nan")
