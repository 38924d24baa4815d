"""Prometheus text exposition (format 0.0.4) for the service, without a client library.

A handful of counters and one latency histogram are all we expose, so a 60-line writer is simpler than a
dependency. All updates happen on the event loop thread, so no locking is needed.
"""

from __future__ import annotations

from collections import defaultdict

# Request latency buckets (seconds): the student answers in milliseconds, the teacher in seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Histogram:
    def __init__(self, buckets=LATENCY_BUCKETS):
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.total = 0
        self.sum = 0.0

    def observe(self, v: float) -> None:
        self.total += 1
        self.sum += v
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        sep = "," if labels else ""
        out = [f'{name}_bucket{{{labels}{sep}le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.total}')
        lab = f"{{{labels}}}" if labels else ""
        out += [f"{name}_sum{lab} {self.sum}", f"{name}_count{lab} {self.total}"]
        return out


class Metrics:
    def __init__(self):
        self.requests = defaultdict(int)          # (endpoint, status code) -> n
        self.inputs = defaultdict(int)            # routed_to -> n (texts, not requests)
        self.route_reasons = defaultdict(int)     # confident | low_confidence | ood -> n
        self.teacher_calls = defaultdict(int)     # ok | cache_hit | parse_error | error | timeout -> n
        self.teacher_spend = 0.0                  # USD of calls made by this process (cache hits are free)
        self.degraded = 0                         # texts answered by the student because the teacher failed
        self.shadow = 0                           # shadow comparisons finished
        self.shadow_disagreements = 0
        self.feedback = 0
        self.latency = defaultdict(Histogram)     # endpoint -> request latency
        self.tokens = defaultdict(int)            # LM: prompt | completion -> tokens the student read / wrote

    def routed_share(self) -> float:
        n = sum(self.inputs.values())
        return self.inputs.get("teacher", 0) / n if n else 0.0

    def render(self, queue_counts: dict[str, int] | None = None, engine_stats: dict | None = None) -> str:
        """``engine_stats``: the LM engine's ``stats()`` (numbers only are shown, as gauges ``distill_engine_*``)."""
        L: list[str] = []

        def block(name: str, kind: str, help_: str, rows: list[str]) -> None:
            L.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}", *rows])

        block("distill_requests_total", "counter", "HTTP requests by endpoint and status code.",
              [f'distill_requests_total{{endpoint="{e}",code="{c}"}} {n}' for (e, c), n in sorted(self.requests.items())])
        block("distill_inputs_total", "counter", "Texts answered, by who answered them.",
              [f'distill_inputs_total{{routed_to="{k}"}} {self.inputs.get(k, 0)}' for k in ("student", "teacher")])
        block("distill_route_reason_total", "counter", "Router decisions by reason.",
              [f'distill_route_reason_total{{reason="{k}"}} {n}' for k, n in sorted(self.route_reasons.items())])
        block("distill_routed_share", "gauge", "Share of texts the router sent to the teacher since start.",
              [f"distill_routed_share {self.routed_share()}"])
        block("distill_teacher_calls_total", "counter", "Teacher look-ups by result (cache_hit = answered from the store).",
              [f'distill_teacher_calls_total{{result="{k}"}} {n}' for k, n in sorted(self.teacher_calls.items())])
        block("distill_teacher_spend_usd_total", "counter", "Teacher spend of calls made by this server (USD).",
              [f"distill_teacher_spend_usd_total {self.teacher_spend}"])
        block("distill_degraded_total", "counter", "Texts the teacher should have answered but could not (student answered).",
              [f"distill_degraded_total {self.degraded}"])
        block("distill_shadow_total", "counter", "Shadow comparisons (teacher re-checked a student answer).",
              [f"distill_shadow_total {self.shadow}"])
        block("distill_shadow_disagreements_total", "counter", "Shadow comparisons where teacher and student differed.",
              [f"distill_shadow_disagreements_total {self.shadow_disagreements}"])
        block("distill_feedback_total", "counter", "Feedback entries received.", [f"distill_feedback_total {self.feedback}"])
        rows: list[str] = []
        for ep, h in sorted(self.latency.items()):
            rows += h.lines("distill_request_latency_seconds", f'endpoint="{ep}"')
        block("distill_request_latency_seconds", "histogram", "Request latency by endpoint.", rows)
        if self.tokens or engine_stats is not None:
            block("distill_tokens_total", "counter", "LM tokens: prompt (read by the student) and completion (written).",
                  [f'distill_tokens_total{{kind="{k}"}} {self.tokens.get(k, 0)}' for k in ("prompt", "completion")])
        for k, v in sorted((engine_stats or {}).items()):
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                name = "distill_engine_" + "".join(ch if ch.isalnum() else "_" for ch in str(k)).lower()
                block(name, "gauge", f"LM engine: {k} (since start, or now for queue and slot counts).",
                      [f"{name} {v}"])
        if queue_counts is not None:
            block("distill_failure_queue_new", "gauge", "Failure-queue entries waiting for the next round.",
                  [f'distill_failure_queue_new{{reason="{k}"}} {queue_counts.get(k, 0)}'
                   for k in ("routed", "shadow_disagreement", "feedback", "degraded")])
        return "\n".join(L) + "\n"
