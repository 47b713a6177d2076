"""The label store as the online loop sees it: a store on this machine, or a label server
(spec §5.3; the store itself is `rlhf_jax.labeling`).

Both adapters offer the same three calls: `check(task)` at start-up (reachable, token accepted,
same task), `enqueue(records, task, overlap)` (idempotent by key) and `labels_after(after)`
(incremental, in id order). The label store is the record of what was asked and answered: the
trainer asks it on resume, never the other way round. Only process 0 opens one.
"""

from __future__ import annotations

import os

from rlhf_jax.labeling.records import TaskIdentity


class OnlineStoreError(RuntimeError):
    """The label store cannot be used by this run; the message says why and names the field."""


class DirectStore:
    """A `LabelStore` opened in this process (`online.db`)."""

    def __init__(self, db: str):
        """Args:
            db: a SQLAlchemy URL, or a directory holding (or to hold) labels.sqlite.
        """
        import sqlalchemy as sa

        from rlhf_jax.labeling.schema import SchemaVersionError
        from rlhf_jax.labeling.store import LabelStore

        self.where = f"--config.online.db={db!r}"
        try:
            self._store = (LabelStore(db) if "://" in db else LabelStore.open(workdir=db))
        except (SchemaVersionError, OSError, ValueError, sa.exc.SQLAlchemyError) as e:
            raise OnlineStoreError(f"{self.where}: cannot open the label store: {e}") from e

    def check(self, task: TaskIdentity) -> dict:
        """Raises OnlineStoreError when the store holds another task; returns its counts."""
        _check_task(self._store.task_identity(), task, self.where)
        return self._store.counts()

    def enqueue(self, records: list[dict], task: TaskIdentity, overlap: float) -> dict:
        """Adds comparisons (a resent key adds nothing)."""
        return self._store.enqueue(records, task, overlap=overlap)

    def labels_after(self, after: int, limit: int = 1000) -> tuple[list[dict], int]:
        """(labels with id > after in id order, the id to read after next)."""
        rows = self._store.labels_after(after, limit, kinds=("train", "validation"))
        return rows, (rows[-1]["id"] if rows else after)

    def close(self) -> None:
        self._store.close()


class HttpStore:
    """A label server's admin API (`online.server`, token from `$online.token_env`)."""

    def __init__(self, server: str, token_env: str):
        from rlhf_jax.labeling.client import LabelClient

        token = os.environ.get(token_env, "")
        self.where = f"--config.online.server={server!r}"
        if not token:
            raise OnlineStoreError(f"{self.where}: set the environment variable {token_env} "
                                   "(--config.online.token_env) to an admin token of that "
                                   "server (`python -m rlhf_jax.label_server add-labeler NAME "
                                   "--admin`)")
        self._client = LabelClient(server, token)

    def _call(self, fn, *args, **kw):
        import httpx2

        from rlhf_jax.labeling.client import ApiError, AuthError

        try:
            return fn(*args, **kw)
        except AuthError as e:
            raise OnlineStoreError(f"{self.where} refused the token: {e.detail} (an admin "
                                   "token is needed: add-labeler NAME --admin)") from e
        except httpx2.TransportError as e:
            raise OnlineStoreError(f"{self.where}: cannot reach the label server: {e}") from e
        except ApiError as e:
            raise OnlineStoreError(f"{self.where}: {e}") from e

    def check(self, task: TaskIdentity) -> dict:
        """Reaches the server with the token; refuses a store of another task."""
        counts = self._call(self._client.counts)
        stored = counts.get("task")
        _check_task(None if stored is None else TaskIdentity.from_dict(stored, self.where),
                    task, self.where)
        return counts

    def enqueue(self, records: list[dict], task: TaskIdentity, overlap: float) -> dict:
        return self._call(self._client.enqueue, task.as_dict(), records, overlap)

    def labels_after(self, after: int, limit: int = 1000) -> tuple[list[dict], int]:
        out = self._call(self._client.labels_after, after, limit, ["train", "validation"])
        return out["labels"], int(out["next_after"])

    def close(self) -> None:
        self._client.close()


def _check_task(stored: TaskIdentity | None, task: TaskIdentity, where: str) -> None:
    from rlhf_jax.labeling.schema import TaskMismatchError

    if stored is None:
        return
    try:
        task.check_same(stored, where)
    except TaskMismatchError as e:
        raise OnlineStoreError(f"{e} (this run: --config.model.tokenizer, task.query_length, "
                               "task.response_length, labels.type)") from e


def open_store(online) -> DirectStore | HttpStore:
    """The store named by `config.online` (server or db; validation made it exactly one)."""
    if online.server:
        return HttpStore(online.server, online.token_env)
    return DirectStore(online.db)
