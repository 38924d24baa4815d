"""The service: the student answers, the router decides when the teacher should instead, and everything
the next training round needs lands in the failure queue.

    distill serve PROJECT --port 8000 [--shadow 0.05]

Endpoints (all need ``Authorization: Bearer <key>``; keys: ``distill keys create``; ``/healthz`` answers
``{"status": "ok"}`` without one and the model's details with one; ``/openapi.json``, the request and
response schemas, is for key holders too):

- ``POST /v1/classify`` ``{"texts": [...]}`` -> one result per text: label, probs, confidence, ood_score,
  routed_to (student | teacher), reason, degraded, latency_ms.
- ``POST /v1/chat/completions`` (OpenAI-compatible): the last user message is the input, the label is the
  assistant's reply, ``model`` is the project name. The ``openai`` client works against it unchanged;
  ``stream: true`` sends the label as one chunk (server-sent events); ``usage`` counts the input's tokens
  as the student's tokenizer reads them, and one completion token (the label).
- ``GET /v1/models``, ``GET /healthz``, ``GET /metrics`` (Prometheus text).
- ``POST /v1/feedback`` ``{"id" | "text", "label", "note"}`` -> the failure queue.

Promises:
- Never a 500 because of the teacher: when it is down, slow (``teacher_timeout_s``), refuses our key or
  answers something unparseable, the student's answer goes out with ``degraded: true`` and the input is
  queued with reason 'degraded'.
- Routed requests reuse the project's teacher cache: the prompt is rendered and keyed exactly as the
  labeller does (``render_messages`` + ``cache_key``), a key already in ``teacher_calls`` is answered from
  the store for free, and a paid call is recorded in ``teacher_calls`` in one transaction, so spend shows up
  in the same ledger as labelling.
- Queue entries are committed before the 2xx response is sent.
- Shadow mode: a seeded share of student-answered texts is also sent to the teacher *after* the response
  (a background task), and disagreements are queued and logged. It costs teacher calls, not latency.
- The service logs request ids, labels and timings; never texts' owners' keys, never the teacher's key.
- Bad requests are 4xx in one error shape that names the field, never a 500 (``distill.serve.guard``): 401
  before anything about the body is said, 413 / 408 / 415 / 400 for the body's size, pace, type and JSON,
  then 422 from the request models. Slow clients are cut off (header and body deadlines).

Concurrency model: one event loop, two helper threads. The loop's store connection only reads (API keys,
the teacher cache, queue counts): in WAL mode a reader never waits for a writer. Every write (queue
entries, paid teacher calls) runs on ``StoreWriter``'s thread and connection, and the request awaits its
commit: so while another process (``distill import``, ``label``) holds the write lock, only the requests
that write wait for it, and a 2xx still means committed. The model runs in a worker thread behind the
micro-batcher.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Discriminator, Tag
from starlette.exceptions import HTTPException as StarletteHTTPException

from distill.errors import DistillError
from distill.project import Project
from distill.redact import redact
from distill.serve import keys as keys_mod
from distill.serve import queue as fq
from distill.serve.batcher import MicroBatcher
from distill.serve.guard import RequestGuard, deadline_protocol, error_body
from distill.serve.metrics import Metrics
from distill.serve.router import ROUTER_FILE, Router, RouterConfig, RouterDecision
from distill.store import Store
from distill.students.predictor import load_predictor
from distill.task import ParseError, cache_key, parse_answer, render_messages
from distill.teachers.base import TeacherRequest
from distill.teachers.ledger import record_call, reply_from_row

log = logging.getLogger("distill.serve")


@dataclass
class ServeConfig:
    """Settings of one `distill serve` process. Every field has a default; ``check`` rejects nonsense."""

    model_path: str | None = None          # pin a student folder or an ONNX export; default: the project's serving model
    backend: Literal["auto", "onnx", "torch"] = "auto"   # auto = the int8 ONNX export when there is one
    device: str = "auto"                   # torch backend: auto -> cuda when available
    shadow_rate: float = 0.0               # share of student-answered texts the teacher re-checks in the background
    seed: int = 0                          # seeds the shadow sampling, so a replayed traffic log picks the same texts
    require_key: bool = True               # False only for loopback experiments
    teacher: str | None = None             # teacher name in distill.yaml; default: the project's default teacher
    teacher_timeout_s: float = 10.0        # a routed text waits at most this long for the teacher, then degrades
    max_texts: int = 64                    # texts per /v1/classify request
    max_text_chars: int | None = None      # default: the spec's max_text_chars
    max_body_bytes: int = 1_000_000        # bigger request bodies get 413 before they are read
    header_timeout_s: float = 10.0         # a request's headers must arrive within this (else 408 + close)
    body_timeout_s: float = 30.0           # ... and its body within this after them (else 408 + close)
    batch_size: int = 32                   # micro-batch: most texts per model call ...
    batch_wait_ms: float = 5.0             # ... and longest wait for more requests to join
    recent_ids: int = 10_000               # results remembered so /v1/feedback can refer to them by id

    def check(self) -> None:
        if not 0.0 <= self.shadow_rate <= 1.0:
            raise DistillError(f"shadow rate must be in [0, 1], got {self.shadow_rate}", hint="e.g. --shadow 0.05")
        if self.teacher_timeout_s <= 0:
            raise DistillError(f"teacher timeout must be > 0 s, got {self.teacher_timeout_s}")
        if self.max_texts < 1 or self.max_body_bytes < 1 or self.batch_size < 1 or self.batch_wait_ms < 0:
            raise DistillError("max_texts, max_body_bytes and batch_size must be >= 1 and batch_wait_ms >= 0")
        if self.header_timeout_s <= 0 or self.body_timeout_s <= 0:
            raise DistillError("header and body timeouts must be > 0 s")
        if self.backend not in ("auto", "onnx", "torch"):
            raise DistillError(f"backend {self.backend!r} is not one of auto, onnx, torch")


# ------------------------------------------------------------------------------------------------
# the model (distill.students.predictor) and its router


def load_router(pred) -> tuple[Router, bool]:
    """The calibrated router saved next to the model, or a pass-through one (student answers all)."""
    if (Path(pred.path) / ROUTER_FILE).exists():
        r = Router.load(pred.path)
        if r.config.labels != list(pred.labels):
            raise DistillError(f"{pred.path / ROUTER_FILE}: calibrated for labels {r.config.labels}, the model has "
                               f"{list(pred.labels)}", hint="re-run `distill route calibrate PROJECT`")
        return r, True
    return Router(RouterConfig(labels=list(pred.labels), ood="none")), False


# ------------------------------------------------------------------------------------------------
# the store's writer


class StoreWriter:
    """Every write the service makes, on one thread with its own connection to the store, one at a time
    in arrival order.

    Why: a write first takes SQLite's write lock (``Store.tx``: BEGIN IMMEDIATE, waiting up to 30 s) and another
    process may hold it for seconds (``distill import`` of 60k rows, ``label``, ``iterate``). Run on the event
    loop, that wait froze every request, health checks included, and past 30 s every write was a 503. Here
    the request that writes awaits its commit (so a 2xx still means committed) while the loop answers the
    others. Reads stay on the loop's connection: in WAL mode they never wait for a writer."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="distill-store-writer")
        self._store: Store | None = None

    async def start(self) -> None:
        def open_() -> None:
            # opened in the thread that uses it (sqlite3 connections belong to their thread)
            self._store = Store(self.path, check=False)

        await asyncio.wrap_future(self._pool.submit(open_))

    async def run(self, fn: Callable[..., Any], *args, **kwargs) -> Any:
        """``fn(store, *args, **kwargs)`` on the writer thread; returns once it returned (committed) or raises
        what it raised (a ``DistillError`` becomes a 503). A cancelled caller's queued write is dropped; a
        running one finishes."""
        return await asyncio.wrap_future(self._pool.submit(lambda: fn(self._store, *args, **kwargs)))

    async def close(self) -> None:
        if self._store is not None:
            await asyncio.wrap_future(self._pool.submit(self._store.close))
            self._store = None
        self._pool.shutdown(wait=False)


def _record_served_call(store: Store, tspec, key: str, msgs: list[dict], reply, status: str, error: str | None) -> float:
    with store.tx() as c:
        # OR IGNORE: a labeller in another process may have recorded the same key meanwhile
        return record_call(c, tspec, key, 0, msgs, reply, status, error, source="serve", or_ignore=True)


# ------------------------------------------------------------------------------------------------
# the teacher side: cache first, one transaction per paid call, degrade on any failure


class TeacherGate:
    """Asks the project's teacher about one text the way the labeller would, with a deadline."""

    def __init__(self, project: Project, cfg: ServeConfig, metrics: Metrics, writer: StoreWriter, teacher=None):
        self.project = project      # read on the loop (the cache); paid calls are written through ``writer``
        self.writer = writer
        self.spec = project.spec
        self.metrics = metrics
        self.timeout = cfg.teacher_timeout_s
        self.tspec = None
        self.teacher = teacher
        self.problem: str | None = None          # why there is no teacher (shown by /healthz)
        self.inflight: dict[str, asyncio.Future] = {}
        try:
            self.tspec = project.spec.get_teacher(cfg.teacher)
            if self.tspec.kind == "ensemble":
                raise DistillError(f"teacher '{self.tspec.name}' is an ensemble; serving needs one teacher",
                                   hint="pass --teacher NAME of one member")
            if self.teacher is None:
                from distill.teachers import make_teacher

                self.teacher = make_teacher(self.tspec, project)
        except DistillError as e:
            # serve anyway: routed texts degrade to the student, /healthz says why
            self.problem = e.message
            log.warning("teacher unavailable, routed texts will be answered by the student: %s", e.message)

    async def aclose(self) -> None:
        if self.teacher is not None and hasattr(self.teacher, "aclose"):
            await self.teacher.aclose()

    async def answer(self, text: str) -> tuple[Any, str]:
        """(answer or None, outcome) with outcome in ok | cache_hit | parse_error | timeout | error | no_teacher."""
        if self.teacher is None or self.tspec is None:
            return None, "no_teacher"
        msgs = render_messages(self.spec, text)
        identity = self.tspec.identity()
        # the labeller re-asks with attempt 1, 2, ... when an answer did not parse: any of them may be cached
        for attempt in range(self.tspec.parse_retries + 1):
            row = self.project.store.get_call(cache_key(identity, msgs, attempt))
            if row is None:
                break
            try:
                reply = reply_from_row(row)
                answer = parse_answer(self.spec, reply.texts[0] if reply.texts else None)
            except ParseError:
                continue
            self.metrics.teacher_calls["cache_hit"] += 1
            return answer, "cache_hit"
        key = cache_key(identity, msgs, 0)
        if self.project.store.get_call(key) is not None:
            # cached, but no attempt parsed: asking again under the same key would only replay it
            self.metrics.teacher_calls["parse_error"] += 1
            return None, "parse_error"
        if key in self.inflight:     # the same text is being asked right now: share that call
            try:
                return await asyncio.shield(self.inflight[key])
            except Exception:
                return None, "error"
        fut = asyncio.get_running_loop().create_future()
        self.inflight[key] = fut
        try:
            req = TeacherRequest(key=key, messages=msgs, kind=self.spec.kind, labels=self.spec.label_names or None)
            result = await self._call(key, msgs, req)
            fut.set_result(result)
            return result
        finally:
            self.inflight.pop(key, None)
            if not fut.done():
                fut.set_result((None, "error"))

    async def _call(self, key: str, msgs: list[dict], req: TeacherRequest) -> tuple[Any, str]:
        try:
            reply = await asyncio.wait_for(self.teacher.ask(req), self.timeout)
        except TimeoutError:
            self.metrics.teacher_calls["timeout"] += 1
            log.warning("teacher '%s' did not answer within %.1fs", self.tspec.name, self.timeout)
            return None, "timeout"
        except Exception as e:  # noqa: BLE001 - any teacher failure degrades, it never fails the request
            self.metrics.teacher_calls["error"] += 1
            # the class name and our own message only: teacher messages never carry the API key
            log.warning("teacher '%s' failed: %s: %s", self.tspec.name, type(e).__name__, redact(str(e)).splitlines()[0][:200] if str(e) else "")
            return None, "error"
        try:
            answer, status, error = parse_answer(self.spec, reply.texts[0] if reply.texts else None), "ok", None
        except ParseError as e:
            answer, status, error = None, "parse_error", e.reason
        cost = await self.writer.run(_record_served_call, self.tspec, key, msgs, reply, status, error)
        self.metrics.teacher_spend += cost
        self.metrics.teacher_calls[status] += 1
        return answer, status


# ------------------------------------------------------------------------------------------------
# the app


def create_app(project_dir: str | Path, *, model_path: str | Path | None = None, shadow_rate: float = 0.0,
               require_key: bool = True, config: ServeConfig | None = None, teacher=None,
               router: Router | None = None):
    """The FastAPI app for ``project_dir``. ``config`` holds every setting (the keyword arguments above
    override its fields); ``teacher`` / ``router`` replace the project's (tests, or a custom setup)."""
    cfg = config or ServeConfig()
    cfg.model_path = str(model_path) if model_path is not None else cfg.model_path
    cfg.shadow_rate = shadow_rate if shadow_rate else cfg.shadow_rate
    cfg.require_key = require_key and cfg.require_key
    cfg.check()

    # Load what can fail before the server starts listening: a bad path is a DistillError at startup.
    project = Project.open(project_dir)
    spec = project.spec
    if spec.kind != "classify":
        project.close()
        raise DistillError(f"{project.root}: serving supports classify projects; this one is '{spec.kind}'",
                           hint="use the exported LM with your own server (vLLM, llama.cpp) for extract/generate")
    try:
        # the promoted model, never a model whose quality gate failed (unless pinned with --model)
        chosen = project.serving_model(cfg.model_path)
    finally:
        project.close()     # the store is re-opened in the event loop's thread (sqlite connections are per thread)
    pred = load_predictor(chosen.path, cfg.backend, cfg.device)
    if router is None:
        router, calibrated = load_router(pred)
    else:
        calibrated = True
    if not calibrated:
        log.warning("%s: no %s next to the model; the student answers everything (run `distill route calibrate`)",
                    pred.path, ROUTER_FILE)
    max_chars = cfg.max_text_chars or spec.max_text_chars
    metrics = Metrics()
    state: dict[str, Any] = {}
    recent: OrderedDict[str, dict] = OrderedDict()
    rng = random.Random(cfg.seed)
    background: set[asyncio.Task] = set()

    @asynccontextmanager
    async def lifespan(app):
        proj = Project.open(project_dir)
        state["project"] = proj
        writer = StoreWriter(proj.store.path)
        await writer.start()
        state["writer"] = writer
        state["batcher"] = MicroBatcher(pred.logits_and_embeddings, cfg.batch_size, cfg.batch_wait_ms)
        state["gate"] = TeacherGate(proj, cfg, metrics, writer, teacher)
        if cfg.require_key and not keys_mod.list_keys(proj.store):
            log.warning("no API keys yet: every request will get 401. Create one with `distill keys create %s`",
                        project_dir)
        log.info("serving %s: model %s (%s, from %s); router %s; shadow %.3f", spec.name, chosen.describe(),
                 type(pred).__name__, pred.path, "calibrated" if calibrated else "pass-through", cfg.shadow_rate)
        try:
            yield
        finally:
            for t in list(background):
                t.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await state["batcher"].close()
            await state["gate"].aclose()
            await writer.close()
            proj.close()

    app = FastAPI(title=f"distill: {spec.name}", version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.model = chosen          # which model answers, and why (serve prints it at start)
    app.state.config = cfg

    def key_ok(raw: str | None) -> bool:
        # One indexed SELECT on the loop's connection (WAL: never waits for a writer), no cache, so a revoked
        # key stops working at once. Nothing here writes, so nothing here takes the write lock.
        return keys_mod.verify_key(state["project"].store, raw) is not None

    # the guard runs before routing: 401 / 413 / 408 / 415 / 400 without any endpoint or validator involved
    app.add_middleware(RequestGuard, key_ok=key_ok if cfg.require_key else None, open_paths=("/healthz",),
                       max_body_bytes=cfg.max_body_bytes, body_timeout_s=cfg.body_timeout_s)

    def error(status: int, message: str, hint: str | None = None, type_: str = "invalid_request_error",
              param: str | None = None) -> JSONResponse:
        return JSONResponse(error_body(status, message, hint, type_, param), status_code=status)

    class _Reject(Exception):
        def __init__(self, status: int, message: str, hint: str | None = None, type_: str = "invalid_request_error",
                     param: str | None = None):
            self.args_ = (status, message, hint, type_, param)

    @app.exception_handler(_Reject)
    async def _on_reject(request: Request, exc: _Reject):
        return error(*exc.args_)

    @app.exception_handler(DistillError)
    async def _on_distill_error(request: Request, exc: DistillError):
        # e.g. the store is locked or the disk is full: nothing was promised, so say so and let the client
        # retry, rather than answer 2xx without the queue entry committed
        log.error("request failed: %s", exc.message)
        return error(503, exc.message, exc.hint, "service_unavailable")

    @app.exception_handler(RequestValidationError)
    async def _on_invalid(request: Request, exc: RequestValidationError):
        parts, first = [], None
        for e in exc.errors()[:5]:
            loc = _loc(e.get("loc", ()))
            first = first or loc
            parts.append(f"`{loc}`: {e.get('msg')}")
        return error(422, "invalid request: " + "; ".join(parts), "see the request schema at /openapi.json", param=first)

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(request: Request, exc: StarletteHTTPException):
        # 404, 405: the same error shape as everything else
        return error(exc.status_code, str(exc.detail), None, "invalid_request_error")

    @app.exception_handler(Exception)
    async def _on_bug(request: Request, exc: Exception):
        # a bug of ours: logged with its traceback by the server; the client gets the error shape, no traceback
        return error(500, "internal error", "retry; if it persists, report it with the server's log", "server_error")

    @app.middleware("http")
    async def _count(request: Request, call_next):
        t0 = time.perf_counter()
        response = await call_next(request)
        ep = request.url.path if request.url.path in _KNOWN_PATHS else "other"
        metrics.requests[(ep, response.status_code)] += 1
        if ep not in ("/metrics", "/healthz"):
            metrics.latency[ep].observe(time.perf_counter() - t0)
        return response

    def check_texts(texts: list[str], field: str = "texts") -> None:
        if not texts:
            raise _Reject(422, f"`{field}` is empty", "send at least one text", param=field)
        if len(texts) > cfg.max_texts:
            raise _Reject(422, f"`{field}` has {len(texts)} items; the limit is {cfg.max_texts} per request",
                          "split the batch into several requests", param=field)
        for i, t in enumerate(texts):
            where = f"{field}[{i}]" if field == "texts" else field
            if len(t) > max_chars:
                raise _Reject(422, f"`{where}` has {len(t)} characters; the limit is {max_chars}",
                              "shorten the text (the limit is `max_text_chars` in distill.yaml)", param=where)
            if not t.strip():
                raise _Reject(422, f"`{where}` is empty", "send non-empty texts", param=where)

    async def classify(texts: list[str]) -> list[dict[str, Any]]:
        """The whole pipeline for a batch of texts; queue entries are committed before it returns."""
        t0 = time.perf_counter()
        logits, feats = await state["batcher"].submit(texts)
        decisions = router.decide(logits, feats)
        gate: TeacherGate = state["gate"]
        routed = [i for i, d in enumerate(decisions) if d.routed_to == "teacher"]
        answers = await asyncio.gather(*(gate.answer(texts[i]) for i in routed))
        teacher_answer = dict(zip(routed, answers))
        entries, results = [], []
        for i, (text, d) in enumerate(zip(texts, decisions)):
            out_label, degraded, teacher_outcome = d.label, False, None
            if d.routed_to == "teacher":
                ans, teacher_outcome = teacher_answer[i]
                if ans is None:
                    degraded = True
                    entries.append({"text": text, "reason": "degraded", "student_answer": d.label,
                                    "student_conf": d.confidence, "note": f"router: {d.reason}; teacher: {teacher_outcome}"})
                else:
                    out_label = ans
                    entries.append({"text": text, "reason": "routed", "student_answer": d.label,
                                    "student_conf": d.confidence, "teacher_answer": ans, "note": f"router: {d.reason}"})
            results.append({"id": "res-" + uuid.uuid4().hex[:16], "label": out_label, "probs": d.probs,
                            "confidence": d.confidence, "ood_score": d.ood_score, "routed_to": d.routed_to,
                            "reason": d.reason, "degraded": degraded, "student_label": d.label,
                            "teacher": teacher_outcome})
        if entries:
            # one transaction for the request's entries, committed before the response exists
            await state["writer"].run(fq.enqueue_many, entries)
        ms = (time.perf_counter() - t0) * 1000
        for text, d, r in zip(texts, decisions, results):
            metrics.route_reasons[d.reason] += 1
            metrics.degraded += r["degraded"]
            # who actually answered: a degraded text was answered by the student
            metrics.inputs["teacher" if d.routed_to == "teacher" and not r["degraded"] else "student"] += 1
            recent[r["id"]] = {"text": text, "label": r["label"], "conf": d.confidence}
            while len(recent) > cfg.recent_ids:
                recent.popitem(last=False)
            r["latency_ms"] = round(ms, 3)
            if d.routed_to == "student" and cfg.shadow_rate > 0 and rng.random() < cfg.shadow_rate:
                task = asyncio.get_running_loop().create_task(shadow(r["id"], text, d))
                background.add(task)
                task.add_done_callback(background.discard)
        return results

    async def shadow(rid: str, text: str, d: RouterDecision) -> None:
        ans, outcome = await state["gate"].answer(text)
        if ans is None:
            log.info("shadow %s: no teacher answer (%s)", rid, outcome)
            return
        metrics.shadow += 1
        if ans != d.label:
            metrics.shadow_disagreements += 1
            try:
                await state["writer"].run(fq.enqueue, text, "shadow_disagreement", student_answer=d.label,
                                          student_conf=d.confidence, teacher_answer=ans, note=f"result {rid}")
            except DistillError as e:      # nobody waits for this answer: log it
                log.error("shadow %s: could not queue the disagreement: %s", rid, e.message)
                return
            log.info("shadow %s: teacher says %r, student said %r (confidence %.3f)", rid, ans, d.label, d.confidence)

    # -- endpoints ----------------------------------------------------------------------------------
    @app.get("/healthz", responses={200: {"model": HealthOut}})
    async def healthz(request: Request):
        # Without a key: liveness only. The model's folder, labels and teacher tell an outsider what runs here
        # and where, so only key holders (or a --no-auth loopback server) see them.
        body: dict[str, Any] = {"status": "ok"}
        if cfg.require_key and not key_ok(keys_mod.bearer(request.headers.get("authorization"))):
            return body
        gate = state.get("gate")
        body.update({"project": spec.name, "model": chosen.run_id, "model_path": str(pred.path),
                     "model_why": chosen.why, "backend": type(pred).__name__, "labels": list(pred.labels),
                     "router": "calibrated" if calibrated else "pass-through",
                     "teacher": None if gate is None or gate.tspec is None else gate.tspec.name,
                     "teacher_problem": None if gate is None else gate.problem, "shadow_rate": cfg.shadow_rate})
        return body

    @app.get("/metrics", response_class=PlainTextResponse, responses={
        200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text"},
        **_errors(401)})
    async def metrics_endpoint():
        return PlainTextResponse(metrics.render(fq.counts(state["project"].store)),
                                 media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", responses={200: {"model": ModelList}, **_errors(401)})
    async def models():
        return {"object": "list", "data": [{"id": spec.name, "object": "model", "created": 0, "owned_by": "distill"}]}

    @app.post("/v1/classify", responses={200: {"model": ClassifyOut}, **_errors(*_BODY_ERRORS)})
    async def classify_endpoint(body: ClassifyIn):
        check_texts(body.texts)
        return {"model": spec.name, "results": await classify(body.texts)}

    @app.post("/v1/chat/completions", responses={
        200: {"model": ChatCompletionOut,
              # one server-sent event (stream: true): a chat.completion.chunk as JSON text in `data`, or [DONE]
              "content": {"text/event-stream": {"schema": {
                  "type": "object", "required": ["data"],
                  "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
                  "description": "stream: true — the label as one chunk, then the finish reason, usage if "
                                 "asked for, and [DONE]"}}}},
        **_errors(*_BODY_ERRORS)})
    async def chat(body: ChatCompletionIn):
        i, text = _last_user_text(body.messages)
        if text is None:
            raise _Reject(422, "no user message with text content", "the last user message is the input",
                          param="messages")
        check_texts([text], field=f"messages[{i}].content")
        # the answer (and its queue entry, committed) exists before any byte of the response is sent,
        # streamed or not
        r = (await classify([text]))[0]
        cid, created = "chatcmpl-" + r["id"].removeprefix("res-"), int(time.time())
        # usage: the input's tokens as the student's tokenizer counts them (what the student read), and one
        # completion token: a classifier's answer is one label, whatever its spelling
        n_in = pred.count_tokens(text)
        usage = {"prompt_tokens": n_in, "completion_tokens": 1, "total_tokens": n_in + 1}
        if body.stream:
            return StreamingResponse(_label_stream(cid, created, spec.name, r, usage, _include_usage(body)),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return {
            "id": cid, "object": "chat.completion", "created": created, "model": spec.name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": r["label"]},
                         "finish_reason": "stop", "logprobs": None}],
            "usage": usage,
            "distill": r,   # routing details; OpenAI clients ignore unknown fields
        }

    @app.post("/v1/feedback", responses={200: {"model": FeedbackOut}, **_errors(*_BODY_ERRORS)})
    async def feedback(body: FeedbackIn):
        if body.label not in spec.label_names:
            raise _Reject(422, f"`label` {body.label!r} is not one of {spec.label_names}",
                          "send one of the project's labels", param="label")
        student, conf, text = None, None, body.text
        if body.id is not None:
            seen = recent.get(body.id)
            if seen is None:
                raise _Reject(422, f"result id {body.id!r} is unknown (this server remembers the last "
                              f"{cfg.recent_ids} results since it started)", "send the `text` instead of the id",
                              param="id")
            text, student, conf = seen["text"], seen["label"], seen["conf"]
        if not text:
            raise _Reject(422, "send `id` (from a /v1/classify result) or `text`", param="text")
        if len(text) > max_chars:
            raise _Reject(422, f"`text` has {len(text)} characters; the limit is {max_chars}", param="text")
        # for feedback entries teacher_answer holds the label the client says is right (not yet verified);
        # fq.enqueue is looked up per call (tests replace it), and the commit is awaited before the 2xx
        qid = await state["writer"].run(fq.enqueue, text, "feedback", student_answer=student, student_conf=conf,
                                        teacher_answer=body.label, note=body.note)
        metrics.feedback += 1
        return {"queued": qid}

    def openapi() -> dict:
        # the generated schema plus the bearer key every path but /healthz needs
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, routes=app.routes,
                              description="distill serve: see `distill serve --help`")
            doc.setdefault("components", {})["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            doc["security"] = [{"bearer": []}]
            doc["paths"]["/healthz"]["get"]["security"] = [{}, {"bearer": []}]
            _document_limits(doc["components"]["schemas"], list(spec.label_names), cfg.max_texts, max_chars)
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi
    return app


# ------------------------------------------------------------------------------------------------
# request and response bodies (they are the OpenAPI schema at /openapi.json)


class ClassifyIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    texts: list[str]


class FeedbackIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str | None = None          # a result id from /v1/classify (or the chat completion's distill.id)
    text: str | None = None        # or the text itself
    label: str                     # the answer the client says is right
    note: str | None = None


class ChatContentPart(BaseModel):
    """One part of a message's content; ``type: "text"`` parts are read, others (images, ...) ignored."""
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


def _content_kind(v: Any) -> str:
    return "parts" if isinstance(v, list) else "text"


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")      # name, tool_calls, ...
    role: str
    # a string or a list of parts; the discriminator picks one, so an error names only that one
    content: Annotated[Annotated[str, Tag("text")] | Annotated[list[ChatContentPart], Tag("parts")],
                       Discriminator(_content_kind)] | None = None


class ChatCompletionIn(BaseModel):
    """An OpenAI chat.completions request: the last user message is the input. The other fields OpenAI
    clients send (temperature, max_tokens, ...) are accepted and ignored."""
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    messages: list[ChatMessage]
    stream: bool | None = None


def _include_usage(body: "ChatCompletionIn") -> bool:
    opts = (body.model_extra or {}).get("stream_options")
    return isinstance(opts, dict) and opts.get("include_usage") is True


async def _label_stream(cid: str, created: int, model: str, r: dict, usage: dict, include_usage: bool):
    """OpenAI's chat.completion.chunk events for an answer that is one label: the role and the whole label in
    one chunk, the finish reason, the usage chunk when asked for (``stream_options.include_usage``), [DONE]."""
    def event(choices: list, **extra) -> str:
        chunk = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                 "choices": choices, **extra}
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

    yield event([{"index": 0, "delta": {"role": "assistant", "content": r["label"]}, "finish_reason": None,
                  "logprobs": None}], distill=r)
    yield event([{"index": 0, "delta": {}, "finish_reason": "stop", "logprobs": None}])
    if include_usage:
        yield event([], usage=usage)
    yield "data: [DONE]\n\n"


class ClassifyResult(BaseModel):
    id: str                        # refer to it in /v1/feedback
    label: str                     # the answer: the teacher's when it answered, else the student's
    probs: dict[str, float]        # the student's probabilities
    confidence: float
    ood_score: float | None
    routed_to: Literal["student", "teacher"]
    reason: str                    # the router's reason: confident | low_confidence | ood
    degraded: bool                 # routed to the teacher, which failed: the student answered
    student_label: str
    teacher: str | None            # the teacher's outcome: ok | cache_hit | parse_error | timeout | error | no_teacher
    latency_ms: float


class ClassifyOut(BaseModel):
    model: str
    results: list[ClassifyResult]


class _ChatReply(BaseModel):
    role: Literal["assistant"]
    content: str


class _ChatChoice(BaseModel):
    index: int
    message: _ChatReply
    finish_reason: str
    logprobs: None = None


class _Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletionOut(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[_ChatChoice]
    usage: _Usage
    distill: ClassifyResult


class _ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[_ModelCard]


class FeedbackOut(BaseModel):
    queued: int                    # the failure-queue entry's id


class HealthOut(BaseModel):
    status: Literal["ok"]
    # with a key only:
    project: str | None = None
    model: str | None = None
    model_path: str | None = None
    model_why: str | None = None
    backend: str | None = None
    labels: list[str] | None = None
    router: str | None = None
    teacher: str | None = None
    teacher_problem: str | None = None
    shadow_rate: float | None = None


class _ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None       # the field the error is about, when there is one
    code: int                      # the HTTP status
    hint: str | None = None        # what to do


class ErrorOut(BaseModel):
    error: _ErrorDetail


_ERROR_WHY = {400: "the body is not JSON within the limits (depth, number size, valid text)",
              401: "missing or invalid API key", 408: "the request did not arrive in time",
              413: "the body is too large", 415: "the body is not JSON (Content-Type)",
              422: "the request does not fit the schema or the limits", 503: "the store cannot write now; retry"}
_BODY_ERRORS = (400, 401, 408, 413, 415, 422, 503)


def _errors(*codes: int) -> dict:
    return {c: {"model": ErrorOut, "description": _ERROR_WHY[c]} for c in codes}


_ROLES = ["system", "developer", "user", "assistant", "tool", "function"]


def _document_limits(schemas: dict, labels: list[str], max_texts: int, max_chars: int) -> None:
    """Write the limits the handlers check (this server's labels, batch size, text length; texts not blank)
    into the generated schemas, so clients, and the fuzzer's "valid" requests, see them. The handlers stay
    the check (with their own messages); the schema only describes it."""
    def texts_in(node):
        # the string schemas under ``node`` (pydantic nests them in anyOf / oneOf)
        if isinstance(node, dict):
            if node.get("type") == "string":
                yield node
            for v in node.get("anyOf", []) + node.get("oneOf", []):
                yield from texts_in(v)

    text = {"minLength": 1, "maxLength": max_chars, "pattern": r"\S"}
    schemas["ClassifyIn"]["properties"]["texts"].update(minItems=1, maxItems=max_texts, items={"type": "string", **text})
    for t in texts_in(schemas["FeedbackIn"]["properties"]["text"]):
        t.update(text)
    schemas["FeedbackIn"]["properties"]["label"]["enum"] = labels
    chat = schemas["ChatCompletionIn"]["properties"]
    chat["messages"].update(minItems=1, contains={"type": "object", "required": ["role"],
                                                  "properties": {"role": {"const": "user"}}})
    chat["stream"] = {"anyOf": [{"type": "boolean"}, {"type": "null"}], "title": "Stream",
                      "description": "true: server-sent events; the answer is one label, sent as one chunk"}
    message = schemas["ChatMessage"]["properties"]
    message["role"]["enum"] = _ROLES
    for t in texts_in(message["content"]):
        t.update(text)


def _loc(loc: tuple) -> str:
    """pydantic's error location as a path: ('body', 'messages', 0, 'content') -> messages[0].content"""
    out = ""
    for p in loc:
        if p == "body" and not out:
            continue
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(body)"


_KNOWN_PATHS = {"/v1/classify", "/v1/chat/completions", "/v1/models", "/v1/feedback", "/metrics", "/healthz"}


def _last_user_text(messages: list[ChatMessage]) -> tuple[int, str | None]:
    """(index, text) of the last user message: its string content, or its text parts joined by newlines."""
    for i in range(len(messages) - 1, -1, -1):
        m = messages[i]
        if m.role == "user":
            c = m.content
            if isinstance(c, str):
                return i, c
            if isinstance(c, list):     # content parts: keep the text parts
                parts = [p.text or "" for p in c if p.type == "text"]
                return i, "\n".join(parts) if parts else None
            return i, None
    return -1, None


def uvicorn_config(app, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "info"):
    """How ``serve`` runs ``app`` with uvicorn (tests run the same): the h11 protocol with the header
    deadline (``guard.DeadlineH11Protocol``; h11 even where httptools is installed, because the deadline lives
    in the protocol), uvicorn's 5 s keep-alive, no access log (it would print client
    addresses and paths for every request; our own log lines carry request ids and outcomes, never headers,
    so never a key)."""
    import uvicorn

    cfg: ServeConfig = app.state.config
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                          http=deadline_protocol(cfg.header_timeout_s), timeout_keep_alive=5)


def serve(project_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "info",
          **kwargs) -> None:
    """Run the service with uvicorn. Binds loopback unless told otherwise; refuses to serve without keys on
    any other interface."""
    import uvicorn

    cfg = kwargs.get("config")
    no_keys = kwargs.get("require_key") is False or (cfg is not None and not cfg.require_key)
    if no_keys and host not in ("127.0.0.1", "localhost", "::1"):
        raise DistillError(f"refusing to serve without API keys on {host}",
                           hint="drop --no-auth, or bind 127.0.0.1 for local experiments")
    app = create_app(project_dir, **kwargs)
    import sys

    print(f"distill serve: model {app.state.model.describe()}", file=sys.stderr, flush=True)
    uvicorn.Server(uvicorn_config(app, host, port, log_level=log_level)).run()
