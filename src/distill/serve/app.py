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
- ``GET /v1/models``, ``GET /healthz``, ``GET /metrics`` (Prometheus text, ``distill.serve.metrics``).
- ``POST /v1/feedback`` ``{"id" | "text", "label", "note"}`` -> the failure queue.
- ``GET /v1/rollout``, ``POST /v1/rollout/promote``, ``POST /v1/rollout/rollback`` ``{"why": ...}``: the canary of
  ``--candidate`` (``distill.serve.rollout``).

Extract and generate projects are served by ``distill.serve.lm_app`` (the GGUF export of the model behind the
same guard, keys, teacher gate, queue and metrics; ``create_app`` hands them over).

Promises:
- Never a 500 because of the teacher: when it is down, slow (``teacher_timeout_s``), refuses our key or
  answers something unparseable, the student's answer goes out with ``degraded: true`` and the input is
  queued with reason 'degraded'.
- Never a 500 because of the router: if scoring a batch fails, every text of it goes to the teacher (route
  reason ``router_error``), and the student's answer is the degraded reply if the teacher fails too. A router
  file that does not belong to the served weights (``distill.serve.router.fingerprint``) is refused at startup.
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

Concurrency model: one event loop, two helper threads per process. The loop does HTTP only (httptools on uvloop).
The model runs in its own thread behind the micro-batcher (``distill.serve.batcher``: no batching window; what
queues during one model call is the next batch), with the router's scoring in the same call. The loop's store
connection only reads (API keys, the teacher cache, queue counts): in WAL mode a reader never waits for a writer.
Every write (queue entries, paid teacher calls) runs on ``StoreWriter``'s thread and connection, and the request
awaits its commit: so while another process (``distill import``, ``label``) holds the write lock, only the requests
that write wait for it, and a 2xx still means committed.

``--workers N``: N such processes share the port (uvicorn's supervisor; a worker that dies is replaced). They
share the store: keys are read per request, the queue and the ledger are written in transactions, and a routed text
is paid for by one worker only (a claim per cache key in ``teacher_claims``; the others read its answer). Each
worker loads its own model copy and reads the store every ``poll_s`` for a new serving model or a rollout verdict.

Measured where the milliseconds went (py-spy on the demo student, batch 1): a fixed 5 ms micro-batch window was
more than half of a lone request's latency; onnxruntime's spinning pool threads burnt ~20 ms of CPU per request
that the event loop needed; Starlette's ``BaseHTTPMiddleware``, FastAPI's response encoding, h11 and ``uuid4`` were
most of the rest (bench/README.md, serving).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import time
from collections import OrderedDict
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import orjson
from fastapi import Request
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict

from distill import runs
from distill.errors import DistillError
from distill.project import Project
from distill.runs import ModelRef
from distill.serve import keys as keys_mod
from distill.serve import queue as fq
from distill.serve.batcher import MicroBatcher
from distill.serve.common import (
    BODY_ERRORS,
    ROLES,
    ChatMessage,
    FeedbackOut,
    ModelList,
    Reject,
    ServeConfig,
    TeacherGate,
    Usage,
    app_skeleton,
    bearer_openapi,
    chat_responses,
    error_responses,
    feedback_input,
    last_user_text,
    serving,
)
from distill.serve.guard import deadline_protocol
from distill.serve import rollout as rollout_mod
from distill.serve.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE, Metrics
from distill.serve.rollout import Rollout, RolloutConfig
from distill.serve.router import ROUTER_FILE, Router, RouterConfig, RouterDecision
from distill.students.predictor import load_predictor

log = logging.getLogger("distill.serve")


# ------------------------------------------------------------------------------------------------
# the model (distill.students.predictor), its router and its micro-batcher


def load_router(pred) -> tuple[Router, bool]:
    """The calibrated router saved next to the model, or a pass-through one (student answers all)."""
    if (Path(pred.path) / ROUTER_FILE).exists():
        r = Router.load(pred.path)
        if r.config.labels != list(pred.labels):
            raise DistillError(f"{pred.path / ROUTER_FILE}: calibrated for labels {r.config.labels}, the model has "
                               f"{list(pred.labels)}", hint="re-run `distill route calibrate PROJECT`")
        return r, True
    return Router(RouterConfig(labels=list(pred.labels), ood="none")), False


@dataclass
class Slot:
    """One loaded model: the predictor, its router and its micro-batcher (the promoted model, or a candidate)."""

    ref: ModelRef
    pred: Any
    router: Router
    calibrated: bool
    batcher: MicroBatcher | None = None

    @property
    def name(self) -> str:
        return self.ref.run_id

    def infer(self, texts: list[str]) -> list[RouterDecision]:
        """The student's forward pass and the router's decisions, in the model thread (the event loop only does
        HTTP). A failing router never fails the request: everything goes to the teacher (reason 'router_error')."""
        logits, feats = self.router.student_features(self.pred, texts)
        try:
            return self.router.decide(logits, self.router.features(feats, texts))
        except Exception:
            log.exception("router failed on a batch of %d; sending it to the teacher", len(texts))
            return self.router.fallback(logits)

    def start(self, cfg: ServeConfig, metrics: Metrics) -> "Slot":
        name = self.name

        def run(texts: list[str]) -> list[RouterDecision]:
            t0 = time.perf_counter()
            out = self.infer(texts)
            # model-thread busy time: near 1 s per second means the model is the bottleneck, well below it the HTTP side
            metrics.batch(len(texts), name, time.perf_counter() - t0)
            return out

        self.batcher = MicroBatcher(run, cfg.batch_size, cfg.batch_wait_ms)
        return self

    async def stop(self) -> None:
        """Finish what this model holds (a swap sends new requests elsewhere first), then stop its worker."""
        if self.batcher is not None:
            if not await self.batcher.drain():
                log.error("model %s: requests still waiting after 60 s at swap time", self.name)
            await self.batcher.close()


def _ids():
    """Result ids: a random 32-bit prefix per process and a counter -- unique across workers and restarts with
    high probability, and no ``os.urandom`` syscall per result (uuid4 was ~4% of the event loop's time)."""
    prefix = f"res-{random.SystemRandom().getrandbits(32):08x}"
    n = 0
    while True:
        n += 1
        yield f"{prefix}{n:08x}"


def load_slot(ref: ModelRef, cfg: ServeConfig, router: Router | None = None) -> Slot:
    pred = load_predictor(ref.path, cfg.backend, cfg.device, threads=cfg.n_threads, spin=cfg.spin)
    if router is not None:
        return Slot(ref, pred, router, True)
    r, calibrated = load_router(pred)
    if not calibrated:
        log.warning("%s: no %s next to the model; the student answers everything (run `distill route calibrate`)",
                    pred.path, ROUTER_FILE)
    return Slot(ref, pred, r, calibrated)


# ------------------------------------------------------------------------------------------------
# the app


def create_app(project_dir: str | Path, *, model_path: str | Path | None = None, shadow_rate: float = 0.0,
               require_key: bool = True, config: ServeConfig | None = None, teacher=None,
               router: Router | None = None, rollout: RolloutConfig | None = None):
    """The FastAPI app for ``project_dir``. ``config`` holds every setting (the keyword arguments above
    override its fields); ``teacher`` / ``router`` replace the project's (tests, or a custom setup);
    ``rollout`` serves a candidate beside the promoted model (``distill.serve.rollout``)."""
    cfg = config or ServeConfig()
    cfg.model_path = str(model_path) if model_path is not None else cfg.model_path
    cfg.shadow_rate = shadow_rate if shadow_rate else cfg.shadow_rate
    cfg.require_key = require_key and cfg.require_key
    cfg.check()

    # Load what can fail before the server starts listening: a bad path is a DistillError at startup.
    project = Project.open(project_dir)
    spec = project.spec
    if spec.kind != "classify":
        # extract / generate: the GGUF student behind /v1/chat/completions (distill.serve.lm_app)
        project.close()
        if rollout is not None and rollout.candidate:
            raise DistillError("canary rollouts serve classify students only (for now)",
                               hint="drop --candidate; extract/generate models are promoted by `distill iterate`")
        from distill.serve.lm_app import create_lm_app

        return create_lm_app(project_dir, cfg, teacher=teacher, router=router)
    try:
        # the promoted model, never a model whose quality gate failed (unless pinned with --model)
        chosen = project.serving_model(cfg.model_path)
        cand_ref = None
        if rollout is not None and rollout.candidate:
            rollout.check()
            cand_ref = project.model(rollout.candidate) if Path(rollout.candidate).exists() or \
                (project.root / rollout.candidate).exists() else project.model(run_id=rollout.candidate)
            if cand_ref.run_id == chosen.run_id:
                raise DistillError(f"the candidate {cand_ref.run_id} is the model already served",
                                   hint="pass another run id with --candidate")
    finally:
        project.close()     # the store is re-opened in the event loop's thread (sqlite connections are per thread)
    root = Path(project_dir).resolve()
    promoted = load_slot(chosen, cfg, router)
    candidate = load_slot(cand_ref, cfg) if cand_ref is not None else None
    if candidate is not None and list(candidate.pred.labels) != list(promoted.pred.labels):
        raise DistillError(f"the candidate {cand_ref.run_id} has labels {list(candidate.pred.labels)}, the promoted "
                           f"model {list(promoted.pred.labels)}", hint="a candidate must answer the same task")
    pred = promoted.pred            # tokenizer for chat usage counts (the same for every model of the project)
    max_chars = cfg.max_text_chars or spec.max_text_chars
    metrics = Metrics()
    state: dict[str, Any] = {"slot": promoted, "candidate": candidate, "rollout": None}
    recent: OrderedDict[str, dict] = OrderedDict()
    rng = random.Random(cfg.seed)
    background: set[asyncio.Task] = set()
    next_id = _ids().__next__
    follow_store = cfg.model_path is None       # a pinned --model is never swapped

    def spawn(coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        background.add(task)
        task.add_done_callback(background.discard)

    @asynccontextmanager
    async def lifespan(app):
        async with serving(project_dir, cfg, metrics, state, background, teacher):
            promoted.start(cfg, metrics)
            if candidate is not None:
                candidate.start(cfg, metrics)
                ro = Rollout(rollout, candidate.name, promoted.name)
                prior = rollout_mod.read_state(state["project"].store)
                if prior and prior.get("candidate") == candidate.name and prior.get("state") in ("rolled_back",
                                                                                                 "promoted"):
                    # another worker (or an earlier run of this server) already judged this candidate
                    ro.state, ro.why = prior["state"], prior.get("why")
                    state["candidate"] = None
                    await candidate.stop()
                state["rollout"] = ro
            log.info("serving %s: model %s (%s, from %s); router %s; shadow %.3f%s", spec.name, chosen.describe(),
                     type(pred).__name__, pred.path, "calibrated" if promoted.calibrated else "pass-through",
                     cfg.shadow_rate, "" if candidate is None else
                     f"; candidate {candidate.name} ({rollout.mode} {rollout.share:.3f})")
            state["poller"] = asyncio.get_running_loop().create_task(poll_store())
            try:
                yield
            finally:
                state["poller"].cancel()
                for s in {id(x): x for x in (state["slot"], state["candidate"], promoted) if x is not None}.values():
                    if s.batcher is not None:
                        await s.batcher.close()

    def key_ok(raw: str | None) -> bool:
        # One indexed SELECT on the loop's connection (WAL: never waits for a writer), no cache, so a revoked
        # key stops working at once. Nothing here writes, so nothing here takes the write lock.
        return keys_mod.verify_key(state["project"].store, raw) is not None

    app = app_skeleton(f"distill: {spec.name}", lifespan, cfg, metrics, key_ok)
    app.state.model = chosen          # which model answers, and why (serve prints it at start)

    def check_texts(texts: list[str], field: str = "texts") -> None:
        if not texts:
            raise Reject(422, f"`{field}` is empty", "send at least one text", param=field)
        if len(texts) > cfg.max_texts:
            raise Reject(422, f"`{field}` has {len(texts)} items; the limit is {cfg.max_texts} per request",
                          "split the batch into several requests", param=field)
        for i, t in enumerate(texts):
            where = f"{field}[{i}]" if field == "texts" else field
            if len(t) > max_chars:
                raise Reject(422, f"`{where}` has {len(t)} characters; the limit is {max_chars}",
                              "shorten the text (the limit is `max_text_chars` in distill.yaml)", param=where)
            if not t.strip():
                raise Reject(422, f"`{where}` is empty", "send non-empty texts", param=where)

    async def classify(texts: list[str], request: Request | None = None) -> list[dict[str, Any]]:
        """The whole pipeline for a batch of texts; queue entries are committed before it returns."""
        t0 = time.perf_counter()
        slot: Slot = state["slot"]
        ro: Rollout | None = state["rollout"]
        sampled = ro is not None and ro.sample()
        answering = state["candidate"] if sampled and ro.cfg.mode == "canary" else slot
        try:
            decisions = await answering.batcher.submit(texts)
        except Exception:
            if answering is slot:
                raise
            # a failing candidate never fails a request: the promoted model answers instead
            log.exception("candidate %s failed on a request; the promoted model answers it", answering.name)
            ro.stats.candidate_errors += 1
            answering, sampled = slot, False
            decisions = await slot.batcher.submit(texts)
        gate: TeacherGate = state["gate"]
        routed = [i for i, d in enumerate(decisions) if d.routed_to == "teacher"]
        answers = await asyncio.gather(*(gate.answer(texts[i]) for i in routed)) if routed else ()
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
            results.append({"id": next_id(), "label": out_label, "probs": d.probs,
                            "confidence": d.confidence, "ood_score": d.ood_score, "routed_to": d.routed_to,
                            "reason": d.reason, "degraded": degraded, "student_label": d.label,
                            "teacher": teacher_outcome, "served_by": answering.name})
        if entries:
            # one transaction for the request's entries, committed before the response exists
            await state["writer"].run(fq.enqueue_many, entries)
        elapsed = time.perf_counter() - t0
        ms = round(elapsed * 1000, 3)
        if request is not None:
            request.scope["distill.model"] = answering.name      # the latency histogram's model label
        for text, d, r in zip(texts, decisions, results):
            metrics.answered(d.routed_to, d.reason, r["degraded"])
            recent[r["id"]] = {"text": text, "label": r["label"], "conf": d.confidence}
            r["latency_ms"] = ms
            if d.routed_to == "student" and cfg.shadow_rate > 0 and rng.random() < cfg.shadow_rate:
                spawn(shadow(r["id"], text, d))
        while len(recent) > cfg.recent_ids:
            recent.popitem(last=False)
        if ro is not None and ro.active:
            ro.latency("candidate" if answering is not slot else "promoted", elapsed)
            if sampled:
                known = {i: a for i, (a, _) in teacher_answer.items() if a is not None}
                spawn(compare(texts, decisions, answering is not slot, known))
        return results

    async def compare(texts: list[str], decisions: list[RouterDecision], by_candidate: bool,
                      known: dict[int, Any]) -> None:
        """After the response: the other model's answers on the same texts, the teacher's where asked, the verdict."""
        ro: Rollout | None = state["rollout"]
        cand, slot = state["candidate"], state["slot"]
        if ro is None or not ro.active or cand is None:
            return
        other = slot if by_candidate else cand
        try:
            other_dec = await other.batcher.submit(texts)
        except Exception:
            log.exception("rollout comparison: model %s failed", other.name)
            if other is cand:
                ro.stats.candidate_errors += 1
            return
        c_dec, p_dec = (decisions, other_dec) if by_candidate else (other_dec, decisions)
        for i, text in enumerate(texts):
            t_ans = known.get(i)
            if t_ans is None and ro.check_teacher():
                t_ans, _ = await state["gate"].answer(text)
            ro.compared(c_dec[i].label, p_dec[i].label, t_ans)
        v = ro.verdict()
        if v is not None:
            await (rollback if v[0] == "rollback" else promote)(v[1])

    async def rollback(why: str) -> dict:
        ro: Rollout | None = state["rollout"]
        if ro is None or not ro.active:
            raise Reject(409, "no canary is running", "start one with `distill serve --candidate RUN_ID`")
        ro.state, ro.why = "rolled_back", why
        log.error("rollout: candidate %s rolled back: %s", ro.candidate_run, why)
        await state["writer"].run(rollout_mod.write_state, ro.candidate_run, "rolled_back", why, **ro.stats.summary())
        status = ro.status()
        await unload_candidate()
        return status

    async def unload_candidate() -> None:
        """A judged candidate takes no traffic: free its model (what it holds is finished first)."""
        cand, state["candidate"] = state["candidate"], None
        if cand is not None and cand is not state["slot"]:
            await cand.stop()

    async def promote(why: str) -> dict:
        ro: Rollout | None = state["rollout"]
        if ro is None or not ro.active:
            raise Reject(409, "no canary is running", "start one with `distill serve --candidate RUN_ID`")
        ro.state, ro.why = "promoted", why
        await state["writer"].run(runs.promote, root, ro.candidate_run, f"canary: {why}")
        await state["writer"].run(rollout_mod.write_state, ro.candidate_run, "promoted", why, **ro.stats.summary())
        log.warning("rollout: candidate %s promoted: %s", ro.candidate_run, why)
        await swap(state["candidate"])
        return ro.status()

    async def swap(new: Slot) -> None:
        """New requests go to ``new`` at once; the old model answers what it already holds, then stops."""
        old: Slot = state["slot"]
        if new is old:
            return
        if new.batcher is None:
            new.start(cfg, metrics)
        state["slot"] = new
        app.state.model = new.ref
        if state["candidate"] is new:
            state["candidate"] = None
        log.warning("serving model %s now (was %s)", new.name, old.name)
        await old.stop()

    async def poll_store() -> None:
        """Follow the store: a rollout judged by another worker (or `distill rollout`), and a new serving model
        (promoted by another worker, `distill rollout promote` or `distill iterate`)."""
        store = state["project"].store
        while True:
            await asyncio.sleep(cfg.poll_s)
            try:
                ro: Rollout | None = state["rollout"]
                if ro is not None and ro.active:
                    st = rollout_mod.read_state(store)
                    if st and st.get("candidate") == ro.candidate_run and st.get("state") in ("rolled_back", "promoted"):
                        ro.state, ro.why = st["state"], st.get("why")
                        log.warning("rollout: candidate %s %s elsewhere: %s", ro.candidate_run, ro.state, ro.why)
                        if ro.state == "rolled_back":
                            await unload_candidate()
                if not follow_store:
                    continue
                run_id = store.get_meta(runs.SERVING_KEY)
                if run_id and run_id != state["slot"].name:
                    cand = state["candidate"]
                    if cand is not None and cand.name == run_id:
                        await swap(cand)
                    else:
                        ref = runs.serving_model(store, root, None, spec.kind)
                        await swap(await asyncio.to_thread(load_slot, ref, cfg))
            except asyncio.CancelledError:
                raise
            except Exception:     # a bad new model must not stop the service: keep serving the old one
                log.exception("could not follow the store (serving model / rollout); still serving %s",
                              state["slot"].name)
                await asyncio.sleep(30)

    async def shadow(rid: str, text: str, d: RouterDecision) -> None:
        ans, outcome = await state["gate"].answer(text)
        if ans is None:
            log.info("shadow %s: no teacher answer (%s)", rid, outcome)
            return
        metrics.shadow(ans != d.label)
        if ans != d.label:
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
        slot: Slot = state["slot"]
        ro: Rollout | None = state["rollout"]
        body.update({"project": spec.name, "model": slot.name, "model_path": str(slot.pred.path),
                     "model_why": slot.ref.why, "backend": type(slot.pred).__name__, "labels": list(slot.pred.labels),
                     "router": "calibrated" if slot.calibrated else "pass-through",
                     "teacher": None if gate is None or gate.tspec is None else gate.tspec.name,
                     "teacher_problem": None if gate is None else gate.problem, "shadow_rate": cfg.shadow_rate,
                     "candidate": None if ro is None else ro.candidate_run,
                     "rollout": None if ro is None else ro.state, "worker_pid": os.getpid()})
        return body

    @app.get("/metrics", response_class=PlainTextResponse, responses={
        200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text"},
        **error_responses(401)})
    async def metrics_endpoint():
        gauges = []
        for s in {id(x): x for x in (state["slot"], state["candidate"]) if x is not None}.values():
            role = "promoted" if s is state["slot"] else "candidate"
            gauges.append(("distill_batch_queue", "Requests waiting for a model call.", s.batcher.queued,
                           {"model": s.name, "role": role}))
        ro: Rollout | None = state["rollout"]
        if ro is not None:
            st = ro.stats.summary()
            for k in ("sampled", "compared", "teacher_checked", "candidate_errors"):
                gauges.append((f"distill_rollout_{k}", f"Canary: {k.replace('_', ' ')} (this worker).", st[k], None))
            for k in ("agreement", "candidate_teacher_disagreement", "promoted_teacher_disagreement",
                      "candidate_p95_ms", "promoted_p95_ms"):
                if st[k] is not None:
                    gauges.append((f"distill_rollout_{k}", f"Canary: {k.replace('_', ' ')} (this worker).", st[k], None))
            gauges.append(("distill_rollout_active", "1 while the candidate takes traffic.", float(ro.active),
                           {"candidate": ro.candidate_run, "state": ro.state}))
        body = metrics.render(fq.counts(state["project"].store), gauges=gauges)
        return Response(body, media_type=METRICS_CONTENT_TYPE)

    @app.get("/v1/models", responses={200: {"model": ModelList}, **error_responses(401)})
    async def models():
        return {"object": "list", "data": [{"id": spec.name, "object": "model", "created": 0, "owned_by": "distill"}]}

    @app.post("/v1/classify", responses={200: {"model": ClassifyOut}, **error_responses(*BODY_ERRORS)})
    async def classify_endpoint(body: ClassifyIn, request: Request):
        check_texts(body.texts)
        # orjson straight to bytes: FastAPI's encoder walks every float of every result in Python (measured:
        # ~0.3 ms of a batch-1 request); ClassifyOut above still documents the shape
        return Response(orjson.dumps({"model": spec.name, "results": await classify(body.texts, request)}),
                        media_type="application/json")

    @app.get("/v1/rollout", responses={200: {"model": RolloutOut}, **error_responses(401)})
    async def rollout_status():
        ro: Rollout | None = state["rollout"]
        stored = rollout_mod.read_state(state["project"].store)
        return {"serving": state["slot"].name, "rollout": None if ro is None else ro.status(), "stored": stored}

    @app.post("/v1/rollout/promote", responses={200: {"model": RolloutOut}, **error_responses(*BODY_ERRORS, 409)})
    async def rollout_promote(body: RolloutAction):
        await promote(body.why or "promoted by an operator (POST /v1/rollout/promote)")
        return await rollout_status()

    @app.post("/v1/rollout/rollback", responses={200: {"model": RolloutOut}, **error_responses(*BODY_ERRORS, 409)})
    async def rollout_rollback(body: RolloutAction):
        await rollback(body.why or "rolled back by an operator (POST /v1/rollout/rollback)")
        return await rollout_status()

    @app.post("/v1/chat/completions", responses=chat_responses(
        ChatCompletionOut, "stream: true — the label as one chunk, then the finish reason, usage if asked for, and "
        "[DONE]", error_responses(*BODY_ERRORS)))
    async def chat(body: ChatCompletionIn, request: Request):
        i, text = last_user_text(body.messages)
        if text is None:
            raise Reject(422, "no user message with text content", "the last user message is the input",
                          param="messages")
        check_texts([text], field=f"messages[{i}].content")
        # the answer (and its queue entry, committed) exists before any byte of the response is sent,
        # streamed or not
        r = (await classify([text], request))[0]
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

    @app.post("/v1/feedback", responses={200: {"model": FeedbackOut}, **error_responses(*BODY_ERRORS)})
    async def feedback(body: FeedbackIn):
        if body.label not in spec.label_names:
            raise Reject(422, f"`label` {body.label!r} is not one of {spec.label_names}",
                          "send one of the project's labels", param="label")
        text, student, conf = feedback_input(recent, body.id, body.text, max_chars, cfg.recent_ids, "label",
                                             "from a /v1/classify result")
        # for feedback entries teacher_answer holds the label the client says is right (not yet verified);
        # fq.enqueue is looked up per call (tests replace it), and the commit is awaited before the 2xx
        qid = await state["writer"].run(fq.enqueue, text, "feedback", student_answer=student, student_conf=conf,
                                        teacher_answer=body.label, note=body.note)
        metrics.feedback()
        return {"queued": qid}

    app.openapi = bearer_openapi(app, lambda schemas: _document_limits(schemas, list(spec.label_names),
                                                                        cfg.max_texts, max_chars))
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


class ChatCompletionIn(BaseModel):
    """An OpenAI chat.completions request: the last user message is the input. The other fields OpenAI
    clients send (temperature, max_tokens, ...) are accepted and ignored."""
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    messages: list[ChatMessage]
    stream: bool | None = None


def _include_usage(body: ChatCompletionIn) -> bool:
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
    served_by: str                 # run id of the student model that answered (the promoted one, or a canary)
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


class ChatCompletionOut(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[_ChatChoice]
    usage: Usage
    distill: ClassifyResult


class RolloutAction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    why: str | None = None         # recorded with the verdict (meta.rollout, the server's log)


class RolloutOut(BaseModel):
    serving: str                   # run id of the model answering now
    rollout: dict[str, Any] | None  # this worker's live comparison (distill.serve.rollout.Rollout.status)
    stored: dict[str, Any] | None  # the verdict every worker follows (meta.rollout)


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
    candidate: str | None = None
    rollout: str | None = None
    worker_pid: int | None = None  # the process that answered (serve --workers N runs N)


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
    message["role"]["enum"] = ROLES
    for t in texts_in(message["content"]):
        t.update(text)


def uvicorn_config(app, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "info", http: str = "auto"):
    """How ``serve`` runs ``app`` with uvicorn (tests run the same): httptools (h11 where it is not installed, or
    with ``http="h11"``) with the header deadline (``guard.deadline_protocol``: uvicorn has none of its own), uvloop
    when installed (uvicorn's "auto" loop), uvicorn's 5 s keep-alive, no access log (it would print client
    addresses and paths for every request; our own log lines carry request ids and outcomes, never headers,
    so never a key)."""
    import uvicorn

    cfg: ServeConfig = app.state.config
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                          http=deadline_protocol(cfg.header_timeout_s, http), timeout_keep_alive=5)


def serve(project_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "info",
          workers: int = 1, **kwargs) -> None:
    """Run the service with uvicorn. Binds loopback unless told otherwise; refuses to serve without keys on
    any other interface. ``workers`` > 1: that many processes share the port (uvicorn's supervisor restarts a
    worker that dies), each with its own model copy, event loop and store connections; SQLite in WAL mode is
    the shared state (keys, failure queue, teacher ledger: every write is one transaction, ``StoreWriter``), and
    /metrics adds up every worker (prometheus_client's multiprocess mode)."""
    import sys

    import uvicorn

    cfg: ServeConfig = kwargs.get("config") or ServeConfig()
    no_keys = kwargs.get("require_key") is False or not cfg.require_key
    if no_keys and host not in ("127.0.0.1", "localhost", "::1"):
        raise DistillError(f"refusing to serve without API keys on {host}",
                           hint="drop --no-auth, or bind 127.0.0.1 for local experiments")
    if workers < 1:
        raise DistillError(f"--workers must be >= 1, got {workers}")
    ro: RolloutConfig | None = kwargs.get("rollout")
    if ro is not None and ro.candidate:
        # a (re)start with --candidate starts a new rollout: an earlier verdict on it no longer holds
        p = Project.open(project_dir)
        try:
            rollout_mod.write_state(p.store, ro.candidate, "starting", "distill serve --candidate")
        finally:
            p.close()
    if workers == 1:
        app = create_app(project_dir, **kwargs)
        print(f"distill serve: model {app.state.model.describe()}", file=sys.stderr, flush=True)
        uvicorn.Server(uvicorn_config(app, host, port, log_level=log_level)).run()
        return
    if kwargs.keys() - {"config", "rollout"}:
        raise DistillError(f"with --workers, serve takes only config= and rollout= (got {sorted(kwargs)})")
    # Fail here, not in N workers: the model must exist and be servable.
    p = Project.open(project_dir)
    try:
        ref = p.serving_model(cfg.model_path)
    finally:
        p.close()
    print(f"distill serve: model {ref.describe()} in {workers} worker processes", file=sys.stderr, flush=True)
    import shutil
    import tempfile
    from dataclasses import asdict

    # the workers' metric files are memory-mapped and written on every update: in RAM where the OS offers it
    shm = Path("/dev/shm")
    mp_dir = tempfile.mkdtemp(prefix="distill-metrics-", dir=shm if shm.is_dir() and os.access(shm, os.W_OK) else None)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = mp_dir          # read by prometheus_client in each worker
    os.environ[WORKER_ENV] = json.dumps({"project": str(Path(project_dir).resolve()), "config": asdict(cfg),
                                         "rollout": None if ro is None else asdict(ro)})
    os.environ["DISTILL_HEADER_TIMEOUT_S"] = str(cfg.header_timeout_s)
    try:
        uvicorn.run("distill.serve.app:app_from_env", factory=True, workers=workers, host=host, port=port,
                    log_level=log_level, access_log=False, timeout_keep_alive=5,
                    http="distill.serve.guard:EnvDeadlineProtocol")
    finally:
        shutil.rmtree(mp_dir, ignore_errors=True)


WORKER_ENV = "DISTILL_SERVE_WORKER"


def app_from_env():
    """The app of one ``--workers`` process (uvicorn's factory): the settings ``serve`` put in the environment."""
    spec = json.loads(os.environ[WORKER_ENV])
    ro = spec.get("rollout")
    return create_app(spec["project"], config=ServeConfig(**spec["config"]),
                      rollout=None if ro is None else RolloutConfig(**ro))
