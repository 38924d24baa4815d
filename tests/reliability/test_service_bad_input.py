"""Malformed requests to the service: each one is a 4xx in the service's error shape whose message names the
field (or says what is wrong with the body as a whole), never a 500 and never a traceback; the server keeps
answering afterwards and /metrics counts no 5xx.

Cases: lone UTF-16 surrogates (``"\\ud800"`` escaped in the JSON: legal JSON syntax, not text) in every text
field, 50k-deep nesting, a 5000-digit integer (Python's int() refuses > 4300 digits with a ValueError) in
every endpoint's body, NaN, a non-string content part in chat, a wrong Content-Type, bytes that are not
UTF-8, a body that is not JSON, an empty body.
"""

import httpx
import pytest
from serving import InProcessServer, served_project

from distill.serve.app import create_app

BIG_INT = "9" * 5000
USER = '{"role": "user", "content": "hello"}'

# (name, path, raw body, content type, expected status, text the message must contain)
CASES = [
    ("surrogate in texts", "/v1/classify", rb'{"texts": ["fine", "bad \ud800 text"]}', None, 400, "texts[1]"),
    ("surrogate in chat content", "/v1/chat/completions",
     rb'{"model": "t", "messages": [{"role": "user", "content": "\udc00"}]}', None, 400, "messages[0].content"),
    ("surrogate in chat content part", "/v1/chat/completions",
     rb'{"messages": [{"role": "user", "content": [{"type": "text", "text": "a\ud83d"}]}]}', None, 400,
     "messages[0].content[0].text"),
    ("surrogate in feedback text", "/v1/feedback", rb'{"text": "\ud800", "label": "neutral"}', None, 400, "`text`"),
    ("surrogate in feedback label", "/v1/feedback", rb'{"text": "ok", "label": "neu\udfff"}', None, 400, "`label`"),
    ("surrogate in a key", "/v1/classify", rb'{"texts": ["a"], "\ud800": 1}', None, 400, "surrogate"),
    ("50k-deep nesting", "/v1/classify", b'{"texts": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", None, 400,
     "nests objects/arrays deeper than"),
    ("50k-deep nesting in chat", "/v1/chat/completions", b'{"messages": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
     None, 400, "nests objects/arrays deeper than"),
    ("5000-digit integer in classify", "/v1/classify", b'{"texts": ["a"], "n": ' + BIG_INT.encode() + b"}", None, 400,
     "`n`"),
    ("5000-digit integer in chat", "/v1/chat/completions",
     b'{"messages": [' + USER.encode() + b'], "max_tokens": ' + BIG_INT.encode() + b"}", None, 400, "`max_tokens`"),
    ("5000-digit integer as a message", "/v1/chat/completions", b'{"messages": [' + BIG_INT.encode() + b"]}",
     None, 400, "`messages[0]`"),
    ("5000-digit integer in feedback", "/v1/feedback", b'{"text": "a", "label": ' + BIG_INT.encode() + b"}", None, 400,
     "`label`"),
    ("huge float", "/v1/classify", b'{"texts": ["a"], "x": 1e999}', None, 400, "`x`"),
    ("NaN", "/v1/feedback", b'{"text": "a", "label": "neutral", "note": NaN}', None, 400, "`note`"),
    ("non-string text part", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}', None, 422,
     "messages[0].content.parts[0].text"),
    ("number as content", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": 7}]}', None, 422,
     "messages[0].content"),
    ("messages not a list", "/v1/chat/completions", b'{"messages": "hi"}', None, 422, "messages"),
    ("no user message", "/v1/chat/completions", b'{"messages": [{"role": "system", "content": "x"}]}', None, 422,
     "no user message"),
    ("number in texts", "/v1/classify", b'{"texts": [1]}', None, 422, "texts[0]"),
    ("wrong content type", "/v1/classify", b'{"texts": ["a"]}', "text/plain", 415, "Content-Type"),
    ("form content type", "/v1/chat/completions", b"messages=hi", "application/x-www-form-urlencoded", 415,
     "Content-Type"),
    ("not JSON", "/v1/classify", b"texts=hello", None, 400, "not JSON"),
    ("not JSON in chat", "/v1/chat/completions", b"{'messages': []}", None, 400, "not JSON"),
    ("truncated JSON", "/v1/feedback", b'{"text": "a", "lab', None, 400, "not JSON"),
    ("not UTF-8", "/v1/classify", b'{"texts": ["caf\xe9"]}', None, 400, "not valid UTF-8"),
    ("empty body", "/v1/feedback", b"", None, 400, "empty"),
    ("JSON but not an object", "/v1/classify", b'["a"]', None, 422, "(body)"),
]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root, key = served_project(tmp_path_factory.mktemp("bad"))
    s = InProcessServer(create_app(root))
    yield {"url": s.url, "h": {"Authorization": f"Bearer {key}"}}
    s.stop()


@pytest.mark.parametrize("name,path,body,ctype,status,names", CASES, ids=[c[0] for c in CASES])
def test_malformed_body_is_a_4xx_naming_the_field(served, name, path, body, ctype, status, names):
    r = httpx.post(served["url"] + path, content=body, timeout=30,
                   headers={**served["h"], "Content-Type": ctype or "application/json"})
    assert r.status_code == status, (r.status_code, r.text[:500])
    err = r.json()["error"]
    assert err["code"] == status and names in err["message"], err
    assert "Traceback" not in r.text and 'File "' not in r.text
    assert len(r.content) < 2000          # the body is never echoed back


def test_the_server_is_fine_afterwards_and_counted_no_5xx(served):
    u, h = served["url"], served["h"]
    for name, path, body, ctype, *_ in CASES:          # once more, all of them, then a good request
        httpx.post(u + path, content=body, headers={**h, "Content-Type": ctype or "application/json"}, timeout=30)
    r = httpx.post(u + "/v1/classify", json={"texts": ["still fine", "emoji \U0001F600 pairs are fine"]}, headers=h,
                   timeout=30)
    assert r.status_code == 200 and len(r.json()["results"]) == 2
    r = httpx.post(u + "/v1/chat/completions", headers=h, timeout=30,
                   json={"model": "t", "temperature": 0, "messages": [{"role": "user", "content": [
                       {"type": "text", "text": "parts"}, {"type": "image_url", "image_url": {"url": "x"}}]}]})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
    m = httpx.get(u + "/metrics", headers=h).text
    codes = [line for line in m.splitlines() if line.startswith("distill_requests_total")]
    assert codes and not [line for line in codes if 'code="5' in line], codes


def test_json_limits_at_their_edges():
    from distill.serve.guard import (
        MAX_JSON_DEPTH,
        MAX_NUMBER_CHARS,
        BadBody,
        parse_json,
    )

    assert parse_json(b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH) is not None
    with pytest.raises(BadBody, match="deeper than"):
        parse_json(b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1))
    # brackets inside strings are text, not nesting
    assert parse_json(b'{"t": "' + b"[" * 1000 + b'"}') == {"t": "[" * 1000}
    assert parse_json(b'{"n": ' + b"9" * MAX_NUMBER_CHARS + b"}")["n"] == int("9" * MAX_NUMBER_CHARS)
    with pytest.raises(BadBody, match="`n`"):
        parse_json(b'{"n": ' + b"9" * (MAX_NUMBER_CHARS + 1) + b"}")
    # an escaped backslash before "ud800" is text; an escaped surrogate pair is one character
    assert parse_json(b'{"t": "\\\\ud800"}') == {"t": "\\ud800"}
    assert parse_json(b'{"t": "\\ud83d\\ude00", "x": 1e300}') == {"t": "\U0001F600", "x": 1e300}
    with pytest.raises(BadBody, match=r"`a\[1\]\.b`"):
        parse_json(b'{"a": [0, {"b": "\\udfff"}]}')
