"""`distill serve --workers 2`: two processes on one port share the store -- API keys, the failure queue and the
teacher ledger -- under concurrent writes, and /metrics adds up both. The CLI runs in a subprocess as a user runs
it; the teacher is the fake OpenAI server (a subprocess on loopback)."""

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from fake_openai_server import make_project, start_server  # noqa: E402
from tiny_models import tiny_bert_folder  # noqa: E402

from distill.project import Project  # noqa: E402
from distill.serve.keys import create_key, revoke_key  # noqa: E402
from distill.serve.router import Router, RouterConfig  # noqa: E402

LABELS = ("positive", "negative", "neutral")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    import torch

    from distill.students.classifier import ClassifierStudent

    tmp = tmp_path_factory.mktemp("workers")
    fake = start_server(tmp, labels=LABELS, delay_s=0.2)      # slow enough that copies of a text overlap
    os.environ["FAKE_KEY"] = "fake-key-for-tests"
    project = make_project(tmp / "proj", 0, fake.base_url, labels=LABELS)
    torch.manual_seed(0)
    student = ClassifierStudent.create(str(tiny_bert_folder(tmp / "base")), list(LABELS), device="cpu")
    model_dir = student.save(tmp / "proj" / "models" / "r1" / "final")
    # every text goes to the teacher (no answer is 101% confident), so each request also writes the ledger
    Router(RouterConfig(labels=list(LABELS), ood="none", conf_threshold=1.01)).save(model_dir)
    project.record_run("r1", "train", "done", model_dir, {})
    project.promote("r1", "test fixture")
    _, key = create_key(project.store, "before-start")
    project.close()
    port = _free_port()
    log = open(tmp / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-c", "from distill.cli import app; app()", "serve", str(tmp / "proj"),
                             "--port", str(port), "--workers", "2", "--threads", "1"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    h = {"Authorization": f"Bearer {key}"}
    deadline = time.monotonic() + 90
    pids: set[int] = set()
    while time.monotonic() < deadline and len(pids) < 2:
        try:
            # a new connection per call: the kernel hands connections to whichever worker accepts first
            r = httpx.get(url + "/healthz", headers=h, timeout=5)
            if r.status_code == 200 and "worker_pid" in r.json():
                pids.add(r.json()["worker_pid"])
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    if len(pids) < 2:
        os.killpg(proc.pid, signal.SIGKILL)
        raise RuntimeError(f"two workers did not come up: {(tmp / 'serve.log').read_text()[-3000:]}")
    yield {"url": url, "h": h, "root": tmp / "proj", "fake": fake, "proc": proc, "pids": pids, "log": tmp / "serve.log"}
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    fake.stop()


async def _post_many(url: str, h: dict, path: str, bodies: list[dict], clients: int = 8) -> list[httpx.Response]:
    out: list = [None] * len(bodies)
    nxt = iter(range(len(bodies)))

    async def one() -> None:
        # new connections now and then, so both workers take part
        for i in nxt:
            async with httpx.AsyncClient(timeout=60) as c:
                out[i] = await c.post(url + path, headers=h, json=bodies[i])

    await asyncio.gather(*(one() for _ in range(clients)))
    return out


def test_keys_are_shared_and_a_revoked_key_stops_working_in_every_worker(served):
    p = Project.open(served["root"])
    try:
        kid, key = create_key(p.store, "after-start")
    finally:
        p.close()
    h = {"Authorization": f"Bearer {key}"}
    seen = {httpx.get(served["url"] + "/healthz", headers=h).json().get("worker_pid") for _ in range(30)}
    assert seen == served["pids"]           # a key created while serving works in both workers
    p = Project.open(served["root"])
    try:
        revoke_key(p.store, kid)
    finally:
        p.close()
    codes = {httpx.post(served["url"] + "/v1/classify", headers=h, json={"texts": ["x"]}).status_code for _ in range(20)}
    assert codes == {401}


def test_concurrent_writes_from_two_workers_lose_nothing_and_pay_once(served):
    url, h = served["url"], served["h"]
    before = len(served["fake"].log_lines())
    # 1) the failure queue: 200 feedback entries from 8 clients over both workers
    fb = [{"text": f"feedback text {i}", "label": LABELS[i % 3], "note": f"n{i}"} for i in range(200)]
    # 2) the ledger: 60 distinct texts, each sent 3 times at once (adjacent, so by different clients, mostly to
    # different workers, while the teacher takes 0.2 s), all routed to the teacher
    distinct = [f"I feel {LABELS[i % 3]} about parcel {i}" for i in range(60)]
    cl = [{"texts": [t]} for t in distinct for _ in range(3)]
    rf, rc = asyncio.run(_go(url, h, fb, cl))
    assert [r.status_code for r in rf + rc] == [200] * (len(fb) + len(cl))
    ids = [r.json()["queued"] for r in rf]
    assert len(set(ids)) == 200
    p = Project.open(served["root"])
    try:
        rows = p.store.q("SELECT id, note FROM failure_queue WHERE reason='feedback'")
        assert {r["id"] for r in rows} >= set(ids)                               # 0 lost queue entries
        assert Counter(r["note"] for r in rows if r["note"]) == Counter(f"n{i}" for i in range(200))
        keys = [r["key"] for r in p.store.q("SELECT key FROM teacher_calls")]
        assert len(keys) == len(set(keys)) == len(distinct)                    # one ledger row per text
        assert p.store.q("SELECT COUNT(*) AS n FROM teacher_claims")[0]["n"] == 0   # every claim released
        routed = p.store.q("SELECT COUNT(*) AS n FROM failure_queue WHERE reason='routed'")[0]["n"]
        assert routed == len(cl)                                                 # every routed text queued
    finally:
        p.close()
    paid = len(served["fake"].log_lines()) - before
    assert paid == len(distinct)          # two workers never paid twice for one text
    answers = {}
    for body, r in zip(cl, rc):           # and every copy of a text got the same (teacher's) answer
        answers.setdefault(body["texts"][0], set()).add(r.json()["results"][0]["label"])
    assert all(len(v) == 1 for v in answers.values())
    # /metrics, whichever worker answers it, counts both workers' requests
    m = httpx.get(url + "/metrics", headers=h).text
    lines = dict(line.rsplit(" ", 1) for line in m.splitlines() if line and not line.startswith("#"))
    assert float(lines['distill_requests_total{code="200",endpoint="/v1/feedback"}']) == 200
    assert float(lines['distill_requests_total{code="200",endpoint="/v1/classify"}']) == len(cl)


async def _go(url, h, fb, cl):
    return await asyncio.gather(_post_many(url, h, "/v1/feedback", fb), _post_many(url, h, "/v1/classify", cl))


def test_a_killed_worker_is_replaced_and_the_service_keeps_answering(served):
    url, h = served["url"], served["h"]
    victim = sorted(served["pids"])[0]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 60
    pids: set[int] = set()
    while time.monotonic() < deadline and (len(pids - {victim}) < 2):
        try:
            r = httpx.get(url + "/healthz", headers=h, timeout=5)
            pids.add(r.json()["worker_pid"])
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    assert len(pids - {victim}) == 2, served["log"].read_text()[-2000:]      # uvicorn's supervisor restarted it
    r = httpx.post(url + "/v1/feedback", headers=h, json={"text": "after the kill", "label": "neutral"})
    assert r.status_code == 200
