"""The labeling app: a FastAPI application over a LabelStore (spec §5.3).

JSON API (every call but /healthz needs `Authorization: Bearer TOKEN` or the login cookie):

| method and path              | who     | what                                                      |
|------------------------------|---------|-----------------------------------------------------------|
| GET  /healthz                | anyone  | {"status": "ok", "schema_version"}; checks the database   |
| GET  /api/v1/me              | labeler | {"id", "name", "admin", "labels"}: your own count         |
| GET  /api/v1/next            | labeler | {"comparison_id", "query", "samples", "instructions",     |
|                              |         | "task", "lease_expires_at"} leased to you; 204 if none    |
| POST /api/v1/labels          | labeler | {"comparison_id", "best", "flag"?}: 201 stored, 200 a     |
|                              |         | repeat, 404 unknown id, 409 not your lease, 422 bad best  |
| POST /api/v1/skip            | labeler | {"comparison_id", "flag"?, "release"?}: give it back      |
| POST /api/v1/comparisons     | admin   | {"task", "comparisons", "overlap"?}: enqueue a batch,     |
|                              |         | idempotent by each comparison's "key"                     |
| GET  /api/v1/labels          | admin   | ?after=ID&limit=N&kinds=train,validation&text=0: labels   |
|                              |         | with id > after, in id order, with token ids; next_after  |
| GET  /api/v1/counts          | admin   | comparisons, labels, queued/leased slots, last label id   |
| GET  /api/v1/stats           | admin   | counts, labels per labeler and hour, median seconds,      |
|                              |         | agreement, gold accuracy, timeline                        |
| GET  /api/v1/export          | admin   | ?format=released|jsonl&kinds=...: the export file        |

Bot labelers (`add-labeler --bot`, the mock label worker) also get a comparison's `extra`
dict in /next; people never do. Errors answer {"detail": "message naming the culprit"}.
"""

from __future__ import annotations

import json
import logging
import os

import sqlalchemy as sa
from fastapi import FastAPI, Query, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, StrictFloat, StrictInt

from rlhf_jax.labeling import export, instructions, stats
from rlhf_jax.labeling.auth import Authenticator
from rlhf_jax.labeling.records import TaskIdentity
from rlhf_jax.labeling.schema import SCHEMA_VERSION, InvalidError, StoreError
from rlhf_jax.labeling.store import LabelStore

logger = logging.getLogger(__name__)


# Body fields of the labeler calls: name -> (accepted types, required).
LABEL_FIELDS = {"comparison_id": (int, True), "best": (int, True), "flag": (str, False)}
SKIP_FIELDS = {"comparison_id": (int, True), "flag": (str, False), "release": (bool, False)}


async def _json_object(request: Request, fields: dict) -> dict:
    """The request's JSON object, checked against `fields`; InvalidError names the culprit."""
    where = f"{request.method} {request.url.path}"
    raw = await request.body()
    try:
        body = json.loads(raw)
    except ValueError as e:
        detail = f"{e.msg} at character {e.pos}" if isinstance(e, json.JSONDecodeError) else e
        raise InvalidError(f"{where}: request body is not valid JSON ({detail})") from None
    if not isinstance(body, dict):
        raise InvalidError(f"{where}: request body must be a JSON object with fields "
                           f"{sorted(fields)}")
    unknown = set(body) - set(fields)
    if unknown:
        raise InvalidError(f"{where}: unknown fields {sorted(unknown)} (expected "
                           f"{sorted(fields)})")
    for name, (kind, required) in fields.items():
        if name not in body:
            if required:
                raise InvalidError(f"{where}: body.{name}: field required")
            continue
        value = body[name]
        # bool is a subclass of int in Python, but `"best": true` is not an index.
        if type(value) is not kind and not (value is None and not required):
            raise InvalidError(f"{where}: body.{name}: expected {kind.__name__}, got "
                               f"{json.dumps(value)}")
        if kind is str and value is not None and len(value) > 500:
            raise InvalidError(f"{where}: body.{name}: longer than 500 characters")
    return body


class EnqueueIn(BaseModel):
    """Body of POST /api/v1/comparisons (fields checked in detail by `records`)."""

    model_config = ConfigDict(extra="forbid")
    task: dict
    comparisons: list
    overlap: StrictFloat | StrictInt = 0.0


def _validation_message(errors) -> str:
    parts = []
    for e in errors:
        loc = ".".join(str(x) for x in e.get("loc", ()))
        if e.get("type") == "json_invalid":
            err = (e.get("ctx") or {}).get("error", "")
            pos = e["loc"][1] if len(e.get("loc", ())) > 1 else "?"
            parts.append(f"request body is not valid JSON ({err} at character {pos})")
        else:
            parts.append(f"{loc}: {e.get('msg')}")
    return "; ".join(parts) or "invalid request"


def create_app(store: LabelStore, *, lease_s: float = 600.0, gold_every: int = 10,
               auth_cache_s: float = 30.0) -> FastAPI:
    """Builds the app: JSON API, labeling and admin pages, static files.

    Args:
        store: the label store (the app does not close it).
        lease_s: seconds a comparison stays leased to a labeler.
        gold_every: one gold question per this many labels of a labeler (0 = none).
        auth_cache_s: seconds a resolved token stays cached.

    Returns:
        The FastAPI app.
    """
    if lease_s <= 0:
        raise ValueError(f"lease_s must be > 0, got {lease_s}")
    app = FastAPI(title="rlhf_jax labeling", docs_url=None, redoc_url=None, openapi_url=None)
    authn = Authenticator(store.labeler_by_hash, cache_s=auth_cache_s)
    app.state.store, app.state.auth = store, authn
    app.state.lease_s, app.state.gold_every = lease_s, gold_every

    @app.exception_handler(StoreError)
    async def _store_error(request: Request, exc: StoreError):
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        return JSONResponse({"detail": f"{request.method} {request.url.path}: "
                             f"{_validation_message(errors)}",
                             "errors": jsonable_encoder(errors, custom_encoder={
                                 Exception: str, bytes: lambda b: b.decode("utf-8", "replace")})},
                            status_code=422)

    @app.get("/healthz")
    def healthz():
        with store.engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        return {"status": "ok", "schema_version": SCHEMA_VERSION}

    @app.get("/api/v1/me")
    def me(request: Request):
        who = authn.authenticate(request)
        return {"id": who.id, "name": who.name, "admin": who.is_admin,
                "labels": store.label_count(who.id)}

    # The calls a labeler makes per label are plain routes, their bodies checked by
    # `_json_object` with messages as clear as FastAPI's.
    async def next_comparison(request: Request):
        who = authn.authenticate(request)
        leased = await store.next_comparison_async(who, lease_s=lease_s, gold_every=gold_every)
        if leased is None:
            return Response(status_code=204)
        body = {"comparison_id": leased.comparison_id, "query": leased.query,
                "samples": leased.samples, "task": leased.task,
                "instructions": instructions.instructions_text(leased.task),
                "lease_expires_at": leased.expires_at}
        if who.is_bot:
            body["extra"] = leased.extra
        return JSONResponse(body)

    async def post_label(request: Request):
        who = authn.authenticate(request)
        body = await _json_object(request, LABEL_FIELDS)
        label_id, created = await store.submit_label_async(
            who.id, body["comparison_id"], body["best"], flag=body.get("flag"))
        return JSONResponse({"label_id": label_id, "comparison_id": body["comparison_id"],
                             "best": body["best"], "created": created},
                            status_code=201 if created else 200)

    async def post_skip(request: Request):
        who = authn.authenticate(request)
        body = await _json_object(request, SKIP_FIELDS)
        release = body.get("release", False)
        await store.skip_async(who.id, body["comparison_id"], flag=body.get("flag"),
                               remember=not release)
        return JSONResponse({"comparison_id": body["comparison_id"], "skipped": not release})

    app.add_route("/api/v1/next", next_comparison, methods=["GET"])
    app.add_route("/api/v1/labels", post_label, methods=["POST"])
    app.add_route("/api/v1/skip", post_skip, methods=["POST"])

    @app.post("/api/v1/comparisons")
    def post_comparisons(body: EnqueueIn, request: Request):
        authn.authenticate(request, admin=True)
        task = TaskIdentity.from_dict(body.task, "body.task")
        return store.enqueue(body.comparisons, task, overlap=float(body.overlap))

    @app.get("/api/v1/labels")
    def get_labels(request: Request, after: int = Query(0, ge=0),
                   limit: int = Query(1000, ge=1, le=100_000), kinds: str | None = None,
                   text: bool = False):
        authn.authenticate(request, admin=True)
        kind_list = _kinds(kinds)
        rows = store.labels_after(after, limit, kinds=kind_list, with_text=text)
        return {"labels": rows, "next_after": rows[-1]["id"] if rows else after}

    @app.get("/api/v1/counts")
    def get_counts(request: Request):
        authn.authenticate(request, admin=True)
        return store.counts()

    @app.get("/api/v1/stats")
    def get_stats(request: Request):
        authn.authenticate(request, admin=True)
        return stats.compute_stats(store)

    @app.get("/api/v1/export")
    def get_export(request: Request, format: str = "released", kinds: str | None = None):
        authn.authenticate(request, admin=True)
        text, count = export.render_export(store, format, _kinds(kinds) or export.DEFAULT_KINDS)
        media = "application/json" if format == "released" else "application/x-ndjson"
        return Response(text, media_type=media, headers={"X-Label-Count": str(count)})

    from rlhf_jax.labeling import pages

    pages.add_pages(app, store, authn)
    return app


def _kinds(kinds: str | None) -> list[str] | None:
    if not kinds:
        return None
    out = [k.strip() for k in kinds.split(",") if k.strip()]
    bad = set(out) - {"train", "validation", "gold"}
    if bad:
        raise export.ExportError(f"kinds: unknown {sorted(bad)}; expected train, validation, gold")
    return out


def app_from_env() -> FastAPI:
    """App factory for `uvicorn --factory` with several worker processes.

    Reads RLHF_JAX_LABEL_DB (a SQLAlchemy URL), RLHF_JAX_LABEL_LEASE_S,
    RLHF_JAX_LABEL_GOLD_EVERY, RLHF_JAX_LABEL_POOL and RLHF_JAX_LABEL_SYNCHRONOUS, which
    `label_server serve` sets.
    """
    url = os.environ.get("RLHF_JAX_LABEL_DB")
    if not url:
        raise RuntimeError("RLHF_JAX_LABEL_DB is not set (use `python -m rlhf_jax.label_server "
                           "serve`, which sets it)")
    store = LabelStore(url, pool_size=int(os.environ.get("RLHF_JAX_LABEL_POOL", "8")),
                       synchronous=os.environ.get("RLHF_JAX_LABEL_SYNCHRONOUS", "FULL"))
    return create_app(store, lease_s=float(os.environ.get("RLHF_JAX_LABEL_LEASE_S", "600")),
                      gold_every=int(os.environ.get("RLHF_JAX_LABEL_GOLD_EVERY", "10")))
