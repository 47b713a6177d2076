"""The label store's tables, engines and transactions (spec §5.3: how labels were collected).

One database holds one task's comparisons (query + N samples), the labelers, their leases and
their labels. It is a SQLite file (`{workdir}/labels.sqlite`, WAL mode) or a PostgreSQL
database (`postgresql+psycopg://...`); the same SQLAlchemy Core code runs on both.

Invariants the database itself enforces, so that several server processes on one database stay
correct without any in-process lock:
- `comparisons.key` is UNIQUE: enqueueing is idempotent (a re-sent key is a no-op);
- `labels (comparison_id, labeler_id)` is UNIQUE: a labeler labels a comparison at most once;
- `leases (comparison_id, slot)` is UNIQUE: a comparison has a fixed number of label slots
  (1, or 2 when it is an overlap comparison), and a label consumes its slot by a conditional
  UPDATE in the same transaction that inserts the label.

Write transactions on SQLite start with BEGIN IMMEDIATE (one writer at a time, others wait up to
`busy_timeout`), so a read-then-update inside them is atomic across processes; on PostgreSQL the
store takes row locks (`FOR UPDATE SKIP LOCKED`) and conditional UPDATEs instead.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time

import sqlalchemy as sa
from sqlalchemy import event

SCHEMA_VERSION = 1
SQLITE_NAME = "labels.sqlite"
KINDS = ("train", "validation", "gold")
# Any constant: the advisory lock that orders label inserts against incremental readers.
PG_LABELS_LOCK = 0x726C6866

metadata = sa.MetaData()

schema_info = sa.Table(
    "schema_info", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("created", sa.Float, nullable=False),
)

# key "task": the task identity (JSON); other keys are free for later settings.
meta = sa.Table(
    "meta", metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.JSON, nullable=False),
)

labelers = sa.Table(
    "labelers", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(100), nullable=False, unique=True),
    sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("is_admin", sa.Boolean, nullable=False, default=False),
    # A mock labeler (label worker): also receives a comparison's `extra` dict.
    sa.Column("is_bot", sa.Boolean, nullable=False, default=False),
    sa.Column("created", sa.Float, nullable=False),
)

comparisons = sa.Table(
    "comparisons", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("key", sa.String(200), nullable=False, unique=True),
    sa.Column("content_hash", sa.String(64), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("task", sa.String(64), nullable=False, default=""),
    sa.Column("round", sa.Integer, nullable=False, default=0),
    sa.Column("num_samples", sa.Integer, nullable=False),
    sa.Column("query_text", sa.Text, nullable=False),
    sa.Column("query_tokens", sa.JSON, nullable=False),
    sa.Column("samples", sa.JSON, nullable=False),
    sa.Column("sample_tokens", sa.JSON, nullable=False),
    # Per slot: {"source": "policy" | "reference" | ..., "step": int}, or null.
    sa.Column("provenance", sa.JSON, nullable=True),
    # Never shown to people (e.g. the reference summary a `rouge` mock worker needs).
    sa.Column("extra", sa.JSON, nullable=True),
    sa.Column("gold_best", sa.Integer, nullable=True),
    sa.Column("created", sa.Float, nullable=False),
    sa.CheckConstraint("kind IN ('train', 'validation', 'gold')", name="ck_comparisons_kind"),
    sa.CheckConstraint("(kind = 'gold') = (gold_best IS NOT NULL)", name="ck_comparisons_gold"),
)
sa.Index("ix_comparisons_kind", comparisons.c.kind, comparisons.c.id)

# One row per label slot of a comparison. Train/validation comparisons get their slots when they
# are enqueued (slot >= 0); a gold comparison gets one slot per labeler on demand (slot =
# -labeler_id), because every labeler should answer it. A slot is free (labeler_id NULL), leased
# (expires_at in the future), expired (offered again) or done (labelled).
leases = sa.Table(
    "leases", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("comparison_id", sa.Integer, sa.ForeignKey("comparisons.id"), nullable=False),
    sa.Column("slot", sa.Integer, nullable=False),
    sa.Column("labeler_id", sa.Integer, sa.ForeignKey("labelers.id"), nullable=True),
    sa.Column("leased_at", sa.Float, nullable=True),
    sa.Column("expires_at", sa.Float, nullable=True),
    sa.Column("done", sa.Boolean, nullable=False, default=False),
    sa.UniqueConstraint("comparison_id", "slot", name="uq_leases_slot"),
)
# The queue: open slots in FIFO order (a partial index stays small as slots get done).
sa.Index("ix_leases_open", leases.c.id, sqlite_where=~leases.c.done,
         postgresql_where=~leases.c.done)
sa.Index("ix_leases_labeler", leases.c.labeler_id, leases.c.comparison_id)

labels = sa.Table(
    "labels", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("comparison_id", sa.Integer, sa.ForeignKey("comparisons.id"), nullable=False),
    sa.Column("labeler_id", sa.Integer, sa.ForeignKey("labelers.id"), nullable=False),
    sa.Column("best", sa.Integer, nullable=False),
    sa.Column("seconds", sa.Float, nullable=False),
    sa.Column("created", sa.Float, nullable=False),
    sa.UniqueConstraint("comparison_id", "labeler_id", name="uq_labels_once"),
)
sa.Index("ix_labels_labeler", labels.c.labeler_id)

skips = sa.Table(
    "skips", metadata,
    sa.Column("labeler_id", sa.Integer, sa.ForeignKey("labelers.id"), primary_key=True),
    sa.Column("comparison_id", sa.Integer, sa.ForeignKey("comparisons.id"), primary_key=True),
    sa.Column("created", sa.Float, nullable=False),
)

flags = sa.Table(
    "flags", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("comparison_id", sa.Integer, sa.ForeignKey("comparisons.id"), nullable=False),
    sa.Column("labeler_id", sa.Integer, sa.ForeignKey("labelers.id"), nullable=False),
    sa.Column("reason", sa.String(500), nullable=False),
    sa.Column("created", sa.Float, nullable=False),
)
sa.Index("ix_flags_comparison", flags.c.comparison_id)


class StoreError(Exception):
    """A request the store refuses; `status` is the HTTP status the API answers with."""

    status = 400


class NotFoundError(StoreError):
    """An unknown comparison (or other record) id."""

    status = 404


class ConflictError(StoreError):
    """A label or skip for a comparison not leased to this labeler, or a changed answer."""

    status = 409


class InvalidError(StoreError):
    """Well-formed JSON with a bad value (a `best` out of range, a bad comparison field)."""

    status = 422


class TaskMismatchError(StoreError):
    """Comparisons of another task (tokenizer, lengths, samples) than the store's."""

    status = 409


class SchemaVersionError(RuntimeError):
    """The database was written by another schema version, or is not a label store."""


def sqlite_url(workdir: str) -> str:
    """The SQLAlchemy URL of the SQLite store in `workdir`."""
    return f"sqlite:///{os.path.abspath(os.path.join(workdir, SQLITE_NAME))}"


def describe_url(url: str) -> str:
    """The URL without its password, for messages and logs."""
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return url


def make_engine(url: str, *, pool_size: int = 8, synchronous: str = "FULL") -> sa.Engine:
    """An engine for a SQLite file or a PostgreSQL database, set up for the store.

    SQLite: WAL journal (readers never block the writer), busy_timeout 30 s (a writer waits for
    another process's transaction instead of failing), foreign keys on, and `synchronous=FULL`
    by default, so a label acknowledged with 201 survives a power cut as well as a kill -9
    (lease transactions skip that fsync: a lease lost in a power cut is simply offered
    again; see `rawsql.transaction`).
    Transactions begun on `engine.execution_options(write=True)` start with BEGIN IMMEDIATE.

    Args:
        url: "sqlite:///path" or "postgresql+psycopg://user@host:port/db".
        pool_size: connections kept open (PostgreSQL; SQLite connections are cheap).
        synchronous: SQLite `PRAGMA synchronous` (FULL or NORMAL; NORMAL loses nothing on a
            process crash, only possibly the last commits on a power cut).

    Returns:
        The engine.
    """
    if synchronous not in ("FULL", "NORMAL"):
        raise ValueError(f"synchronous must be FULL or NORMAL, got {synchronous!r}")
    parsed = sa.engine.make_url(url)
    if parsed.get_backend_name() == "sqlite":
        engine = sa.create_engine(
            url, connect_args={"timeout": 30.0, "check_same_thread": False},
            pool_size=pool_size, max_overflow=2 * pool_size)

        @event.listens_for(engine, "connect")
        def _connect(dbapi_conn, _record):
            # Let SQLAlchemy's "begin" event issue BEGIN itself (pysqlite's own is DEFERRED).
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute(f"PRAGMA synchronous={synchronous}")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        _SQLITE_WRITE_LOCKS[id(engine)] = threading.Lock()
        SQLITE_SYNCHRONOUS[id(engine)] = synchronous

        @event.listens_for(engine, "begin")
        def _begin(conn):
            immediate = conn.get_execution_options().get("write", False)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

        return engine
    if parsed.get_backend_name() == "postgresql":
        return sa.create_engine(url, pool_size=pool_size, max_overflow=2 * pool_size)
    raise ValueError(f"unsupported database URL {describe_url(url)!r}: use sqlite:///FILE or "
                     "postgresql+psycopg://USER@HOST:PORT/DB")


_SQLITE_WRITE_LOCKS: dict[int, threading.Lock] = {}
SQLITE_SYNCHRONOUS: dict[int, str] = {}


@contextlib.contextmanager
def write_transaction(engine: sa.Engine):
    """A write transaction: BEGIN IMMEDIATE on SQLite, a plain transaction on PostgreSQL.

    On SQLite the threads of one process also queue on a lock before BEGIN IMMEDIATE. This is
    for speed, not correctness (the database lock is what serialises writers, across
    processes too): a thread that finds the database locked waits in SQLite's busy handler,
    which polls with sleeps of up to 100 ms, while a queued thread starts the moment the
    previous transaction commits.
    """
    lock = _SQLITE_WRITE_LOCKS.get(id(engine)) if engine.dialect.name == "sqlite" else None
    with lock if lock is not None else contextlib.nullcontext():
        with engine.execution_options(write=True).begin() as conn:
            yield conn


def is_postgres(engine: sa.Engine) -> bool:
    """True for a PostgreSQL engine."""
    return engine.dialect.name == "postgresql"


def ensure_schema(engine: sa.Engine, *, create: bool = True) -> int:
    """Checks the store's schema version, creating the tables in an empty database.

    Two processes starting at once on an empty database are serialised (BEGIN IMMEDIATE on
    SQLite, a transaction-scoped advisory lock on PostgreSQL), so the tables are made once.

    Args:
        engine: the store's engine.
        create: create the tables when the database has none of them.

    Returns:
        The schema version (always SCHEMA_VERSION on success).

    Raises:
        SchemaVersionError: another version, tables without a version, or nothing to open.
    """
    where = describe_url(str(engine.url))
    with write_transaction(engine) as conn:
        if is_postgres(engine):
            conn.execute(sa.select(sa.func.pg_advisory_xact_lock(PG_LABELS_LOCK + 1)))
        tables = set(sa.inspect(conn).get_table_names())
        ours = set(metadata.tables)
        if "schema_info" in tables:
            version = conn.execute(sa.select(schema_info.c.version)).scalar()
            if version != SCHEMA_VERSION:
                raise SchemaVersionError(
                    f"{where}: label store schema version {version}, but this rlhf_jax reads "
                    f"version {SCHEMA_VERSION}; use the rlhf_jax release that wrote it (export "
                    "its labels there) or a new store")
            return version
        if tables & ours:
            raise SchemaVersionError(
                f"{where}: has tables {sorted(tables & ours)} but no schema_info table: not an "
                "rlhf_jax label store (or one from before versioning); refusing to touch it")
        if not create:
            raise SchemaVersionError(f"{where}: no label store here (no schema_info table)")
        metadata.create_all(conn)
        conn.execute(schema_info.insert().values(id=1, version=SCHEMA_VERSION,
                                                 created=time.time()))
    return SCHEMA_VERSION
