"""`distill serve` for an extract project, end to end: a real uvicorn server on 127.0.0.1 (in a thread) with the
packaged SmolLM2-135M-Instruct GGUF as the student (an "export folder" built from it, pinned with model_path,
so nothing is trained), stand-in teachers and routers, and the `openai` client as a user would run it.

The model's text is never asserted (it differs across CPUs); what is asserted is what the service
promises: answers validate against the enforced schema, stream chunks add up to the answer, usage counts
real tokens, routed / degraded inputs are in the queue when the response arrives, bad requests are 4xx
naming the field, concurrent requests share the engine's decode steps."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import time
from pathlib import Path

import httpx
import jsonschema
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reliability"))
from serving import InProcessServer

from distill.errors import DistillError
from distill.project import Project
from distill.serve import queue as fq
from distill.serve.app import ServeConfig, create_app
from distill.teachers.base import TeacherReply

pytestmark = pytest.mark.slow      # the real packaged GGUF model

SCHEMA = {"type": "object",
          "properties": {"intent": {"enum": ["weather", "music"]},
                         "slots": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                                   "additionalProperties": False}},
          "required": ["intent", "slots"], "additionalProperties": False}
SPEC = f"""
name: slots
kind: extract
description: "Weather or music request."
schema: {json.dumps(SCHEMA)}
prompt:
  system: "Answer with JSON."
teachers:
  - name: rec
    kind: replay
    path: rec.jsonl
teacher: rec
"""
TEACHER_ANSWER = {"intent": "music", "slots": {"city": "zzq-teacher"}}   # valid, and no student writes it
TEXTS = ["rain in paris tomorrow?", "play songs from rome", "is it sunny in oslo", "put on jazz from lima"]
# small budgets keep the whole module quick on a busy 2-core machine; one engine thread: with two, llama.cpp's
# threads wait on each other whenever another process holds a core (measured 2 tok/s vs 23 tok/s with one)
CFG = {"max_tokens": 40, "n_ctx_per_seq": 256, "max_batch": 4, "n_threads": 1, "max_text_chars": 4000}
_TOKENIZER: dict[str, Path] = {}     # the HF tokenizer read from the GGUF (13 s), once per process


def lm_export_folder(dest: Path) -> Path:
    """A GGUF export folder as `distill export --format gguf` writes one: the packaged SmolLM2 GGUF (linked),
    its HF tokenizer and distill_student.json."""
    from transformers import AutoTokenizer

    from distill.models import resolve_model

    gguf = resolve_model("smollm2-135m-instruct").gguf
    dest.mkdir(parents=True, exist_ok=True)
    (dest / gguf.name).symlink_to(gguf)
    if "dir" not in _TOKENIZER:
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(dest)
        _TOKENIZER["dir"] = dest
    else:
        for f in _TOKENIZER["dir"].iterdir():
            if not f.name.endswith(".gguf") and f.is_file():
                shutil.copy(f, dest / f.name)
    (dest / "distill_student.json").write_text(json.dumps(
        {"prompt": "short", "input_prefix": "", "base_model": "smollm2-135m-instruct"}))
    return dest


def lm_project(tmp: Path) -> tuple[Path, Path, str]:
    """(project root, GGUF folder, API key) of a tiny extract project."""
    from distill.serve.keys import create_key

    gguf_dir = lm_export_folder(tmp / "gguf")
    project = Project.init(tmp / "proj", "extract", SPEC)
    _, key = create_key(project.store, "tests")
    project.close()
    return tmp / "proj", gguf_dir, key


class StandInTeacher:
    """The project's teacher 'rec', answering ``TEACHER_ANSWER`` (or failing) without a recording."""

    def __init__(self, fail: bool = False):
        self.fail, self.calls = fail, 0

    async def ask(self, req):
        self.calls += 1
        if self.fail:
            raise ConnectionError("teacher down (test)")
        return TeacherReply(texts=[json.dumps(TEACHER_ANSWER)], tokens_in=20, tokens_out=12, latency_s=0.01)


class RouteAll:
    """A stand-in for a calibrated LMRouter that sends every answer to the teacher (or keeps it)."""

    needs_embedding = False
    calibrated = True

    def __init__(self, where: str = "teacher"):
        self.where = where

    def decide(self, res):
        from distill.serve.lm_router import LMDecision

        lp = res.token_logprobs
        return LMDecision(routed_to=self.where, reason="low_confidence" if self.where == "teacher" else "confident",
                          signals={"mean_logprob": sum(lp) / len(lp) if lp else None, "ood": False})


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root, gguf_dir, key = lm_project(tmp_path_factory.mktemp("serve_lm"))
    return {"root": root, "gguf": gguf_dir, "key": key}


def start(world, *, router=None, teacher=None, shadow=0.0, **cfg) -> InProcessServer:
    app = create_app(world["root"], model_path=world["gguf"], shadow_rate=shadow, router=router,
                     teacher=teacher or StandInTeacher(), config=ServeConfig(**{**CFG, **cfg}))
    return InProcessServer(app)


@pytest.fixture(scope="module")
def plain(world):
    """No lm_router.json: the pass-through router (tokens stream live); shadow mode re-asks every answer."""
    s = start(world, shadow=1.0)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def routed(world):
    s = start(world, router=RouteAll("teacher"))
    yield s
    s.stop()


def H(world) -> dict:
    return {"Authorization": f"Bearer {world['key']}"}


def client(world, server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key=world["key"], max_retries=0, timeout=60)


def queue(world, reason=None) -> list:
    p = Project.open(world["root"])
    try:
        return fq.list_entries(p.store, reasons=[reason] if reason else None)
    finally:
        p.close()


def user(text: str) -> list[dict]:
    return [{"role": "system", "content": "ignored"}, {"role": "user", "content": text}]


# ------------------------------------------------------------------------------------------------


def test_openai_client_answers_validate_and_stream_adds_up(world, plain):
    """Non-stream and stream with the official client: content validates against the task schema, usage is the
    student's real token counts, stream chunks concatenate to the answer, the usage chunk comes last."""
    from distill.task import render_messages

    c = client(world, plain)
    assert [m.id for m in c.models.list().data] == ["slots"]
    app = plain.server.config.app
    p = Project.open(world["root"])
    spec = p.spec
    p.close()
    text = TEXTS[0]
    out = c.chat.completions.create(model="slots", messages=user(text), max_tokens=40)
    content = out.choices[0].message.content
    d = out.model_extra["distill"]
    if out.choices[0].finish_reason == "stop":
        jsonschema.validate(json.loads(content), SCHEMA)
    assert d["routed_to"] in ("student", "teacher") and d["format"] == "task_schema" and d["streamed"] is None
    n_prompt = len(app.state.student.prompt_tokens(render_messages(spec, text)))
    assert out.usage.prompt_tokens == n_prompt
    assert 1 <= out.usage.completion_tokens <= 40 and out.usage.total_tokens == n_prompt + out.usage.completion_tokens

    chunks = list(c.chat.completions.create(model="slots", messages=user(text), max_tokens=40, stream=True,
                                            stream_options={"include_usage": True}, logprobs=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [ch.choices[0].delta.content for ch in chunks if ch.choices and ch.choices[0].delta.content]
    assert len(pieces) > 1                                        # live: one chunk per decoded piece
    final = [ch for ch in chunks if ch.choices and ch.choices[0].finish_reason][-1]
    dd = final.model_extra["distill"]
    assert dd["streamed"] == "live" and dd["reason"] == "pass_through"
    assert "".join(pieces) == dd["student_content"]
    lps = [ch.choices[0].logprobs.content[0] for ch in chunks if ch.choices and ch.choices[0].delta.content]
    assert [t.token for t in lps] == pieces and all(t.logprob <= 0 for t in lps)
    if final.choices[0].finish_reason == "stop":
        jsonschema.validate(json.loads("".join(pieces)), SCHEMA)
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.prompt_tokens == n_prompt
    assert usage.completion_tokens >= len(pieces) - 1 and usage.total_tokens == n_prompt + usage.completion_tokens


def test_concurrent_requests_all_validate_and_are_batched(world, plain):
    """Four simultaneous requests: all 200, every answer validates against the task schema (a cut-off student
    answer goes to the teacher, whose answer validates), and the engine decoded them in shared steps."""
    engine = plain.server.config.app.state.student.engine
    before = engine.stats()

    async def main():
        async with httpx.AsyncClient(timeout=120) as c:
            return await asyncio.gather(*(c.post(plain.url + "/v1/chat/completions", headers=H(world),
                                                 json={"messages": user(t), "max_tokens": 40}) for t in TEXTS))

    rs = asyncio.run(main())
    after = engine.stats()
    assert [r.status_code for r in rs] == [200] * 4, [r.text for r in rs]
    for r in rs:
        body = r.json()
        d = body["distill"]
        if not d["degraded"]:
            assert d["valid"]
            jsonschema.validate(json.loads(body["choices"][0]["message"]["content"]), SCHEMA)
    steps = after["steps"] - before["steps"]
    step_tokens = after["mean_batch_size"] * after["steps"] - before["mean_batch_size"] * before["steps"]
    assert steps > 0 and step_tokens / steps > 1.0, (before, after)


def test_client_json_schema_is_enforced_and_logprobs(world, plain):
    colour = {"type": "object", "properties": {"colour": {"enum": ["red", "blue", "green"]}},
              "required": ["colour"], "additionalProperties": False}
    r = httpx.post(plain.url + "/v1/chat/completions", headers=H(world), timeout=60, json={
        "messages": user("what colour is the sky"), "max_tokens": 24, "logprobs": True,
        "response_format": {"type": "json_schema", "json_schema": {"name": "colour", "schema": colour}}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["distill"]["format"] == "client_schema"
    content = body["choices"][0]["message"]["content"]
    assert body["choices"][0]["finish_reason"] == "stop"
    jsonschema.validate(json.loads(content), colour)
    lps = body["choices"][0]["logprobs"]["content"]
    assert len(lps) == body["usage"]["completion_tokens"] and all(t["logprob"] <= 0 for t in lps)
    assert "".join(t["token"] for t in lps) == content


def test_bad_requests_are_4xx_naming_the_field(world, plain):
    import openai

    u, h = plain.url + "/v1/chat/completions", H(world)

    def post(**extra):
        return httpx.post(u, headers=h, timeout=60, json={"messages": user("rain in bern"), "max_tokens": 8, **extra})

    r = post(response_format={"type": "xml"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format.type"
    assert "'xml'" in r.json()["error"]["message"]
    r = post(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format.json_schema.schema"
    r = post(response_format={"type": "json_schema", "json_schema": {"name": "x"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format.json_schema.schema"
    # a prompt longer than the context (256 tokens per sequence here), within the character limit
    long = " ".join(f"city{i}" for i in range(400))
    r = httpx.post(u, headers=h, timeout=60, json={"messages": user(long)})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "messages[1].content" and "256" in err["message"], err
    # the official client surfaces the message
    with pytest.raises(openai.BadRequestError, match="response_format.type"):
        client(world, plain).chat.completions.create(model="slots", messages=user("x y"),
                                                     response_format={"type": "yaml"})
    assert httpx.post(u, headers=h, json={"messages": user("a" * 4001)}).status_code == 422
    assert httpx.post(u, headers=h, json={"messages": [{"role": "system", "content": "x"}]}).status_code == 422
    assert post(n=2).status_code == 400
    assert post(max_tokens=0).status_code == 422


def test_auth_models_health_metrics_openapi(world, plain):
    u = plain.url
    assert httpx.post(u + "/v1/chat/completions", json={"messages": user("x")}).status_code == 401
    assert httpx.get(u + "/v1/models").status_code == 401
    assert httpx.get(u + "/metrics").status_code == 401
    assert httpx.get(u + "/healthz").json() == {"status": "ok"}
    h = httpx.get(u + "/healthz", headers=H(world)).json()
    assert h["kind"] == "extract" and h["backend"] == "gguf" and h["router"] == "pass-through"
    assert h["streaming"] == "live" and h["max_tokens"] == 40 and h["n_ctx_per_seq"] == 256 and h["max_batch"] == 4
    assert httpx.get(u + "/v1/models", headers=H(world)).json()["data"][0]["id"] == "slots"
    httpx.post(u + "/v1/chat/completions", headers=H(world), timeout=60,
               json={"messages": user("play something from doha"), "max_tokens": 16})
    m = httpx.get(u + "/metrics", headers=H(world))
    assert m.status_code == 200 and m.headers["content-type"].startswith("text/plain")
    lines = dict(line.rsplit(" ", 1) for line in m.text.splitlines() if line and not line.startswith("#"))
    assert float(lines['distill_tokens_total{kind="completion"}']) >= 1
    assert float(lines["distill_engine_tokens_generated"]) >= 1 and float(lines["distill_engine_slots"]) == 4
    assert float(lines['distill_route_reason_total{reason="pass_through"}']) >= 1
    assert float(lines['distill_request_latency_seconds_count{endpoint="/v1/chat/completions",model=""}']) >= 1
    doc = httpx.get(u + "/openapi.json", headers=H(world))
    assert doc.status_code == 200
    assert {"/v1/chat/completions", "/v1/feedback", "/v1/models", "/metrics", "/healthz"} <= set(doc.json()["paths"])


def test_feedback_validates_against_the_schema(world, plain):
    r = httpx.post(plain.url + "/v1/chat/completions", headers=H(world), timeout=60,
                   json={"messages": user("rain in kyiv"), "max_tokens": 40})
    rid = r.json()["distill"]["id"]
    good = {"intent": "weather", "slots": {"city": "kyiv"}}
    f = httpx.post(plain.url + "/v1/feedback", headers=H(world), json={"id": rid, "answer": json.dumps(good)})
    assert f.status_code == 200, f.text
    e = {x.id: x for x in queue(world, "feedback")}[f.json()["queued"]]
    assert e.text == "rain in kyiv" and e.teacher_answer == good
    bad = httpx.post(plain.url + "/v1/feedback", headers=H(world), json={"text": "x", "answer": {"intent": "golf"}})
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "answer"


def test_shadow_disagreements_are_queued_after_the_response(world, plain):
    # every request on `plain` is shadowed; the teacher's answer is one no student writes
    text = "shadow: play songs from baku"
    r = httpx.post(plain.url + "/v1/chat/completions", headers=H(world), timeout=60,
                   json={"messages": user(text), "max_tokens": 40})
    assert r.status_code == 200 and r.json()["distill"]["routed_to"] == "student"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not [e for e in queue(world, "shadow_disagreement") if e.text == text]:
        time.sleep(0.1)
    e = next(e for e in queue(world, "shadow_disagreement") if e.text == text)
    assert e.teacher_answer == TEACHER_ANSWER and e.student_answer != TEACHER_ANSWER and 0 < e.student_conf <= 1


def test_routed_answers_come_from_the_teacher_and_are_queued_before_the_response(world, routed):
    text = "routed: rain in bern"
    r = httpx.post(routed.url + "/v1/chat/completions", headers=H(world), timeout=60,
                   json={"messages": user(text), "max_tokens": 40})
    # checked right after the response: the entry was committed before it was sent
    entries = [e for e in queue(world, "routed") if e.text == text]
    assert r.status_code == 200, r.text
    body = r.json()
    assert json.loads(body["choices"][0]["message"]["content"]) == TEACHER_ANSWER
    d = body["distill"]
    assert d["routed_to"] == "teacher" and d["reason"] == "low_confidence" and d["teacher"] == "ok" and not d["degraded"]
    assert len(entries) == 1 and entries[0].teacher_answer == TEACHER_ANSWER and 0 < entries[0].student_conf <= 1
    assert body["usage"]["completion_tokens"] >= 5        # the teacher's answer, in the student's tokens
    # the same ledger as labelling: the paid call is in teacher_calls, and the same input is then a cache hit
    p = Project.open(world["root"])
    calls = [c for c in p.store.q("SELECT teacher, status, request FROM teacher_calls") if text in c["request"]]
    p.close()
    assert len(calls) == 1 and calls[0]["teacher"] == "rec" and calls[0]["status"] == "ok"
    r2 = httpx.post(routed.url + "/v1/chat/completions", headers=H(world), timeout=60,
                    json={"messages": user(text), "max_tokens": 40})
    assert r2.json()["distill"]["teacher"] == "cache_hit"


def test_routed_stream_is_buffered_and_queued_before_the_first_byte(world, routed):
    text = "routed stream: music from oslo"
    c = client(world, routed)
    stream = c.chat.completions.create(model="slots", messages=user(text), max_tokens=40, stream=True,
                                       stream_options={"include_usage": True})
    first = next(iter(stream))
    assert [e for e in queue(world, "routed") if e.text == text]     # queued before the first chunk
    assert first.model_extra["distill"]["streamed"] == "buffered"
    rest = list(stream)
    content = (first.choices[0].delta.content or "") + "".join(
        ch.choices[0].delta.content or "" for ch in rest if ch.choices)
    assert json.loads(content) == TEACHER_ANSWER
    assert rest[-1].usage.completion_tokens >= 5


def test_teacher_failure_degrades_to_the_student_and_is_queued(world):
    s = start(world, router=RouteAll("teacher"), teacher=StandInTeacher(fail=True))
    try:
        text = "degraded: weather in rome"
        r = httpx.post(s.url + "/v1/chat/completions", headers=H(world), timeout=60,
                       json={"messages": user(text), "max_tokens": 40})
        entries = [e for e in queue(world, "degraded") if e.text == text]
        assert r.status_code == 200, r.text
        d = r.json()["distill"]
        assert d["degraded"] and d["routed_to"] == "teacher" and d["teacher"] == "error"
        assert r.json()["choices"][0]["message"]["content"] == d["student_content"]
        assert len(entries) == 1 and entries[0].teacher_answer is None
        m = httpx.get(s.url + "/metrics", headers=H(world)).text
        assert "distill_degraded_total 1.0" in m
    finally:
        s.stop()


def test_a_failing_router_sends_the_request_to_the_teacher_never_a_500(world):
    class Broken(RouteAll):
        def decide(self, res):
            raise RuntimeError("boom")

    s = start(world, router=Broken(), teacher=StandInTeacher())
    try:
        r = httpx.post(s.url + "/v1/chat/completions", headers=H(world), timeout=60,
                       json={"messages": user("router error: weather in oslo"), "max_tokens": 40})
        assert r.status_code == 200, r.text
        d = r.json()["distill"]
        assert d["routed_to"] == "teacher" and d["reason"] == "router_error" and not d["degraded"]
    finally:
        s.stop()


def test_teacher_answer_must_fit_the_clients_schema(world, routed):
    """Routed with a client schema the teacher's (task) answer does not fit: degraded, the student's answer
    (which does fit: constrained decoding) is served."""
    colour = {"type": "object", "properties": {"colour": {"enum": ["red", "blue"]}}, "required": ["colour"],
              "additionalProperties": False}
    r = httpx.post(routed.url + "/v1/chat/completions", headers=H(world), timeout=60, json={
        "messages": user("format mismatch: sky colour"), "max_tokens": 24,
        "response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": colour}}})
    d = r.json()["distill"]
    assert r.status_code == 200 and d["degraded"] and d["teacher"] == "format_mismatch"
    jsonschema.validate(json.loads(r.json()["choices"][0]["message"]["content"]), colour)


def test_setup_errors_are_distill_errors(world, tmp_path):
    # a trained-looking run without a GGUF export: the hint says how to make one
    p = Project.open(world["root"])
    run_dir = tmp_path / "r1"
    run_dir.mkdir()
    p.record_run("r1", "train_lm", "done", run_dir, {})
    p.close()
    with pytest.raises(DistillError, match="GGUF") as e:
        create_app(world["root"], model_path=run_dir)
    assert "--format gguf" in str(e.value)
    with pytest.raises(DistillError, match="max_batch"):
        create_app(world["root"], model_path=world["gguf"], config=ServeConfig(max_batch=0))


def test_client_disconnect_cancels_the_generation(world):
    """A streaming client that leaves after the first chunk: the engine drops its sequence."""
    s = start(world, max_tokens=200)
    try:
        engine = s.server.config.app.state.student.engine
        before = engine.stats()["requests_cancelled"]
        free_text = {"type": "object", "properties": {"story": {"type": "string"}}, "required": ["story"]}
        with httpx.stream("POST", s.url + "/v1/chat/completions", headers=H(world), timeout=60, json={
                "messages": user("tell a long story about a city"), "max_tokens": 200, "stream": True,
                "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": free_text}}}) as r:
            for line in r.iter_lines():
                if line.startswith("data:") and "content" in line:
                    break
        deadline = time.monotonic() + 10
        while engine.stats()["requests_cancelled"] == before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.stats()["requests_cancelled"] == before + 1
    finally:
        s.stop()


def test_generate_project_is_unconstrained_unless_asked(world, tmp_path):
    """kind generate: free text by default; response_format json_object gives a JSON object."""
    from distill.serve.keys import create_key

    p = Project.init(tmp_path / "gen", "generate", SPEC.replace("kind: extract", "kind: generate").replace(
        f"schema: {json.dumps(SCHEMA)}\n", "").replace("name: slots", "name: gen"))
    _, key = create_key(p.store, "gen")
    p.close()
    s = InProcessServer(create_app(tmp_path / "gen", model_path=world["gguf"], teacher=StandInTeacher(),
                                   config=ServeConfig(**CFG)))
    try:
        h = {"Authorization": f"Bearer {key}"}
        r = httpx.post(s.url + "/v1/chat/completions", headers=h, timeout=60,
                       json={"messages": user("write one line about rain"), "max_tokens": 12})
        assert r.status_code == 200 and r.json()["distill"]["format"] == "text"
        assert r.json()["choices"][0]["message"]["content"].strip()
        r = httpx.post(s.url + "/v1/chat/completions", headers=h, timeout=60, json={
            "messages": user("describe rain as JSON"), "max_tokens": 40, "response_format": {"type": "json_object"}})
        body = r.json()
        assert r.status_code == 200 and body["distill"]["format"] == "json_object"
        if body["choices"][0]["finish_reason"] == "stop":
            assert isinstance(json.loads(body["choices"][0]["message"]["content"]), dict)
        f = httpx.post(s.url + "/v1/feedback", headers=h, json={"text": "x", "answer": "a better line"})
        assert f.status_code == 200
    finally:
        s.stop()


def test_cli_serve_options(world, tmp_path):
    """`distill serve` with the LM options, as a user starts it."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reliability"))
    from serving import ServeProcess

    s = ServeProcess(world["root"], args=("--model", world["gguf"], "--max-tokens", 16, "--n-ctx", 256,
                                          "--max-batch", 2, "--threads", 1), log=tmp_path / "serve.log")
    try:
        h = httpx.get(s.url + "/healthz", headers=H(world)).json()
        assert (h["max_tokens"], h["n_ctx_per_seq"], h["max_batch"]) == (16, 256, 2)
        r = httpx.post(s.url + "/v1/chat/completions", headers=H(world), timeout=60,
                       json={"messages": user("rain in lima"), "max_tokens": 100})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 16
    finally:
        s.stop()

