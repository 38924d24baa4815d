"""Batch API teachers (``batch: true``, distill.teachers.batch) against the loopback fake server
(tests/fake_openai_server.py + fake_openai_batches.py), which charges every batch line and every online answer
and logs each one, so the tests can count what was paid.

What is proved:
- a batch labels exactly as online labelling does: the same cache keys, answers and tokens, the ledger at the
  batch rate; the cache is shared both ways (a batch answer is an online cache hit and the reverse) and a re-run
  after a collected batch pays nothing;
- kill -9 at every step of a batch (upload, create, poll, download, collect), as `distill label` runs in its own
  process: the re-run finds or polls the batch, never submits another one, and no request is paid twice;
- partial failures (error-file lines, answers that do not parse, expired / cancelled / failed batches) are
  asked again online, or in a follow-up batch, each counted with its reason;
- --budget refuses a batch before anything is sent; --detach submits and returns, a re-run collects.
The tests marked with ``backend`` run on SQLite and on PostgreSQL (DISTILL_DB_URL, tests/conftest.py).
"""

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fake_openai_server import make_project, start_server  # noqa: E402

from distill.labeling import label, label_with  # noqa: E402
from distill.project import Project  # noqa: E402
from distill.status import status  # noqa: E402
from distill.teachers import make_teacher  # noqa: E402
from distill.teachers.ledger import cost_of  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
KEY = "right-key"


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    monkeypatch.setenv("FAKE_KEY", KEY)


def teacher_yaml(base_url: str, *, batch: bool = True, retry: str = "online") -> str:
    return f"""
  - name: api
    kind: openai
    base_url: {base_url}
    model: fake-1
    api_key_env: FAKE_KEY
    max_retries: 2
    timeout_s: 3
    batch: {str(batch).lower()}
    batch_poll_s: 0.05
    batch_retry: {retry}
    price: {{input_per_1m: 1.0, output_per_1m: 2.0}}
    terms: {{outputs_may_train_models: true}}
"""


def batch_project(root: Path, n: int, server, **kw) -> Project:
    return make_project(root, n, server.base_url, teacher_yaml=teacher_yaml(server.base_url, **kw))


def paid(server) -> list[dict]:
    """Every charged answer the server gave: online chat completions and batch lines."""
    return [x for x in server.log_lines() if x["charged"]]


def online_keys(server) -> list[str]:
    return [x["key"] for x in paid(server) if x.get("path") != "batch_line"]


def batch_keys(server) -> list[str]:
    return [x["key"] for x in paid(server) if x.get("path") == "batch_line"]


def server_list(server, what: str) -> list[dict]:
    """What the server holds (``files`` or ``batches``), asked directly: the ground truth for 'submitted once'."""
    r = httpx.get(f"{server.base_url}/{what}", params={"limit": 1000}, headers={"Authorization": f"Bearer {KEY}"})
    return r.json()["data"]


def check_books(project: Project, server, n: int) -> None:
    """Every input labelled ok once; every key paid exactly once (batch or online) and in the ledger once, with
    the tokens the server charged."""
    assert dict(Counter(r["status"] for r in project.store.q("SELECT status FROM labels"))) == {"ok": n}
    keys = [x["key"] for x in paid(server)]
    assert len(keys) == len(set(keys)), Counter(k for k in keys if keys.count(k) > 1)
    calls = project.store.q("SELECT key, tokens_in, tokens_out FROM teacher_calls")
    assert {c["key"] for c in calls} == set(keys)
    assert sum(c["tokens_in"] for c in calls) == sum(x["tokens_in"] for x in paid(server))
    assert sum(c["tokens_out"] for c in calls) == sum(x["tokens_out"] for x in paid(server))


# -- same keys, same ledger, one cache ------------------------------------------------------------------


def test_batch_labels_like_online_at_the_batch_rate_and_shares_the_cache(tmp_path):
    server = start_server(tmp_path, batch_polls=2)
    try:
        n = 24
        online = make_project(tmp_path / "online", n, server.base_url,
                              teacher_yaml=teacher_yaml(server.base_url, batch=False))
        batch = batch_project(tmp_path / "batch", n, server)
        r_online = label(online, progress=False)
        assert r_online.calls == n
        before = len(server.log_lines())
        r = label(batch, progress=False)
        assert r.ok == n and r.calls == 0 and r.batch["answered"] == n and len(r.batch["batches"]) == 1
        assert len(batch_keys(server)) == n and len(online_keys(server)) == n    # no online call for the batch

        # same keys (identity has no `batch`), same answers and tokens; the cost at half the online price
        a = {c["key"]: c for c in online.store.q("SELECT * FROM teacher_calls")}
        b = {c["key"]: c for c in batch.store.q("SELECT * FROM teacher_calls")}
        assert a.keys() == b.keys()
        for k in a:
            assert json.loads(b[k]["response"])["texts"] == json.loads(a[k]["response"])["texts"]
            assert (b[k]["tokens_in"], b[k]["tokens_out"], b[k]["status"]) == (a[k]["tokens_in"], a[k]["tokens_out"],
                                                                               a[k]["status"])
            assert b[k]["cost"] == pytest.approx(a[k]["cost"] * 0.5)
            assert '"source": "batch"' in b[k]["request"]
        la = {x["example_id"]: (x["answer"], x["call_key"]) for x in online.store.q("SELECT * FROM labels")}
        lb = {x["example_id"]: (x["answer"], x["call_key"]) for x in batch.store.q("SELECT * FROM labels")}
        assert la == lb
        tspec = batch.spec.get_teacher("api")
        assert r.spend == pytest.approx(sum(cost_of(tspec, c["tokens_in"], c["tokens_out"], 0, batch=True)
                                            for c in b.values()))

        # re-running after a collected batch pays nothing and sends nothing
        seen = len(server.log_lines())
        again = label(batch, progress=False)
        assert (again.calls, again.spend, again.batch["submitted"], again.already_labelled) == (0, 0.0, 0, n)
        assert len(server.log_lines()) == seen
        assert len(server_list(server, "batches")) == 1 and before < seen

        # a batch answer is a cache hit for an online call with the same teacher
        with batch.store.tx() as c:
            c.execute("DELETE FROM labels")
        teacher = make_teacher(tspec, batch)
        r2 = label_with(batch, tspec, teacher)
        assert (r2.ok, r2.calls, r2.cache_hits) == (n, 0, n)
        assert len(online_keys(server)) == n        # still only the online project's calls
    finally:
        server.stop()


def test_online_answers_are_cache_hits_for_a_later_batch(tmp_path):
    server = start_server(tmp_path)
    try:
        n = 20
        project = batch_project(tmp_path / "p", n, server)
        tspec = project.spec.get_teacher("api")
        first = label_with(project, tspec, make_teacher(tspec, project), limit=8)     # online
        assert first.calls == 8
        # a JSONL without its row (killed between writing it and committing the row) is never sent, and removed
        stray = project.root / "batches" / "distill-0000000000000000.jsonl"
        stray.parent.mkdir()
        stray.write_text('{"custom_id": "x"}\n')
        r = label(project, progress=False)
        assert not stray.exists()
        assert r.ok == n - 8 and r.batch["submitted"] == n - 8 and r.already_labelled == 8
        assert not set(online_keys(server)) & set(batch_keys(server))
        check_books(project, server, n)
    finally:
        server.stop()


# -- kill -9 at every step ------------------------------------------------------------------------------


def _spawn(root: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "FAKE_KEY": KEY}
    return subprocess.Popen([sys.executable, "-m", "distill.cli", "label", str(root), "--no-progress", *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_for_stall(server, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(x.get("stalled") for x in server.log_lines()):
            return
        if proc.poll() is not None:
            raise AssertionError(f"the labeller ended before the stall: {proc.communicate()[1].decode()[-2000:]}")
        time.sleep(0.02)
    raise AssertionError("the server never saw the request to stall")


# STEP[@N]:before|after (fake_openai_batches.py): the request went out, its answer never came back
KILL_POINTS = [
    "upload:before",      # the upload never reached the server: upload again
    "upload:after",       # file stored, its id not committed: find it by filename, do not upload again
    "create:before",      # the create never reached the server: create
    "create:after",       # batch created, its id not committed: find it by metadata, never create another
    "get@1:after",        # polling a running batch
    "get@2:after",        # the poll that ended the batch (answers charged), its answer lost
    "content@0:after",    # downloading the output
    "content@1:before",   # output recorded, error file not downloaded yet (collecting)
]


@pytest.mark.parametrize("stall", KILL_POINTS)
def test_kill9_at_each_step_resumes_without_paying_twice(tmp_path, stall):
    n = 12
    # line 0 fails in the batch, so there is an error file to download and one request goes online
    server = start_server(tmp_path, batch_polls=3, batch_faults="error@0:0", stall=stall)
    try:
        project = batch_project(tmp_path / "p", n, server)
        project.close()
        proc = _spawn(project.root)
        _wait_for_stall(server, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        final = _spawn(project.root)
        out, err = final.communicate(timeout=120)
        assert final.returncode == 0, err.decode()[-3000:]
        assert b"12 ok" in out, out.decode()
        assert len(server_list(server, "batches")) == 1
        assert len([f for f in server_list(server, "files") if f["purpose"] == "batch"]) == 1
        p = Project.open(project.root)
        check_books(p, server, n)
        assert len(batch_keys(server)) == n - 1 and len(online_keys(server)) == 1
        rows = p.store.q("SELECT state, answered FROM teacher_batches")
        assert [(r["state"], r["answered"]) for r in rows] == [("collected", n - 1)]
        assert not list((project.root / "batches").glob("*.jsonl"))     # files removed once collected
        p.close()
    finally:
        server.stop()


# -- partial failures -----------------------------------------------------------------------------------


def test_error_lines_and_unparseable_answers_are_retried_online(tmp_path, backend):
    n = 20
    server = start_server(tmp_path, batch_faults="error@0:1-3,badlabel@0:4")
    try:
        project = batch_project(tmp_path / "p", n, server)
        r = label(project, progress=False)
        assert r.ok == n and r.failed_by_reason == {}
        assert r.batch["retry_online"] == {"server_error": 3, "parse_error": 1}
        assert r.batch["answered"] == n - 3 and r.batch["parse_errors"] == 1
        assert r.calls == 4 and len(online_keys(server)) == 4       # 3 attempt-0 keys + 1 attempt-1 key
        check_books(project, server, n)
        statuses = Counter(c["status"] for c in project.store.q("SELECT status FROM teacher_calls"))
        assert statuses == {"ok": n, "parse_error": 1}
    finally:
        server.stop()


def test_partial_failures_go_to_a_follow_up_batch_when_asked(tmp_path):
    n = 20
    server = start_server(tmp_path, batch_faults="error@0:1-3,badlabel@0:4")
    try:
        project = batch_project(tmp_path / "p", n, server, retry="batch")
        r = label(project, progress=False)
        assert r.ok == n and r.calls == 0 and online_keys(server) == []
        assert r.batch["retry_batch"] == {"server_error": 3, "parse_error": 1} and r.batch["retry_online"] == {}
        assert len(r.batch["batches"]) == 2 and len(server_list(server, "batches")) == 2
        check_books(project, server, n)
        costs = project.store.q("SELECT request FROM teacher_calls")
        assert all('"source": "batch"' in c["request"] for c in costs)
    finally:
        server.stop()


@pytest.mark.parametrize("fault,reason,answered", [("expire@0", "batch_expired", 10), ("cancel@0", "cancelled", 0),
                                                   ("fail@0", "failed", 0)])
def test_expired_cancelled_or_failed_batches_are_retried_online(tmp_path, fault, reason, answered):
    n = 20
    server = start_server(tmp_path, batch_faults=fault)
    try:
        project = batch_project(tmp_path / "p", n, server)
        r = label(project, progress=False)
        assert r.ok == n and r.batch["answered"] == answered
        assert r.batch["retry_online"] == {reason: n - answered} and r.calls == n - answered
        check_books(project, server, n)
    finally:
        server.stop()


def test_follow_up_batch_at_most_once_then_online(tmp_path):
    # both batches fail line 0 (the follow-up batch holds only that request)
    n = 6
    server = start_server(tmp_path, batch_faults="error@0:0,error@1:0")
    try:
        project = batch_project(tmp_path / "p", n, server, retry="batch")
        r = label(project, progress=False)
        assert r.ok == n and len(server_list(server, "batches")) == 2
        assert r.batch["retry_batch"] == {"server_error": 1} and r.batch["retry_online"] == {"server_error": 1}
        assert r.calls == 1
        check_books(project, server, n)
    finally:
        server.stop()


# -- budget, detach, status --------------------------------------------------------------------------------


def test_budget_refuses_the_batch_before_anything_is_sent(tmp_path):
    n = 20
    server = start_server(tmp_path)
    try:
        project = batch_project(tmp_path / "p", n, server)
        r = label(project, budget=0.001, progress=False)
        assert r.stopped == "budget" and "refused to submit a batch of 20 requests" in r.message()
        assert "nothing was sent" in r.message()
        assert server.log_lines() == [] and project.store.q("SELECT * FROM teacher_batches") == []
        assert not list((project.root / "batches").glob("*")) if (project.root / "batches").exists() else True
        r = label(project, budget=1.0, progress=False)
        assert r.stopped is None and r.ok == n and r.spend <= 1.0
    finally:
        server.stop()


def test_detach_submits_and_returns_then_a_rerun_collects(tmp_path, backend):
    n = 10
    server = start_server(tmp_path, batch_polls=3)
    try:
        project = batch_project(tmp_path / "p", n, server)
        r = label(project, detach=True, progress=False)
        assert r.stopped == "batch_pending" and r.batch["pending"] == n and r.ok == 0
        assert "re-run `distill label" in r.message()
        st = status(project)
        assert [(b["state"], b["requests"]) for b in st["batches_in_flight"]] == [("submitted", n)]
        assert "batch(es) at the provider" in st["next_step"]
        r = label(project, detach=True, progress=False)        # poll 2 of 3: still running
        assert r.stopped == "batch_pending" and batch_keys(server) == []
        r = label(project, detach=True, progress=False)        # poll 3: ended, collected, labelled
        assert r.stopped is None and r.ok == n and r.batch["answered"] == n
        assert status(project)["batches_in_flight"] == []
        check_books(project, server, n)
    finally:
        server.stop()


def test_cli_detach_and_status(tmp_path):
    n = 5
    server = start_server(tmp_path, batch_polls=2)
    try:
        project = batch_project(tmp_path / "p", n, server)
        project.close()
        p = _spawn(project.root, "--detach")
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err.decode()
        assert b"still running" in out
        env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
        st = subprocess.run([sys.executable, "-m", "distill.cli", "status", str(project.root), "--json"], env=env,
                            capture_output=True, timeout=60)
        flight = json.loads(st.stdout)["batches_in_flight"]
        assert [(b["state"], b["status"], b["requests"]) for b in flight] == [("submitted", "in_progress", n)]
        p = _spawn(project.root)
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err.decode()
        assert b"5 ok" in out
    finally:
        server.stop()
