"""The service's security defaults, checked on a real `distill serve` process started through the CLI:
loopback-only bind by default (read from the kernel's socket table, not from our own config), refusal to
serve without keys on another interface, 401 without a valid key before anything about the body or the schema
(and no echo of the key offered), 413
for big bodies, 422 for too many texts, and API keys that exist only as salted hashes on disk.
tests/integration/test_serve.py checks the same limits on an in-process app; this is the deployed shape."""

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from fake_openai_server import make_project
from serving import LABELS, ServeProcess, add_student
from tiny_models import tiny_bert_folder

from distill.serve.keys import create_key

REPO = Path(__file__).resolve().parents[2]


def distill(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distill.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO / "src"), "COLUMNS": "300"}, timeout=120)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sec")
    project = make_project(tmp / "p", 0, "http://127.0.0.1:9/v1", labels=LABELS, extra_yaml="\nteacher: api\n")
    add_student(project, tiny_bert_folder(tmp / "bert"))
    _, key = create_key(project.store, "ops")
    project.close()
    s = ServeProcess(tmp / "p", args=("--max-texts", "4", "--max-body-bytes", "20000"), log=tmp / "serve.log")
    yield {"root": tmp / "p", "key": key, "serve": s}
    s.stop()


def listening_addresses(port: int) -> set[str]:
    """Local addresses with a LISTEN socket on ``port``, from /proc/net/tcp{,6} (what the kernel really bound)."""
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, p = local.split(":")
            if state == "0A" and int(p, 16) == port:
                out.add(addr)
    return out


def test_binds_loopback_only_by_default(world):
    help_text = " ".join(distill("serve", "--help").stdout.split())
    assert "127.0.0.1" in help_text
    # 0100007F is 127.0.0.1 in /proc/net/tcp's little-endian hex; 0.0.0.0 would be 00000000
    assert listening_addresses(world["serve"].port) == {"0100007F"}


def test_refuses_non_loopback_without_keys(world):
    r = distill("serve", world["root"], "--host", "0.0.0.0", "--no-auth", "--port", "1")
    assert r.returncode == 2 and "refusing to serve without API keys" in " ".join(r.stderr.split())


def test_no_key_wrong_key_revoked_key_are_401_and_never_echoed(world):
    u = world["serve"].url
    assert httpx.post(u + "/v1/classify", json={"texts": ["x"]}).status_code == 401
    wrong = "dk_deadbeef_" + "Q" * 43
    r = httpx.post(u + "/v1/classify", json={"texts": ["x"]}, headers={"Authorization": f"Bearer {wrong}"})
    assert r.status_code == 401 and wrong not in r.text and "Q" * 10 not in r.text
    r = httpx.post(u + "/v1/classify", json={"texts": ["x"]}, headers={"Authorization": "Basic abc"})
    assert r.status_code == 401
    for path in ("/v1/models", "/metrics"):
        assert httpx.get(u + path).status_code == 401
    assert httpx.get(u + "/v1/models", headers={"Authorization": f"Bearer {world['key']}"}).status_code == 200


def test_without_a_key_nothing_but_401(world):
    # the body is not looked at (no 422 naming fields) and the schema is not served without a key
    u = world["serve"].url
    for body in (b'{"text": 1}', b"not json", b'{"texts": ["\\ud800"]}'):
        r = httpx.post(u + "/v1/classify", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 401 and "texts" not in r.text, r.text
    for path in ("/openapi.json", "/docs", "/nope"):
        assert httpx.get(u + path).status_code == 401
    doc = httpx.get(u + "/openapi.json", headers={"Authorization": f"Bearer {world['key']}"})
    assert doc.status_code == 200 and "/v1/classify" in doc.json()["paths"]


def test_body_and_batch_limits(world):
    u, h = world["serve"].url + "/v1/classify", {"Authorization": f"Bearer {world['key']}"}
    r = httpx.post(u, content=b'{"texts": ["' + b"x" * 30_000 + b'"]}', headers={**h, "Content-Type": "application/json"})
    assert r.status_code == 413
    r = httpx.post(u, json={"texts": ["a"] * 5}, headers=h)
    assert r.status_code == 422 and "limit is 4" in r.json()["error"]["message"]
    r = httpx.post(u, json={"texts": ["fine"] * 4}, headers=h)
    assert r.status_code == 200 and len(r.json()["results"]) == 4
    # the 413 is answered before the body is read: an unauthenticated client cannot make us buffer it either
    r = httpx.post(u, content=b"x" * 30_000, headers={"Content-Type": "application/json"})
    assert r.status_code in (401, 413)


def test_keys_are_stored_hashed_only(world):
    # while the server runs (WAL + shm present) and after it used the key: no raw key bytes on disk
    files = list(world["root"].glob("distill.db*"))
    assert any(f.name.endswith("-wal") for f in files)
    raw = world["key"].encode()
    secret_part = raw.split(b"_", 2)[2]      # dk_<id>_<secret>; the secret may hold "_"
    for f in files:
        data = f.read_bytes()
        assert raw not in data and secret_part not in data, f.name
    r = distill("keys", "list", world["root"])
    assert r.returncode == 0 and world["key"] not in r.stdout and secret_part.decode() not in r.stdout
