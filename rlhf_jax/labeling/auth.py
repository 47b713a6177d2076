"""Access tokens and request authentication for the labeling app (spec §5.3).

A token is 32 random bytes (`secrets.token_urlsafe`), shown once by `add-labeler`. The store
keeps only its sha256: a token has 256 bits of entropy, so a plain hash cannot be brute-forced
and needs no salt or slow KDF, and a leaked database does not leak tokens. A request carries the
token as `Authorization: Bearer TOKEN` (scripts, workers) or in the HttpOnly `rlhf_token`
cookie that the login page sets (browsers). Its hash is looked up (an indexed equality on a
hash reveals nothing about the token) and compared again with `hmac.compare_digest`.

A missing or unknown token answers 401, a labeler asking for an admin page 403; both are logged
with the method, path and client address, never with the token.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import logging
import secrets
import threading
import time

from fastapi import HTTPException, Request

logger = logging.getLogger(__name__)

TOKEN_PREFIX = "rlhf_"
COOKIE_NAME = "rlhf_token"


@dataclasses.dataclass(frozen=True)
class Labeler:
    """An authenticated labeler."""

    id: int
    name: str
    is_admin: bool
    is_bot: bool
    token_hash: str


def new_token() -> str:
    """A fresh access token (prefix + 43 url-safe characters, 256 bits of entropy)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """The sha256 hex digest the store keeps instead of the token."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def csrf_token(labeler: Labeler) -> str:
    """The form token of a labeler's pages: derived from the stored hash, never the token."""
    return hashlib.sha256(b"csrf:" + labeler.token_hash.encode()).hexdigest()[:32]


def check_csrf(labeler: Labeler, value: str | None) -> bool:
    """Constant-time check of a submitted form token."""
    return hmac.compare_digest(csrf_token(labeler), value or "")


class Authenticator:
    """Resolves request tokens to labelers, with a short cache so a request costs no query.

    The cache maps token hashes to labelers for `cache_s` seconds; labelers cannot be removed
    or demoted today, so the cache can only delay a new labeler by nothing (misses go to the
    store). Thread-safe: FastAPI runs sync handlers in a thread pool.
    """

    def __init__(self, lookup, cache_s: float = 30.0):
        """Args:
            lookup: `token_hash -> Labeler | None` (LabelStore.labeler_by_hash).
            cache_s: how long a resolved labeler is cached.
        """
        self._lookup = lookup
        self._cache_s = cache_s
        self._cache: dict[str, tuple[float, Labeler]] = {}
        self._lock = threading.Lock()

    def resolve(self, token: str) -> Labeler | None:
        """The labeler holding `token`, or None."""
        digest = hash_token(token)
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(digest)
        if hit is not None and now - hit[0] < self._cache_s:
            labeler = hit[1]
        else:
            labeler = self._lookup(digest)
            if labeler is None:
                return None
            with self._lock:
                if len(self._cache) > 10_000:
                    self._cache.clear()
                self._cache[digest] = (now, labeler)
        # The lookup matched on the hash already; compare again in constant time so that no
        # code path decides on a byte-by-byte comparison of secrets.
        return labeler if hmac.compare_digest(labeler.token_hash, digest) else None

    def authenticate(self, request: Request, *, admin: bool = False) -> Labeler:
        """The request's labeler, or an HTTPException 401/403 (logged without the token).

        Args:
            request: the incoming request (Authorization header or cookie).
            admin: require an admin labeler.

        Returns:
            The labeler.
        """
        token = None
        header = request.headers.get("authorization")
        if header:
            scheme, _, value = header.partition(" ")
            if scheme.lower() != "bearer" or not value.strip():
                self._refuse(request, 401, "malformed Authorization header (expected 'Bearer TOKEN')")
            token = value.strip()
        else:
            token = request.cookies.get(COOKIE_NAME)
        if not token:
            self._refuse(request, 401, "missing access token (Authorization: Bearer TOKEN)")
        labeler = self.resolve(token)
        if labeler is None:
            self._refuse(request, 401, "unknown access token")
        if admin and not labeler.is_admin:
            self._refuse(request, 403, f"labeler {labeler.name!r} is not an admin")
        return labeler

    @staticmethod
    def log_refusal(request: Request, status: int, reason: str) -> None:
        """Logs a refused request: method, path, client, reason; never the token."""
        client = request.client.host if request.client else "?"
        logger.warning("%d %s %s from %s: %s", status, request.method, request.url.path, client,
                       reason)

    def _refuse(self, request: Request, status: int, reason: str):
        self.log_refusal(request, status, reason)
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        raise HTTPException(status_code=status, detail=reason, headers=headers)
