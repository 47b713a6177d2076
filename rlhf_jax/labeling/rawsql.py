"""SQLAlchemy Core statements run on the pooled DBAPI connection, for the store's hot path.

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

import contextlib
import json

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
            the WAL is written in order. A label costs one fsync instead of two. On
            PostgreSQL they commit with synchronous_commit off, for the same reason.
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
            elif not durable:
                # The same on PostgreSQL: the commit does not wait for its WAL flush.
                cursor.execute("SET LOCAL synchronous_commit = off")
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
