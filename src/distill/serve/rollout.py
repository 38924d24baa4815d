"""Safe rollouts: serve a candidate model beside the promoted one, compare them live, roll back on its own,
promote without dropping a request.

    distill serve P --candidate RUN_ID [--canary 0.1 | --canary 0.1 --candidate-shadow] [--promote-after 2000]
    distill rollout status|promote|rollback P          # or GET /v1/rollout, POST /v1/rollout/{promote,rollback}

- **Canary** (default): a seeded ``share`` of requests is answered by the candidate (its own router decides what
  goes to the teacher). **Shadow** (``mode="shadow"``): the promoted model answers everything and the candidate
  sees a copy of the sampled requests after the response; it costs CPU, never latency.
- **What is compared, on the same texts**: each sampled text gets both models' answers (the model that did not
  answer runs in the background), so agreement is paired; a ``teacher_check_rate`` share of them is also put to
  the teacher through the service's gate (cache first, then a paid call in the same ledger), so each model's
  disagreement with the teacher is measured on identical inputs. Latency: the candidate's request latency (its own
  path only) against the promoted model's over the same period.
- **Automatic rollback** when, after ``min_compared`` teacher-checked texts, the candidate disagrees with the teacher
  more than the promoted model by over ``max_disagreement_increase``, or when its p95 latency passes
  ``max_p95_ratio`` x the promoted model's (after ``min_latency_samples`` requests each). The verdict is written to
  the store (``meta.rollout``), so every worker process and a restart see it; the candidate stops answering at once.
- **Promotion** (``promote_after`` compared texts within bounds, or asked for): ``runs.promote`` in the store, then a
  hot swap. Every worker polls the store (``ServeConfig.poll_s``) and swaps to whatever the project's serving model is now --
  so `distill iterate` promoting a new model is picked up live too. A swap sends new requests to the new model and
  lets the old one finish what it holds (``MicroBatcher.drain``): no request is dropped or failed.

Why paired comparison against the teacher and not accuracy: there is no gold in production; the teacher is the
reference the student was trained to imitate, and comparing both models on the same texts removes the traffic mix
from the difference (the error of a difference of two rates on n paired texts is about sqrt(2p/n): at 200 texts and
10% disagreement ~0.03, hence the 0.05 default).
"""

from __future__ import annotations

import json
import random
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from distill.errors import DistillError

ROLLOUT_KEY = "rollout"          # meta: JSON of the current rollout (candidate, state, why, at)


@dataclass
class RolloutConfig:
    candidate: str | None = None            # run id (or model folder) of the candidate
    mode: Literal["canary", "shadow"] = "canary"
    share: float = 0.1                      # requests sampled for the candidate (canary: it answers them)
    teacher_check_rate: float = 1.0         # share of sampled texts also put to the teacher (cache first)
    min_compared: int = 200                 # teacher-checked texts before any verdict on disagreement
    max_disagreement_increase: float = 0.05  # candidate's disagreement with the teacher minus the promoted model's
    max_p95_ratio: float = 1.5              # candidate p95 request latency / promoted p95
    min_latency_samples: int = 50           # requests of each model before any verdict on latency
    promote_after: int | None = None        # promote on its own after this many teacher-checked texts within bounds
    seed: int = 0

    def check(self) -> None:
        if self.mode not in ("canary", "shadow"):
            raise DistillError(f"rollout mode {self.mode!r} is not canary or shadow")
        if not 0.0 < self.share <= 1.0 or not 0.0 <= self.teacher_check_rate <= 1.0:
            raise DistillError(f"canary share must be in (0, 1] (got {self.share}) and teacher check rate in [0, 1] "
                               f"(got {self.teacher_check_rate})", hint="e.g. --canary 0.1")
        if self.min_compared < 1 or self.min_latency_samples < 1 or self.max_p95_ratio <= 0:
            raise DistillError("min_compared and min_latency_samples must be >= 1, max_p95_ratio > 0")
        if self.promote_after is not None and self.promote_after < self.min_compared:
            raise DistillError(f"--promote-after {self.promote_after} is below min_compared {self.min_compared}: a "
                               "candidate would be promoted before it could be judged")


@dataclass
class RolloutStats:
    sampled: int = 0               # requests sampled for the candidate
    compared: int = 0              # texts both models answered
    agreed: int = 0                # ... with the same answer
    teacher_checked: int = 0       # texts both answered and the teacher answered too
    candidate_disagreed: int = 0   # ... where the candidate's answer differs from the teacher's
    promoted_disagreed: int = 0    # ... where the promoted model's answer differs from the teacher's
    candidate_errors: int = 0      # candidate calls that raised (the promoted model answered instead)
    latency: dict[str, deque] = field(default_factory=lambda: {"candidate": deque(maxlen=2000),
                                                               "promoted": deque(maxlen=2000)})

    def p95_ms(self, who: str) -> float | None:
        xs = self.latency[who]
        return float(np.percentile(np.fromiter(xs, float), 95)) * 1000 if xs else None

    def summary(self) -> dict[str, Any]:
        n = self.teacher_checked
        return {"sampled": self.sampled, "compared": self.compared,
                "agreement": self.agreed / self.compared if self.compared else None,
                "teacher_checked": n,
                "candidate_teacher_disagreement": self.candidate_disagreed / n if n else None,
                "promoted_teacher_disagreement": self.promoted_disagreed / n if n else None,
                "candidate_errors": self.candidate_errors,
                "candidate_p95_ms": self.p95_ms("candidate"), "promoted_p95_ms": self.p95_ms("promoted"),
                "latency_samples": {k: len(v) for k, v in self.latency.items()}}


class Rollout:
    """The live comparison of one candidate with the promoted model (one per worker process)."""

    def __init__(self, cfg: RolloutConfig, candidate_run: str, promoted_run: str):
        cfg.check()
        self.cfg = cfg
        self.candidate_run = candidate_run
        self.promoted_run = promoted_run
        self.rng = random.Random(cfg.seed)
        self.stats = RolloutStats()
        self.state: Literal["running", "rolled_back", "promoted"] = "running"
        self.why: str | None = None

    @property
    def active(self) -> bool:
        return self.state == "running"

    def sample(self) -> bool:
        """Whether this request goes to the candidate (seeded, so a replayed traffic log picks the same ones)."""
        if not self.active:
            return False
        hit = self.rng.random() < self.cfg.share
        self.stats.sampled += hit
        return hit

    def check_teacher(self) -> bool:
        return self.rng.random() < self.cfg.teacher_check_rate

    def latency(self, who: str, seconds: float) -> None:
        if self.active:
            self.stats.latency[who].append(seconds)

    def compared(self, candidate_answer: Any, promoted_answer: Any, teacher_answer: Any = None) -> None:
        s = self.stats
        s.compared += 1
        s.agreed += candidate_answer == promoted_answer
        if teacher_answer is not None:
            s.teacher_checked += 1
            s.candidate_disagreed += candidate_answer != teacher_answer
            s.promoted_disagreed += promoted_answer != teacher_answer

    def verdict(self) -> tuple[str, str] | None:
        """("rollback" | "promote", why) once the evidence says so, else None."""
        if not self.active:
            return None
        s, c = self.stats, self.cfg
        if s.teacher_checked >= c.min_compared:
            cand = s.candidate_disagreed / s.teacher_checked
            prom = s.promoted_disagreed / s.teacher_checked
            if cand - prom > c.max_disagreement_increase:
                return "rollback", (f"the candidate disagreed with the teacher on {cand:.1%} of {s.teacher_checked} "
                                    f"checked texts, the promoted model on {prom:.1%} of the same texts (allowed "
                                    f"increase {c.max_disagreement_increase:.1%})")
        pc, pp = s.p95_ms("candidate"), s.p95_ms("promoted")
        if (pc is not None and pp is not None and len(s.latency["candidate"]) >= c.min_latency_samples
                and len(s.latency["promoted"]) >= c.min_latency_samples and pc > c.max_p95_ratio * pp):
            return "rollback", (f"the candidate's p95 latency {pc:.1f} ms is over {c.max_p95_ratio:g}x the promoted "
                                f"model's {pp:.1f} ms")
        if c.promote_after is not None and s.teacher_checked >= c.promote_after:
            return "promote", (f"canary within bounds on {s.teacher_checked} teacher-checked texts (teacher "
                               f"disagreement {s.candidate_disagreed / s.teacher_checked:.1%} vs "
                               f"{s.promoted_disagreed / s.teacher_checked:.1%})")
        return None

    def status(self) -> dict[str, Any]:
        return {"candidate": self.candidate_run, "promoted": self.promoted_run, "state": self.state, "why": self.why,
                "config": {k: v for k, v in asdict(self.cfg).items()}, **self.stats.summary()}


# -- the verdict in the store: every worker and every restart sees it ------------------------------------

def read_state(store) -> dict[str, Any] | None:
    raw = store.get_meta(ROLLOUT_KEY)
    return json.loads(raw) if raw else None


def write_state(store, candidate: str | None, state: str, why: str | None = None, **extra) -> dict[str, Any]:
    obj = {"candidate": candidate, "state": state, "why": why, "at": time.time(), **extra}
    with store.tx() as c:
        c.execute("INSERT OR REPLACE INTO meta(key, value) VALUES(?, ?)", (ROLLOUT_KEY, json.dumps(obj)))
    return obj
