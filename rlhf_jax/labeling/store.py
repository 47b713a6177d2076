"""The label store: every operation on comparisons, leases and labels (spec §5.3).

`LabelStore` is the Python API of the store, used by the web app, the CLI and (for one-machine
runs) directly by a trainer. Each method is one database transaction, so every acknowledged
label is committed before it is acknowledged and a kill -9 at any moment leaves a consistent
store. Nothing relies on an in-process lock: several server processes can share one database.

Work is handed out through label *slots* (`schema.leases`): a train or validation comparison has
1 slot, or 2 when it was picked for overlap (quality control: two labelers judge it); a gold
comparison gets one slot per labeler on demand. `next_comparison` leases the oldest free or
expired slot of a comparison the labeler has not seen, for `lease_s` seconds; a lease that
expires is offered again. `submit_label` consumes the labeler's slot and inserts the label in one
transaction; the same label sent again is a no-op.

Incremental readers (`labels_after`) get labels in id order with no gaps later filled: on SQLite
writers are serialised, so ids commit in order; on PostgreSQL label inserts hold a shared
advisory lock that a reader takes exclusively for an instant to find the highest settled id.
"""

from __future__ import annotations

import functools
import hashlib
import time
from collections.abc import Sequence

import sqlalchemy as sa

from rlhf_jax.labeling import auth, queue, rawsql
from rlhf_jax.labeling.queue import Leased  # noqa: F401 - part of the store API
from rlhf_jax.labeling.records import TaskIdentity, validate_comparisons
from rlhf_jax.labeling.schema import (
    PG_LABELS_LOCK,
    SQLITE_NAME,
    InvalidError,
    comparisons,
    describe_url,
    ensure_schema,
    is_postgres,
    labelers,
    labels,
    leases,
    make_engine,
    meta,
    sqlite_url,
    write_transaction,
)

# SQLite allows at most 32766 bound parameters per statement; stay well below.
_CHUNK = 500


def overlap_slots(key: str, overlap: float) -> int:
    """1 or 2 label slots for a comparison: 2 for a deterministic `overlap` share of keys.

    A hash of the key decides, so a re-sent comparison gets the same answer and the share is
    `overlap` in expectation whatever the order of enqueueing.
    """
    if not 0.0 <= overlap <= 1.0:
        raise InvalidError(f"overlap must be in [0, 1], got {overlap}")
    u = int(hashlib.sha256(key.encode()).hexdigest()[:13], 16) / 16**13
    return 2 if u < overlap else 1


class LabelStore:
    """A label store on a SQLite file or a PostgreSQL database."""

    def __init__(self, url: str, *, create: bool = True, pool_size: int = 8,
                 synchronous: str = "FULL"):
        """Opens (and with `create`, initialises) the store.

        Args:
            url: SQLAlchemy URL (see `schema.make_engine`).
            create: create the tables in an empty database.
            pool_size: connection pool size.
            synchronous: SQLite `PRAGMA synchronous` (FULL or NORMAL).

        Raises:
            SchemaVersionError: another schema version, or not a label store.
        """
        self.url = url
        self.where = describe_url(url)
        self.engine = make_engine(url, pool_size=pool_size, synchronous=synchronous)
        self._pg = is_postgres(self.engine)
        self._gold = queue.GoldCache()
        self._stmts = rawsql.Statements(self.engine)
        self._runner = rawsql.Runner(self._stmts)
        try:
            ensure_schema(self.engine, create=create)
        except BaseException:
            self.engine.dispose()
            raise

    @classmethod
    def open(cls, workdir: str | None = None, db: str | None = None, **kw) -> LabelStore:
        """The store of `--db URL`, or else the SQLite file in `--workdir DIR`."""
        import os

        if db:
            return cls(db, **kw)
        if not workdir:
            raise ValueError("give --workdir DIR (a SQLite store in it) or --db URL")
        if kw.get("create", True):
            os.makedirs(workdir, exist_ok=True)
        elif not os.path.exists(os.path.join(workdir, SQLITE_NAME)):
            raise FileNotFoundError(f"{workdir}: no label store here (labels.sqlite is missing)")
        return cls(sqlite_url(workdir), **kw)

    def close(self) -> None:
        """Finishes queued transactions and closes every pooled connection."""
        self._runner.close()
        self.engine.dispose()

    # ---- labelers ------------------------------------------------------------------------

    def add_labeler(self, name: str, *, admin: bool = False, bot: bool = False) -> str:
        """Adds a labeler and returns its new access token (only its hash is stored).

        Raises:
            InvalidError: an empty or taken name.
        """
        if not isinstance(name, str) or not name.strip() or len(name) > 100:
            raise InvalidError("labeler name: expected 1 to 100 characters")
        token = auth.new_token()
        with write_transaction(self.engine) as conn:
            if conn.execute(sa.select(labelers.c.id).where(labelers.c.name == name)).first():
                raise InvalidError(f"labeler {name!r} already exists in {self.where}")
            conn.execute(labelers.insert().values(
                name=name, token_hash=auth.hash_token(token), is_admin=admin, is_bot=bot,
                created=time.time()))
        return token

    def labeler_by_hash(self, token_hash: str) -> auth.Labeler | None:
        """The labeler whose token has this sha256, or None."""
        c = labelers.c
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(c.id, c.name, c.is_admin, c.is_bot, c.token_hash)
                               .where(c.token_hash == token_hash)).first()
        return None if row is None else auth.Labeler(row.id, row.name, bool(row.is_admin),
                                                     bool(row.is_bot), row.token_hash)

    def list_labelers(self) -> list[dict]:
        """Every labeler: id, name, admin, bot, created (never token hashes)."""
        c = labelers.c
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(c.id, c.name, c.is_admin, c.is_bot, c.created)
                                .order_by(c.id)).all()
        return [dict(id=r.id, name=r.name, admin=bool(r.is_admin), bot=bool(r.is_bot),
                     created=r.created) for r in rows]

    # ---- enqueue -------------------------------------------------------------------------

    def task_identity(self) -> TaskIdentity | None:
        """The task identity of the stored comparisons, or None while the store is empty."""
        with self.engine.connect() as conn:
            value = conn.execute(sa.select(meta.c.value).where(meta.c.key == "task")).scalar()
        return None if value is None else TaskIdentity.from_dict(value, f"{self.where}: task")

    def enqueue(self, records: Sequence, task: TaskIdentity, *, overlap: float = 0.0,
                names: Sequence[str] | None = None) -> dict:
        """Adds comparisons in one transaction: all of them, or none when one is bad.

        A record whose `key` is already stored is skipped (idempotent re-sends), unless its
        content differs, which is an error (two different comparisons under one key).

        Args:
            records: comparison objects (see `records.validate_comparison`).
            task: their task identity; must equal the store's (set by the first enqueue).
            overlap: share of new train/validation comparisons that get two label slots.
            names: optional name per record for error messages.

        Returns:
            {"added": n, "existing": m, "ids": [comparison id per record]}.

        Raises:
            InvalidError: a bad record or key (naming it); TaskMismatchError.
        """
        stored = self.task_identity()
        if stored is not None:  # the clearer error first: another task, not bad lengths
            task.check_same(stored, self.where)
        rows = validate_comparisons(records, task, names=names)
        overlap_slots("", overlap)  # validates the fraction before any write
        now = time.time()
        with write_transaction(self.engine) as conn:
            self._check_task(conn, task)
            existing = {}
            keys = [r["key"] for r in rows]
            for start in range(0, len(keys), _CHUNK):
                part = keys[start:start + _CHUNK]
                for r in conn.execute(sa.select(comparisons.c.key, comparisons.c.id,
                                                comparisons.c.content_hash)
                                      .where(comparisons.c.key.in_(part))):
                    existing[r.key] = (r.id, r.content_hash)
            for i, row in enumerate(rows):
                if row["key"] in existing and existing[row["key"]][1] != row["content_hash"]:
                    name = names[i] if names is not None else f"comparisons[{i}]"
                    raise InvalidError(f"{name}.key: {row['key']!r} is already stored with "
                                       "different content; keys must identify one comparison")
            new = [dict(row, created=now) for row in rows if row["key"] not in existing]
            ids = dict((k, v[0]) for k, v in existing.items())
            for start in range(0, len(new), _CHUNK):
                stmt = comparisons.insert().returning(comparisons.c.id, comparisons.c.key)
                if self._pg:
                    # Another server enqueueing the same key at this instant: its row wins.
                    from sqlalchemy.dialects.postgresql import insert as pg_insert

                    stmt = (pg_insert(comparisons).on_conflict_do_nothing(index_elements=["key"])
                            .returning(comparisons.c.id, comparisons.c.key))
                for r in conn.execute(stmt, new[start:start + _CHUNK]):
                    ids[r.key] = r.id
            slots = [dict(comparison_id=ids[row["key"]], slot=s, done=False)
                     for row in new if row["kind"] != "gold" and row["key"] in ids
                     for s in range(overlap_slots(row["key"], overlap))]
            for start in range(0, len(slots), _CHUNK):
                conn.execute(leases.insert(), slots[start:start + _CHUNK])
        added = len(new)
        return {"added": added, "existing": len(rows) - added, "ids": [ids[k] for k in keys]}

    def _check_task(self, conn, task: TaskIdentity) -> None:
        stored = conn.execute(sa.select(meta.c.value).where(meta.c.key == "task")).scalar()
        if stored is None:
            conn.execute(meta.insert().values(key="task", value=task.as_dict()))
        else:
            task.check_same(TaskIdentity.from_dict(stored, f"{self.where}: task"), self.where)

    # ---- labelling -----------------------------------------------------------------------

    def next_comparison(self, labeler: auth.Labeler, *, lease_s: float = 600.0,
                        gold_every: int = 10) -> Leased | None:
        """Leases the next comparison to a labeler, or returns None when nothing waits.

        A labeler holding an unexpired lease gets the same comparison again (a reloaded page
        shows what it showed), with the lease renewed. Every `gold_every`-th label of a labeler
        is asked on a gold comparison it has not answered, while there are any. Otherwise the
        oldest free or expired slot of a comparison the labeler has not labelled or skipped.

        Args:
            labeler: who asks.
            lease_s: seconds until the lease expires and the slot is offered again.
            gold_every: one gold question per this many labels (0 = no gold questions).

        Returns:
            The leased comparison, or None.
        """
        body = functools.partial(queue.next_body, pg=self._pg, gold=self._gold, labeler=labeler,
                                 lease_s=lease_s, gold_every=gold_every)
        return queue.leased(self._stmts, self._runner.run(body, durable=False), labeler)

    async def next_comparison_async(self, labeler: auth.Labeler, *, lease_s: float = 600.0,
                                    gold_every: int = 10) -> Leased | None:
        """`next_comparison` for the event loop."""
        body = functools.partial(queue.next_body, pg=self._pg, gold=self._gold, labeler=labeler,
                                 lease_s=lease_s, gold_every=gold_every)
        result = await self._runner.run_async(body, durable=False)
        return queue.leased(self._stmts, result, labeler)

    def submit_label(self, labeler_id: int, comparison_id: int, best: int, *,
                     flag: str | None = None) -> tuple[int, bool]:
        """Stores a label, consuming the labeler's slot, in one transaction.

        Args:
            labeler_id: who labels.
            comparison_id: the comparison leased to them.
            best: the chosen sample index.
            flag: optional reason the samples are broken or offensive.

        Returns:
            (label id, True) for a new label; (label id, False) for a repeat of a stored one.
            Either way the label is committed when this returns.

        Raises:
            NotFoundError: unknown comparison. InvalidError: `best` out of range.
            ConflictError: not leased to this labeler, or already labelled differently.
        """
        body = functools.partial(queue.submit_body, pg=self._pg, me=labeler_id,
                                 comparison_id=comparison_id, best=best, flag=flag)
        for attempt in range(3):
            try:
                return self._runner.run(body)
            except self.engine.dialect.loaded_dbapi.IntegrityError:
                # The same labeler's concurrent request inserted this label first: the next
                # attempt finds it and answers as for a repeat.
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    async def submit_label_async(self, labeler_id: int, comparison_id: int, best: int, *,
                                 flag: str | None = None) -> tuple[int, bool]:
        """`submit_label` for the event loop."""
        body = functools.partial(queue.submit_body, pg=self._pg, me=labeler_id,
                                 comparison_id=comparison_id, best=best, flag=flag)
        for attempt in range(3):
            try:
                return await self._runner.run_async(body)
            except self.engine.dialect.loaded_dbapi.IntegrityError:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def skip(self, labeler_id: int, comparison_id: int, *, flag: str | None = None,
             remember: bool = True) -> None:
        """Gives a leased comparison back; with `remember`, it is not offered to them again.

        `remember=False` is a plain release (a worker stopping): the labeler may get it again.

        Raises:
            NotFoundError: unknown comparison. ConflictError: not leased to this labeler.
        """
        body = functools.partial(queue.skip_body, labeler_id=labeler_id, pg=self._pg,
                                 comparison_id=comparison_id, flag=flag, remember=remember)
        # A skip or a flag is a record worth an fsync; a plain release is not.
        self._runner.run(body, durable=bool(remember or flag))

    async def skip_async(self, labeler_id: int, comparison_id: int, *, flag: str | None = None,
                         remember: bool = True) -> None:
        """`skip` for the event loop."""
        body = functools.partial(queue.skip_body, labeler_id=labeler_id, pg=self._pg,
                                 comparison_id=comparison_id, flag=flag, remember=remember)
        await self._runner.run_async(body, durable=bool(remember or flag))

    def label_count(self, labeler_id: int) -> int:
        """How many labels this labeler has given."""
        with self.engine.connect() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(labels)
                                .where(labels.c.labeler_id == labeler_id)).scalar_one()

    # ---- reading -------------------------------------------------------------------------

    def settled_label_id(self) -> int:
        """The highest label id below which no label can still appear."""
        with self.engine.begin() as conn:
            if self._pg:
                # Waits for in-flight label transactions (they hold the lock shared); new ones
                # get higher ids, so everything up to the max is final.
                conn.execute(sa.select(sa.func.pg_advisory_xact_lock(PG_LABELS_LOCK)))
            return conn.execute(sa.select(sa.func.coalesce(sa.func.max(labels.c.id), 0))).scalar()

    def labels_after(self, after: int = 0, limit: int = 1000, *, kinds: Sequence[str] | None = None,
                     with_text: bool = False) -> list[dict]:
        """Labels with id > `after`, in id order, with their comparisons' token ids.

        Reading again with `after` = the last id returned never misses a label: ids only grow,
        and a label id is returned only once every smaller id is settled.

        Args:
            after: the last label id already read (0 for all).
            limit: at most this many labels.
            kinds: only comparisons of these kinds (default: all).
            with_text: include the query and sample texts.

        Returns:
            Dicts with id, comparison_id, key, kind, round, task, labeler, best, seconds,
            created, query_tokens, sample_tokens, provenance, gold_best (and query, samples).
        """
        if type(after) is not int or after < 0 or type(limit) is not int or not 0 < limit <= 100_000:
            raise InvalidError(f"after must be an integer >= 0 and limit in [1, 100000], got "
                               f"after={after!r}, limit={limit!r}")
        watermark = self.settled_label_id()
        c, lab = comparisons.c, labels.c
        cols = [lab.id, lab.comparison_id, lab.best, lab.seconds, lab.created,
                labelers.c.name.label("labeler"), c.key, c.kind, c.round, c.task, c.query_tokens,
                c.sample_tokens, c.provenance, c.gold_best]
        if with_text:
            cols += [c.query_text, c.samples]
        query = (sa.select(*cols).select_from(labels.join(comparisons, lab.comparison_id == c.id)
                                              .join(labelers, lab.labeler_id == labelers.c.id))
                 .where(lab.id > after, lab.id <= watermark).order_by(lab.id).limit(limit))
        if kinds is not None:
            query = query.where(c.kind.in_(list(kinds)))
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        out = []
        for r in rows:
            d = r._asdict()
            if with_text:
                d["query"], d["samples"] = d.pop("query_text"), d.pop("samples")
            out.append(d)
        return out

    def counts(self) -> dict:
        """Counts for a trainer and the admin page (a few aggregate queries).

        Returns:
            {"comparisons": {kind: n, "total": n}, "labels": {kind: n, "total": n},
            "labeled_comparisons", "slots": {"queued", "leased", "done"}, "flags",
            "labelers", "last_label_id", "task"}.
        """
        from rlhf_jax.labeling import stats

        return stats.counts(self.engine)
