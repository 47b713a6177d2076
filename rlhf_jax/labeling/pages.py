"""Server-rendered pages of the labeling app: login, labeling, admin (spec §5.3).

Jinja2 with autoescaping renders every page, so model text reaches the browser as text, never
as HTML: a sample containing `<script>` is shown as those characters. The labeling page works
without JavaScript (each pick is a form post, answered by a redirect to the next comparison);
`static/label.js` adds the keys 1-N, `s` (skip) and `f` (flag). Forms carry a token derived
from the labeler's token hash (CSRF), and the login cookie is HttpOnly and SameSite=Strict.

Unauthenticated page requests answer 401 with the login form; a labeler on the admin page
gets 403.
"""

from __future__ import annotations

import datetime
import time
import urllib.parse

import jinja2
import markupsafe
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

from rlhf_jax.labeling import auth, instructions, stats
from rlhf_jax.labeling.schema import StoreError

_ENV = jinja2.Environment(
    loader=jinja2.PackageLoader("rlhf_jax.labeling", "templates"),
    autoescape=jinja2.select_autoescape(["html"], default=True),
    undefined=jinja2.StrictUndefined,
)
NOTICES = {
    "labelled": "Saved. Here is the next one.",
    "skipped": "Skipped.",
    "lease_lost": "That comparison was no longer reserved for you (it took longer than the "
                  "lease); your answer was not stored. Here is the next one.",
    "error": "Your answer could not be stored; please try again.",
}
MAX_FORM_BYTES = 16_384


def _utc(t: float | None) -> str:
    if t is None:
        return "-"
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _fmt(value, digits: int = 2, percent: bool = False) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}%" if percent else f"{value:.{digits}f}"


_ENV.filters.update(utc=_utc, fmt=_fmt)


def render(name: str, status: int = 200, **context) -> HTMLResponse:
    """Renders a template of the package into an HTML response."""
    return HTMLResponse(_ENV.get_template(name).render(**context), status_code=status)


def timeline_svg(line: dict, width: int = 960, height: int = 200,
                 min_buckets: int = 12) -> markupsafe.Markup:
    """A bar chart of labels per time bucket, ending now, as inline SVG.

    At least `min_buckets` buckets are drawn (empty ones before the first label), so the first
    minutes of a run do not draw one wall-to-wall bar. Only numbers and times go into the
    markup, never stored text.
    """
    counts = line["counts"]
    if not counts:
        return markupsafe.Markup('<p class="muted">No labels yet.</p>')
    pad = max(0, min_buckets - len(counts))
    counts = [0] * pad + list(counts)
    start = line["start"] - pad * line["bucket_s"]
    end = start + line["bucket_s"] * len(counts)
    left, right, bottom, top = 44, 10, 24, 22
    plot_w, plot_h = width - left - right, height - bottom - top
    peak = max(counts) or 1
    bar_w = plot_w / len(counts)
    unit = _bucket_name(line["bucket_s"])
    parts = [f'<svg class="chart" viewBox="0 0 {width} {height}" width="100%" role="img" '
             f'aria-label="labels per {unit}">',
             f'<text x="{left}" y="12">labels per {unit}</text>',
             f'<line x1="{left}" y1="{top + plot_h}" x2="{width - right}" y2="{top + plot_h}" '
             'stroke="#888"/>',
             f'<text x="{left - 6}" y="{top + 8}" text-anchor="end">{peak}</text>',
             f'<text x="{left - 6}" y="{top + plot_h}" text-anchor="end">0</text>']
    for i, n in enumerate(counts):
        h = plot_h * n / peak
        parts.append(f'<rect x="{left + i * bar_w + 1:.1f}" y="{top + plot_h - h:.1f}" '
                     f'width="{max(bar_w - 2, 1):.1f}" height="{h:.1f}" fill="#3b6ea8">'
                     f'<title>{n} labels</title></rect>')
    for x, t, anchor in ((left, start, "start"), (width - right, end, "end")):
        parts.append(f'<text x="{x}" y="{height - 6}" text-anchor="{anchor}">{_utc(t)}</text>')
    parts.append("</svg>")
    return markupsafe.Markup("".join(parts))


def _bucket_name(seconds: float) -> str:
    for size, name in ((7 * 86400, "week"), (86400, "day"), (3600, "hour"), (60, "minute")):
        if seconds >= size and seconds % size == 0:
            n = int(seconds // size)
            return name if n == 1 else f"{n} {name}s"
    return f"{int(seconds)} s"


def _labeler(authn, request: Request, admin: bool = False):
    """The page's labeler, or an HTML 401 (login form) / 403 page."""
    try:
        return authn.authenticate(request, admin=admin), None
    except HTTPException as e:
        if e.status_code == 401:
            return None, render("login.html", status=401, error=None, next=request.url.path)
        return None, render("message.html", status=403, title="Admins only",
                            message="This page is for admins. Ask an admin for access.")


async def _form(request: Request) -> dict[str, str]:
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        raise HTTPException(413, "form too large")
    fields = urllib.parse.parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
    return {k: v[-1] for k, v in fields.items()}


def add_pages(app: FastAPI, store, authn: auth.Authenticator) -> None:
    """Adds the HTML routes and the static files to the app."""
    app.mount("/static", StaticFiles(packages=[("rlhf_jax.labeling", "static")]), name="static")

    @app.get("/", include_in_schema=False)
    def root():
        return RedirectResponse("/label", status_code=303)

    @app.get("/login", include_in_schema=False)
    def login_page(next: str = "/label"):
        return render("login.html", error=None, next=next)

    @app.post("/login", include_in_schema=False)
    async def login(request: Request):
        form = await _form(request)
        token = form.get("token", "").strip()
        target = form.get("next", "/label")
        if not target.startswith("/") or target.startswith("//"):
            target = "/label"  # only local redirects
        who = authn.resolve(token) if token else None
        if who is None:
            authn.log_refusal(request, 401, "login with an unknown token")
            return render("login.html", status=401, error="Unknown access token.", next=target)
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(auth.COOKIE_NAME, token, httponly=True, samesite="strict",
                            secure=request.url.scheme == "https", max_age=30 * 86400)
        return response

    @app.get("/logout", include_in_schema=False)
    def logout():
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(auth.COOKIE_NAME)
        return response

    @app.get("/label", include_in_schema=False)
    def label_page(request: Request, notice: str | None = None):
        who, refused = _labeler(authn, request)
        if refused:
            return refused
        leased = store.next_comparison(who, lease_s=app.state.lease_s,
                                       gold_every=app.state.gold_every)
        question, explanation = instructions.instructions(leased.task if leased else "")
        n = len(leased.samples) if leased else 4
        return render("label.html", labeler=who, count=store.label_count(who.id),
                      leased=leased, question=question, explanation=explanation,
                      keys_help=instructions.KEYS_HELP.format(n=n), notice=NOTICES.get(notice),
                      csrf=auth.csrf_token(who), lease_minutes=f"{app.state.lease_s / 60:g}")

    @app.post("/label", include_in_schema=False)
    async def label_submit(request: Request):
        who, refused = _labeler(authn, request)
        if refused:
            return refused
        form = await _form(request)
        if not auth.check_csrf(who, form.get("csrf")):
            return render("message.html", status=403, title="Form expired",
                          message="This form is not valid any more. Reload the page.")
        flag = "flagged on the labeling page" if form.get("flag") else None
        try:
            comparison_id = int(form.get("comparison_id", ""))
            if form.get("action") == "skip":
                store.skip(who.id, comparison_id, flag=flag)
                notice = "skipped"
            else:
                store.submit_label(who.id, comparison_id, int(form.get("best", "")), flag=flag)
                notice = "labelled"
        except ValueError:
            notice = "error"
        except StoreError as e:
            notice = "lease_lost" if e.status == 409 else "error"
        return RedirectResponse(f"/label?notice={notice}", status_code=303)

    @app.get("/admin", include_in_schema=False)
    def admin_page(request: Request):
        who, refused = _labeler(authn, request, admin=True)
        if refused:
            return refused
        s = stats.compute_stats(store)
        return render("admin.html", labeler=who, s=s, chart=timeline_svg(s["timeline"]),
                      flags=recent_flags(store), now=time.time())


def recent_flags(store, limit: int = 20) -> list[dict]:
    """The latest flags with their labeler and comparison, newest first."""
    import sqlalchemy as sa

    from rlhf_jax.labeling.schema import comparisons, flags, labelers

    with store.engine.connect() as conn:
        rows = conn.execute(
            sa.select(flags.c.comparison_id, flags.c.reason, flags.c.created,
                      labelers.c.name, comparisons.c.query_text)
            .select_from(flags.join(labelers, flags.c.labeler_id == labelers.c.id)
                         .join(comparisons, flags.c.comparison_id == comparisons.c.id))
            .order_by(flags.c.id.desc()).limit(limit)).all()
    return [dict(comparison_id=r.comparison_id, reason=r.reason, created=r.created,
                 labeler=r.name, query=r.query_text[:120]) for r in rows]
