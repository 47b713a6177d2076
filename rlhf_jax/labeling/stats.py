"""Quality control of human labels: overlap agreement, gold accuracy, pace (spec §5.3).

The paper's authors found their labelers' preferences drifting from their own (labelers
rewarded copying) and reported labeler-labeler agreement of only 38-46% on the 4-way tasks.
These statistics make that visible while labels come in:

- agreement: on comparisons labelled by two labelers (the overlap share), how often both picked
  the same sample, overall and per labeler (chance is 1/N);
- gold accuracy: on comparisons with a known answer, how often each labeler picked it;
- pace: labels per labeler, labels in the last hour, median seconds per label, and a timeline.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections import defaultdict

import sqlalchemy as sa

from rlhf_jax.labeling.schema import comparisons, flags, labelers, labels, leases, meta

# Timeline bucket widths, smallest first; the first giving at most MAX_BUCKETS buckets is used.
BUCKETS_S = (60, 300, 900, 3600, 4 * 3600, 86400, 7 * 86400)
MAX_BUCKETS = 48


def _ratio(num: int, den: int) -> float | None:
    return None if den == 0 else num / den


def _median(values) -> float | None:
    return statistics.median(values) if values else None


def timeline(times: list[float], now: float) -> dict:
    """Label counts per time bucket from the first label to now.

    Args:
        times: label creation times (epoch seconds).
        now: the end of the last bucket.

    Returns:
        {"bucket_s": width, "start": first bucket start, "counts": [n per bucket]}.
    """
    if not times:
        return {"bucket_s": BUCKETS_S[0], "start": now, "counts": []}
    first = min(times)
    width = next((w for w in BUCKETS_S if (now - first) / w < MAX_BUCKETS), BUCKETS_S[-1])
    start = first - first % width
    counts = [0] * (int((now - start) // width) + 1)
    for t in times:
        counts[min(int((t - start) // width), len(counts) - 1)] += 1
    return {"bucket_s": width, "start": start, "counts": counts}


def compute_stats(store, now: float | None = None) -> dict:
    """Everything the admin page and `GET /api/v1/stats` show.

    Args:
        store: a LabelStore.
        now: the current time (default: time.time()).

    Returns:
        A JSON-able dict: "counts" (LabelStore.counts), "labels_per_hour" (last hour),
        "median_seconds", "agreement" {"pairs", "agree", "rate", "chance", "comparisons"},
        "overlap" {"fraction", "comparisons", "fully_labeled"}, "gold" {"questions",
        "answers", "accuracy"}, "labelers": [per-labeler rows], "timeline".
    """
    now = time.time() if now is None else now
    counts = store.counts()
    c = comparisons.c
    with store.engine.connect() as conn:
        rows = conn.execute(
            sa.select(labels.c.comparison_id, labels.c.labeler_id, labels.c.best,
                      labels.c.seconds, labels.c.created, c.kind, c.gold_best, c.num_samples)
            .select_from(labels.join(comparisons, labels.c.comparison_id == c.id))
            .order_by(labels.c.id)).all()
        names = dict(conn.execute(sa.select(labelers.c.id, labelers.c.name)).all())
        flag_counts = dict(conn.execute(sa.select(flags.c.labeler_id, sa.func.count())
                                        .group_by(flags.c.labeler_id)).all())
        slot_counts = conn.execute(
            sa.select(leases.c.comparison_id, sa.func.count()).where(leases.c.slot >= 0)
            .group_by(leases.c.comparison_id)).all()
    per = defaultdict(lambda: {"labels": 0, "seconds": [], "last_hour": 0, "pairs": 0, "agree": 0,
                               "gold": 0, "gold_correct": 0})
    by_comparison = defaultdict(list)
    num_samples = {}
    for r in rows:
        p = per[r.labeler_id]
        p["labels"] += 1
        p["seconds"].append(r.seconds)
        p["last_hour"] += r.created >= now - 3600
        if r.kind == "gold":
            p["gold"] += 1
            p["gold_correct"] += r.best == r.gold_best
        else:
            by_comparison[r.comparison_id].append((r.labeler_id, r.best))
            num_samples[r.comparison_id] = r.num_samples
    pairs = agree = 0
    for answers in by_comparison.values():
        for (a, best_a), (b, best_b) in itertools.combinations(answers, 2):
            same = best_a == best_b
            pairs += 1
            agree += same
            for who in (a, b):
                per[who]["pairs"] += 1
                per[who]["agree"] += same
    multi = sum(1 for n in slot_counts if n[1] > 1)
    fully = sum(1 for answers in by_comparison.values() if len(answers) > 1)
    gold_answers = sum(p["gold"] for p in per.values())
    gold_correct = sum(p["gold_correct"] for p in per.values())
    n = next(iter(num_samples.values()), (counts["task"] or {}).get("num_samples", 4))
    labeler_rows = []
    for labeler_id, name in sorted(names.items()):
        p = per.get(labeler_id)
        if p is None:
            p = per[labeler_id]
        labeler_rows.append({
            "id": labeler_id, "name": name, "labels": p["labels"],
            "labels_last_hour": p["last_hour"], "median_seconds": _median(p["seconds"]),
            "overlap_pairs": p["pairs"], "agreement": _ratio(p["agree"], p["pairs"]),
            "gold_answers": p["gold"], "gold_accuracy": _ratio(p["gold_correct"], p["gold"]),
            "flags": int(flag_counts.get(labeler_id, 0)),
        })
    return {
        "counts": counts,
        "labels_per_hour": sum(1 for r in rows if r.created >= now - 3600),
        "median_seconds": _median([r.seconds for r in rows]),
        "agreement": {"pairs": pairs, "agree": agree, "rate": _ratio(agree, pairs),
                      "chance": 1.0 / n if n else None},
        "overlap": {"fraction": _ratio(multi, len(slot_counts)), "comparisons": multi,
                    "fully_labeled": fully},
        "gold": {"questions": counts["comparisons"]["gold"], "answers": gold_answers,
                 "accuracy": _ratio(gold_correct, gold_answers)},
        "labelers": labeler_rows,
        "timeline": timeline([r.created for r in rows], now),
        "time": now,
    }


def counts(engine) -> dict:
    """LabelStore.counts: a few aggregate queries.

    Args:
        engine: the store's engine.

    Returns:
        {"comparisons": {kind: n, "total": n}, "labels": {kind: n, "total": n},
        "labeled_comparisons", "slots": {"queued", "leased", "done"}, "flags",
        "labelers", "last_label_id", "task"}.
    """
    now = time.time()
    c = comparisons.c
    with engine.connect() as conn:
        by_kind = dict(conn.execute(sa.select(c.kind, sa.func.count()).group_by(c.kind)).all())
        label_kind = dict(conn.execute(
            sa.select(c.kind, sa.func.count()).select_from(
                labels.join(comparisons, labels.c.comparison_id == c.id)).group_by(c.kind)).all())
        labeled = conn.execute(sa.select(sa.func.count(sa.distinct(labels.c.comparison_id)))).scalar()
        open_ = ~leases.c.done
        leased_now = sa.and_(open_, leases.c.labeler_id.is_not(None), leases.c.expires_at >= now)
        slot_counts = conn.execute(sa.select(
            sa.func.coalesce(sa.func.sum(sa.case((sa.and_(open_, leases.c.slot >= 0, ~leased_now), 1), else_=0)), 0),
            sa.func.coalesce(sa.func.sum(sa.case((leased_now, 1), else_=0)), 0),
            sa.func.coalesce(sa.func.sum(sa.case((leases.c.done, 1), else_=0)), 0))).one()
        num_flags = conn.execute(sa.select(sa.func.count()).select_from(flags)).scalar()
        num_labelers = conn.execute(sa.select(sa.func.count()).select_from(labelers)).scalar()
        last = conn.execute(sa.select(sa.func.coalesce(sa.func.max(labels.c.id), 0))).scalar()
        task = conn.execute(sa.select(meta.c.value).where(meta.c.key == "task")).scalar()
    kinds = ("train", "validation", "gold")
    return {
        "comparisons": {**{k: int(by_kind.get(k, 0)) for k in kinds}, "total": sum(by_kind.values())},
        "labels": {**{k: int(label_kind.get(k, 0)) for k in kinds}, "total": sum(label_kind.values())},
        "labeled_comparisons": int(labeled),
        "slots": {"queued": int(slot_counts[0]), "leased": int(slot_counts[1]),
                  "done": int(slot_counts[2])},
        "flags": int(num_flags), "labelers": int(num_labelers), "last_label_id": int(last),
        "task": task,
    }
