"""The one interface every teacher implements, and the records that cross it.

A teacher turns chat messages into a ``TeacherReply``. It does not cache, parse, count cost or decide
about retries on bad answers: the labeller (``distill.labeling``) does all of that the same way for every
teacher, so caching and crash-safety are proven once. Transport-level retries (429/5xx/timeouts) are the
teacher's own business because only it knows its transport.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from distill.errors import DistillError
from distill.task import TaskKind, TeacherSpec


@dataclass
class TeacherRequest:
    key: str                      # cache key; also sent as the Idempotency-Key of HTTP teachers
    messages: list[dict[str, str]]
    kind: TaskKind
    labels: list[str] | None = None   # classify: the label names, so a local model can score them all


@dataclass
class TeacherReply:
    texts: list[str]                          # one per sample (n >= 1); texts[0] is the answer
    label_probs: dict[str, float] | None = None   # classify: a full distribution over the labels, if known
    logprobs: list[dict[str, Any]] | None = None  # choice 0, per token: {token, logprob, top_logprobs: [...]}
    tokens_in: int = 0
    tokens_out: int = 0
    latency_s: float = 0.0
    retries: int = 0                          # transport retries it took (429, 5xx, timeouts)
    raw: dict[str, Any] = field(default_factory=dict)   # JSON-serialisable answer as received (provenance)


class Teacher(Protocol):
    spec: TeacherSpec

    async def ask(self, req: TeacherRequest) -> TeacherReply:
        """One answer. Raises ``TeacherUnavailable`` when retries are exhausted, ``TeacherAuthError`` on
        401/403 (no point retrying), never returns a half-filled reply."""
        ...

    async def aclose(self) -> None: ...


class TeacherUnavailable(DistillError):
    """The teacher could not be reached or kept failing after all retries."""


class TeacherAuthError(DistillError):
    """The teacher rejected our credentials. Stop the run: every further call would fail the same way."""


class NoAnswer(Exception):
    """This one input gets no answer, for a reason that retrying will not fix (e.g. a replay recording
    has no entry for it). The labeller records a failed label with ``reason`` and moves on; nothing was
    paid, so no teacher_calls row is written."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
