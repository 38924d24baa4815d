"""`distill review` as a user runs it (the CLI in a subprocess): a decision the page was told is saved survives a
kill -9 of the server the moment after, and the restarted server carries on where it was."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from test_filters import ASSETS, make_project, put_label  # noqa: E402

from distill.data.importer import import_file  # noqa: E402
from distill.project import Project  # noqa: E402

H = {"X-Distill-Review": "1"}


def start(root: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", "from distill.cli import app; app()", "review", str(root), "--port",
                             str(port), "--no-auth"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/stats", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(proc.stderr.read().decode()[-2000:])


def test_a_saved_decision_survives_kill_9_and_the_restart_carries_on(tmp_path):
    p = make_project(tmp_path)
    import_file(p, ASSETS / "reviews.csv", label="label")
    for ex in [r["id"] for r in p.store.q("SELECT id FROM examples WHERE split != 'test'")]:
        put_label(p, ex, "positive", probs={"positive": 0.6, "negative": 0.4, "neutral": 0.0}, confidence=0.6)
    root = p.root
    p.close()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    proc = start(root, port)
    try:
        it = httpx.post(url + "/api/next", headers=H, json={"queue": "audit", "reviewer": "ann"}).json()["item"]
        r = httpx.post(url + "/api/decide", headers=H, json={"item": it["item"], "queue": "audit", "reviewer": "ann",
                                                              "action": "correct", "answer": "negative"})
        assert r.status_code == 200
    finally:
        os.kill(proc.pid, signal.SIGKILL)       # the moment after "saved"
        proc.wait(10)
    p = Project.open(root)
    try:
        d = p.store.q("SELECT item, action, answer FROM review_decisions")
        assert [(x["item"], x["action"], json.loads(x["answer"])) for x in d] == [(it["item"], "correct", "negative")]
        c = p.store.q("SELECT answer FROM corrections WHERE example_id=?", (it["example_id"],))
        assert json.loads(c[0]["answer"]) == "negative"
    finally:
        p.close()
    proc = start(root, port)
    try:
        nxt = httpx.post(url + "/api/next", headers=H, json={"queue": "audit", "reviewer": "ann"}).json()["item"]
        assert nxt["item"] != it["item"]             # the decided item is not offered again
        assert httpx.get(url + "/api/stats").json()["audit"]["reviewed"] == 1
    finally:
        proc.kill()
        proc.wait(10)
