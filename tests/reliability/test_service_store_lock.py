"""Another process holding the store's write lock (as `distill import` of 60k rows does for seconds) must not
stall the service: health checks and student answers go on in well under a second, and a write issued
meanwhile (feedback) waits for the lock off the event loop and is answered 2xx only once committed.

The lock holder is a separate process: `BEGIN IMMEDIATE` on its own connection, held for LOCK_S seconds.
"""

import subprocess
import sys
import threading
import time

import httpx
import pytest
from serving import InProcessServer, served_project

from distill.project import Project
from distill.serve.app import create_app

LOCK_S = 5.0
HOLD = """
import sqlite3, sys, time
c = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
c.execute("BEGIN IMMEDIATE")              # the write lock, as a long import holds it
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
c.execute("ROLLBACK")
print("released", flush=True)
"""


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root, key = served_project(tmp_path_factory.mktemp("lock"))    # pass-through router: the student answers
    s = InProcessServer(create_app(root))
    yield {"root": root, "key": key, "url": s.url}
    s.stop()


def test_service_answers_while_another_process_holds_the_write_lock(served):
    url, h = served["url"], {"Authorization": f"Bearer {served['key']}"}
    # warm up: the first model call and connection set-up are not what is measured
    assert httpx.post(url + "/v1/classify", json={"texts": ["warm up"]}, headers=h, timeout=30).status_code == 200

    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(served["root"] / "distill.db"), str(LOCK_S)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        t_locked = time.monotonic()
        fb: dict = {}

        def feedback():
            r = httpx.post(url + "/v1/feedback", json={"text": "written during the lock", "label": "neutral"},
                           headers=h, timeout=60)
            fb.update(response=r, at=time.monotonic())

        writer = threading.Thread(target=feedback)
        writer.start()
        time.sleep(0.5)                   # the feedback's write is now waiting for the lock
        took = {}
        for name, call in [
            ("healthz", lambda: httpx.get(url + "/healthz", timeout=30)),
            ("healthz with key", lambda: httpx.get(url + "/healthz", headers=h, timeout=30)),
            ("classify", lambda: httpx.post(url + "/v1/classify", json={"texts": ["is the lock a problem?"]},
                                            headers=h, timeout=30)),
            ("models", lambda: httpx.get(url + "/v1/models", headers=h, timeout=30)),
        ]:
            t0 = time.monotonic()
            r = call()
            took[name] = time.monotonic() - t0
            assert r.status_code == 200, (name, r.text)
        slow = {k: round(v, 3) for k, v in took.items() if v >= 1.0}
        assert not slow, f"answers waited for another process's write lock: {slow}"
        assert holder.poll() is None, "the lock was released before the checks ran: the test proves nothing"

        assert holder.stdout.readline().strip() == "released"
        writer.join(60)
        r = fb["response"]
        assert r.status_code == 200, r.text
        # acknowledged only after the lock was released (and so after its own commit), not before
        assert fb["at"] - t_locked > LOCK_S - 0.5, "feedback was acknowledged while the lock was still held"
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.wait(10)
    p = Project.open(served["root"])
    try:
        row = p.store.q("SELECT text, reason, teacher_answer FROM failure_queue WHERE id=?", (r.json()["queued"],))
    finally:
        p.close()
    assert [tuple(x) for x in row] == [("written during the lock", "feedback", '"neutral"')]
