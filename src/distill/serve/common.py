"""What every `distill serve` app shares, whatever the task kind: the settings (``ServeConfig``), the store's
writer thread (``StoreWriter``), the teacher behind the router (``TeacherGate``: the labeller's prompt and cache
key, one transaction per paid call, degrade on any failure), and the app skeleton (``app_skeleton``: the request
guard, one error shape for every refusal, the request counter of /metrics; ``bearer_openapi``), plus the chat
request models both apps read.

``distill.serve.app`` builds the classify service on these, ``distill.serve.lm_app`` the extract/generate one;
the promises (queue entries committed before the 2xx, never a 500 because of the teacher, 4xx naming the
field) are described in ``distill.serve.app``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Discriminator, Tag
from starlette.exceptions import HTTPException as StarletteHTTPException

from distill.errors import DistillError
from distill.project import Project
from distill.redact import redact
from distill.serve import keys as keys_mod
from distill.serve.guard import RequestGuard, error_body
from distill.serve.metrics import Metrics
from distill.store import Store
from distill.fewshot import FewShot
from distill.task import ParseError, cache_key, parse_answer, render_messages
from distill.teachers.base import TeacherRequest
from distill.teachers import ledger
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
    batch_wait_ms: float = 0.0             # ... and a fixed wait for more requests to join (0: none; the batch is
                                           # what queued during the previous call, see distill.serve.batcher)
    spin: bool = False                     # onnxruntime pool threads busy-wait between runs (faster batch-1 on an
                                           # idle machine, but the cycles are the event loop's: see bench/serve.py)
    poll_s: float = 1.0                    # how often a server reads the store for a new serving model or a rollout
                                           # verdict (hot swap; every worker of --workers follows within this)
    recent_ids: int = 10_000               # results remembered so /v1/feedback can refer to them by id
    # extract / generate (distill.serve.lm_app): the GGUF student and its engine
    max_tokens: int | None = None          # cap on a completion's tokens; default: the teacher's max_tokens (256)
    n_ctx_per_seq: int = 2048              # context per sequence (prompt + completion); longer prompts get 400
    max_batch: int = 8                     # sequences the engine decodes together (its slots); more wait in line
    n_threads: int | None = None           # engine CPU threads; default: llama.cpp's choice

    def check(self) -> None:
        if not 0.0 <= self.shadow_rate <= 1.0:
            raise DistillError(f"shadow rate must be in [0, 1], got {self.shadow_rate}", hint="e.g. --shadow 0.05")
        if self.teacher_timeout_s <= 0:
            raise DistillError(f"teacher timeout must be > 0 s, got {self.teacher_timeout_s}")
        if self.max_texts < 1 or self.max_body_bytes < 1 or self.batch_size < 1 or self.batch_wait_ms < 0:
            raise DistillError("max_texts, max_body_bytes and batch_size must be >= 1 and batch_wait_ms >= 0")
        if self.header_timeout_s <= 0 or self.body_timeout_s <= 0 or self.poll_s <= 0:
            raise DistillError("header and body timeouts and poll_s must be > 0 s")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise DistillError(f"max tokens must be >= 1, got {self.max_tokens}", hint="e.g. --max-tokens 256")
        if self.n_ctx_per_seq < 64 or self.max_batch < 1 or (self.n_threads is not None and self.n_threads < 1):
            raise DistillError(f"n_ctx_per_seq must be >= 64 (got {self.n_ctx_per_seq}), max_batch >= 1 (got "
                               f"{self.max_batch}) and n_threads >= 1 (got {self.n_threads})")
        if self.backend not in ("auto", "onnx", "torch"):
            raise DistillError(f"backend {self.backend!r} is not one of auto, onnx, torch")


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
        cost = record_call(c, tspec, key, 0, msgs, reply, status, error, source="serve", or_ignore=True)
        c.execute("DELETE FROM teacher_claims WHERE key=?", (key,))
        return cost


def _claim(store: Store, key: str, owner: str, ttl_s: float) -> bool:
    """Take the claim to pay for ``key`` (``ledger.claim``: shared with other workers, replicas and labellers)."""
    return ledger.claim(store, key, owner, ttl_s)


def _release(store: Store, key: str, owner: str) -> None:
    ledger.release(store, key, owner)


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
        self.owner = ledger.claim_owner("serve")        # who holds a claim in teacher_claims (this process, this app)
        self.claim_ttl_s = 2 * self.timeout + 5.0       # older claims: their worker died mid-call
        self.fewshot = None
        try:
            self.tspec = project.spec.get_teacher(cfg.teacher)
            self.fewshot = FewShot.for_project(project)    # the pool is read once, at start
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

    async def prompt(self, text: str) -> tuple[list[dict], list[str] | None]:
        """The teacher's messages (and classify candidates) for ``text``, as the labeller renders them; with
        few-shot examples the demonstrations are retrieved for the text (off the event loop: it embeds)."""
        if self.fewshot is None:
            return render_messages(self.spec, text), self.spec.label_names or None
        demos = (await asyncio.to_thread(self.fewshot.select, [(None, text)]))[0]
        tp = self.fewshot.prompt(text, None, None, demos)
        return tp.messages, tp.labels

    def _cached(self, identity: str, msgs: list[dict]) -> tuple[Any, str] | None:
        """The answer already in the store (any attempt that parsed), (None, 'parse_error') when every cached
        attempt failed to parse, or None when nothing is cached."""
        # the labeller re-asks with attempt 1, 2, ... when an answer did not parse: any of them may be cached
        cached = False
        for attempt in range(self.tspec.parse_retries + 1):
            row = self.project.store.get_call(cache_key(identity, msgs, attempt))
            if row is None:
                break
            cached = True
            try:
                reply = reply_from_row(row)
                answer = parse_answer(self.spec, reply.texts[0] if reply.texts else None)
            except ParseError:
                continue
            self.metrics.teacher_call("cache_hit")
            return answer, "cache_hit"
        if cached:
            # cached, but no attempt parsed: asking again under the same key would only replay it. (Not a second
            # read of attempt 0: another worker or replica may have recorded it in between, and a good answer
            # would then pass for a parse error.)
            self.metrics.teacher_call("parse_error")
            return None, "parse_error"
        return None

    async def answer(self, text: str) -> tuple[Any, str]:
        """(answer or None, outcome) with outcome in ok | cache_hit | parse_error | timeout | error | no_teacher."""
        if self.teacher is None or self.tspec is None:
            return None, "no_teacher"
        msgs, labels = await self.prompt(text)
        identity = self.tspec.identity()
        hit = self._cached(identity, msgs)
        if hit is not None:
            return hit
        key = cache_key(identity, msgs, 0)
        if key in self.inflight:     # the same text is being asked right now in this process: share that call
            try:
                return await asyncio.shield(self.inflight[key])
            except Exception:
                return None, "error"
        fut = asyncio.get_running_loop().create_future()
        self.inflight[key] = fut
        try:
            # ... and across worker processes: one claim per key in the store, so two workers never pay for the
            # same text (the loser reads the winner's answer from the store when it lands)
            if await self.writer.run(_claim, key, self.owner, self.claim_ttl_s):
                req = TeacherRequest(key=key, messages=msgs, kind=self.spec.kind, labels=labels)
                result = await self._call(key, msgs, req)
            else:
                result = await self._await_other(identity, msgs)
            fut.set_result(result)
            return result
        finally:
            self.inflight.pop(key, None)
            if not fut.done():
                fut.set_result((None, "error"))

    async def _await_other(self, identity: str, msgs: list[dict]) -> tuple[Any, str]:
        """Another worker holds the claim on this text: its answer, read from the store, within our deadline."""
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            await asyncio.sleep(0.02)
            hit = self._cached(identity, msgs)
            if hit is not None:
                return hit
        self.metrics.teacher_call("timeout")
        return None, "timeout"

    async def _call(self, key: str, msgs: list[dict], req: TeacherRequest) -> tuple[Any, str]:
        try:
            reply = await asyncio.wait_for(self.teacher.ask(req), self.timeout)
        except TimeoutError:
            self.metrics.teacher_call("timeout")
            log.warning("teacher '%s' did not answer within %.1fs", self.tspec.name, self.timeout)
            await self._release(key)
            return None, "timeout"
        except Exception as e:  # noqa: BLE001 - any teacher failure degrades, it never fails the request
            self.metrics.teacher_call("error")
            await self._release(key)
            # the class name and our own message only: teacher messages never carry the API key
            log.warning("teacher '%s' failed: %s: %s", self.tspec.name, type(e).__name__, redact(str(e)).splitlines()[0][:200] if str(e) else "")
            return None, "error"
        try:
            answer, status, error = parse_answer(self.spec, reply.texts[0] if reply.texts else None), "ok", None
        except ParseError as e:
            answer, status, error = None, "parse_error", e.reason
        cost = await self.writer.run(_record_served_call, self.tspec, key, msgs, reply, status, error)
        self.metrics.teacher_call(status, cost)
        return answer, status

    async def _release(self, key: str) -> None:
        """Give the claim back after a failed call, so the next request (any worker) may try again."""
        try:
            await self.writer.run(_release, key, self.owner)
        except DistillError as e:       # the claim then expires after claim_ttl_s
            log.error("could not release the teacher claim: %s", e.message)


# ------------------------------------------------------------------------------------------------
# what every app shares (classify here, extract/generate in distill.serve.lm_app)


@asynccontextmanager
async def serving(project_dir: str | Path, cfg: "ServeConfig", metrics: Metrics, state: dict[str, Any],
                  background: set[asyncio.Task], teacher=None) -> AsyncIterator[None]:
    """What both apps hold while they serve, opened in the event loop's thread (sqlite connections belong to
    their thread): the project (reads on the loop), the store writer, the teacher gate -- put into ``state``
    as "project", "writer", "gate". On the way out: background tasks (shadow checks) cancelled and awaited,
    then the gate, the writer and the project closed, in that order."""
    proj = Project.open(project_dir)
    state["project"] = proj
    writer = StoreWriter(proj.store.path)
    await writer.start()
    state["writer"] = writer
    state["gate"] = TeacherGate(proj, cfg, metrics, writer, teacher)
    if cfg.require_key and not keys_mod.list_keys(proj.store):
        log.warning("no API keys yet: every request will get 401. Create one with `distill keys create %s`",
                    project_dir)
    try:
        yield
    finally:
        for t in list(background):
            t.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        await state["gate"].aclose()
        await writer.close()
        proj.close()


class Reject(Exception):
    """A request the handler refuses: a 4xx in the error shape, ``param`` naming the field."""

    def __init__(self, status: int, message: str, hint: str | None = None, type_: str = "invalid_request_error",
                 param: str | None = None):
        super().__init__(message)
        self.args_ = (status, message, hint, type_, param)


def feedback_input(recent: dict, rid: str | None, text: str | None, max_chars: int, remembered: int, answer_field: str,
                   id_source: str) -> tuple[str, Any, float | None]:
    """(text, the answer served, its confidence) that a /v1/feedback body refers to: a remembered result id
    (``recent``, the last ``remembered`` results) or the text itself; 422 when neither is usable."""
    student, conf = None, None
    if rid is not None:
        seen = recent.get(rid)
        if seen is None:
            raise Reject(422, f"result id {rid!r} is unknown (this server remembers the last {remembered} results "
                         "since it started)", "send the `text` instead of the id", param="id")
        text, student, conf = seen["text"], seen[answer_field], seen["conf"]
    if not text:
        raise Reject(422, f"send `id` ({id_source}) or `text`", param="text")
    if len(text) > max_chars:
        raise Reject(422, f"`text` has {len(text)} characters; the limit is {max_chars}", param="text")
    return text, student, conf


def app_skeleton(title: str, lifespan, cfg: ServeConfig, metrics: Metrics,
                 key_ok: Callable[[str | None], bool]) -> FastAPI:
    """The FastAPI app with what every endpoint sits behind: the request guard (key, size, deadline, JSON),
    one error shape for every refusal (``Reject``, 422 from the models, 404/405, a store failure as 503, a bug
    as 500 without its traceback) and the request counter of /metrics."""
    app = FastAPI(title=title, version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.config = cfg

    # the guard runs before routing: 401 / 413 / 408 / 415 / 400 without any endpoint or validator involved
    app.add_middleware(RequestGuard, key_ok=key_ok if cfg.require_key else None, open_paths=("/healthz",),
                       max_body_bytes=cfg.max_body_bytes, body_timeout_s=cfg.body_timeout_s)

    def error(status: int, message: str, hint: str | None = None, type_: str = "invalid_request_error",
              param: str | None = None) -> JSONResponse:
        return JSONResponse(error_body(status, message, hint, type_, param), status_code=status)

    @app.exception_handler(Reject)
    async def _on_reject(request: Request, exc: Reject):
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

    # outermost: counts every request, refusals of the guard included
    app.add_middleware(RequestMetrics, metrics=metrics)
    return app


class RequestMetrics:
    """Counts each request by endpoint and status, and times it (``distill_request_latency_seconds``, labelled with
    the model that answered when the endpoint says so in ``scope["distill.model"]``). A plain ASGI middleware:
    Starlette's ``BaseHTTPMiddleware`` (``@app.middleware("http")``) wraps every response in a stream and cost
    ~0.2 ms per request (measured with py-spy on the batch-1 path)."""

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = [500]

        async def send_(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_)
        finally:
            path = scope.get("path", "")
            ep = path if path in KNOWN_PATHS else "other"
            timed = ep not in ("/metrics", "/healthz")
            self.metrics.request(ep, status[0], time.perf_counter() - t0 if timed else None,
                                 scope.get("distill.model", ""))


def bearer_openapi(app: FastAPI, document: Callable[[dict], None]) -> Callable[[], dict]:
    """``app.openapi``: the generated schema plus the bearer key every path but /healthz needs;
    ``document(schemas)`` writes this server's limits into the component schemas."""
    def openapi() -> dict:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, routes=app.routes,
                              description="distill serve: see `distill serve --help`")
            doc.setdefault("components", {})["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            doc["security"] = [{"bearer": []}]
            doc["paths"]["/healthz"]["get"]["security"] = [{}, {"bearer": []}]
            document(doc["components"]["schemas"])
            app.openapi_schema = doc
        return app.openapi_schema

    return openapi


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


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


ERROR_WHY = {400: "the body is not JSON within the limits (depth, number size, valid text)",
             401: "missing or invalid API key", 408: "the request did not arrive in time",
             409: "no canary is running", 413: "the body is too large", 415: "the body is not JSON (Content-Type)",
             422: "the request does not fit the schema or the limits", 503: "the store cannot write now; retry"}
BODY_ERRORS = (400, 401, 408, 413, 415, 422, 503)


def error_responses(*codes: int, why: dict[int, str] | None = None) -> dict:
    """OpenAPI ``responses`` for these error codes, in the one error shape (``why`` overrides a description)."""
    table = {**ERROR_WHY, **(why or {})}
    return {c: {"model": ErrorOut, "description": table[c]} for c in codes}


def chat_responses(model: type, stream: str, errors: dict) -> dict:
    """OpenAPI ``responses`` of /v1/chat/completions: ``model`` as JSON, or with stream: true server-sent events
    (each a chat.completion.chunk as JSON text in ``data``, or [DONE]); ``stream`` describes what they carry."""
    return {200: {"model": model, "content": {"text/event-stream": {"schema": {
        "type": "object", "required": ["data"],
        "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
        "description": stream}}}}, **errors}


class _ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None       # the field the error is about, when there is one
    code: int                      # the HTTP status
    hint: str | None = None        # what to do


class ErrorOut(BaseModel):
    error: _ErrorDetail


ROLES = ["system", "developer", "user", "assistant", "tool", "function"]


def _loc(loc: tuple) -> str:
    """pydantic's error location as a path: ('body', 'messages', 0, 'content') -> messages[0].content"""
    out = ""
    for p in loc:
        if p == "body" and not out:
            continue
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(body)"


KNOWN_PATHS = {"/v1/classify", "/v1/chat/completions", "/v1/models", "/v1/feedback", "/metrics", "/healthz",
               "/v1/rollout", "/v1/rollout/promote", "/v1/rollout/rollback"}


def last_user_text(messages: list[ChatMessage]) -> tuple[int, str | None]:
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
