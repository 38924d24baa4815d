"""The service for extract and generate projects: the GGUF export of the student answers chat completions,
the router decides on its answer whether the teacher should answer instead, and everything routed or
disagreeing lands in the failure queue. ``distill serve PROJECT`` picks this app for kind extract/generate
(``distill.serve.app.create_app`` hands over); it shares the classify app's guard, keys, error shape, store
writer, teacher gate, queue and metrics.

    distill export PROJECT --format gguf     # once: the model the service loads
    distill serve PROJECT --port 8000 [--max-tokens 256 --max-batch 8 --shadow 0.05]

Endpoints (``Authorization: Bearer <key>`` as for classify):

- ``POST /v1/chat/completions`` (OpenAI-compatible; the ``openai`` client works unchanged). The input is the
  last user message's text; it is rendered as the labeller renders it (``render_messages``) and then as the
  student was trained to read it (``GGUFStudent.prompt_tokens``), so the client's system prompt and earlier
  turns are ignored. ``max_tokens`` / ``max_completion_tokens`` are capped at the server's ``max_tokens`` and
  at what is left of the context. ``usage`` counts real tokens in the student's tokenizer: the prompt the
  student read, and the answer served (the student's generated tokens, or the teacher's answer re-tokenised).
  ``logprobs: true`` adds the student's per-token log-probabilities (when the student answered).
- ``response_format`` (constrained decoding: the engine's grammar, so the answer cannot leave the schema):
  ``text`` (default) / ``json_object`` / ``json_schema`` (``json_schema.schema`` is enforced). An extract
  project always enforces a schema: the task's, unless the client sends its own. Anything else is a 400
  naming ``response_format.type``; a schema that does not compile is a 400 naming
  ``response_format.json_schema.schema``; a prompt longer than the context is a 400 with both numbers.
- ``POST /v1/feedback`` ``{"id" | "text", "answer", "note"}``: the corrected answer (extract: a JSON object, or
  its JSON text, that validates against the task schema; generate: text) -> the failure queue.
- ``GET /v1/models``, ``GET /healthz``, ``GET /metrics`` (plus the engine's gauges: slots, queue, batch sizes,
  tokens).

Routing. The router (``lm_router.json`` in the GGUF export folder, from route calibration; without it every
answer is the student's) reads the student's finished answer: its token log-probabilities, whether the
grammar had to override the model, optionally the prompt embedding. A routed input is answered by the
teacher through ``TeacherGate``: the labeller's prompt and cache key, so a cached answer is free and a paid
call lands in ``teacher_calls`` like labelling spend. For extract the teacher's answer (a dict) is served as
``json.dumps(answer, ensure_ascii=False)``. The teacher's answer must fit the request's ``response_format``
too (a client schema, or a JSON object); if it does not, or the teacher is down, slow or unparseable, the
student's answer goes out with ``degraded: true`` and a 'degraded' queue entry. When the student's own
answer breaks the enforced schema (the token budget ran out mid-object), it is sent to the teacher as well
(reason ``invalid_answer``; not in a live stream, whose tokens are already out), so an extract answer the
service sends validates unless it is degraded or its ``finish_reason`` is ``length``
(``distill.valid`` says which).

Queue entries (``routed``, ``degraded``, ``shadow_disagreement``, ``feedback``) store answers as JSON text:
extract answers as the object (the raw text when it did not parse), generate answers as a string.
``student_conf`` is exp(mean token log-probability): the geometric mean of the student's per-token
probabilities, in (0, 1] like a classifier's confidence. Entries are committed before the response is
sent; with ``stream: true`` before its first byte.

Streaming (``stream: true``): OpenAI's chat.completion.chunk events (role chunk, content deltas, a final chunk
with ``finish_reason``, a usage chunk when ``stream_options.include_usage``, ``data: [DONE]``).
- Pass-through router: the router cannot send anything to the teacher, so tokens stream as the engine
  decodes them (``distill.streamed = "live"``, in the final chunk).
- Calibrated router: the decision needs the whole answer (its log-probabilities), so the answer is
  generated, decided and queued first, and then streamed (``distill.streamed = "buffered"``, in the first
  chunk). Time to first token is then the whole generation.
A client that disconnects cancels its generation (``GGUFEngine.cancel``), streamed or not.

Shadow mode as for classify: a seeded share of student-answered requests is re-asked in the background
after the response; when the answers differ once parsed (``answer_key``: canonical JSON for extract,
whitespace- and case-folded text for generate) a 'shadow_disagreement' entry is queued. Requests with a
client schema are never shadowed: the teacher answers the task's schema, not theirs.

Concurrency: the engine batches the sequences of concurrent requests (up to ``max_batch`` slots, the rest
wait in its queue) on its own thread; the event loop only tokenises, routes and writes through
``StoreWriter``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

import jsonschema
from fastapi import Request
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from distill import runs
from distill.errors import DistillError
from distill.export.gguf import gguf_export_for
from distill.project import Project
from distill.serve import keys as keys_mod
from distill.serve import queue as fq
from distill.serve.common import (
    BODY_ERRORS,
    ROLES,
    ChatMessage,
    FeedbackOut,
    ModelList,
    Reject,
    ServeConfig,
    Usage,
    app_skeleton,
    bearer_openapi,
    chat_responses,
    error_responses,
    feedback_input,
    last_user_text,
    serving,
)
from distill.serve.lm_router import LM_ROUTER_FILE, LMDecision, LMRouter
from distill.serve.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE, Metrics
from distill.students.gguf_engine import (
    ContextLengthError,
    GenRequest,
    GenResult,
    GGUFStudent,
    TokenEvent,
    schema_grammar,
)
from distill.task import answer_key, render_messages

log = logging.getLogger("distill.serve")

FORMATS = ("text", "json_object", "json_schema")


# ------------------------------------------------------------------------------------------------
# the model: the GGUF export of the serving run


def gguf_model(project: Project, pinned: str | Path | None) -> tuple[runs.ModelRef, Path]:
    """(the serving model, its GGUF export folder). ``pinned`` (``--model``) may be a GGUF export folder itself
    or a training run's folder (whose GGUF export is then used)."""
    ref = project.serving_model(pinned)
    if pinned is not None and any(ref.path.glob("*.gguf")):
        return ref, ref.path
    folder = gguf_export_for(project, ref.run_id) if ref.kind != "pinned" else None
    if folder is None:
        what = (f"--model {pinned} is neither a GGUF export folder (no .gguf inside) nor a training run of this "
                "project" if ref.kind == "pinned" else f"model {ref.run_id} has no GGUF export")
        raise DistillError(f"{project.root}: {what}; extract/generate students are served from their GGUF export",
                           hint=f"run `distill export {project.root} --format gguf` (or pin an export folder with "
                                "--model FOLDER)")
    return ref, Path(folder)


def load_lm_router(folder: Path) -> tuple[LMRouter, bool]:
    """The calibrated router saved in the export folder, or a pass-through one (student answers all)."""
    if (Path(folder) / LM_ROUTER_FILE).exists():
        return LMRouter.load(folder), True
    log.warning("%s: no %s; the student answers everything (calibrate the router to route hard inputs)",
                folder, LM_ROUTER_FILE)
    return LMRouter.pass_through(), False


class _Format:
    """What a request's ``response_format`` asks for, resolved against the project: the grammar the engine
    enforces and the check a served answer must pass."""

    def __init__(self, kind: Literal["text", "json_object", "task_schema", "client_schema"],
                 schema: dict | None, grammar: str | None):
        self.kind, self.schema, self.grammar = kind, schema, grammar
        # built once: jsonschema.validate would re-check the schema itself on every answer (the hot path)
        self.validator = jsonschema.validators.validator_for(schema)(schema) if schema is not None else None

    def parse(self, content: str) -> tuple[Any, bool]:
        """(the answer as the queue stores it, whether it fits): an object for JSON formats (the text itself
        when it is not JSON), the text for ``text``."""
        if self.kind == "text":
            return content, True
        try:
            obj = json.loads(content)
        except (ValueError, RecursionError):
            return content, False
        if not isinstance(obj, dict):
            return obj, False
        if self.validator is not None and not self.validator.is_valid(obj):
            return obj, False
        return obj, True


# ------------------------------------------------------------------------------------------------
# the app


def create_lm_app(project_dir: str | Path, cfg: ServeConfig, *, teacher=None, router=None,
                  student: GGUFStudent | None = None):
    """The FastAPI app of an extract/generate project (``create_app`` calls this; ``cfg`` is checked there).
    ``teacher`` / ``router`` / ``student`` replace the project's (tests, or a custom set-up); a router needs
    ``decide(GenResult) -> LMDecision`` and may say ``needs_embedding`` and ``calibrated`` (False: answers
    stream live)."""
    project = Project.open(project_dir)
    spec = project.spec
    try:
        chosen, folder = gguf_model(project, cfg.model_path)
        tspec = project.spec.get_teacher(cfg.teacher) if project.spec.teachers else None
    finally:
        project.close()     # re-opened in the event loop's thread (sqlite connections are per thread)
    cap = cfg.max_tokens or (tspec.max_tokens if tspec is not None else 256)
    if router is None:
        router, calibrated = load_lm_router(folder)
    else:
        calibrated = bool(getattr(router, "calibrated", True))
    live = not calibrated               # nothing can be routed: stream tokens as they are decoded
    max_chars = cfg.max_text_chars or spec.max_text_chars
    if student is None:
        student = GGUFStudent(folder, n_ctx_per_seq=cfg.n_ctx_per_seq, max_batch=cfg.max_batch, n_threads=cfg.n_threads)
    engine = student.engine
    # the task's grammar is compiled once, now: a task schema the engine cannot enforce fails at start-up
    task_format = None
    if spec.kind == "extract":
        task_format = _Format("task_schema", spec.json_schema, schema_grammar(spec.json_schema))
    json_object_grammar = schema_grammar(None, json_object=True)
    metrics = Metrics()
    state: dict[str, Any] = {}
    recent: OrderedDict[str, dict] = OrderedDict()
    rng = random.Random(cfg.seed)
    background: set[asyncio.Task] = set()

    @asynccontextmanager
    async def lifespan(app):
        try:
            async with serving(project_dir, cfg, metrics, state, background, teacher):
                log.info("serving %s (%s): model %s from %s; router %s; max %d tokens, %d slots of %d tokens; "
                         "shadow %.3f", spec.name, spec.kind, chosen.describe(), folder,
                         "calibrated" if calibrated else "pass-through", cap, engine.max_batch, engine.n_ctx_per_seq,
                         cfg.shadow_rate)
                yield
        finally:
            student.close()

    def key_ok(raw: str | None) -> bool:
        return keys_mod.verify_key(state["project"].store, raw) is not None

    app = app_skeleton(f"distill: {spec.name}", lifespan, cfg, metrics, key_ok)
    app.state.model = chosen
    app.state.student = student      # tests read the engine's stats

    # -- one request, step by step ------------------------------------------------------------------
    def the_input(body: LMChatCompletionIn) -> str:
        i, text = last_user_text(body.messages)
        if text is None:
            raise Reject(422, "no user message with text content", "the last user message is the input",
                         param="messages")
        where = f"messages[{i}].content"
        if len(text) > max_chars:
            raise Reject(422, f"`{where}` has {len(text)} characters; the limit is {max_chars}",
                         "shorten the text (the limit is `max_text_chars` in distill.yaml)", param=where)
        if not text.strip():
            raise Reject(422, f"`{where}` is empty", "send a non-empty user message", param=where)
        return text

    def the_format(rf: ResponseFormatIn | None) -> _Format:
        kind = "text" if rf is None else rf.type
        if kind not in FORMATS:
            raise Reject(400, f"`response_format.type` {kind!r} is not one of {list(FORMATS)}",
                         "send text, json_object, or json_schema with json_schema.schema", param="response_format.type")
        if kind == "json_schema":
            where = "response_format.json_schema.schema"
            schema = (rf.json_schema or {}).get("schema")
            if not isinstance(schema, dict):
                raise Reject(400, f"`{where}` is missing or not an object", "send the JSON schema the answer must "
                             "follow under response_format.json_schema.schema", param=where)
            try:
                jsonschema.Draft202012Validator.check_schema(schema)
            except jsonschema.SchemaError as e:
                raise Reject(400, f"`{where}` is not a valid JSON schema: {e.message}", param=where) from None
            try:
                grammar = schema_grammar(schema)     # cached by schema
            except DistillError as e:
                raise Reject(400, f"`{where}` cannot be enforced by constrained decoding: {e.message}",
                             e.hint or "simplify the schema (e.g. drop unsupported keywords)", param=where) from None
            return _Format("client_schema", schema, grammar)
        if task_format is not None:          # extract: always the task's schema (json_object included)
            return task_format
        if kind == "json_object":
            return _Format("json_object", None, json_object_grammar)
        return _Format("text", None, None)

    def the_request(body: LMChatCompletionIn, text: str, fmt: _Format) -> GenRequest:
        if body.n not in (None, 1):
            raise Reject(400, f"`n` is {body.n}; this server answers with one choice", "send n: 1", param="n")
        prompt = student.prompt_tokens(render_messages(spec, text))
        room = engine.n_ctx_per_seq - len(prompt)
        if room < 1:
            i, _ = last_user_text(body.messages)
            raise Reject(400, f"the prompt is {len(prompt)} tokens; the context holds {engine.n_ctx_per_seq} "
                         "(prompt and answer together)", "shorten the input (or serve with a larger --n-ctx)",
                         param=f"messages[{i}].content")
        want = body.max_completion_tokens or body.max_tokens or cap
        return GenRequest(prompt_tokens=prompt, max_tokens=max(1, min(want, cap, room)), grammar=fmt.grammar,
                          want_embedding=bool(getattr(router, "needs_embedding", False)),
                          temperature=float(body.temperature or 0.0),
                          seed=None if body.seed is None else body.seed & 0xFFFFFFFF)

    def submit(req: GenRequest, on_token=None):
        try:
            return engine.submit(req, on_token=on_token)
        except ContextLengthError as e:
            raise Reject(400, e.message, e.hint or "shorten the input", param="messages") from None

    async def generated(fut, request: Request) -> GenResult | None:
        """The engine's result; None when the client left meanwhile (its generation is cancelled)."""
        task = asyncio.wrap_future(fut)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=0.25)
                if done:
                    return task.result()
                if await request.is_disconnected():
                    engine.cancel(fut)
                    log.info("client left: generation cancelled")
                    return None
        except asyncio.CancelledError:
            engine.cancel(fut)
            raise

    async def decide(text: str, res: GenResult, fmt: _Format, mode: str | None, t0: float) -> dict[str, Any]:
        """Route the student's answer, ask the teacher when routed, commit the queue entries. Returns the
        served content and the ``distill`` object."""
        try:
            if getattr(router, "needs_text", False):     # the OOD signal embeds the input (a frozen encoder pass)
                d = await asyncio.to_thread(router.decide, res, text)
            else:
                d = router.decide(res)
        except Exception:
            # a failing router never fails the request: the teacher answers (route reason 'router_error')
            log.exception("LM router failed; sending the request to the teacher")
            d = LMDecision("teacher", "router_error", {})
        student_answer, valid = fmt.parse(res.text)
        conf = _confidence(res)
        routed_to, reason = d.routed_to, d.reason
        if mode == "live" and routed_to == "teacher":
            # the answer is already out (only a calibrated router routes, and it never streams live)
            log.warning("live stream: the router wanted the teacher (%s) after the student's answer was sent", reason)
            routed_to = "student"
        if routed_to == "student" and not valid and mode != "live":
            routed_to, reason = "teacher", "invalid_answer"      # never serve an answer that breaks the schema
        content, finish, degraded, outcome, teacher_ans = res.text, res.finish_reason, False, None, None
        entry = None
        if routed_to == "teacher":
            teacher_ans, outcome = await state["gate"].answer(text)
            if teacher_ans is not None:
                t_content = json.dumps(teacher_ans, ensure_ascii=False) if spec.kind == "extract" else str(teacher_ans)
                if fmt.kind in ("client_schema", "json_object") and not fmt.parse(t_content)[1]:
                    teacher_ans, outcome = None, "format_mismatch"    # it answered the task, not this format
                else:
                    content, finish = t_content, "stop"
            if teacher_ans is None:
                degraded = True
                entry = {"text": text, "reason": "degraded", "student_answer": student_answer, "student_conf": conf,
                         "note": f"router: {reason}; teacher: {outcome}"}
            else:
                entry = {"text": text, "reason": "routed", "student_answer": student_answer, "student_conf": conf,
                         "teacher_answer": teacher_ans, "note": f"router: {reason}"}
        if entry is not None:
            # committed before the response (or its first byte) exists
            await state["writer"].run(fq.enqueue_many, [entry])
        by_teacher = routed_to == "teacher" and not degraded
        rid = "res-" + uuid.uuid4().hex[:16]
        completion = student.count_tokens(content) if by_teacher else res.completion_tokens
        r = {"id": rid, "routed_to": routed_to, "reason": reason, "signals": _signals(d.signals), "degraded": degraded,
             "teacher": outcome, "confidence": conf, "student_content": res.text,
             "student_finish_reason": res.finish_reason, "valid": fmt.parse(content)[1] if by_teacher else valid,
             "format": fmt.kind, "streamed": mode, "interventions": res.interventions,
             "latency_ms": round((time.perf_counter() - t0) * 1000, 3)}
        metrics.answered("teacher" if by_teacher else "student", reason, degraded)
        metrics.tokens("prompt", res.prompt_tokens)
        metrics.tokens("completion", completion)
        recent[rid] = {"text": text, "answer": teacher_ans if by_teacher else student_answer, "conf": conf}
        while len(recent) > cfg.recent_ids:
            recent.popitem(last=False)
        if (routed_to == "student" and fmt.kind != "client_schema" and cfg.shadow_rate > 0
                and rng.random() < cfg.shadow_rate):
            task = asyncio.get_running_loop().create_task(shadow(rid, text, student_answer, conf))
            background.add(task)
            task.add_done_callback(background.discard)
        usage = {"prompt_tokens": res.prompt_tokens, "completion_tokens": completion,
                 "total_tokens": res.prompt_tokens + completion}
        logprobs = _logprobs(student, res) if not by_teacher else None
        return {"content": content, "finish_reason": finish, "usage": usage, "distill": r, "logprobs": logprobs}

    async def shadow(rid: str, text: str, student_answer: Any, conf: float) -> None:
        ans, outcome = await state["gate"].answer(text)
        if ans is None:
            log.info("shadow %s: no teacher answer (%s)", rid, outcome)
            return
        metrics.shadow(answer_key(spec, ans) != answer_key(spec, student_answer))
        if answer_key(spec, ans) != answer_key(spec, student_answer):
            try:
                await state["writer"].run(fq.enqueue, text, "shadow_disagreement", student_answer=student_answer,
                                          student_conf=conf, teacher_answer=ans, note=f"result {rid}")
            except DistillError as e:      # nobody waits for this answer: log it
                log.error("shadow %s: could not queue the disagreement: %s", rid, e.message)
                return
            log.info("shadow %s: teacher and student disagree (student confidence %.3f)", rid, conf)

    def chunk(cid: str, created: int, choices: list, **extra) -> str:
        c = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": spec.name,
             "choices": choices, **extra}
        return f"data: {json.dumps(c, ensure_ascii=False)}\n\n"

    async def buffered_stream(cid: str, created: int, out: dict, include_usage: bool) -> AsyncIterator[str]:
        """The decided answer as events: role + content, then the finish reason, usage, [DONE]."""
        yield chunk(cid, created, [{"index": 0, "delta": {"role": "assistant", "content": out["content"]},
                                    "finish_reason": None, "logprobs": out["logprobs"]}], distill=out["distill"])
        yield chunk(cid, created, [{"index": 0, "delta": {}, "finish_reason": out["finish_reason"], "logprobs": None}])
        if include_usage:
            yield chunk(cid, created, [], usage=out["usage"])
        yield "data: [DONE]\n\n"

    async def live_stream(cid: str, created: int, text: str, fmt: _Format, fut, events: asyncio.Queue,
                          want_logprobs: bool, include_usage: bool, t0: float) -> AsyncIterator[str]:
        """Tokens as the engine decodes them; the router still reads the finished answer (for its signals,
        metrics and shadow mode), but a pass-through router never routes. A disconnect cancels the
        generation (Starlette cancels this generator)."""
        try:
            yield chunk(cid, created, [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                        "finish_reason": None, "logprobs": None}])
            while True:
                ev = await events.get()
                if ev is None:
                    break
                if ev.text:
                    lp = {"content": [_token_logprob(ev.text, ev.logprob)]} if want_logprobs else None
                    yield chunk(cid, created, [{"index": 0, "delta": {"content": ev.text}, "finish_reason": None,
                                                "logprobs": lp}])
            try:
                res = fut.result()
            except Exception as e:  # noqa: BLE001 - headers are sent: the error goes in the stream
                log.error("generation failed mid-stream: %s: %s", type(e).__name__, e)
                yield f"data: {json.dumps({'error': {'message': 'generation failed', 'type': 'server_error', 'code': 500}})}\n\n"
                return
            out = await decide(text, res, fmt, "live", t0)
            yield chunk(cid, created, [{"index": 0, "delta": {}, "finish_reason": out["finish_reason"],
                                        "logprobs": None}], distill=out["distill"])
            if include_usage:
                yield chunk(cid, created, [], usage=out["usage"])
            yield "data: [DONE]\n\n"
        finally:
            if not fut.done():
                engine.cancel(fut)
                log.info("client left mid-stream: generation cancelled")

    # -- endpoints ----------------------------------------------------------------------------------
    @app.post("/v1/chat/completions", responses=chat_responses(
        LMChatCompletionOut, "stream: true — chat.completion.chunk events (role, content deltas, finish reason, usage "
        "if asked for), then [DONE]", _lm_errors(*BODY_ERRORS)))
    async def chat(body: LMChatCompletionIn, request: Request):
        t0 = time.perf_counter()
        text = the_input(body)
        fmt = the_format(body.response_format)
        req = the_request(body, text, fmt)
        cid, created = "chatcmpl-" + uuid.uuid4().hex[:24], int(time.time())
        include_usage = bool(body.stream_options and body.stream_options.get("include_usage") is True)
        if body.stream and live:
            loop = asyncio.get_running_loop()
            events: asyncio.Queue = asyncio.Queue()

            def on_token(ev: TokenEvent) -> None:       # the engine's thread
                loop.call_soon_threadsafe(events.put_nowait, ev)

            fut = submit(req, on_token)
            fut.add_done_callback(lambda _: loop.call_soon_threadsafe(events.put_nowait, None))
            return StreamingResponse(live_stream(cid, created, text, fmt, fut, events, bool(body.logprobs),
                                                 include_usage, t0),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        res = await generated(submit(req), request)
        if res is None:
            return Response(status_code=499)        # nobody is listening
        out = await decide(text, res, fmt, "buffered" if body.stream else None, t0)
        if body.stream:
            return StreamingResponse(buffered_stream(cid, created, out, include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return {"id": cid, "object": "chat.completion", "created": created, "model": spec.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": out["content"]},
                             "finish_reason": out["finish_reason"],
                             "logprobs": out["logprobs"] if body.logprobs else None}],
                "usage": out["usage"], "distill": out["distill"]}

    @app.post("/v1/feedback", responses={200: {"model": FeedbackOut}, **_lm_errors(*BODY_ERRORS)})
    async def feedback(body: LMFeedbackIn):
        answer = _feedback_answer(spec, body.answer)
        text, student, conf = feedback_input(recent, body.id, body.text, max_chars, cfg.recent_ids, "answer",
                                             "a chat completion's distill.id")
        qid = await state["writer"].run(fq.enqueue, text, "feedback", student_answer=student, student_conf=conf,
                                        teacher_answer=answer, note=body.note)
        metrics.feedback()
        return {"queued": qid}

    @app.get("/healthz", responses={200: {"model": LMHealthOut}})
    async def healthz(request: Request):
        body: dict[str, Any] = {"status": "ok"}
        if cfg.require_key and not key_ok(keys_mod.bearer(request.headers.get("authorization"))):
            return body
        gate = state.get("gate")
        body.update({"project": spec.name, "kind": spec.kind, "model": chosen.run_id, "model_path": str(folder),
                     "model_why": chosen.why, "backend": "gguf", "gguf_file": Path(student.gguf_file).name,
                     "router": "calibrated" if calibrated else "pass-through", "streaming": "live" if live else "buffered",
                     "max_tokens": cap, "n_ctx_per_seq": engine.n_ctx_per_seq, "max_batch": engine.max_batch,
                     "teacher": None if gate is None or gate.tspec is None else gate.tspec.name,
                     "teacher_problem": None if gate is None else gate.problem, "shadow_rate": cfg.shadow_rate})
        return body

    @app.get("/metrics", response_class=PlainTextResponse, responses={
        200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text"},
        **_lm_errors(401)})
    async def metrics_endpoint():
        return Response(metrics.render(fq.counts(state["project"].store), engine.stats()),
                        media_type=METRICS_CONTENT_TYPE)

    @app.get("/v1/models", responses={200: {"model": ModelList}, **_lm_errors(401)})
    async def models():
        return {"object": "list", "data": [{"id": spec.name, "object": "model", "created": 0, "owned_by": "distill"}]}

    app.openapi = bearer_openapi(app, lambda schemas: _document_limits(schemas, max_chars))
    return app


# ------------------------------------------------------------------------------------------------
# helpers


def _confidence(res: GenResult) -> float:
    """exp(mean token log-probability): the geometric mean of the per-token probabilities, in (0, 1]."""
    lps = [lp for lp in res.token_logprobs if lp is not None and math.isfinite(lp)]
    return round(math.exp(sum(lps) / len(lps)), 6) if lps else 1.0


def _signals(signals: dict) -> dict[str, float | bool | None]:
    # JSON has no NaN/inf: a signal that is not a finite number is reported as null
    out: dict[str, float | bool | None] = {}
    for k, v in (signals or {}).items():
        if isinstance(v, bool) or v is None:
            out[k] = v
        else:
            try:
                f = float(v)
            except (TypeError, ValueError):
                continue
            out[k] = f if math.isfinite(f) else None
    return out


def _token_logprob(token: str, logprob: float) -> dict:
    lp = float(logprob) if logprob is not None and math.isfinite(logprob) else -9999.0
    return {"token": token, "logprob": lp, "bytes": list(token.encode("utf-8")), "top_logprobs": []}


def _logprobs(student: GGUFStudent, res: GenResult) -> dict | None:
    """OpenAI's ``choices[0].logprobs``: one entry per generated token (its text, log-probability, bytes)."""
    tokens = list(getattr(res, "tokens", None) or [])
    if not tokens or len(tokens) != len(res.token_logprobs):
        return None
    return {"content": [_token_logprob(student.tokenizer.decode([t]), lp) for t, lp in zip(tokens, res.token_logprobs)]}


def _feedback_answer(spec, answer: Any) -> Any:
    """The corrected answer as the queue stores it; for extract it must validate against the task schema."""
    if spec.kind != "extract":
        if not isinstance(answer, str) or not answer.strip():
            raise Reject(422, "`answer` must be the corrected text", param="answer")
        return answer
    if isinstance(answer, str):
        try:
            answer = json.loads(answer)
        except (ValueError, RecursionError) as e:
            raise Reject(422, f"`answer` is not JSON: {str(e)[:120]}", "send the corrected object, or its JSON text",
                         param="answer") from None
    try:
        jsonschema.validate(answer, spec.json_schema or {})
    except jsonschema.ValidationError as e:
        path = "/".join(str(p) for p in e.absolute_path) or "(root)"
        raise Reject(422, f"`answer` does not fit the task's schema at {path}: {e.message[:200]}",
                     "send an answer that validates against `schema:` in distill.yaml", param="answer") from None
    return answer


# ------------------------------------------------------------------------------------------------
# request and response bodies (the OpenAPI schema at /openapi.json)


class ResponseFormatIn(BaseModel):
    """OpenAI's ``response_format``: ``{"type": "text" | "json_object"}`` or
    ``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}``."""
    model_config = ConfigDict(extra="allow")
    type: str
    json_schema: dict[str, Any] | None = None


class LMChatCompletionIn(BaseModel):
    """An OpenAI chat.completions request: the last user message is the input. Other fields OpenAI clients
    send (top_p, stop, presence_penalty, user, ...) are accepted and ignored."""
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    messages: list[ChatMessage]
    stream: bool | None = None
    stream_options: dict[str, Any] | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    response_format: ResponseFormatIn | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    logprobs: bool | None = None
    n: int | None = Field(None, ge=1, le=128)


class LMFeedbackIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str | None = None          # a chat completion's distill.id
    text: str | None = None        # or the input itself
    answer: str | dict[str, Any]   # the right answer: extract, an object (or its JSON text); generate, text
    note: str | None = None


class LMResult(BaseModel):
    id: str                        # refer to it in /v1/feedback
    routed_to: Literal["student", "teacher"]
    reason: str                    # confident | low_confidence | ood | invalid_unconstrained | pass_through | invalid_answer
    signals: dict[str, float | bool | None]   # what the router read (mean_logprob, min_logprob, ...)
    degraded: bool                 # routed to the teacher, which failed: the student answered
    teacher: str | None            # ok | cache_hit | parse_error | timeout | error | no_teacher | format_mismatch
    confidence: float              # exp(mean token log-probability) of the student's answer
    student_content: str           # the student's answer (also when the teacher's was served)
    student_finish_reason: str
    valid: bool                    # the served content fits the enforced format (schema / JSON object)
    format: Literal["text", "json_object", "task_schema", "client_schema"]
    streamed: Literal["live", "buffered"] | None
    interventions: int             # tokens where the grammar overrode the model's own choice
    latency_ms: float


class _LMReply(BaseModel):
    role: Literal["assistant"]
    content: str


class _TokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[dict[str, Any]] = []


class _Logprobs(BaseModel):
    content: list[_TokenLogprob] | None = None


class _LMChoice(BaseModel):
    index: int
    message: _LMReply
    finish_reason: Literal["stop", "length"]
    logprobs: _Logprobs | None = None


class LMChatCompletionOut(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[_LMChoice]
    usage: Usage
    distill: LMResult


class LMHealthOut(BaseModel):
    status: Literal["ok"]
    # with a key only:
    project: str | None = None
    kind: str | None = None
    model: str | None = None
    model_path: str | None = None
    model_why: str | None = None
    backend: str | None = None
    gguf_file: str | None = None
    router: str | None = None
    streaming: str | None = None
    max_tokens: int | None = None
    n_ctx_per_seq: int | None = None
    max_batch: int | None = None
    teacher: str | None = None
    teacher_problem: str | None = None
    shadow_rate: float | None = None


# a 400 here also means a request that cannot be served as asked
_WHY_400 = {400: "the body is not JSON within the limits, or the request cannot be served as asked "
                 "(response_format, schema, prompt longer than the context, n > 1)"}


def _lm_errors(*codes: int) -> dict:
    return error_responses(*codes, why=_WHY_400)


def _document_limits(schemas: dict, max_chars: int) -> None:
    """The limits the handlers check, written into the generated schemas (see app._document_limits)."""
    def texts_in(node):
        if isinstance(node, dict):
            if node.get("type") == "string":
                yield node
            for v in node.get("anyOf", []) + node.get("oneOf", []):
                yield from texts_in(v)

    text = {"minLength": 1, "maxLength": max_chars, "pattern": r"\S"}
    for t in texts_in(schemas["LMFeedbackIn"]["properties"]["text"]):
        t.update(text)
    chat = schemas["LMChatCompletionIn"]["properties"]
    chat["messages"].update(minItems=1, contains={"type": "object", "required": ["role"],
                                                  "properties": {"role": {"const": "user"}}})
    schemas["ResponseFormatIn"]["properties"]["type"]["enum"] = list(FORMATS)
    message = schemas["ChatMessage"]["properties"]
    message["role"]["enum"] = ROLES
    for t in texts_in(message["content"]):
        t.update(text)
