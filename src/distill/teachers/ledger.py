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
import os
import secrets
import socket
import time
from typing import Any

from distill.redact import redact
from distill.task import TeacherSpec
from distill.teachers.base import TeacherReply


def cost_of(tspec: TeacherSpec, tokens_in: float, tokens_out: float, latency_s: float, *, batch: bool = False) -> float:
    """USD of one call at ``tspec.price``: per 1M input and output tokens, plus per hour of latency (local
    teachers are priced by the compute time they hold). ``batch``: made through the Batch API, so the token
    prices are multiplied by ``price.batch_factor`` (distill.teachers.batch)."""
    p = tspec.price
    tokens = tokens_in / 1e6 * p.input_per_1m + tokens_out / 1e6 * p.output_per_1m
    return tokens * (p.batch_factor if batch else 1.0) + latency_s / 3600 * p.per_hour


def record_call(c, tspec: TeacherSpec, key: str, attempt: int, messages: list[dict[str, str]], reply: TeacherReply,
                status: str, error: str | None, *, source: str | None = None, or_ignore: bool = False) -> float:
    """Write one teacher call to ``teacher_calls`` (the cache and the ledger) inside the caller's transaction
    ``c``; return its cost. Labelling, serving (``source="serve"``) and judging (``source="judge"``) all record
    calls here. ``or_ignore``: another process may have recorded the same key meanwhile (keep the first).
    ``source="batch"``: an answer from the Batch API (distill.teachers.batch), priced at the batch rate."""
    # nothing a provider echoed back (an API key in an error body) reaches the store
    error = redact(error) if error else error
    cost = cost_of(tspec, reply.tokens_in, reply.tokens_out, reply.latency_s, batch=source == "batch")
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


# -- claims: one payer per key across processes -----------------------------------------------------------------
# ``teacher_claims`` says who is paying for a key right now: the workers of `distill serve --workers`, serve replicas
# and (on a shared store, PostgreSQL) labellers on other machines all claim a key before paying for it. Each function
# is its own transaction: the store's writer lock (BEGIN IMMEDIATE, or the project's advisory lock on PostgreSQL)
# makes check-and-take atomic. Times are the claimers' clocks (keep the machines on NTP).


def claim_owner(kind: str) -> str:
    """A claim owner's name, ``kind:host:pid-namespace:pid:token``: unique per holder, and telling whether the holder
    is a process of this machine (and container) that has died, whose claims need not wait for their ttl."""
    return f"{kind}:{socket.gethostname()}:{_pid_namespace()}:{os.getpid()}:{secrets.token_hex(4)}"


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid").strip("pid:[]")
    except OSError:
        return "-"


def _gone(owner: str) -> bool:
    """True when ``owner`` (``claim_owner``) was a process of this host and pid namespace that no longer runs."""
    parts = owner.split(":")
    if len(parts) != 5 or parts[1] != socket.gethostname() or parts[2] != _pid_namespace() or not parts[3].isdigit():
        return False
    try:
        os.kill(int(parts[3]), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False       # alive, someone else's
    return False


def claim(store: Any, key: str, owner: str, ttl_s: float) -> bool:
    """Take the claim to pay for ``key``: False when the call is already recorded, or another owner's claim is younger
    than ``ttl_s`` and its process may be alive (an older claim, or one of a dead process of this machine, belongs
    to a process that died mid-call, and is taken over)."""
    now = time.time()
    with store.tx() as c:
        if c.execute("SELECT 1 FROM teacher_calls WHERE key=?", (key,)).fetchone():
            return False
        row = c.execute("SELECT owner, at FROM teacher_claims WHERE key=?", (key,)).fetchone()
        if row is not None and row["owner"] != owner and row["at"] > now - ttl_s and not _gone(row["owner"]):
            return False
        c.execute("INSERT OR REPLACE INTO teacher_claims(key, owner, at) VALUES(?, ?, ?)", (key, owner, now))
        return True


def release(store: Any, key: str | None, owner: str) -> None:
    """Give ``owner``'s claim on ``key`` back (every claim of ``owner`` when ``key`` is None) after a call that
    failed or never started, so another process may pay for it at once."""
    with store.tx() as c:
        if key is None:
            c.execute("DELETE FROM teacher_claims WHERE owner=?", (owner,))
        else:
            c.execute("DELETE FROM teacher_claims WHERE key=? AND owner=?", (key, owner))


def renew(store: Any, owner: str) -> None:
    """Keep ``owner``'s claims young while its calls run (a labeller's call may wait for rate limits and retries
    far longer than any ttl)."""
    with store.tx() as c:
        c.execute("UPDATE teacher_claims SET at=? WHERE owner=?", (time.time(), owner))
