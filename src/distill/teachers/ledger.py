"""The ledger: what a teacher call cost, and the rows that record calls and labels in the store.

``teacher_calls`` is both the cache (a key already there is answered without a call) and the ledger (every
paid call, with its tokens, cost and latency). Labelling (``distill.labeling``), serving (``distill.serve``)
and judging (``distill.judge``) all write it through ``record_call`` and read it back through
``reply_from_row``, so a call costs the same and looks the same whoever made it.

These are plain synchronous functions that take the caller's open transaction ``c`` (``store.tx()``): the
caller decides what commits together (the labeller commits a call and its label in one transaction, so
``kill -9`` never leaves a paid call without its label). No asyncio here and no import of the labeller, so
the service and the judge can use the ledger without pulling in the labelling machinery.
"""

from __future__ import annotations

import json
import time
from typing import Any

from distill.redact import redact
from distill.task import TeacherSpec
from distill.teachers.base import TeacherReply


def cost_of(tspec: TeacherSpec, tokens_in: float, tokens_out: float, latency_s: float) -> float:
    """USD of one call at ``tspec.price``: per 1M input and output tokens, plus per hour of latency (local
    teachers are priced by the compute time they hold)."""
    p = tspec.price
    return tokens_in / 1e6 * p.input_per_1m + tokens_out / 1e6 * p.output_per_1m + latency_s / 3600 * p.per_hour


def record_call(c, tspec: TeacherSpec, key: str, attempt: int, messages: list[dict[str, str]], reply: TeacherReply,
                status: str, error: str | None, *, source: str | None = None, or_ignore: bool = False) -> float:
    """Write one teacher call to ``teacher_calls`` (the cache and the ledger) inside the caller's transaction
    ``c``; return its cost. Labelling, serving (``source="serve"``) and judging (``source="judge"``) all record
    calls here. ``or_ignore``: another process may have recorded the same key meanwhile (keep the first)."""
    # nothing a provider echoed back (an API key in an error body) reaches the store
    error = redact(error) if error else error
    cost = cost_of(tspec, reply.tokens_in, reply.tokens_out, reply.latency_s)
    params = {k: v for k, v in tspec.identity().items() if k != "name"}    # no secrets: see identity()
    request = {"messages": messages, "params": params, **({"source": source} if source else {})}
    response = {"texts": reply.texts, "label_probs": reply.label_probs, "logprobs": reply.logprobs, "raw": reply.raw}
    c.execute(
        f"""INSERT {"OR IGNORE " if or_ignore else ""}INTO teacher_calls(key, teacher, model, attempt, request,
           response, status, error, tokens_in, tokens_out, cost, latency_s, retries, created_at)
           VALUES(?,?,?,?,?,?,?,?,?,?,?,?,?,?)""",
        (key, tspec.name, tspec.model, attempt, json.dumps(request, ensure_ascii=False),
         json.dumps(response, ensure_ascii=False), status, error, reply.tokens_in, reply.tokens_out, cost,
         reply.latency_s, reply.retries, time.time()))
    return cost


def reply_from_row(row: Any) -> TeacherReply:
    """The ``TeacherReply`` a ``teacher_calls`` row recorded: a cache hit is answered with exactly this."""
    resp = json.loads(row["response"] or "{}")
    return TeacherReply(texts=resp.get("texts") or [], label_probs=resp.get("label_probs"),
                        logprobs=resp.get("logprobs"), tokens_in=row["tokens_in"], tokens_out=row["tokens_out"],
                        latency_s=row["latency_s"], retries=row["retries"], raw=resp.get("raw") or {})


def upsert_label(c, example_id: str, teacher: str, *, status: str, answer: Any = None,
                 probs: dict | None = None, confidence: float | None = None, agreement: float | None = None,
                 samples: list | None = None, rationale: str | None = None, logprobs: list | None = None,
                 reason: str | None = None, call_key: str | None = None) -> None:
    """Insert or replace ``teacher``'s label of one example inside the caller's transaction ``c``. A failed
    label keeps its ``reason`` and no answer; ``call_key`` points at the ``teacher_calls`` row it came from."""
    def j(v: Any) -> str | None:
        return None if v is None else json.dumps(v, ensure_ascii=False)

    c.execute(
        """INSERT INTO labels(example_id, teacher, status, answer, probs, confidence, agreement, samples,
           rationale, logprobs, reason, call_key, created_at) VALUES(?,?,?,?,?,?,?,?,?,?,?,?,?)
           ON CONFLICT(example_id, teacher) DO UPDATE SET status=excluded.status, answer=excluded.answer,
           probs=excluded.probs, confidence=excluded.confidence, agreement=excluded.agreement,
           samples=excluded.samples, rationale=excluded.rationale, logprobs=excluded.logprobs,
           reason=excluded.reason, call_key=excluded.call_key, created_at=excluded.created_at""",
        (example_id, teacher, status, j(answer) if status == "ok" else None, j(probs), confidence, agreement,
         j(samples), rationale, j(logprobs), reason, call_key, time.time()))
