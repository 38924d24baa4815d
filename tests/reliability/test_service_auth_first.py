"""Without a valid API key the service says nothing but 401: not which field a body lacks (FastAPI's 422 used to
come first, with the schema's field names), not the schema itself (/openapi.json, /docs), not which paths exist.
/healthz alone answers without a key, and only {"status": "ok"}."""

import httpx
import pytest
from serving import InProcessServer, served_project

from distill.serve.app import create_app

WRONG = "dk_deadbeef_" + "Q" * 43
BODIES = [
    b'{"text": 1}',                                    # wrong shape: used to be a 422 listing `texts`
    b'{"texts": ["a"], "extra": true}',
    b"not json at all",
    b'{"texts": ["\\ud800"]}',
    b'{"texts": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    b"",
]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root, key = served_project(tmp_path_factory.mktemp("auth"))
    s = InProcessServer(create_app(root))
    yield {"url": s.url, "key": key}
    s.stop()


@pytest.mark.parametrize("auth", [None, f"Bearer {WRONG}", "Basic abc", "Bearer"], ids=["none", "wrong", "basic", "empty"])
def test_every_request_without_a_valid_key_is_401_before_the_body_is_looked_at(served, auth):
    u = served["url"]
    h = {"Authorization": auth} if auth else {}
    for path in ("/v1/classify", "/v1/chat/completions", "/v1/feedback", "/v1/nope"):
        for body in BODIES:
            for ctype in ("application/json", "text/plain"):
                r = httpx.post(u + path, content=body, headers={**h, "Content-Type": ctype}, timeout=30)
                assert r.status_code == 401, (path, body[:40], ctype, r.status_code, r.text[:300])
                assert r.headers["www-authenticate"] == "Bearer"
                err = r.json()["error"]
                assert err["type"] == "authentication_error"
                # nothing about the body or the schema
                for word in ("texts", "messages", "label", "field", "JSON", "surrogate"):
                    assert word not in r.text, (path, word, r.text)
                assert WRONG not in r.text
    for path in ("/metrics", "/v1/models", "/openapi.json", "/docs", "/redoc", "/nope"):
        r = httpx.get(u + path, headers=h, timeout=30)
        assert r.status_code == 401, (path, r.status_code, r.text[:300])
        assert "paths" not in r.text and "openapi" not in r.text
    r = httpx.get(u + "/healthz", headers=h)
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_a_big_body_without_a_key_is_refused_without_reading_it(served):
    r = httpx.post(served["url"] + "/v1/classify", content=b"x" * 3_000_000, headers={"Content-Type": "application/json"},
                   timeout=30)
    assert r.status_code in (401, 413)


def test_key_holders_get_the_schema_and_422s_that_name_the_field(served):
    u, h = served["url"], {"Authorization": f"Bearer {served['key']}"}
    doc = httpx.get(u + "/openapi.json", headers=h).json()
    assert {"/v1/classify", "/v1/chat/completions", "/v1/feedback", "/v1/models", "/metrics", "/healthz"} <= set(doc["paths"])
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    r = httpx.post(u + "/v1/classify", json={"text": 1}, headers=h)
    assert r.status_code == 422 and "texts" in r.json()["error"]["message"]
    assert httpx.get(u + "/nope", headers=h).status_code == 404
