"""The service's metrics, with ``prometheus_client`` (the library every Prometheus scraper expects).

Each app gets its own ``CollectorRegistry`` (tests build many apps in one process). With several worker
processes (``distill serve --workers N``) the counters and histograms live in prometheus_client's multiprocess
files (``PROMETHEUS_MULTIPROC_DIR``, set by ``serve`` before the workers start) and /metrics, whichever worker
answers it, adds up every worker's values (``MultiProcessCollector``).

Names are stable (dashboards depend on them): ``distill_requests_total{endpoint,code}``,
``distill_request_latency_seconds{endpoint,model}``, ``distill_inputs_total{routed_to}``,
``distill_route_reason_total{reason}``, ``distill_routed_share``, ``distill_teacher_calls_total{result}``,
``distill_teacher_spend_usd_total``, ``distill_degraded_total``, ``distill_shadow_total``,
``distill_shadow_disagreements_total``, ``distill_feedback_total``, ``distill_batch_size{model}``,
``distill_model_busy_seconds_total{model}``,
``distill_batch_queue``, ``distill_failure_queue_new{reason}``, ``distill_tokens_total{kind}`` (LM),
``distill_engine_*`` (LM engine gauges), ``distill_rollout_*`` (canary: ``distill.serve.rollout``).
"""

from __future__ import annotations

import os
from typing import Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client import multiprocess
from prometheus_client.core import GaugeMetricFamily

# Request latency buckets (seconds): the student answers in milliseconds, the teacher in seconds.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                   5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
QUEUE_REASONS = ("routed", "shadow_disagreement", "feedback", "degraded")

# no ``*_created`` series: the multiprocess mode (``--workers``) has none, so one process should not either
disable_created_metrics()


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._requests = Counter("distill_requests", "HTTP requests by endpoint and status code.",
                                 ("endpoint", "code"), registry=r)
        self._latency = Histogram("distill_request_latency_seconds", "Request latency by endpoint and serving model "
                                  "(promoted or candidate run).", ("endpoint", "model"), buckets=LATENCY_BUCKETS,
                                  registry=r)
        self._inputs = Counter("distill_inputs", "Texts answered, by who answered them.", ("routed_to",), registry=r)
        self._reasons = Counter("distill_route_reason", "Router decisions by reason.", ("reason",), registry=r)
        self._teacher = Counter("distill_teacher_calls", "Teacher look-ups by result (cache_hit = answered from the "
                                "store).", ("result",), registry=r)
        self._spend = Counter("distill_teacher_spend_usd", "Teacher spend of calls made by this server (USD).",
                              registry=r)
        self._degraded = Counter("distill_degraded", "Texts the teacher should have answered but could not (the "
                                 "student answered).", registry=r)
        self._shadow = Counter("distill_shadow", "Shadow comparisons (the teacher re-checked a student answer).",
                               registry=r)
        self._shadow_dis = Counter("distill_shadow_disagreements", "Shadow comparisons where teacher and student "
                                   "differed.", registry=r)
        self._feedback = Counter("distill_feedback", "Feedback entries received.", registry=r)
        self._batch = Histogram("distill_batch_size", "Texts per model call (micro-batch).", ("model",),
                                buckets=BATCH_BUCKETS, registry=r)
        self._busy = Counter("distill_model_busy_seconds", "Seconds the model thread spent in forward passes and router "
                             "scoring (rate ~1 per worker: the model is the bottleneck).", ("model",), registry=r)
        self._tokens = Counter("distill_tokens", "LM tokens: prompt (read by the student) and completion (written).",
                               ("kind",), registry=r)
        self._children: dict = {}
        # totals this process keeps for its own decisions (routed share of /healthz, the LM's engine view)
        self.inputs = {"student": 0, "teacher": 0}
        for k in ("student", "teacher"):            # present from the start, so a dashboard sees 0, not no data
            self._inputs.labels(k)

    # -- updates (all on the event loop thread) -------------------------------------------------------
    def _child(self, metric, *labels):
        """``metric.labels(*labels)``, remembered: prometheus_client builds and locks a key on every ``labels()``
        call, which was ~7% of the event loop's time per request (py-spy at 16 connections)."""
        key = (id(metric), labels)
        c = self._children.get(key)
        if c is None:
            c = self._children[key] = metric.labels(*labels)
        return c

    def request(self, endpoint: str, code: int, seconds: float | None = None, model: str = "") -> None:
        self._child(self._requests, endpoint, str(code)).inc()
        if seconds is not None:
            self._child(self._latency, endpoint, model).observe(seconds)

    def answered(self, routed_to: str, reason: str, degraded: bool = False) -> None:
        """One text: who answered it (a degraded text was answered by the student) and the router's reason."""
        who = "teacher" if routed_to == "teacher" and not degraded else "student"
        self.inputs[who] += 1
        self._child(self._inputs, who).inc()
        self._child(self._reasons, reason).inc()
        if degraded:
            self._degraded.inc()

    def teacher_call(self, result: str, cost: float = 0.0) -> None:
        self._child(self._teacher, result).inc()
        if cost:
            self._spend.inc(cost)

    def shadow(self, disagreed: bool) -> None:
        self._shadow.inc()
        if disagreed:
            self._shadow_dis.inc()

    def feedback(self) -> None:
        self._feedback.inc()

    def batch(self, size: int, model: str = "", seconds: float | None = None) -> None:
        # called from the model thread: prometheus_client's values are locked, our child cache is a dict (atomic
        # get/set under the GIL; a race at worst builds the same child twice)
        self._child(self._batch, model).observe(size)
        if seconds is not None:
            self._child(self._busy, model).inc(seconds)

    def tokens(self, kind: str, n: int) -> None:
        self._child(self._tokens, kind).inc(n)

    def routed_share(self) -> float:
        n = sum(self.inputs.values())
        return self.inputs["teacher"] / n if n else 0.0

    # -- the exposition ---------------------------------------------------------------------------------
    def render(self, queue_counts: dict[str, int] | None = None, engine_stats: dict | None = None,
               gauges: Iterable[tuple[str, str, float, dict[str, str] | None]] = ()) -> bytes:
        """Prometheus text: every counter and histogram (every worker's, added up, under ``--workers``), then the
        gauges read now: the routed share, the failure queue (``queue_counts``), LM engine numbers
        (``engine_stats``) and ``gauges`` = (name, help, value, labels) of the caller."""
        if multiprocess_dir():
            reg = CollectorRegistry()
            multiprocess.MultiProcessCollector(reg)
        else:
            reg = self.registry
        body = generate_latest(reg)
        now = CollectorRegistry(auto_describe=False)
        fams: list[GaugeMetricFamily] = []
        inputs = _sum_by_label(reg, "distill_inputs", "routed_to")
        n = sum(inputs.values())
        fams.append(GaugeMetricFamily("distill_routed_share", "Share of texts the teacher answered since start (all "
                                      "workers).", value=inputs.get("teacher", 0.0) / n if n else 0.0))
        if queue_counts is not None:
            g = GaugeMetricFamily("distill_failure_queue_new", "Failure-queue entries waiting for the next round.",
                                  labels=("reason",))
            for k in QUEUE_REASONS:
                g.add_metric((k,), queue_counts.get(k, 0))
            fams.append(g)
        for k, v in sorted((engine_stats or {}).items()):
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                name = "distill_engine_" + "".join(ch if ch.isalnum() else "_" for ch in str(k)).lower()
                fams.append(GaugeMetricFamily(name, f"LM engine: {k} (since start, or now for queue and slot counts; "
                                              "this worker).", value=v))
        by_name: dict[str, GaugeMetricFamily] = {}
        for name, help_, value, labels in gauges:
            if name not in by_name:
                by_name[name] = GaugeMetricFamily(name, help_, labels=tuple(labels or ()))
            by_name[name].add_metric(tuple((labels or {}).values()), value)
        fams += list(by_name.values())
        now.register(_Fixed(fams))
        return body + generate_latest(now)


class _Fixed:
    """A collector that yields metric families computed at scrape time."""

    def __init__(self, fams):
        self.fams = fams

    def collect(self):
        return iter(self.fams)


def _sum_by_label(reg: CollectorRegistry, name: str, label: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for fam in reg.collect():
        if fam.name == name:
            for s in fam.samples:
                if s.name == name + "_total":
                    k = s.labels.get(label, "")
                    out[k] = out.get(k, 0.0) + s.value
    return out
