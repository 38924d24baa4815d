"""Two `distill serve` replicas, each with its own copy of the project folder (as on two machines), sharing one store
in PostgreSQL (DISTILL_DB_URL): API keys created or revoked through either copy hold on both, the failure queue
takes every entry from both, and a text sent to both replicas at once is paid for once (``teacher_claims``). The CLI
runs in subprocesses as a user runs it; the teacher is the fake OpenAI server; PostgreSQL is a real server
(tests/pg_server.py, or $DISTILL_TEST_PG_URL)."""

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from conftest import pg_schema_url  # noqa: E402
from fake_openai_server import make_project, start_server  # noqa: E402
from tiny_models import tiny_bert_folder  # noqa: E402

from distill.project import Project  # noqa: E402
from distill.serve.keys import create_key, revoke_key  # noqa: E402
from distill.serve.router import Router, RouterConfig  # noqa: E402

LABELS = ("positive", "negative", "neutral")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_replica(root: Path, log: Path, key: str) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-c", "from distill.cli import app; app()", "serve", str(root),
                             "--port", str(port), "--threads", "1"],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(url + "/healthz", headers={"Authorization": f"Bearer {key}"}, timeout=5).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    raise RuntimeError(f"replica on {root} did not come up: {log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def replicas(tmp_path_factory, pg_server_url):
    import psycopg
    import torch

    from distill.students.classifier import ClassifierStudent

    tmp = tmp_path_factory.mktemp("replicas")
    schema = "t_replicas_" + uuid.uuid4().hex[:8]       # its own, also on a shared $DISTILL_TEST_PG_URL server
    url = pg_schema_url(pg_server_url, schema)
    saved = os.environ.get("DISTILL_DB_URL")
    os.environ["DISTILL_DB_URL"] = url           # this process and both replicas (inherited)
    os.environ["FAKE_KEY"] = "fake-key-for-tests"
    fake = start_server(tmp, labels=LABELS, delay_s=0.2)      # slow enough that copies of a text overlap
    project = make_project(tmp / "m1" / "proj", 0, fake.base_url, labels=LABELS)
    torch.manual_seed(0)
    student = ClassifierStudent.create(str(tiny_bert_folder(tmp / "base")), list(LABELS), device="cpu")
    model_dir = student.save(tmp / "m1" / "proj" / "models" / "r1" / "final")
    # every text goes to the teacher (no answer is 101% confident), so each request also writes the ledger
    Router(RouterConfig(labels=list(LABELS), ood="none", conf_threshold=1.01)).save(model_dir)
    project.record_run("r1", "train", "done", model_dir, {})
    project.promote("r1", "test fixture")
    _, key = create_key(project.store, "before-start")
    project.close()
    shutil.copytree(tmp / "m1" / "proj", tmp / "m2" / "proj")   # the second machine's copy: spec + models
    started = []
    try:
        for m in ("m1", "m2"):
            started.append(_start_replica(tmp / m / "proj", tmp / f"{m}.log", key))
        yield {"urls": [u for _, u in started], "roots": [tmp / "m1" / "proj", tmp / "m2" / "proj"],
               "h": {"Authorization": f"Bearer {key}"}, "fake": fake}
    finally:
        for proc, _ in started:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        fake.stop()
        if saved is None:
            os.environ.pop("DISTILL_DB_URL", None)
        else:
            os.environ["DISTILL_DB_URL"] = saved
        with psycopg.connect(pg_server_url, autocommit=True) as c:
            c.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


def test_keys_made_or_revoked_through_either_copy_hold_on_both_replicas(replicas):
    a, b = replicas["roots"]
    p = Project.open(b)                          # made on "machine 2" ...
    try:
        kid, key = create_key(p.store, "after-start")
    finally:
        p.close()
    h = {"Authorization": f"Bearer {key}"}
    assert [httpx.get(u + "/healthz", headers=h).status_code for u in replicas["urls"]] == [200, 200]
    p = Project.open(a)                          # ... revoked on "machine 1"
    try:
        revoke_key(p.store, kid)
    finally:
        p.close()
    codes = {httpx.post(u + "/v1/classify", headers=h, json={"texts": ["x"]}).status_code
             for u in replicas["urls"] for _ in range(3)}
    assert codes == {401}


async def _post_all(urls: list[str], h: dict, path: str, bodies: list[dict], clients: int = 8) -> list:
    """Each body to urls[i % 2]: half the traffic to each replica."""
    out: list = [None] * len(bodies)
    nxt = iter(range(len(bodies)))

    async def one() -> None:
        async with httpx.AsyncClient(timeout=60) as c:
            for i in nxt:
                out[i] = await c.post(urls[i % len(urls)] + path, headers=h, json=bodies[i])

    await asyncio.gather(*(one() for _ in range(clients)))
    return out


async def _both(urls, h, fb, cl):
    return await asyncio.gather(_post_all(urls, h, "/v1/feedback", fb), _post_all(urls, h, "/v1/classify", cl))


def test_replicas_share_queue_and_ledger_and_pay_once_per_text(replicas):
    urls, h, fake = replicas["urls"], replicas["h"], replicas["fake"]
    before = len(fake.log_lines())
    fb = [{"text": f"feedback text {i}", "label": LABELS[i % 3], "note": f"n{i}"} for i in range(120)]
    # 40 distinct texts, each sent twice at once: once to each replica (adjacent bodies go to different replicas)
    distinct = [f"I feel {LABELS[i % 3]} about parcel {i}" for i in range(40)]
    cl = [{"texts": [t]} for t in distinct for _ in range(2)]
    rf, rc = asyncio.run(_both(urls, h, fb, cl))
    assert [r.status_code for r in rf + rc] == [200] * (len(fb) + len(cl))
    ids = [r.json()["queued"] for r in rf]
    assert len(set(ids)) == len(fb)                     # ids from one sequence, whichever replica took the entry
    p = Project.open(replicas["roots"][1])
    try:
        rows = p.store.q("SELECT id, note FROM failure_queue WHERE reason='feedback'")
        assert {r["id"] for r in rows} >= set(ids)
        assert Counter(r["note"] for r in rows) == Counter(f"n{i}" for i in range(len(fb)))      # 0 lost entries
        keys = [r["key"] for r in p.store.q("SELECT key FROM teacher_calls")]
        assert len(keys) == len(set(keys)) == len(distinct)                      # one ledger row per text
        assert p.store.one("SELECT COUNT(*) FROM teacher_claims") == 0            # every claim released
        assert p.store.one("SELECT COUNT(*) FROM failure_queue WHERE reason='routed'") == len(cl)
        sources = Counter(r["src"] for r in p.store.q(
            "SELECT json_extract(request, '$.source') AS src FROM teacher_calls"))
        assert sources == {"serve": len(distinct)}
    finally:
        p.close()
    assert len(fake.log_lines()) - before == len(distinct)        # the teacher was paid once per text
    answers: dict[str, set] = {}
    for body, r in zip(cl, rc):                                    # and both replicas gave the teacher's answer
        answers.setdefault(body["texts"][0], set()).add(r.json()["results"][0]["label"])
    assert all(len(v) == 1 for v in answers.values())
