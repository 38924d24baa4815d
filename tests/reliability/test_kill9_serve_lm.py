"""`kill -9` of `distill serve` for an extract project under concurrent load: every chat completion and
feedback the server acknowledged with a 2xx has its failure-queue entry in the store after the kill. The
server commits before it answers, so the number of acknowledged entries missing must be exactly 0.

The served model is the packaged SmolLM2-135M GGUF in an export folder (test_serve_lm.lm_project), started
through the CLI with an lm_router.json whose confidence cut (mean log-probability >= 1, impossible) routes
every answer to the teacher. The teacher is a replay recording that knows half of the inputs: those are
answered by it ('routed' entries, then cache hits), the others fail over to the student ('degraded' entries).
Seeded: the kill moments come from random.Random(SEED). The second round restarts on the same store.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from serving import ServeProcess

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from test_serve_lm import SCHEMA, lm_project

from distill.project import Project

pytestmark = pytest.mark.slow      # the real packaged GGUF model

SEED = 13
CLIENTS = 4
ROUNDS = 2
RECORDED = [f"rain in city {i}" for i in range(6)]
ANSWER = {"intent": "weather", "slots": {"city": "recorded"}}


def record_teacher(root: Path) -> None:
    """rec.jsonl: the replay teacher's answers to the RECORDED inputs, as the labeller would render them."""
    from distill.task import render_messages

    p = Project.open(root)
    spec = p.spec
    p.close()
    lines = [{"provenance": {"teacher": "rec", "command": "test_kill9_serve_lm.record_teacher"}}]
    lines += [{"messages": render_messages(spec, t), "reply": {"texts": [json.dumps(ANSWER)], "tokens_in": 10,
                                                               "tokens_out": 8}} for t in RECORDED]
    (root / "rec.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


async def client_loop(url: str, key: str, cid: int, rng: random.Random, stop: threading.Event, acked: Counter,
                      fed: dict, stats: Counter) -> None:
    h = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(timeout=60) as c:
        i = 0
        while not stop.is_set():
            i += 1
            try:
                if i % 3 == 0:
                    text = f"feedback {cid} {i} {time.monotonic_ns()}"
                    r = await c.post(url + "/v1/feedback", headers=h,
                                     json={"text": text, "answer": {"intent": "music", "slots": {}}})
                    if r.status_code == 200:
                        fed[r.json()["queued"]] = text
                    else:
                        stats[f"http_{r.status_code}"] += 1
                    continue
                text = rng.choice(RECORDED) if i % 2 else f"client {cid} asks {i} {time.monotonic_ns()}"
                r = await c.post(url + "/v1/chat/completions", headers=h,
                                 json={"messages": [{"role": "user", "content": text}], "max_tokens": 12})
            except httpx.HTTPError:
                stats["transport_errors"] += 1        # the kill: in flight, never acknowledged
                continue
            if r.status_code == 200:
                d = r.json()["distill"]
                acked[(text, "degraded" if d["degraded"] else "routed")] += 1
            else:
                stats[f"http_{r.status_code}"] += 1


def test_kill9_serve_lm_loses_no_acknowledged_entry(tmp_path):
    from distill.serve.lm_router import LMRouter, LMRouterConfig

    root, gguf_dir, key = lm_project(tmp_path)
    record_teacher(root)
    LMRouter(LMRouterConfig(kind="extract", schema=SCHEMA, conf_threshold=1.0)).save(gguf_dir)
    rng = random.Random(SEED)
    acked: Counter = Counter()
    fed: dict[int, str] = {}
    summary = []
    for rnd in range(ROUNDS):
        stats: Counter = Counter()
        before = sum(acked.values())
        serve = ServeProcess(root, args=("--model", gguf_dir, "--threads", 1, "--max-tokens", 12, "--n-ctx", 256,
                                         "--max-batch", 4), log=tmp_path / f"serve{rnd}.log", timeout=120)
        stop = threading.Event()

        t = threading.Thread(target=lambda *a: asyncio.run(_gather(*a)), daemon=True,
                             args=(serve.url, key, rng, stop, acked, fed, stats))
        try:
            t.start()
            deadline = time.monotonic() + 60
            while sum(acked.values()) - before < 6 and time.monotonic() < deadline:   # under load before the kill
                time.sleep(0.05)
            time.sleep(rng.uniform(0.1, 1.0))
            serve.kill()                          # SIGKILL with requests in flight
            stop.set()
            t.join(60)
        finally:
            stop.set()
            serve.kill()
        got = sum(acked.values()) - before
        assert got >= 6, f"round {rnd}: only {got} acknowledged chat completions before the kill ({dict(stats)})"
        p = Project.open(root)
        try:
            rows = p.store.q("SELECT id, text, reason, teacher_answer FROM failure_queue")
        finally:
            p.close()
        stored = Counter((r["text"], r["reason"]) for r in rows)
        lost = {k: n - stored[k] for k, n in acked.items() if stored[k] < n}
        assert lost == {}, f"round {rnd}: acknowledged chat completions without their queue entry: {lost}"
        by_id = {r["id"]: r for r in rows}
        lost_fb = [i for i, text in fed.items() if i not in by_id or by_id[i]["text"] != text]
        assert lost_fb == [], f"round {rnd}: lost {len(lost_fb)} acknowledged feedback entries"
        # routed entries carry the teacher's answer as JSON text
        assert all(json.loads(r["teacher_answer"]) == ANSWER for r in rows if r["reason"] == "routed")
        assert {reason for _, reason in acked} == {"routed", "degraded"} or rnd == 0
        summary.append({"round": rnd, "acknowledged_chat": got, "feedback": len(fed), **stats})
    print(f"\nkill -9 serve (extract): {summary}; acknowledged {sum(acked.values())} chats + {len(fed)} feedback, lost 0")


async def _gather(url, key, rng, stop, acked, fed, stats):
    await asyncio.gather(*(client_loop(url, key, i, random.Random(rng.random()), stop, acked, fed, stats)
                           for i in range(CLIENTS)))
