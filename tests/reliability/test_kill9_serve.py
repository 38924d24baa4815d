"""`kill -9` of `distill serve` under concurrent load: every feedback entry the server acknowledged with a
2xx is in the store after the kill, with its text and label. The server writes (commits) before it answers,
so the count of acknowledged entries missing after the kill must be exactly 0.

Seeded: the kill moments come from random.Random(SEED). Each round starts the server through the CLI,
runs CLIENTS concurrent clients (each posts feedback with unique texts and sometimes a classify request)
until a random moment, SIGKILLs the server mid-load, and checks the books on a fresh connection. The next
round restarts on the same store. tests/integration/test_serve.py::test_accepted_feedback_survives_kill_9
is the single-request version.
"""

import asyncio
import random
import threading
import time

import httpx
from fake_openai_server import make_project
from serving import LABELS, ServeProcess, add_student
from tiny_models import tiny_bert_folder

from distill.project import Project
from distill.serve.keys import create_key

SEED = 8
CLIENTS = 8
ROUNDS = 2


async def client_loop(url: str, key: str, cid: int, stop: threading.Event, acked: dict, stats: dict) -> None:
    h = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(timeout=10) as c:
        i = 0
        while not stop.is_set():
            i += 1
            text, lab = f"client {cid} message {i} {time.monotonic_ns()}", LABELS[i % 3]
            try:
                if i % 4 == 0:
                    r = await c.post(url + "/v1/classify", json={"texts": [text]}, headers=h)
                    stats["classify_2xx"] += r.status_code == 200
                    continue
                r = await c.post(url + "/v1/feedback", json={"text": text, "label": lab}, headers=h)
            except httpx.HTTPError:
                stats["transport_errors"] += 1        # the kill: in flight, never acknowledged
                continue
            if 200 <= r.status_code < 300:
                acked[r.json()["queued"]] = (text, lab)
            else:
                stats[f"http_{r.status_code}"] = stats.get(f"http_{r.status_code}", 0) + 1


def run_load(url: str, key: str, stop: threading.Event, acked: dict, stats: dict) -> threading.Thread:
    async def main():
        await asyncio.gather(*(client_loop(url, key, i, stop, acked, stats) for i in range(CLIENTS)))

    t = threading.Thread(target=lambda: asyncio.run(main()), daemon=True)
    t.start()
    return t


def test_kill9_under_load_loses_no_acknowledged_entry(tmp_path):
    project = make_project(tmp_path / "p", 0, "http://127.0.0.1:9/v1", labels=LABELS, extra_yaml="\nteacher: api\n")
    add_student(project, tiny_bert_folder(tmp_path / "bert"))
    _, key = create_key(project.store, "load")
    project.close()
    rng = random.Random(SEED)
    acked: dict[int, tuple[str, str]] = {}
    summary = []
    for rnd in range(ROUNDS):
        stats = {"classify_2xx": 0, "transport_errors": 0}
        before = len(acked)
        serve = ServeProcess(tmp_path / "p", log=tmp_path / f"serve{rnd}.log")
        stop = threading.Event()
        try:
            t = run_load(serve.url, key, stop, acked, stats)
            deadline = time.monotonic() + 30
            while len(acked) - before < 20 and time.monotonic() < deadline:   # under load before the kill
                time.sleep(0.05)
            time.sleep(rng.uniform(0.1, 1.5))
            serve.kill()                          # SIGKILL with requests in flight
            stop.set()
            t.join(30)
        finally:
            stop.set()
            serve.kill()
        got = len(acked) - before
        assert got >= 20, f"round {rnd}: only {got} acknowledged entries before the kill"
        p = Project.open(tmp_path / "p")
        try:
            rows = {r["id"]: (r["text"], r["teacher_answer"]) for r in
                    p.store.q("SELECT id, text, teacher_answer FROM failure_queue WHERE reason='feedback'")}
        finally:
            p.close()
        lost = [i for i in acked if i not in rows]
        wrong = [i for i in acked if i in rows and rows[i][0] != acked[i][0]]
        assert lost == [] and wrong == [], f"round {rnd}: lost {len(lost)}, mismatched {len(wrong)}"
        # answers are stored as JSON text
        assert all(rows[i][1].strip('"') == acked[i][1] for i in acked)
        summary.append({"round": rnd, "acknowledged": got, **stats, "stored_total": len(rows)})
    print(f"\nkill -9 serve: {summary}; acknowledged {len(acked)}, lost 0")
