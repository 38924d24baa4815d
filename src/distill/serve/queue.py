"""The failure queue: inputs the deployed system says the next training round should look at.

Four ways in (``reason``):
- ``routed``               the router sent it to the teacher (low confidence or out of distribution); the
                           teacher's answer is a ready-made training label for exactly the inputs the
                           student is weakest on.
- ``shadow_disagreement``  in shadow mode the teacher also answered a student-handled input and disagreed.
- ``feedback``             a client said the answer was wrong (``POST /v1/feedback``).
- ``degraded``             the router wanted the teacher but it was down, so the student answered.

Every ``enqueue`` (or ``enqueue_many``: one request's entries) is its own committed transaction, done
*before* the service answers 2xx, so a ``kill -9`` right after a response never loses an accepted entry.
(The service runs them on its writer thread and awaits the commit; see ``distill.serve.common.StoreWriter``.) ``consume`` marks the entries a new
round takes (``status='consumed'``, ``round=N``) in one transaction, so two rounds never take the same
entry and a crash mid-consume leaves them all 'new'.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from distill.errors import DistillError
from distill.store import Store

REASONS = ("routed", "shadow_disagreement", "feedback", "degraded")


@dataclass
class QueueEntry:
    id: int
    created_at: float
    text: str
    student_answer: Any
    student_conf: float | None
    teacher_answer: Any
    reason: str
    note: str | None
    status: str
    round: int | None


def _j(v: Any) -> str | None:
    return None if v is None else json.dumps(v, ensure_ascii=False)


def enqueue(store: Store, text: str, reason: str, *, student_answer: Any = None, student_conf: float | None = None,
            teacher_answer: Any = None, note: str | None = None) -> int:
    """Append one entry (committed when this returns) and return its id."""
    return enqueue_many(store, [{"text": text, "reason": reason, "student_answer": student_answer,
                                 "student_conf": student_conf, "teacher_answer": teacher_answer, "note": note}])[0]


def enqueue_many(store: Store, entries: list[dict[str, Any]]) -> list[int]:
    """Append several entries (each a dict of ``enqueue``'s arguments) in one transaction: all of them are
    committed when this returns, or none. Returns their ids in order."""
    for e in entries:
        if e["reason"] not in REASONS:
            raise DistillError(f"failure queue reason {e['reason']!r} is not one of {REASONS}")
    ids = []
    with store.tx() as c:
        for e in entries:
            cur = c.execute(
                """INSERT INTO failure_queue(created_at, text, student_answer, student_conf, teacher_answer, reason,
                   note, status) VALUES(?,?,?,?,?,?,?, 'new')""",
                (time.time(), e["text"], _j(e.get("student_answer")), e.get("student_conf"),
                 _j(e.get("teacher_answer")), e["reason"], e.get("note")))
            ids.append(int(cur.lastrowid))
    return ids


def _entry(r) -> QueueEntry:
    def lj(s):
        return None if s is None else json.loads(s)

    return QueueEntry(id=r["id"], created_at=r["created_at"], text=r["text"], student_answer=lj(r["student_answer"]),
                      student_conf=r["student_conf"], teacher_answer=lj(r["teacher_answer"]), reason=r["reason"],
                      note=r["note"], status=r["status"], round=r["round"])


def list_entries(store: Store, *, status: str | None = "new", reasons: Iterable[str] | None = None,
                 limit: int | None = None) -> list[QueueEntry]:
    sql, params = "SELECT * FROM failure_queue WHERE 1=1", []
    if status:
        sql += " AND status=?"
        params.append(status)
    if reasons:
        reasons = list(reasons)
        sql += f" AND reason IN ({','.join('?' * len(reasons))})"
        params += reasons
    sql += " ORDER BY id"
    if limit:
        sql += " LIMIT ?"
        params.append(int(limit))
    return [_entry(r) for r in store.q(sql, tuple(params))]


def consume(store: Store, *, round: int | None = None, reasons: Iterable[str] | None = None,
            limit: int | None = None) -> tuple[int, list[QueueEntry]]:
    """Take the 'new' entries for the next round: returns (round, entries), all marked consumed with that
    round number in one transaction. ``round`` defaults to one more than the highest so far."""
    with store.tx() as c:
        if round is None:
            round = int(c.execute("SELECT COALESCE(MAX(round), 0) FROM failure_queue").fetchone()[0]) + 1
        sql, params = "SELECT * FROM failure_queue WHERE status='new'", []
        if reasons:
            reasons = list(reasons)
            sql += f" AND reason IN ({','.join('?' * len(reasons))})"
            params += reasons
        sql += " ORDER BY id" + (" LIMIT ?" if limit else "")
        if limit:
            params.append(int(limit))
        rows = c.execute(sql, tuple(params)).fetchall()
        c.executemany("UPDATE failure_queue SET status='consumed', round=? WHERE id=?", [(round, r["id"]) for r in rows])
    entries = [_entry(r) for r in rows]
    for e in entries:
        e.status, e.round = "consumed", round
    return round, entries


def counts(store: Store) -> dict[str, int]:
    """'new' entries per reason (for /metrics and `distill status`)."""
    return {r["reason"]: r["n"] for r in store.q(
        "SELECT reason, COUNT(*) AS n FROM failure_queue WHERE status='new' GROUP BY reason")}
