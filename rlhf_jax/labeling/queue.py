"""Handing out comparisons and taking labels: the store's hot path (spec §5.3).

A person's browser (or a label worker) calls two things per label: `next_comparison` (lease a
label slot) and `submit_label` (consume it and insert the label). Both are one transaction of
few statements, built once at import with bind parameters (building SQLAlchemy expressions per
call cost more than running them), and both decide with conditional UPDATEs:

- leasing: `UPDATE leases SET labeler = me ... WHERE id = (the oldest free or expired slot of a
  comparison I have not seen nor skipped) RETURNING comparison_id`; on PostgreSQL the inner
  SELECT takes `FOR UPDATE SKIP LOCKED`, so concurrent labelers take different slots without
  waiting; on SQLite the transaction is BEGIN IMMEDIATE, so there is one writer at a time;
- labelling: `UPDATE leases SET done WHERE (my open slot of that comparison) RETURNING
  leased_at`, then INSERT the label (UNIQUE (comparison, labeler)), in the same transaction.
"""

from __future__ import annotations

import dataclasses
import time

import sqlalchemy as sa
from sqlalchemy import bindparam as bp

from rlhf_jax.labeling.rawsql import Statements
from rlhf_jax.labeling.schema import (
    PG_LABELS_LOCK,
    ConflictError,
    InvalidError,
    NotFoundError,
    comparisons,
    flags,
    labels,
    leases,
    skips,
)

L, C = leases.c, comparisons.c
_pick, _other = leases.alias("pick"), leases.alias("other")

# The labeler's unexpired open lease, renewed (a reloaded page shows the same comparison).
_RENEW = (sa.update(leases).where(L.labeler_id == bp("me"), ~L.done, L.expires_at >= bp("now"))
          .values(expires_at=bp("until")).returning(L.comparison_id))


def _take(pg: bool):
    free = sa.or_(_pick.c.labeler_id.is_(None), _pick.c.expires_at < bp("now"))
    pick = (sa.select(_pick.c.id)
            .where(~_pick.c.done, _pick.c.slot >= 0, free,
                   ~sa.exists().where(_other.c.comparison_id == _pick.c.comparison_id,
                                      _other.c.labeler_id == bp("me"), _other.c.id != _pick.c.id),
                   ~sa.exists().where(skips.c.comparison_id == _pick.c.comparison_id,
                                      skips.c.labeler_id == bp("me")))
            .order_by(_pick.c.id).limit(1))
    if pg:
        pick = pick.with_for_update(skip_locked=True)
    return (sa.update(leases)
            .where(L.id == pick.scalar_subquery(), ~L.done,
                   sa.or_(L.labeler_id.is_(None), L.expires_at < bp("now")))
            .values(labeler_id=bp("me"), leased_at=bp("now"), expires_at=bp("until"))
            .returning(L.comparison_id))


_TAKE = {False: _take(False), True: _take(True)}
_SHOW = sa.select(C.query_text, C.samples, C.task, C.extra).where(C.id == bp("cid"))
_HAS_GOLD = sa.select(C.id).where(C.kind == "gold").limit(1)
_GOLD_COUNTS = (sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(
    sa.case((C.kind == "gold", 1), else_=0)), 0))
    .select_from(labels.join(comparisons, labels.c.comparison_id == C.id))
    .where(labels.c.labeler_id == bp("me")))
_GOLD_PICK = (sa.select(C.id).where(
    C.kind == "gold",
    ~sa.exists().where(labels.c.comparison_id == C.id, labels.c.labeler_id == bp("me")),
    ~sa.exists().where(skips.c.comparison_id == C.id, skips.c.labeler_id == bp("me")))
    .order_by(C.id).limit(1))
_GOLD_RELEASE = (sa.update(leases).where(L.comparison_id == bp("cid"), L.slot == bp("gold_slot"))
                 .values(labeler_id=bp("me"), leased_at=bp("now"), expires_at=bp("until")))
_GOLD_INSERT = leases.insert().values(comparison_id=bp("cid"), slot=bp("gold_slot"),
                                      labeler_id=bp("me"), leased_at=bp("now"),
                                      expires_at=bp("until"), done=False)

# One query for everything `submit_label` checks before writing: the comparison's size and
# this labeler's earlier label of it, if any.
def _check_statement(pg: bool):
    columns = [C.num_samples, labels.c.id, labels.c.best]
    if pg:
        # Label inserts hold this lock shared (see LabelStore.settled_label_id); taking it
        # here saves a round trip.
        columns.append(sa.func.pg_advisory_xact_lock_shared(PG_LABELS_LOCK))
    return (sa.select(*columns)
            .select_from(comparisons.outerjoin(labels, sa.and_(
                labels.c.comparison_id == C.id, labels.c.labeler_id == bp("me"))))
            .where(C.id == bp("cid")))


_CHECK = {False: _check_statement(False), True: _check_statement(True)}
_CONSUME = (sa.update(leases)
            .where(L.id == sa.select(_pick.c.id).where(
                _pick.c.comparison_id == bp("cid"), _pick.c.labeler_id == bp("me"),
                ~_pick.c.done).order_by(_pick.c.id).limit(1).scalar_subquery(),
                L.labeler_id == bp("me"), ~L.done)
            .values(done=True).returning(L.leased_at))
_INSERT_LABEL = labels.insert().values(
    comparison_id=bp("cid"), labeler_id=bp("me"), best=bp("choice"), seconds=bp("secs"),
    created=bp("now")).returning(labels.c.id)
_FLAG = flags.insert().values(comparison_id=bp("cid"), labeler_id=bp("me"), reason=bp("reason"),
                              created=bp("now"))
_MINE = (L.comparison_id == bp("cid"), L.labeler_id == bp("me"), ~L.done)
# A gold slot belongs to its labeler (slot = -id): giving it back drops it.
_DROP_GOLD = leases.delete().where(*_MINE, L.slot < 0)
_FREE = leases.update().where(*_MINE, L.slot >= 0).values(labeler_id=None, leased_at=None,
                                                          expires_at=None)
_REMEMBER_SKIP = skips.insert().values(labeler_id=bp("me"), comparison_id=bp("cid"),
                                       created=bp("now"))


# PostgreSQL: the same steps in one statement each, to save round trips (and the psycopg
# work per statement, which costs the server more CPU than the database spends): renew or
# take a slot and read its comparison; consume the slot and insert the label. Leases commit
# without waiting for their WAL flush (set_config ... synchronous_commit, as `rawsql`).
_NEXT_PG = sa.text("""
WITH renew AS (
  UPDATE leases SET expires_at = :until
  WHERE labeler_id = :me AND NOT done AND expires_at >= :now
  RETURNING comparison_id),
take AS (
  UPDATE leases SET labeler_id = :me, leased_at = :now, expires_at = :until
  WHERE id = (
    SELECT pick.id FROM leases AS pick
    WHERE NOT pick.done AND pick.slot >= 0
      AND (pick.labeler_id IS NULL OR pick.expires_at < :now)
      AND NOT EXISTS (SELECT 1 FROM leases AS other WHERE other.comparison_id = pick.comparison_id
                      AND other.labeler_id = :me AND other.id != pick.id)
      AND NOT EXISTS (SELECT 1 FROM skips WHERE skips.comparison_id = pick.comparison_id
                      AND skips.labeler_id = :me)
      AND NOT EXISTS (SELECT 1 FROM renew)
    ORDER BY pick.id LIMIT 1 FOR UPDATE SKIP LOCKED)
    AND NOT done AND (labeler_id IS NULL OR expires_at < :now)
  RETURNING comparison_id),
got AS (SELECT comparison_id FROM renew UNION ALL SELECT comparison_id FROM take LIMIT 1)
SELECT c.id, c.query_text, c.samples, c.task, c.extra,
       set_config('synchronous_commit', 'off', true)
FROM comparisons AS c JOIN got ON c.id = got.comparison_id
""")
_LABEL_PG = sa.text("""
WITH consume AS (
  UPDATE leases SET done = true
  WHERE id = (SELECT id FROM leases WHERE comparison_id = :cid AND labeler_id = :me
              AND NOT done ORDER BY id LIMIT 1)
    AND labeler_id = :me AND NOT done
  RETURNING leased_at)
INSERT INTO labels (comparison_id, labeler_id, best, seconds, created)
SELECT :cid, :me, :choice, GREATEST(0, :now - leased_at), :now FROM consume
RETURNING id
""")

_RELAX_PG = sa.text("SELECT set_config('synchronous_commit', 'off', true)")


@dataclasses.dataclass(frozen=True)
class Leased:
    """A comparison leased to a labeler: what the labeling page and `GET /next` show."""

    comparison_id: int
    query: str
    samples: list[str]
    task: str
    expires_at: float
    extra: dict | None


class GoldCache:
    """Whether the store has gold comparisons; a yes is final (they are never deleted)."""

    def __init__(self, ttl_s: float = 5.0):
        self.ttl_s, self.known, self.checked = ttl_s, False, -1e9

    def has_gold(self, tx) -> bool:
        now = time.monotonic()
        if not self.known and now - self.checked > self.ttl_s:
            self.known = tx.one(_HAS_GOLD) is not None
            self.checked = now
        return self.known


def next_body(tx, pg: bool, gold: GoldCache, labeler, lease_s: float, gold_every: int):
    """The transaction of LabelStore.next_comparison: (comparison id, row, expiry) or None."""
    now = time.time()
    params = {"me": labeler.id, "now": now, "until": now + lease_s}
    if pg and not (gold_every > 0 and gold.has_gold(tx)):
        row = tx.one(_NEXT_PG, params)
        return None if row is None else (row[0], tuple(row[1:5]), now + lease_s)
    if pg:
        tx.execute(_RELAX_PG)
    cid = tx.scalar(_RENEW, params)
    if cid is None and gold_every > 0 and gold.has_gold(tx):
        cid = _lease_gold(tx, params, gold_every)
    if cid is None:
        cid = tx.scalar(_TAKE[pg], params)
    if cid is None:
        return None
    return cid, tuple(tx.one(_SHOW, {"cid": cid})), now + lease_s


def leased(stmts: Statements, result, labeler) -> Leased | None:
    """The Leased of a `next_body` result (JSON columns decoded)."""
    if result is None:
        return None
    cid, (query, samples, task, extra), expires = result
    return Leased(cid, query, list(stmts.json(samples)), task, expires,
                  stmts.json(extra) if labeler.is_bot else None)


def _lease_gold(tx, params: dict, every: int) -> int | None:
    """Leases a gold comparison when this labeler is due one (one per `every` labels)."""
    total, answered = tx.one(_GOLD_COUNTS, params)
    if total // every < answered:
        return None
    cid = tx.scalar(_GOLD_PICK, params)
    if cid is None:
        return None
    # A gold comparison has one slot per labeler (slot = -labeler id), made on first use.
    gold = dict(params, cid=cid, gold_slot=-params["me"])
    if tx.execute(_GOLD_RELEASE, gold).rowcount == 0:
        tx.execute(_GOLD_INSERT, gold)
    return cid


def submit_body(tx, pg: bool, me: int, comparison_id, best, flag: str | None):
    """The transaction of LabelStore.submit_label: (label id, created)."""
    now = time.time()
    params = {"me": me, "cid": comparison_id, "now": now}
    n, prior_id, prior_best = _check(tx, params, comparison_id, pg)[:3]
    if type(best) is not int or not 0 <= best < n:
        raise InvalidError(f"best={best!r} out of range: comparison {comparison_id} has "
                           f"{n} samples, so best must be in [0, {n})")
    if prior_id is not None:
        return _repeat(prior_id, prior_best, comparison_id, best), False
    if pg:
        label_id = tx.scalar(_LABEL_PG, dict(params, choice=best))
        leased_at = None if label_id is None else now
    else:
        leased_at = tx.scalar(_CONSUME, params)
    if leased_at is None:
        _, prior_id, prior_best = _check(tx, params, comparison_id)[:3]  # a concurrent twin?
        if prior_id is not None:
            return _repeat(prior_id, prior_best, comparison_id, best), False
        raise ConflictError(
            f"comparison {comparison_id} is not leased to you (its lease expired and went "
            "to another labeler, or it was never yours); GET /api/v1/next")
    if not pg:
        label_id = tx.scalar(_INSERT_LABEL, dict(params, choice=best,
                                                 secs=max(0.0, now - leased_at)))
    if flag:
        tx.execute(_FLAG, dict(params, reason=str(flag)[:500]))
    return label_id, True


def _check(tx, params, comparison_id, lock: bool = False):
    if type(comparison_id) is not int:
        raise InvalidError(f"comparison_id: expected an integer, got {comparison_id!r}")
    row = tx.one(_CHECK[lock], params)
    if row is None:
        raise NotFoundError(f"comparison {comparison_id} does not exist")
    return row


def _repeat(prior_id, prior_best, comparison_id, best) -> int:
    if prior_best != best:
        raise ConflictError(f"you already labelled comparison {comparison_id} with "
                            f"best={prior_best}; a stored label cannot be changed")
    return prior_id


def skip_body(tx, labeler_id: int, comparison_id, flag: str | None, remember: bool,
              pg: bool = False) -> None:
    """The transaction of LabelStore.skip."""
    params = {"me": labeler_id, "cid": comparison_id, "now": time.time()}
    _check(tx, params, comparison_id)
    if pg and not (remember or flag):
        tx.execute(_RELAX_PG)  # a plain release needs no durable commit
    given_back = tx.execute(_DROP_GOLD, params).rowcount
    given_back += tx.execute(_FREE, params).rowcount
    if given_back == 0:
        raise ConflictError(f"comparison {comparison_id} is not leased to you")
    if remember:
        tx.execute(_REMEMBER_SKIP, params)
    if flag:
        tx.execute(_FLAG, dict(params, reason=str(flag)[:500]))
