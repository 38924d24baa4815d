"""The service end to end: a real uvicorn server on 127.0.0.1 (in a thread) with a tiny student, the fake
OpenAI server as the teacher (a subprocess on loopback), and the `openai` client as a user would run it."""

import asyncio
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from fake_openai_server import make_project, start_server  # noqa: E402
from tiny_models import WORDS, tiny_bert_folder  # noqa: E402

from distill.errors import DistillError  # noqa: E402
from distill.project import Project  # noqa: E402
from distill.serve import queue as fq  # noqa: E402
from distill.serve.app import ServeConfig, create_app, uvicorn_config  # noqa: E402
from distill.serve.batcher import MicroBatcher  # noqa: E402
from distill.serve.keys import create_key, revoke_key  # noqa: E402
from distill.serve.router import Router, RouterConfig, calibrate_project  # noqa: E402

LABELS = ("positive", "negative", "neutral")
DOWN_TEACHER = """
  - name: down
    kind: openai
    base_url: http://127.0.0.1:{port}/v1
    model: nobody-home
    max_retries: 0
    timeout_s: 1
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """uvicorn in a background thread, configured as `distill serve` runs it (``uvicorn_config``); the app's
    lifespan (store, writer thread, batcher, teacher) runs in that thread."""

    def __init__(self, app):
        import uvicorn

        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn_config(app, "127.0.0.1", self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A project with two teachers ('api' = the fake server, 'down' = a closed port), a tiny trained-looking
    student registered as the latest train run, and one API key."""
    import torch

    from distill.students.classifier import ClassifierStudent

    tmp = tmp_path_factory.mktemp("serve")
    fake = start_server(tmp, labels=LABELS)
    slow = start_server(tmp, labels=LABELS, faults="slow:1", slow_s=5.0, name="slow")
    os.environ["FAKE_KEY"] = "fake-key-for-tests"
    teachers = f"""
  - name: api
    kind: openai
    base_url: {fake.base_url}
    model: fake-1
    api_key_env: FAKE_KEY
    max_retries: 1
    timeout_s: 5
    price: {{input_per_1m: 1.0, output_per_1m: 2.0}}
  - name: slow
    kind: openai
    base_url: {slow.base_url}
    model: fake-slow
    max_retries: 0
""" + DOWN_TEACHER.format(port=_free_port())
    project = make_project(tmp / "proj", 0, fake.base_url, labels=LABELS, teacher_yaml=teachers,
                           extra_yaml="\nteacher: api\n")
    torch.manual_seed(0)
    student = ClassifierStudent.create(str(tiny_bert_folder(tmp / "base")), list(LABELS), device="cpu")
    model_dir = student.save(tmp / "proj" / "models" / "r1" / "final")
    project.record_run("r1", "train", "done", model_dir, {})
    project.promote("r1", "test fixture")      # serve answers with the promoted model only
    _, key = create_key(project.store, "tests")
    project.close()
    yield {"root": tmp / "proj", "fake": fake, "key": key, "student": student, "model_dir": model_dir}
    fake.stop()
    slow.stop()


def all_to(where: str) -> Router:
    """A router that sends everything to the teacher (threshold +inf) or to the student (-inf)."""
    return Router(RouterConfig(labels=list(LABELS), ood="none",
                               conf_threshold=float("inf") if where == "teacher" else float("-inf")))


@pytest.fixture(scope="module")
def routed(world):
    """Everything goes to the teacher: the fake OpenAI server."""
    s = Server(create_app(world["root"], router=all_to("teacher"),
                          config=ServeConfig(max_texts=4, max_body_bytes=20_000, max_text_chars=2_000)))
    yield s
    s.stop()


def H(world):
    return {"Authorization": f"Bearer {world['key']}"}


def queue(world, reason=None):
    p = Project.open(world["root"])
    try:
        return fq.list_entries(p.store, reasons=[reason] if reason else None)
    finally:
        p.close()


def test_classify_routed_to_teacher_uses_and_fills_the_cache(world, routed):
    text = "I feel negative about the parcel, which arrived late"     # the fake teacher answers 'negative'
    before = len(world["fake"].log_lines())
    r = httpx.post(routed.url + "/v1/classify", json={"texts": [text]}, headers=H(world), timeout=30)
    assert r.status_code == 200, r.text
    res = r.json()["results"][0]
    assert res["routed_to"] == "teacher" and res["label"] == "negative" and not res["degraded"]
    assert set(res["probs"]) == set(LABELS) and abs(sum(res["probs"].values()) - 1) < 1e-5
    assert res["latency_ms"] > 0 and res["reason"] == "low_confidence"
    assert len(world["fake"].log_lines()) == before + 1
    p = Project.open(world["root"])
    calls = [c for c in p.store.q("SELECT teacher, status, cost, request FROM teacher_calls") if text in c["request"]]
    p.close()
    assert len(calls) == 1 and calls[0]["teacher"] == "api" and calls[0]["status"] == "ok" and calls[0]["cost"] > 0
    assert "fake-key-for-tests" not in calls[0]["request"]
    entries = [e for e in queue(world, "routed") if e.text == text]
    assert entries and entries[0].teacher_answer == "negative"
    # the same text again: answered from teacher_calls, no new call to the teacher
    r2 = httpx.post(routed.url + "/v1/classify", json={"texts": [text]}, headers=H(world), timeout=30)
    assert r2.json()["results"][0]["teacher"] == "cache_hit"
    assert len(world["fake"].log_lines()) == before + 1


def test_openai_client_chat_completions_and_models(world, routed):
    from openai import OpenAI

    client = OpenAI(base_url=routed.url + "/v1", api_key=world["key"], max_retries=0)
    models = client.models.list()
    assert [m.id for m in models.data] == ["t"]
    out = client.chat.completions.create(model="t", messages=[
        {"role": "system", "content": "ignored"}, {"role": "user", "content": "I feel positive today"}])
    assert out.model == "t" and out.choices[0].message.content == "positive"
    import openai

    bad = OpenAI(base_url=routed.url + "/v1", api_key="dk_00000000_" + "x" * 43, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_openai_client_streams_the_label_as_one_chunk_with_usage(world, routed):
    """stream: true with the official client: the label arrives as one content chunk, then the finish reason
    and (stream_options.include_usage) a usage chunk whose prompt tokens are the student tokenizer's count."""
    from openai import OpenAI

    from distill.students.classifier import ClassifierStudent

    client = OpenAI(base_url=routed.url + "/v1", api_key=world["key"], max_retries=0)
    text = "I feel positive about the streaming answer"
    chunks = list(client.chat.completions.create(model="t", messages=[{"role": "user", "content": text}],
                                                 stream=True, stream_options={"include_usage": True}))
    content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert content == ["positive"]                                    # the routed teacher's label, one chunk
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    usage = chunks[-1].usage
    n = len(ClassifierStudent.load(world["model_dir"], device="cpu").tokenizer(text)["input_ids"])
    assert usage.prompt_tokens == n and usage.completion_tokens == 1 and usage.total_tokens == n + 1
    # not streamed: the same usage in the response
    out = client.chat.completions.create(model="t", messages=[{"role": "user", "content": text}])
    assert out.usage.prompt_tokens == n and out.usage.total_tokens == n + 1
    # the routed input was queued before the stream began, like a plain request
    assert any(e.text == text for e in queue(world, "routed"))


def test_auth_and_limits(world, routed):
    u = routed.url + "/v1/classify"
    assert httpx.post(u, json={"texts": ["x"]}).status_code == 401
    r = httpx.post(u, json={"texts": ["x"]}, headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
    # a revoked key stops working at once
    p = Project.open(world["root"])
    kid, raw = create_key(p.store, "temp")
    p.close()
    assert httpx.get(routed.url + "/v1/models", headers={"Authorization": f"Bearer {raw}"}).status_code == 200
    p = Project.open(world["root"])
    revoke_key(p.store, kid)
    p.close()
    assert httpx.get(routed.url + "/v1/models", headers={"Authorization": f"Bearer {raw}"}).status_code == 401
    # batch limit, text length, empty, wrong shape -> 422 with a message that says what to do
    r = httpx.post(u, json={"texts": ["a"] * 5}, headers=H(world))
    assert r.status_code == 422 and "limit is 4" in r.json()["error"]["message"]
    r = httpx.post(u, json={"texts": ["a" * 2001]}, headers=H(world))
    assert r.status_code == 422 and "2001 characters" in r.json()["error"]["message"]
    assert httpx.post(u, json={"texts": []}, headers=H(world)).status_code == 422
    r = httpx.post(u, json={"text": "a"}, headers=H(world))
    assert r.status_code == 422 and "texts" in r.json()["error"]["message"]
    # body size -> 413, whether declared up front or streamed without a Content-Length
    r = httpx.post(u, content=b"x" * 30_000, headers={**H(world), "Content-Type": "application/json"})
    assert r.status_code == 413

    def chunks():
        for _ in range(30):
            yield b"x" * 1000

    r = httpx.post(u, content=chunks(), headers={**H(world), "Content-Type": "application/json"})
    assert r.status_code == 413
    assert httpx.get(routed.url + "/healthz").status_code == 200      # health needs no key


def test_feedback_lands_in_the_queue(world, routed):
    r = httpx.post(routed.url + "/v1/classify", json={"texts": ["the box was ok I guess"]}, headers=H(world), timeout=30)
    rid = r.json()["results"][0]["id"]
    f = httpx.post(routed.url + "/v1/feedback", json={"id": rid, "label": "neutral", "note": "customer said so"},
                   headers=H(world))
    assert f.status_code == 200, f.text
    g = httpx.post(routed.url + "/v1/feedback", json={"text": "unseen text", "label": "negative"}, headers=H(world))
    assert g.status_code == 200
    fb = {e.id: e for e in queue(world, "feedback")}
    a, b = fb[f.json()["queued"]], fb[g.json()["queued"]]
    assert a.text == "the box was ok I guess" and a.teacher_answer == "neutral" and a.note == "customer said so"
    assert a.student_answer == r.json()["results"][0]["label"]
    assert b.text == "unseen text" and b.student_answer is None
    assert httpx.post(routed.url + "/v1/feedback", json={"text": "x", "label": "banana"}, headers=H(world)).status_code == 422
    assert httpx.post(routed.url + "/v1/feedback", json={"id": "res-nope", "label": "neutral"}, headers=H(world)).status_code == 422


def test_metrics_are_prometheus_text(world, routed):
    httpx.post(routed.url + "/v1/classify", json={"texts": ["I feel neutral"]}, headers=H(world), timeout=30)
    m = httpx.get(routed.url + "/metrics", headers=H(world))
    assert m.status_code == 200 and m.headers["content-type"].startswith("text/plain")
    lines = dict(line.rsplit(" ", 1) for line in m.text.splitlines() if line and not line.startswith("#"))
    assert float(lines['distill_inputs_total{routed_to="teacher"}']) >= 1
    assert float(lines["distill_routed_share"]) == 1.0
    assert float(lines['distill_teacher_calls_total{result="ok"}']) >= 1
    assert float(lines["distill_teacher_spend_usd_total"]) > 0
    # latency by endpoint and by the model that answered (the promoted run; a canary's candidate has its own)
    assert float(lines['distill_request_latency_seconds_count{endpoint="/v1/classify",model="r1"}']) >= 1
    assert float(lines['distill_batch_size_count{model="r1"}']) >= 1              # micro-batches and their sizes
    assert float(lines['distill_model_busy_seconds_total{model="r1"}']) > 0       # model-thread time
    assert 'distill_batch_queue{model="r1",role="promoted"}' in lines            # requests waiting for the model
    assert not [k for k in lines if k.endswith("_created") or "_created{" in k]  # as under --workers: no *_created
    assert 'distill_requests_total{code="401",endpoint="/v1/classify"}' in lines
    assert httpx.get(routed.url + "/metrics").status_code == 401


def test_teacher_down_degrades_to_the_student_with_200(world):
    s = Server(create_app(world["root"], router=all_to("teacher"), config=ServeConfig(teacher="down",
                                                                                     teacher_timeout_s=5)))
    try:
        texts = ["I feel positive", "broken box"]
        r = httpx.post(s.url + "/v1/classify", json={"texts": texts}, headers=H(world), timeout=30)
        assert r.status_code == 200, r.text
        res = r.json()["results"]
        assert all(x["degraded"] and x["routed_to"] == "teacher" and x["teacher"] == "error" for x in res)
        assert [x["label"] for x in res] == [LABELS[i] for i in world["student"].predict_proba(texts).argmax(1)]
        assert {e.text for e in queue(world, "degraded")} >= set(texts)
        m = httpx.get(s.url + "/metrics", headers=H(world)).text
        assert "distill_degraded_total 2.0" in m
    finally:
        s.stop()


def test_slow_teacher_times_out_into_a_degraded_answer(world):
    s = Server(create_app(world["root"], router=all_to("teacher"),
                          config=ServeConfig(teacher="slow", teacher_timeout_s=0.5)))
    try:
        t0 = time.monotonic()
        r = httpx.post(s.url + "/v1/classify", json={"texts": ["I feel neutral, slowly"]}, headers=H(world), timeout=30)
        took = time.monotonic() - t0
        assert r.status_code == 200
        res = r.json()["results"][0]
        assert res["degraded"] and res["teacher"] == "timeout"
        assert took < 4.0          # the teacher answers after 5 s; the client got the student's answer long before
    finally:
        s.stop()
    # shadow mode never adds the teacher's latency: the shadow call runs after the response
    s = Server(create_app(world["root"], router=all_to("student"), shadow_rate=1.0,
                          config=ServeConfig(teacher="slow", teacher_timeout_s=30)))
    try:
        t0 = time.monotonic()
        r = httpx.post(s.url + "/v1/classify", json={"texts": ["shadow me"]}, headers=H(world), timeout=30)
        assert r.status_code == 200 and r.json()["results"][0]["routed_to"] == "student"
        assert time.monotonic() - t0 < 4.0
    finally:
        s.stop()               # cancels the pending shadow call cleanly


def test_shadow_mode_logs_disagreements_without_waiting_for_the_teacher(world):
    student = world["student"]
    # texts that name a label the student does not predict: the fake teacher answers the named label
    cands = [f"I feel {lab} about order {i}" for i in range(10) for lab in LABELS]
    pred = student.predict_proba(cands).argmax(1)
    texts = [t for t, p in zip(cands, pred) if LABELS[p] not in t][:3]
    assert texts
    s = Server(create_app(world["root"], router=all_to("student"), shadow_rate=1.0))
    try:
        r = httpx.post(s.url + "/v1/classify", json={"texts": texts}, headers=H(world), timeout=30)
        assert r.status_code == 200
        assert all(x["routed_to"] == "student" and x["teacher"] is None for x in r.json()["results"])
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            got = {e.text: e for e in queue(world, "shadow_disagreement")}
            if set(texts) <= set(got):
                break
            time.sleep(0.1)
        for t in texts:
            e = got[t]
            assert e.teacher_answer in t and e.student_answer != e.teacher_answer
    finally:
        s.stop()


def test_calibrate_project_then_serve_with_the_calibrated_router(world, tmp_path):
    """Router thresholds fitted on teacher-labelled validation rows are saved next to the model and used."""
    import shutil

    # a fresh project: copying the live store with shutil would open and close its file in this process,
    # which drops SQLite's POSIX locks of the servers still running here (see store.py)
    root = tmp_path / "proj"
    p = make_project(root, 0, world["fake"].base_url, labels=LABELS)
    _, key = create_key(p.store, "calibrate")
    now = time.time()
    rng = np.random.default_rng(0)
    with p.store.tx() as c:
        for i in range(40):
            lab = LABELS[i % 3]
            # words the tiny tokenizer knows, so the texts (and the student's confidences) really differ
            text = " ".join(rng.choice(WORDS, 6)) + f" {i}"
            split = "validation" if i < 30 else "train"
            c.execute("INSERT INTO examples(id, text, norm, split, created_at) VALUES(?,?,?,?,?)",
                      (f"v{i}", text, text, split, now))
            c.execute("INSERT INTO labels(example_id, teacher, status, answer, created_at) VALUES(?,?,?,?,?)",
                      (f"v{i}", "api", "ok", json.dumps(lab), now))
    p.close()
    model_copy = tmp_path / "m"
    shutil.copytree(world["model_dir"], model_copy)
    cfg = calibrate_project(root, model_path=model_copy, coverage=0.5, ood="mahalanobis", guarantee=False)
    assert abs(cfg.achieved_coverage - 0.5) <= 1 / 30 + 1e-9 and cfg.n_validation == 30
    assert (model_copy / "router.json").exists() and (model_copy / "router_stats.npz").exists()
    assert cfg.n_oos_validation == 0 and any("no out-of-scope examples" in n for n in cfg.notes)

    # thresholds never read the test split; out-of-scope validation rows (gold not a label) set no threshold
    p = Project.open(root)
    with p.store.tx() as c:
        for i in range(5):
            c.execute("INSERT INTO examples(id, text, norm, split, created_at) VALUES(?,?,?,?,?)",
                      (f"t{i}", f"zebra {i}", f"zebra {i}", "test", now))
            c.execute("INSERT INTO examples(id, text, norm, split, gold, created_at) VALUES(?,?,?,?,?,?)",
                      (f"o{i}", f"quantum {i}", f"quantum {i}", "validation", json.dumps("oos"), now))
    p.close()
    again = calibrate_project(root, model_path=model_copy, coverage=0.5, ood="mahalanobis", guarantee=False)
    assert (again.conf_threshold, again.ood_threshold, again.n_validation) == \
        (cfg.conf_threshold, cfg.ood_threshold, cfg.n_validation)
    assert again.n_oos_validation == 5 and again.oos_recall_validation is not None
    assert all("oos_recall" in pt for pt in again.curve)

    app = create_app(root, model_path=model_copy)
    s = Server(app)
    try:
        # the model's details are for key holders (without a key /healthz is liveness only)
        assert httpx.get(s.url + "/healthz", headers={"Authorization": f"Bearer {key}"}).json()["router"] == "calibrated"
        r = httpx.post(s.url + "/v1/classify", json={"texts": ["great fast delivery"]},
                       headers={"Authorization": f"Bearer {key}"}, timeout=30)
        assert r.status_code == 200 and r.json()["results"][0]["ood_score"] is not None
    finally:
        s.stop()

    # a router.json belongs to the weights it was calibrated on: new weights beside it are refused at startup
    import torch

    from distill.students.classifier import ClassifierStudent

    retrained = ClassifierStudent.load(model_copy, device="cpu")
    with torch.no_grad():
        next(retrained.model.parameters()).add_(0.01)
    retrained.save(model_copy)
    with pytest.raises(DistillError, match="calibrated on other weights"):
        create_app(root, model_path=model_copy)
    # ... and so is a router.json from before routers recorded their model
    d = json.loads((model_copy / "router.json").read_text())
    d.pop("model")
    (model_copy / "router.json").write_text(json.dumps(d))
    with pytest.raises(DistillError, match="recorded which model"):
        create_app(root, model_path=model_copy)


def test_a_failing_router_sends_the_batch_to_the_teacher_never_a_500(world):
    """Router errors -> the teacher answers (reason router_error); teacher down as well -> degraded student answer."""
    class Broken(Router):
        def decide(self, logits, feats=None):
            raise RuntimeError("boom")

    broken = Broken(RouterConfig(labels=list(LABELS), ood="none"))
    s = Server(create_app(world["root"], router=broken))
    try:
        r = httpx.post(s.url + "/v1/classify", json={"texts": ["hello there"]}, headers=H(world), timeout=30)
        assert r.status_code == 200
        res = r.json()["results"][0]
        assert res["routed_to"] == "teacher" and res["reason"] == "router_error" and res["label"] in LABELS
        assert 'distill_route_reason_total{reason="router_error"} 1.0' in httpx.get(s.url + "/metrics", headers=H(world)).text
    finally:
        s.stop()
    s = Server(create_app(world["root"], router=broken, config=ServeConfig(teacher="down", teacher_timeout_s=5)))
    try:
        r = httpx.post(s.url + "/v1/classify", json={"texts": ["hello there"]}, headers=H(world), timeout=30)
        assert r.status_code == 200 and r.json()["results"][0]["degraded"] is True
    finally:
        s.stop()


def test_bad_setup_is_a_distill_error(world, tmp_path):
    with pytest.raises(DistillError, match="no such model folder"):
        create_app(world["root"], model_path=tmp_path / "missing")
    with pytest.raises(DistillError, match="shadow rate"):
        create_app(world["root"], shadow_rate=2.0)
    from distill.serve.app import serve

    with pytest.raises(DistillError, match="without API keys"):
        serve(world["root"], host="0.0.0.0", require_key=False)


def test_micro_batcher_merges_concurrent_requests():
    calls = []

    def fn(texts):
        calls.append(len(texts))
        return [(len(t), 0.0) for t in texts]

    async def main():
        b = MicroBatcher(fn, max_batch=8)
        outs = await asyncio.gather(*(b.submit(["a" * i, "b"]) for i in range(1, 5)))
        await b.close()
        return outs

    outs = asyncio.run(main())
    assert calls == [8]                      # four requests of two texts -> one model call, with no wait at all
    for i, rows in enumerate(outs, start=1):
        assert [r[0] for r in rows] == [i, 1]   # each request gets its own rows back


def test_micro_batcher_adapts_to_load_and_drains():
    """No timer: a lone request runs at once; what arrives during a model call is the next batch; drain() waits
    for every submitted request (a hot swap relies on it)."""
    import threading

    calls, gate = [], threading.Event()

    def fn(texts):
        calls.append(list(texts))
        if texts == ["first"]:
            gate.wait(5)            # the model is busy with the first request while others arrive
        return texts

    async def main():
        b = MicroBatcher(fn, max_batch=32)
        first = asyncio.ensure_future(b.submit(["first"]))
        while not calls:            # the first request is in the model before anyone else arrives
            await asyncio.sleep(0.001)
        rest = [asyncio.ensure_future(b.submit([f"t{i}"])) for i in range(5)]
        await asyncio.sleep(0.05)
        assert not await b.drain(timeout_s=0.01)       # six requests outstanding
        gate.set()
        assert await b.drain(timeout_s=5)
        assert all(f.done() for f in [first, *rest])
        await b.close()
        return await first, [await f for f in rest]

    first, rest = asyncio.run(main())
    assert calls == [["first"], [f"t{i}" for i in range(5)]]
    assert first == ["first"] and rest == [[f"t{i}"] for i in range(5)]


def test_accepted_feedback_survives_kill_9(world, routed):
    """An entry acknowledged with 2xx is committed: kill -9 right after the response loses nothing.
    ``routed`` keeps another server (and its store connection) open in this process meanwhile: that is
    the set-up in which a stray close() of the database file used to hide other processes' commits."""
    import signal
    import subprocess

    port = _free_port()
    code = ("import uvicorn\nfrom distill.serve.app import create_app\n"
            f"uvicorn.run(create_app({str(world['root'])!r}), host='127.0.0.1', port={port}, log_level='warning')\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "server did not start"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/feedback", json={"text": "kill me softly", "label": "neutral"},
                       headers=H(world), timeout=30)
        assert r.status_code == 200
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    entries = {e.id: e for e in queue(world, "feedback")}
    assert entries[r.json()["queued"]].text == "kill me softly"


def test_failure_queue_consume_takes_each_entry_once(tmp_path, backend):
    from distill.store import Store

    s = Store(tmp_path / "q.db")
    a = fq.enqueue(s, "t1", "routed", student_answer="neg", student_conf=0.4, teacher_answer="pos", note="router: ood")
    b = fq.enqueue(s, "t2", "feedback", teacher_answer="neutral")
    fq.enqueue(s, "t3", "degraded", student_answer="pos")
    assert fq.counts(s) == {"routed": 1, "feedback": 1, "degraded": 1}
    rnd, taken = fq.consume(s, reasons=["routed", "feedback"])
    assert rnd == 1 and [e.id for e in taken] == [a, b]
    assert taken[0].teacher_answer == "pos" and taken[0].student_conf == 0.4
    assert all(e.status == "consumed" and e.round == 1 for e in fq.list_entries(s, status="consumed"))
    rnd2, taken2 = fq.consume(s)
    assert rnd2 == 2 and [e.text for e in taken2] == ["t3"]
    assert fq.consume(s)[1] == [] and fq.list_entries(s) == []
    with pytest.raises(DistillError, match="reason"):
        fq.enqueue(s, "x", "because")
    s.close()


def test_store_failure_is_a_503_not_a_silent_2xx(world, routed, monkeypatch):
    def disk_full(*a, **k):
        raise DistillError("distill.db: write failed: database or disk is full", hint="free space")

    monkeypatch.setattr(fq, "enqueue", disk_full)
    r = httpx.post(routed.url + "/v1/feedback", json={"text": "lost?", "label": "neutral"}, headers=H(world))
    assert r.status_code == 503 and "disk is full" in r.json()["error"]["message"]
