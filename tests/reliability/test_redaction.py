"""Providers repeat the API key in error bodies - whole, or masked with its tail kept (``sk-...AbCd``,
``****************AbCd``). `distill label` used to print such a body to stderr on 401, 400 and 500. Now every
message built from a teacher's response goes through ``distill.redact`` (registered at the moment the key is
read from the environment), and so does the CLI's error printing.

The fake provider here is a loopback ``http.server`` in the test process that answers every request with the
fault under test; `distill label` runs as a subprocess, as a user runs it. Then stdout, stderr and every file
of the project (store, -wal, spec) are searched for the key and for its last 4 characters.
"""

import asyncio
import json
import os
import random
import secrets
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from fake_openai_server import make_project

from distill.redact import MASK, redact, register
from distill.task import TeacherSpec
from distill.teachers.base import TeacherRequest
from distill.teachers.openai_compat import OpenAITeacher

REPO = Path(__file__).resolve().parents[2]


def planted_key() -> str:
    # the tail is upper-case letters outside A-F, so it cannot turn up by chance in a hex hash of the store
    tail = "".join(random.choice("GHJKLMNPQRSTUVWXYZ") for _ in range(4))
    return "sk-proj-" + secrets.token_hex(20) + tail


def error_body(kind: str, key: str) -> tuple[int, str, bytes]:
    tail = key[-4:]
    if kind == "401":
        msg = (f"Incorrect API key provided: {key}. (shown masked elsewhere as sk-...{tail}). "
               "You can find your API key at https://example.invalid/account/api-keys.")
        return 401, "application/json", json.dumps({"error": {"message": msg, "type": "invalid_request_error"}}).encode()
    if kind == "400":
        msg = f"Invalid request from key {'*' * 16}{tail} (Bearer {key}): unknown parameter 'top_k'"
        return 400, "application/json", json.dumps({"error": {"message": msg}}).encode()
    # 500 with a plain-text body: the path that quotes the raw bytes
    return 500, "text/plain", f"upstream exploded handling Authorization: Bearer {key} ({'*' * 16}{tail})".encode()


class FakeProvider:
    """Answers every POST with one error; counts the requests it saw."""

    def __init__(self, kind: str, key: str):
        status, ctype, body = error_body(kind, key)
        seen = self.seen = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers.get("content-length") or 0))
                seen.append(self.headers.get("authorization"))
                self.send_response(status)
                self.send_header("content-type", ctype)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):       # keep the test's own stderr quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


def leaks(key: str, texts: list[str], files: list[Path]) -> list[str]:
    tail = key[-4:]
    out = [f"output #{i}: ...{t[max(0, t.find(tail) - 80):t.find(tail) + 20]!r}"
           for i, t in enumerate(texts) if key in t or tail in t]
    out += [str(f) for f in files if key.encode() in f.read_bytes() or tail.encode() in f.read_bytes()]
    return out


@pytest.mark.parametrize("kind", ["401", "400", "500"])
def test_label_never_prints_or_stores_the_key_from_an_error_body(tmp_path, kind):
    key = planted_key()
    server = FakeProvider(kind, key)
    try:
        project = make_project(tmp_path / "p", 3, server.base_url, concurrency=1, max_retries=1, timeout_s=5)
        project.close()
        r = subprocess.run([sys.executable, "-m", "distill.cli", "label", str(tmp_path / "p"), "--no-progress"],
                           env={**os.environ, "PYTHONPATH": str(REPO / "src"), "FAKE_KEY": key},
                           capture_output=True, text=True, timeout=120)
    finally:
        server.stop()
    assert server.seen and all(h == f"Bearer {key}" for h in server.seen)    # the key really was sent
    assert r.returncode == 2, r.stderr[-3000:]
    assert f"HTTP {kind}" in r.stderr and MASK in r.stderr, r.stderr[-3000:]  # the body's text was shown, redacted
    files = [f for f in (tmp_path / "p").rglob("*") if f.is_file()]
    assert any(f.name == "distill.db" for f in files)
    assert leaks(key, [r.stdout, r.stderr], files) == []


@pytest.mark.parametrize("kind", ["401", "400", "500"])
def test_teacher_errors_are_redacted_at_the_source(monkeypatch, kind):
    """What `serve` logs and the labeller stores is the exception's own text: it must already be clean."""
    key = planted_key()
    monkeypatch.setenv("SOME_KEY", key)
    status, ctype, body = error_body(kind, key)
    transport = httpx.MockTransport(lambda req: httpx.Response(status, content=body, headers={"content-type": ctype}))
    spec = TeacherSpec(name="api", kind="openai", base_url="http://x.invalid/v1", model="m", api_key_env="SOME_KEY",
                       max_retries=1)

    async def go():
        async def no_sleep(_):
            return None
        t = OpenAITeacher(spec, transport=transport, sleep=no_sleep)
        try:
            await t.ask(TeacherRequest(key="k", messages=[{"role": "user", "content": "hi"}], kind="classify"))
        finally:
            await t.aclose()

    with pytest.raises(Exception) as e:
        asyncio.run(go())
    text = f"{e.value}\n{getattr(e.value, 'message', '')}\n{getattr(e.value, 'hint', '')}"
    assert f"HTTP {kind}" in text and MASK in text, text
    assert key not in text and key[-4:] not in text, text


def test_redact_removes_the_secret_its_tail_and_head():
    key = "sk-proj-0123456789abcdefXYZW"
    text = f"a {key} b sk-...XYZW c ****YZW d {key[:10]}... e"
    out = redact(text, [key])
    assert key not in out and "XYZW" not in out and key[:10] not in out
    assert out.startswith(f"a {MASK} b sk-...{MASK} c ****YZW d {MASK}... e")   # 3 chars are not a tail
    assert redact("nothing here", [key]) == "nothing here" and redact(None, [key]) is None
    assert redact("k k k", ["k"]) == "k k k"          # too short to be a credential: left alone


def test_registered_secrets_are_redacted_everywhere():
    key = planted_key()
    register(key)
    assert redact(f"x {key} y") == f"x {MASK} y"
    assert redact(f"tail only ...{key[-6:]}") == f"tail only ...{MASK}"
