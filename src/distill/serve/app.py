"""The service: the student answers, the router decides when the teacher should instead, and everything
the next training round needs lands in the failure queue.

    distill serve PROJECT --port 8000 [--shadow 0.05]

Endpoints (all but /healthz need ``Authorization: Bearer <key>``; keys: ``distill keys create``):

- ``POST /v1/classify`` ``{"texts": [...]}`` -> one result per text: label, probs, confidence, ood_score,
  routed_to (student | teacher), reason, degraded, latency_ms.
- ``POST /v1/chat/completions`` (OpenAI-compatible): the last user message is the input, the label is the
  assistant's reply, ``model`` is the project name. The ``openai`` client works against it unchanged.
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

Concurrency model: one event loop. The store (sqlite) is opened in the loop's thread at startup and only
used from it; the model runs in a worker thread behind the micro-batcher.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
import uuid
from collections import OrderedDict
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict

from distill.errors import DistillError
from distill.labeling import record_call, reply_from_row
from distill.project import Project
from distill.serve import keys as keys_mod
from distill.serve import queue as fq
from distill.serve.batcher import MicroBatcher
from distill.serve.metrics import Metrics
from distill.serve.router import ROUTER_FILE, Router, RouterConfig, RouterDecision
from distill.task import ParseError, cache_key, parse_answer, render_messages
from distill.teachers.base import TeacherRequest

log = logging.getLogger("distill.serve")


@dataclass
class ServeConfig:
    """Settings of one `distill serve` process. Every field has a default; ``check`` rejects nonsense."""

    model_path: str | None = None          # a trained student folder or an ONNX export; default: the latest train run
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
        if self.backend not in ("auto", "onnx", "torch"):
            raise DistillError(f"backend {self.backend!r} is not one of auto, onnx, torch")


# ------------------------------------------------------------------------------------------------
# the model: ONNX (no torch at serve time) or the torch student, behind one small interface


class TorchPredictor:
    """``ClassifierStudent`` -> (logits, mean-pooled last hidden state) in one forward pass, as the ONNX
    graph computes them, so a router calibrated on either backend reads the same kind of numbers."""

    def __init__(self, path: Path, device: str = "auto"):
        from distill.students.classifier import ClassifierStudent

        self.student = ClassifierStudent.load(path, device=device)
        self.labels = list(self.student.labels)
        self.path = Path(path)

    def logits_and_embeddings(self, texts: Sequence[str], batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
        import torch

        s = self.student
        s.model.eval()
        logits, embs = [], []
        with torch.inference_mode():
            for i in range(0, len(texts), batch_size):
                enc = s.tokenizer(list(texts[i : i + batch_size]), padding=True, truncation=True,
                                  max_length=s.max_length, return_tensors="pt").to(s.device)
                out = s.model(**enc, output_hidden_states=True)
                h = out.hidden_states[-1].float()
                mask = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
                embs.append(((h * mask).sum(1) / mask.sum(1).clamp(min=1.0)).cpu().numpy())
                logits.append(out.logits.float().cpu().numpy())
        if not logits:
            return np.zeros((0, len(self.labels)), np.float32), np.zeros((0, 0), np.float32)
        return np.concatenate(logits), np.concatenate(embs)


def resolve_model_path(project: Project, model_path: str | Path | None = None) -> Path:
    """An explicit path (relative to the project folder if not found as given), else the latest train run."""
    if model_path is not None:
        p = Path(model_path)
        if not p.exists() and (project.root / p).exists():
            p = project.root / p
        if not p.is_dir():
            raise DistillError(f"{model_path}: no such model folder", hint="pass the folder `distill train` wrote")
        return p
    run = project.store.latest_run("train")
    if run is None or not run["path"]:
        raise DistillError(f"{project.root}: no finished training run to serve",
                           hint="train a student first (`distill train PROJECT`) or pass --model PATH")
    p = Path(run["path"])
    if not p.is_absolute() and not p.exists():
        p = project.root / p
    if not p.is_dir():
        raise DistillError(f"{p}: the latest training run's model folder is missing",
                           hint="re-run `distill train`, or pass --model PATH")
    return p


def onnx_dir_for(model_path: Path) -> Path | None:
    """Where `distill export --onnx` put the export of ``model_path`` (the folder itself, or ./onnx beside it)."""
    for d in (model_path, model_path.parent / "onnx", model_path / "onnx"):
        if (d / "model.int8.onnx").exists() or (d / "model.onnx").exists():
            return d
    return None


def load_predictor(model_path: Path, backend: str = "auto", device: str = "auto"):
    model_path = Path(model_path)
    onnx_dir = onnx_dir_for(model_path)
    if backend == "onnx" or (backend == "auto" and onnx_dir is not None):
        if onnx_dir is None:
            raise DistillError(f"{model_path}: no ONNX export found", hint="run `distill export PROJECT --onnx` first")
        from distill.export_onnx import OnnxClassifier

        return OnnxClassifier(onnx_dir, int8=(onnx_dir / "model.int8.onnx").exists())
    return TorchPredictor(model_path, device=device)


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
# the teacher side: cache first, one transaction per paid call, degrade on any failure


class TeacherGate:
    """Asks the project's teacher about one text the way the labeller would, with a deadline."""

    def __init__(self, project: Project, cfg: ServeConfig, metrics: Metrics, teacher=None):
        self.project = project
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
        except asyncio.TimeoutError:
            self.metrics.teacher_calls["timeout"] += 1
            log.warning("teacher '%s' did not answer within %.1fs", self.tspec.name, self.timeout)
            return None, "timeout"
        except Exception as e:  # noqa: BLE001 - any teacher failure degrades, it never fails the request
            self.metrics.teacher_calls["error"] += 1
            # the class name and our own message only: teacher messages never carry the API key
            log.warning("teacher '%s' failed: %s: %s", self.tspec.name, type(e).__name__, str(e).splitlines()[0][:200])
            return None, "error"
        try:
            answer, status, error = parse_answer(self.spec, reply.texts[0] if reply.texts else None), "ok", None
        except ParseError as e:
            answer, status, error = None, "parse_error", e.reason
        with self.project.store.tx() as c:
            # OR IGNORE: a labeller in another process may have recorded the same key meanwhile
            cost = record_call(c, self.tspec, key, 0, msgs, reply, status, error, source="serve", or_ignore=True)
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
    path = resolve_model_path(project, cfg.model_path)
    project.close()     # the store is re-opened in the event loop's thread (sqlite connections are per thread)
    pred = load_predictor(path, cfg.backend, cfg.device)
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
        state["batcher"] = MicroBatcher(pred.logits_and_embeddings, cfg.batch_size, cfg.batch_wait_ms)
        state["gate"] = TeacherGate(proj, cfg, metrics, teacher)
        if cfg.require_key and not keys_mod.list_keys(proj.store):
            log.warning("no API keys yet: every request will get 401. Create one with `distill keys create %s`",
                        project_dir)
        log.info("serving %s (%s) from %s; router %s; shadow %.3f", spec.name, type(pred).__name__, pred.path,
                 "calibrated" if calibrated else "pass-through", cfg.shadow_rate)
        try:
            yield
        finally:
            for t in list(background):
                t.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await state["batcher"].close()
            await state["gate"].aclose()
            proj.close()

    app = FastAPI(title=f"distill: {spec.name}", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(_BodyLimit, max_bytes=cfg.max_body_bytes)

    def error(status: int, message: str, hint: str | None = None, type_: str = "invalid_request_error") -> JSONResponse:
        # OpenAI's error shape, so the openai client surfaces `message`
        body = {"error": {"message": message, "type": type_, "hint": hint, "code": status}}
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return JSONResponse(body, status_code=status, headers=headers)

    class _Reject(Exception):
        def __init__(self, status: int, message: str, hint: str | None = None, type_: str = "invalid_request_error"):
            self.args_ = (status, message, hint, type_)

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
        parts = []
        for e in exc.errors()[:5]:
            loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "(body)"
            parts.append(f"`{loc}`: {e.get('msg')}")
        return error(422, "invalid request: " + "; ".join(parts),
                     hint='send JSON like {"texts": ["..."]} with Content-Type: application/json')

    @app.middleware("http")
    async def _count(request: Request, call_next):
        t0 = time.perf_counter()
        response = await call_next(request)
        ep = request.url.path if request.url.path in _KNOWN_PATHS else "other"
        metrics.requests[(ep, response.status_code)] += 1
        if ep not in ("/metrics", "/healthz"):
            metrics.latency[ep].observe(time.perf_counter() - t0)
        return response

    def auth(request: Request) -> str | None:
        if not cfg.require_key:
            return None
        key_id = keys_mod.verify_key(state["project"].store, keys_mod.bearer(request.headers.get("authorization")))
        if key_id is None:
            raise _Reject(401, "missing or invalid API key", "send `Authorization: Bearer <key>`; create a key with "
                          "`distill keys create PROJECT --name NAME`", "authentication_error")
        return key_id

    def check_texts(texts: list[str]) -> None:
        if not texts:
            raise _Reject(422, "`texts` is empty", "send at least one text")
        if len(texts) > cfg.max_texts:
            raise _Reject(422, f"`texts` has {len(texts)} items; the limit is {cfg.max_texts} per request",
                          "split the batch into several requests")
        for i, t in enumerate(texts):
            if len(t) > max_chars:
                raise _Reject(422, f"`texts[{i}]` has {len(t)} characters; the limit is {max_chars}",
                              "shorten the text (the limit is `max_text_chars` in distill.yaml)")
            if not t.strip():
                raise _Reject(422, f"`texts[{i}]` is empty", "send non-empty texts")

    async def classify(texts: list[str]) -> list[dict[str, Any]]:
        """The whole pipeline for a batch of texts; queue entries are committed before it returns."""
        t0 = time.perf_counter()
        logits, feats = await state["batcher"].submit(texts)
        decisions = router.decide(logits, feats)
        gate: TeacherGate = state["gate"]
        routed = [i for i, d in enumerate(decisions) if d.routed_to == "teacher"]
        answers = await asyncio.gather(*(gate.answer(texts[i]) for i in routed))
        teacher_answer = dict(zip(routed, answers))
        store = state["project"].store
        results = []
        for i, (text, d) in enumerate(zip(texts, decisions)):
            metrics.route_reasons[d.reason] += 1
            out_label, degraded, teacher_outcome = d.label, False, None
            if d.routed_to == "teacher":
                ans, teacher_outcome = teacher_answer[i]
                if ans is None:
                    degraded = True
                    metrics.degraded += 1
                    fq.enqueue(store, text, "degraded", student_answer=d.label, student_conf=d.confidence,
                               note=f"router: {d.reason}; teacher: {teacher_outcome}")
                else:
                    out_label = ans
                    fq.enqueue(store, text, "routed", student_answer=d.label, student_conf=d.confidence,
                               teacher_answer=ans, note=f"router: {d.reason}")
            # who actually answered: a degraded text was answered by the student
            who = "teacher" if d.routed_to == "teacher" and not degraded else "student"
            metrics.inputs[who] += 1
            rid = "res-" + uuid.uuid4().hex[:16]
            recent[rid] = {"text": text, "label": out_label, "conf": d.confidence}
            while len(recent) > cfg.recent_ids:
                recent.popitem(last=False)
            results.append({"id": rid, "label": out_label, "probs": d.probs, "confidence": d.confidence,
                            "ood_score": d.ood_score, "routed_to": d.routed_to, "reason": d.reason,
                            "degraded": degraded, "student_label": d.label, "teacher": teacher_outcome})
            if d.routed_to == "student" and cfg.shadow_rate > 0 and rng.random() < cfg.shadow_rate:
                task = asyncio.get_running_loop().create_task(shadow(rid, text, d))
                background.add(task)
                task.add_done_callback(background.discard)
        ms = (time.perf_counter() - t0) * 1000
        for r in results:
            r["latency_ms"] = round(ms, 3)
        return results

    async def shadow(rid: str, text: str, d: RouterDecision) -> None:
        ans, outcome = await state["gate"].answer(text)
        if ans is None:
            log.info("shadow %s: no teacher answer (%s)", rid, outcome)
            return
        metrics.shadow += 1
        if ans != d.label:
            metrics.shadow_disagreements += 1
            fq.enqueue(state["project"].store, text, "shadow_disagreement", student_answer=d.label,
                       student_conf=d.confidence, teacher_answer=ans, note=f"result {rid}")
            log.info("shadow %s: teacher says %r, student said %r (confidence %.3f)", rid, ans, d.label, d.confidence)

    # -- endpoints ----------------------------------------------------------------------------------
    @app.get("/healthz")
    async def healthz():
        gate = state.get("gate")
        return {"status": "ok", "project": spec.name, "model": str(pred.path), "backend": type(pred).__name__,
                "labels": list(pred.labels), "router": "calibrated" if calibrated else "pass-through",
                "teacher": None if gate is None or gate.tspec is None else gate.tspec.name,
                "teacher_problem": None if gate is None else gate.problem, "shadow_rate": cfg.shadow_rate}

    @app.get("/metrics")
    async def metrics_endpoint(request: Request):
        auth(request)
        return PlainTextResponse(metrics.render(fq.counts(state["project"].store)),
                                 media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request):
        auth(request)
        return {"object": "list", "data": [{"id": spec.name, "object": "model", "created": 0, "owned_by": "distill"}]}

    @app.post("/v1/classify")
    async def classify_endpoint(body: ClassifyIn, request: Request):
        auth(request)
        check_texts(body.texts)
        return {"model": spec.name, "results": await classify(body.texts)}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        auth(request)
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise _Reject(422, "the body is not JSON", "send an OpenAI chat.completions request") from None
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            raise _Reject(422, "`messages` is missing or not a list", 'send {"messages": [{"role": "user", ...}]}')
        if body.get("stream"):
            raise _Reject(422, "streaming is not supported: the answer is one label", "send stream: false")
        text = _last_user_text(body["messages"])
        if text is None:
            raise _Reject(422, "no user message with text content", "the last user message is the input")
        check_texts([text])
        r = (await classify([text]))[0]
        return {
            "id": "chatcmpl-" + r["id"].removeprefix("res-"), "object": "chat.completion", "created": int(time.time()),
            "model": spec.name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": r["label"]},
                         "finish_reason": "stop", "logprobs": None}],
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
            "distill": r,   # routing details; OpenAI clients ignore unknown fields
        }

    @app.post("/v1/feedback")
    async def feedback(body: FeedbackIn, request: Request):
        auth(request)
        if body.label not in spec.label_names:
            raise _Reject(422, f"`label` {body.label!r} is not one of {spec.label_names}", "send one of the project's labels")
        student, conf, text = None, None, body.text
        if body.id is not None:
            seen = recent.get(body.id)
            if seen is None:
                raise _Reject(422, f"result id {body.id!r} is unknown (this server remembers the last "
                              f"{cfg.recent_ids} results since it started)", "send the `text` instead of the id")
            text, student, conf = seen["text"], seen["label"], seen["conf"]
        if not text:
            raise _Reject(422, "send `id` (from a /v1/classify result) or `text`")
        if len(text) > max_chars:
            raise _Reject(422, f"`text` has {len(text)} characters; the limit is {max_chars}")
        # for feedback entries teacher_answer holds the label the client says is right (not yet verified)
        qid = fq.enqueue(state["project"].store, text, "feedback", student_answer=student, student_conf=conf,
                         teacher_answer=body.label, note=body.note)
        metrics.feedback += 1
        return {"queued": qid}

    return app


class ClassifyIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    texts: list[str]


class FeedbackIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str | None = None          # a result id from /v1/classify (or the chat completion's distill.id)
    text: str | None = None        # or the text itself
    label: str                     # the answer the client says is right
    note: str | None = None


_KNOWN_PATHS = {"/v1/classify", "/v1/chat/completions", "/v1/models", "/v1/feedback", "/metrics", "/healthz"}


def _last_user_text(messages: list) -> str | None:
    for m in reversed(messages):
        if isinstance(m, dict) and m.get("role") == "user":
            c = m.get("content")
            if isinstance(c, str):
                return c
            if isinstance(c, list):     # content parts: keep the text parts
                parts = [p.get("text", "") for p in c if isinstance(p, dict) and p.get("type") == "text"]
                return "\n".join(parts) if parts else None
            return None
    return None


class _BodyLimit:
    """ASGI middleware: 413 for bodies over ``max_bytes``, from Content-Length before reading, or while
    reading a chunked body, so a huge upload never sits in memory."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._reject(send)
        seen = 0
        too_big = False
        replaced = False

        async def limited():
            nonlocal seen, too_big
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:
                    too_big = True
                    raise _TooBig()
            return msg

        async def guarded_send(msg):
            # FastAPI turns an exception while reading the body into a 400; answer 413 instead
            nonlocal replaced
            if too_big:
                if not replaced:
                    replaced = True
                    await self._reject(send)
                return
            await send(msg)

        try:
            await self.app(scope, limited, guarded_send)
        except _TooBig:
            if not replaced:
                await self._reject(send)

    async def _reject(self, send):
        body = json.dumps({"error": {"message": f"request body is larger than {self.max_bytes} bytes",
                                     "type": "invalid_request_error", "code": 413,
                                     "hint": "send fewer or shorter texts per request"}}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _TooBig(Exception):
    pass


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
    # access_log=False: the access log would print client addresses and paths for every request; our own
    # log lines carry request ids and outcomes, never headers (so never a key)
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False)
