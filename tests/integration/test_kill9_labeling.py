"""Crash safety: SIGKILL the labeller at seeded random moments, re-run to completion, and check the books.

The labeller runs as its own process, exactly as a user runs it (``distill label PROJECT``), against the fake provider, which charges each Idempotency-Key once and logs every request.
After the kills and a final run:
- every example has exactly one ok label;
- charged requests at the server == distinct charged keys == teacher_calls rows (nothing paid twice,
  nothing paid and lost);
- the ledger's tokens == the tokens the server charged.
How many requests were answered by idempotent replay (the ones in flight at a kill) is printed, not
asserted: it depends on timing.
"""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fake_openai_server import make_project, start_server  # noqa: E402

from distill.project import Project  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def _spawn(root: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "FAKE_KEY": "k"}
    # SIGINT back to its default in the child, as for a command typed at a terminal: a test run started in the
    # background by a non-interactive shell (`... &`) ignores SIGINT, the child inherits that, and Python then
    # never raises KeyboardInterrupt (that is how a CI run under nohup failed the Ctrl-C test)
    return subprocess.Popen([sys.executable, "-m", "distill.cli", "label", str(root), "--no-progress"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for_requests(server, after: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while len(server.log_lines()) <= after and time.monotonic() < deadline:
        time.sleep(0.02)


def _check_books(project: Project, server, n: int) -> dict:
    labels = project.store.q("SELECT status, COUNT(*) AS c FROM labels WHERE teacher='api' GROUP BY status")
    assert {r["status"]: r["c"] for r in labels} == {"ok": n}
    per_example = project.store.q("SELECT example_id, COUNT(*) AS c FROM labels GROUP BY example_id HAVING COUNT(*) != 1")
    assert per_example == []
    lines = server.log_lines()
    charged = [x for x in lines if x["charged"]]
    calls = project.store.q("SELECT key, tokens_in, tokens_out FROM teacher_calls")
    assert len(charged) == len({x["key"] for x in charged}) == len(calls)
    assert {x["key"] for x in charged} == {c["key"] for c in calls}
    assert sum(c["tokens_in"] for c in calls) == sum(x["tokens_in"] for x in charged)
    assert sum(c["tokens_out"] for c in calls) == sum(x["tokens_out"] for x in charged)
    return {"requests": len(lines), "charged": len(charged), "replayed": sum(x["replayed"] for x in lines),
            "calls": len(calls)}


def test_kill9_at_random_moments_never_double_charges(tmp_path, backend):
    """On PostgreSQL a killed labeller also leaves claims (teacher_claims); the next run on this machine sees their
    process is gone and takes them over at once."""
    n = 120
    server = start_server(tmp_path, delay_s=0.1, faults="429:0.03,500:0.03,seed=11")
    try:
        project = make_project(tmp_path / "p", n, server.base_url, concurrency=4)
        project.close()
        rng = random.Random(20241125)
        kills = 0
        for _ in range(5):
            before = len(server.log_lines())
            proc = _spawn(project.root)
            _wait_for_requests(server, before)            # it is labelling now (imports took ~1 s)
            time.sleep(rng.uniform(0.05, 0.8))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
            proc.wait(30)
            Project.open(project.root).close()            # the store passes its integrity check after each kill
        assert kills >= 3
        final = _spawn(project.root)
        out, err = final.communicate(timeout=120)
        assert final.returncode == 0, err.decode()[-2000:]
        p = Project.open(project.root)
        books = _check_books(p, server, n)
        print(f"\nkill -9: {kills} kills, {books}")         # replayed = in flight at a kill, charged once
        assert books["calls"] == n
    finally:
        server.stop()


def test_ctrl_c_commits_finished_work_and_exits_cleanly(tmp_path):
    # 120 inputs x 0.2 s / 3 in flight = 8 s of labelling: the SIGINT after the 10th request lands mid-run
    # even when a loaded CI machine is slow to deliver it (60 x 0.1 s could finish first)
    n = 120
    server = start_server(tmp_path, delay_s=0.2)
    try:
        project = make_project(tmp_path / "p", n, server.base_url, concurrency=3)
        project.close()
        proc = _spawn(project.root)
        _wait_for_requests(server, 10)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 130, err.decode()[-2000:]
        assert b"interrupted" in err
        p = Project.open(project.root)
        done = p.store.one("SELECT COUNT(*) FROM labels WHERE status='ok'")
        assert 0 < done < n
        assert done == p.store.one("SELECT COUNT(*) FROM teacher_calls")
        p.close()
        final = _spawn(project.root)
        final.communicate(timeout=60)
        assert final.returncode == 0
        _check_books(Project.open(project.root), server, n)
    finally:
        server.stop()
