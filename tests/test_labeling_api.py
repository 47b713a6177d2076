"""The labeling app's HTTP handlers and pages, with FastAPI's TestClient (SQLite store)."""

import json
import logging
import re

import pytest
from fastapi.testclient import TestClient
from labeling_util import TASK, comparison

from rlhf_jax.data import labels as labels_lib
from rlhf_jax.labeling.api import create_app
from rlhf_jax.labeling.store import LabelStore

SCRIPT = "<script>alert('pwned')</script>"


@pytest.fixture
def app(tmp_path):
    store = LabelStore.open(str(tmp_path / "store"))
    tokens = {name: store.add_labeler(name, admin=name == "admin", bot=name == "bot")
              for name in ("admin", "alice", "bob", "bot")}
    client = TestClient(create_app(store, lease_s=60, gold_every=0))
    yield client, store, tokens
    store.close()


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


def enqueue(client, tokens, records, task=TASK, overlap=0.0):
    return client.post("/api/v1/comparisons", headers=bearer(tokens["admin"]),
                       json={"task": task.as_dict(), "comparisons": records, "overlap": overlap})


def test_tokens_are_required_and_refusals_are_logged_without_them(app, caplog):
    client, _, tokens = app
    caplog.set_level(logging.WARNING, logger="rlhf_jax.labeling.auth")
    assert client.get("/healthz").json() == {"status": "ok", "schema_version": 1}
    assert client.get("/api/v1/next").status_code == 401
    wrong = "rlhf_" + "x" * 43
    response = client.get("/api/v1/next", headers=bearer(wrong))
    assert response.status_code == 401 and response.json()["detail"] == "unknown access token"
    assert client.get("/api/v1/next", headers={"Authorization": "Basic abc"}).status_code == 401
    for path in ("/api/v1/stats", "/api/v1/counts", "/api/v1/labels", "/api/v1/export"):
        response = client.get(path, headers=bearer(tokens["alice"]))
        assert response.status_code == 403, path
        assert response.json()["detail"] == "labeler 'alice' is not an admin"
    assert enqueue(client, {"admin": tokens["bob"]}, [comparison(0)]).status_code == 403
    assert client.get("/label").status_code == 401 and client.get("/admin").status_code == 401
    assert client.get("/admin", headers=bearer(tokens["alice"])).status_code == 403
    logged = caplog.text
    assert "401 GET /api/v1/next from testclient: unknown access token" in logged
    assert "403 GET /api/v1/stats" in logged
    for token in (*tokens.values(), wrong):
        assert token not in logged


def test_next_label_repeat_and_every_refusal(app):
    client, store, tokens = app
    assert client.get("/api/v1/next", headers=bearer(tokens["alice"])).status_code == 204
    assert enqueue(client, tokens, [comparison(i, extra={"reference": "ref"})
                                    for i in range(2)]).json()["added"] == 2
    got = client.get("/api/v1/next", headers=bearer(tokens["alice"])).json()
    assert set(got) == {"comparison_id", "query", "samples", "task", "instructions",
                        "lease_expires_at"}  # people never see `extra`
    assert got["instructions"].startswith("Which continuation is the most positive?")
    bot = client.get("/api/v1/next", headers=bearer(tokens["bot"])).json()
    assert bot["extra"] == {"reference": "ref"} and bot["comparison_id"] != got["comparison_id"]
    cid = got["comparison_id"]
    post = lambda body, who="alice", **kw: client.post(  # noqa: E731
        "/api/v1/labels", headers=bearer(tokens[who]), json=body, **kw)
    response = post({"comparison_id": cid, "best": 7})
    assert response.status_code == 422
    assert response.json()["detail"] == (f"best=7 out of range: comparison {cid} has 4 "
                                         "samples, so best must be in [0, 4)")
    assert post({"comparison_id": 12345, "best": 0}).status_code == 404
    response = post({"comparison_id": bot["comparison_id"], "best": 0})
    assert response.status_code == 409 and "not leased to you" in response.json()["detail"]
    response = post({"comparison_id": cid, "best": "2"})
    assert response.status_code == 422 and "body.best" in response.json()["detail"]
    response = client.post("/api/v1/labels", headers={**bearer(tokens["alice"]),
                                                      "Content-Type": "application/json"},
                           content=b'{"comparison_id": 1, "best": ')
    assert response.status_code == 422
    assert "request body is not valid JSON" in response.json()["detail"]
    first = post({"comparison_id": cid, "best": 2})
    assert first.status_code == 201 and first.json()["created"] is True
    repeat = post({"comparison_id": cid, "best": 2})
    assert repeat.status_code == 200 and repeat.json()["label_id"] == first.json()["label_id"]
    assert post({"comparison_id": cid, "best": 1}).status_code == 409
    me = client.get("/api/v1/me", headers=bearer(tokens["alice"])).json()
    assert me == {"id": me["id"], "name": "alice", "admin": False, "labels": 1}
    assert store.counts()["labels"]["total"] == 1


def test_admin_enqueue_read_labels_counts_stats_and_export(app, tmp_path):
    client, store, tokens = app
    admin = bearer(tokens["admin"])
    bad = [comparison(0), dict(comparison(1), samples=["only one"])]
    response = enqueue(client, tokens, bad)
    assert response.status_code == 422
    assert response.json()["detail"] == ("comparisons[1].samples: expected 4 samples (the "
                                         "store's task has num_samples=4), got 1")
    response = client.get("/api/v1/export", headers=admin)
    assert response.status_code == 404 and "no labels to export" in response.json()["detail"]
    records = [comparison(i) for i in range(4)]
    assert enqueue(client, tokens, records).json()["added"] == 4
    assert enqueue(client, tokens, records).json() == {"added": 0, "existing": 4,
                                                       "ids": [1, 2, 3, 4]}
    other = TASK.as_dict() | {"response_length": 7}
    response = client.post("/api/v1/comparisons", headers=admin,
                           json={"task": other, "comparisons": records})
    assert response.status_code == 409 and "response_length=7 (store: 6)" in response.json()["detail"]
    for who in ("alice", "bob", "alice"):
        cid = client.get("/api/v1/next", headers=bearer(tokens[who])).json()["comparison_id"]
        client.post("/api/v1/labels", headers=bearer(tokens[who]),
                    json={"comparison_id": cid, "best": 3})
    page = client.get("/api/v1/labels", params={"after": 0, "limit": 2}, headers=admin).json()
    assert [r["id"] for r in page["labels"]] == [1, 2] and page["next_after"] == 2
    rest = client.get("/api/v1/labels", params={"after": 2}, headers=admin).json()
    assert [r["id"] for r in rest["labels"]] == [3] and rest["next_after"] == 3
    assert rest["labels"][0]["sample_tokens"] == records[2]["sample_tokens"]
    counts = client.get("/api/v1/counts", headers=admin).json()
    assert counts["labels"]["total"] == 3 and counts["slots"]["queued"] == 1
    s = client.get("/api/v1/stats", headers=admin).json()
    assert {r["name"]: r["labels"] for r in s["labelers"]} == {"admin": 0, "alice": 2, "bob": 1,
                                                               "bot": 0}
    assert s["labels_per_hour"] == 3 and s["median_seconds"] >= 0
    released = client.get("/api/v1/export", headers=admin)
    assert released.headers["x-label-count"] == "3"
    path = tmp_path / "labels.json"
    path.write_text(released.text)
    loaded = labels_lib.load_labels(str(path), "best_of_4", query_length=8, response_length=6,
                                    vocab_size=50257)
    assert loaded["best"].tolist() == [3, 3, 3] and loaded["sample0"].shape == (3, 6)
    lines = client.get("/api/v1/export", params={"format": "jsonl"}, headers=admin).text
    rows = [json.loads(line) for line in lines.splitlines()]
    assert [r["labeler"] for r in rows] == ["alice", "bob", "alice"]
    assert rows[0]["samples"] == records[0]["samples"] and rows[0]["created_utc"].endswith("+00:00")
    assert client.get("/api/v1/export", params={"format": "csv"},
                      headers=admin).json()["detail"].startswith("unknown export format 'csv'")


def test_model_text_is_shown_as_text_on_the_page(app):
    client, _, tokens = app
    enqueue(client, tokens, [comparison(0, query=f"A query {SCRIPT} here.",
                                        samples=[SCRIPT, "<b>bold</b>", "x & y", "plain"])])
    html = client.get("/label", headers=bearer(tokens["alice"])).text
    assert SCRIPT not in html and "<b>bold</b>" not in html
    assert "&lt;script&gt;alert(&#39;pwned&#39;)&lt;/script&gt;" in html
    assert "x &amp; y" in html and html.count("&lt;script&gt;") == 2
    assert re.search(r'<script src="/static/label.js"></script>', html)  # our only script
    js = client.get("/static/label.js")
    assert js.status_code == 200 and "keydown" in js.text


def test_login_label_skip_and_flag_through_the_pages(app):
    client, store, tokens = app
    enqueue(client, tokens, [comparison(i) for i in range(3)])
    response = client.post("/login", data={"token": "wrong"}, follow_redirects=False)
    assert response.status_code == 401 and "Unknown access token" in response.text
    response = client.post("/login", data={"token": tokens["alice"], "next": "//evil.example"},
                           follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == "/label"
    cookie = response.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie
    page = client.get("/label").text
    assert "You have labelled <strong id=\"my-count\">0</strong>" in page
    csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', page).group(1)
    cid = int(re.search(r'name="comparison_id" value="(\d+)"', page).group(1))
    refused = client.post("/label", data={"csrf": "forged", "comparison_id": cid, "best": 1})
    assert refused.status_code == 403 and store.counts()["labels"]["total"] == 0
    done = client.post("/label", data={"csrf": csrf, "comparison_id": cid, "best": 1, "flag": "1"})
    assert done.status_code == 200 and "Saved. Here is the next one." in done.text
    assert "<strong id=\"my-count\">1</strong>" in done.text
    cid2 = int(re.search(r'name="comparison_id" value="(\d+)"', done.text).group(1))
    skipped = client.post("/label", data={"csrf": csrf, "comparison_id": cid2, "action": "skip"})
    assert "Skipped." in skipped.text
    assert f'name="comparison_id" value="{cid2}"' not in skipped.text
    assert store.counts()["flags"] == 1 and store.counts()["labels"]["total"] == 1
    client.post("/login", data={"token": tokens["admin"]})
    admin_page = client.get("/admin")
    assert admin_page.status_code == 200 and '<span class="big" id="labels-total">1</span>' in admin_page.text
    assert "<svg" in admin_page.text and "flagged on the labeling page" in admin_page.text
