"""An HTTP client of the labeling API, for label workers and remote trainers (spec §5.3).

`LabelClient` wraps the JSON API of `rlhf_jax.labeling.api` with an `httpx2.Client` (keep-alive,
one connection per client; httpx2 is the httpx successor that Starlette's test client uses). Labeler calls: `next`, `label`, `skip`, `me`. Admin calls (what a
trainer on another machine needs): `enqueue`, `labels_after`, `counts`, `stats`, `export`.
For a store on the same machine, `LabelStore` offers the same operations without HTTP.
"""

from __future__ import annotations

import httpx2


class ApiError(RuntimeError):
    """The server answered with an unexpected status; `status` and `detail` say which."""

    def __init__(self, method: str, path: str, status: int, detail: str):
        super().__init__(f"{method} {path}: HTTP {status}: {detail}")
        self.status = status
        self.detail = detail


class AuthError(ApiError):
    """401 or 403: the token is unknown, missing, or not an admin's."""


class LabelClient:
    """A client of one label server with one token."""

    def __init__(self, server: str, token: str, *, timeout: float = 30.0):
        """Args:
            server: base URL, e.g. "http://127.0.0.1:8000".
            token: the access token (`label_server add-labeler`).
            timeout: seconds per request.
        """
        self.server = server.rstrip("/")
        self._http = httpx2.Client(base_url=self.server, timeout=timeout,
                                  headers={"Authorization": f"Bearer {token}"})

    def close(self) -> None:
        """Closes the connection."""
        self._http.close()

    def __enter__(self) -> LabelClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def request(self, method: str, path: str, *, ok=(200,), **kw) -> httpx2.Response:
        """One request; raises ApiError (AuthError for 401/403) unless its status is in `ok`."""
        response = self._http.request(method, path, **kw)
        if response.status_code not in ok:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            cls = AuthError if response.status_code in (401, 403) else ApiError
            raise cls(method, path, response.status_code, str(detail))
        return response

    # ---- labeler ------------------------------------------------------------------------

    def me(self) -> dict:
        """{"id", "name", "admin", "labels"} of this token's labeler."""
        return self.request("GET", "/api/v1/me").json()

    def next(self) -> dict | None:
        """The comparison leased to us, or None when nothing waits (204)."""
        response = self.request("GET", "/api/v1/next", ok=(200, 204))
        return None if response.status_code == 204 else response.json()

    def label(self, comparison_id: int, best: int, flag: str | None = None) -> tuple[int, dict]:
        """Posts a label; returns (201 stored | 200 repeat, body). 409: ApiError."""
        body = {"comparison_id": comparison_id, "best": best}
        if flag:
            body["flag"] = flag
        response = self.request("POST", "/api/v1/labels", ok=(200, 201), json=body)
        return response.status_code, response.json()

    def skip(self, comparison_id: int, *, release: bool = False, flag: str | None = None) -> dict:
        """Gives a comparison back (release=True: it may come back to us)."""
        body = {"comparison_id": comparison_id, "release": release}
        if flag:
            body["flag"] = flag
        return self.request("POST", "/api/v1/skip", json=body).json()

    # ---- admin --------------------------------------------------------------------------

    def enqueue(self, task: dict, comparisons: list[dict], overlap: float = 0.0) -> dict:
        """Enqueues a batch; idempotent by each comparison's key (a resend adds nothing)."""
        return self.request("POST", "/api/v1/comparisons",
                            json={"task": task, "comparisons": comparisons,
                                  "overlap": overlap}).json()

    def labels_after(self, after: int = 0, limit: int = 1000, kinds: list[str] | None = None,
                     text: bool = False) -> dict:
        """{"labels": [...], "next_after": id}: labels with id > after, in id order."""
        params = {"after": after, "limit": limit, "text": text}
        if kinds:
            params["kinds"] = ",".join(kinds)
        return self.request("GET", "/api/v1/labels", params=params).json()

    def counts(self) -> dict:
        """The store's counts."""
        return self.request("GET", "/api/v1/counts").json()

    def stats(self) -> dict:
        """The quality-control statistics."""
        return self.request("GET", "/api/v1/stats").json()

    def export(self, fmt: str = "released", kinds: list[str] | None = None) -> str:
        """The export file's text."""
        params = {"format": fmt}
        if kinds:
            params["kinds"] = ",".join(kinds)
        return self.request("GET", "/api/v1/export", params=params).text
