"""SQLAlchemy Core statements run on the pooled DBAPI connection: the label store's hot path.

Part of the labeling app (spec §5.3: labelers pick the best of four samples).

Leasing a comparison and storing a label are a few short statements each, and a server
answers them hundreds of times a second. Through `sqlalchemy.Connection.execute` each statement
cost more CPU (event dispatch, parameter processing, result wrappers) than SQLite took to run it
(bench/RESULTS.md). So the hot statements are still written with SQLAlchemy Core, once, but
compiled once per dialect and executed with the driver's own cursor (sqlite3 or psycopg) on a
connection from the engine's pool. Transactions are explicit: BEGIN IMMEDIATE on SQLite (after
the in-process writer lock of `schema.write_transaction`), the driver's implicit transaction on
PostgreSQL; COMMIT on success, ROLLBACK on any error.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import functools
import json
import threading

import sqlalchemy as sa

from rlhf_jax.labeling import schema


class Compiled:
    """A Core statement compiled for one dialect, with its bind-parameter layout."""

    def __init__(self, statement, dialect):
        compiled = statement.compile(dialect=dialect)
        self.sql = compiled.string
        # Literal values of the statement (LIMIT 1, kind = 'gold', ...); callers pass the rest.
        self.defaults = dict(compiled.params)
        positions = compiled.positiontup
        self.positions = list(positions) if positions is not None else None

    def params(self, values: dict):
        """Driver parameters: a tuple for qmark (sqlite3), a dict for pyformat (psycopg)."""
        merged = {**self.defaults, **values}
        if self.positions is None:
            return merged
        return tuple(merged[k] for k in self.positions)


class Statements:
    """Lazily compiled statements of one engine's dialect."""

    def __init__(self, engine: sa.Engine):
        self.engine = engine
        self.dialect = engine.dialect
        self._compiled: dict[int, Compiled] = {}
        self.json_as_text = self.dialect.name == "sqlite"

    def get(self, statement) -> Compiled:
        key = id(statement)
        compiled = self._compiled.get(key)
        if compiled is None:
            compiled = self._compiled[key] = Compiled(statement, self.dialect)
        return compiled

    def json(self, value):
        """A JSON column's value as Python (sqlite3 returns the text, psycopg parses it)."""
        if value is None or not self.json_as_text:
            return value
        return json.loads(value)


class Tx:
    """One transaction on a raw pooled connection; use `Statements.transaction`."""

    def __init__(self, statements: Statements, cursor):
        self._statements = statements
        self._cursor = cursor

    def sql(self, text: str) -> None:
        """Runs a fixed SQL command (SAVEPOINT, RELEASE, ...)."""
        self._cursor.execute(text)

    def execute(self, statement, params: dict | None = None):
        """Runs a statement; returns the cursor (fetchone, fetchall, rowcount)."""
        compiled = self._statements.get(statement)
        self._cursor.execute(compiled.sql, compiled.params(params or {}))
        return self._cursor

    def one(self, statement, params: dict | None = None):
        """The first row, or None."""
        return self.execute(statement, params).fetchone()

    def scalar(self, statement, params: dict | None = None):
        """The first column of the first row, or None."""
        row = self.one(statement, params)
        return None if row is None else row[0]


@contextlib.contextmanager
def transaction(statements: Statements, *, durable: bool = True):
    """A write transaction on the driver's connection (see the module docstring).

    Args:
        statements: the engine's statements.
        durable: False for transactions whose loss in a power cut is harmless (leases: an
            unanswered lease is offered again anyway). On SQLite with synchronous=FULL they
            commit without an fsync; the next durable commit's fsync covers them too, since
            the WAL is written in order. A label costs one fsync instead of two. (On
            PostgreSQL the statements of `queue` turn synchronous_commit off themselves.)
    """
    engine = statements.engine
    sqlite = statements.dialect.name == "sqlite"
    lock = schema._SQLITE_WRITE_LOCKS.get(id(engine)) if sqlite else None
    relax = sqlite and not durable and schema.SQLITE_SYNCHRONOUS.get(id(engine)) == "FULL"
    with lock if lock is not None else contextlib.nullcontext():
        raw = engine.raw_connection()
        cursor = raw.cursor()
        try:
            if relax:
                cursor.execute("PRAGMA synchronous=NORMAL")
            if sqlite:
                cursor.execute("BEGIN IMMEDIATE")
            try:
                yield Tx(statements, cursor)
            except BaseException:
                raw.rollback()
                raise
            raw.commit()
        finally:
            if relax:  # the pooled connection goes back as it came: synchronous=FULL
                cursor.execute("PRAGMA synchronous=FULL")
            cursor.close()
            raw.close()  # back to the pool


class Runner:
    """Runs the store's hot transactions: directly (PostgreSQL) or in batches (SQLite).

    PostgreSQL runs concurrent transactions and flushes their commits together by itself, so
    each transaction runs on the caller's thread. SQLite has one writer, and with
    synchronous=FULL each commit waits for an fsync (milliseconds on a virtual disk). So on
    SQLite one thread per process runs every hot transaction: it takes all that are waiting,
    runs each inside its own SAVEPOINT (a refused label rolls back alone), and commits them
    together, with one fsync for the whole batch (group commit). Each caller gets its result
    only after that commit, so an acknowledged label is still a committed one.
    """

    def __init__(self, statements: Statements, *, max_batch: int = 256):
        self.statements = statements
        self.batched = statements.dialect.name == "sqlite"
        self.max_batch = max_batch
        self._items = collections.deque()
        self._cv = threading.Condition()
        self._thread = None
        self._closed = False

    def run(self, body, *, durable: bool = True):
        """`body(tx)` in a transaction; returns its result or raises its exception."""
        if not self.batched:
            with transaction(self.statements, durable=durable) as tx:
                return body(tx)
        return self.submit(body, durable=durable).result()

    async def run_async(self, body, *, durable: bool = True):
        """`run` for the event loop: waits without blocking it."""
        import asyncio

        import anyio.to_thread

        if self.batched:
            return await asyncio.wrap_future(self.submit(body, durable=durable))
        return await anyio.to_thread.run_sync(functools.partial(self.run, body, durable=durable))

    def submit(self, body, *, durable: bool = True) -> concurrent.futures.Future:
        """Queues `body` for the batch thread (SQLite); the future resolves after commit."""
        future = concurrent.futures.Future()
        with self._cv:
            if self._closed:
                raise RuntimeError("the label store is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="label-store-writer",
                                                daemon=True)
                self._thread.start()
            self._items.append((body, durable, future))
            self._cv.notify()
        return future

    def close(self) -> None:
        """Finishes what is queued and stops the batch thread."""
        with self._cv:
            self._closed = True
            self._cv.notify()
            thread = self._thread
        if thread is not None:
            thread.join()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._items and not self._closed:
                    self._cv.wait()
                if not self._items:
                    return
                count = min(len(self._items), self.max_batch)
                batch = [self._items.popleft() for _ in range(count)]
            batch = [item for item in batch if item[2].set_running_or_notify_cancel()]
            if batch:
                self._run_batch(batch)

    def _run_batch(self, batch) -> None:
        outcomes = []
        try:
            with transaction(self.statements, durable=any(d for _, d, _ in batch)) as tx:
                for body, _, future in batch:
                    tx.sql("SAVEPOINT item")
                    try:
                        outcomes.append((future, body(tx), None))
                    except Exception as e:  # noqa: BLE001 - handed to its caller
                        tx.sql("ROLLBACK TO item")
                        outcomes.append((future, None, e))
                    tx.sql("RELEASE item")
        except BaseException as e:  # the commit failed: nothing of the batch is stored
            for _, _, future in batch:
                future.set_exception(e)
            if not isinstance(e, Exception):
                raise
            return
        for future, result, error in outcomes:
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(error)
