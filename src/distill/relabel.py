"""`distill relabel`: the teacher changed (model, sampling parameters, prompt); ask it again where it matters.

    distill relabel PROJECT [--dry-run] [--budget USD]

A label is *stale* when the call it points at (``labels.call_key``) is not one of the keys the example
renders to under the current spec and teacher identity (``cache_key(identity, render_messages(...),
attempt)`` for attempt 0..max_parse_retries) — exactly the test the labeller uses to decide what to do, so
relabelling *is* a labelling run (``distill.labeling.label``) and this module adds three things:

1. the counts per split before anything is paid (``dry_run=True`` stops there);
2. an audit trail: before asking again, every stale label is copied to ``label_history`` (old answer, old
   call key); after the run, the rows whose label really was replaced get ``superseded_at``. The old
   ``teacher_calls`` rows are never touched (they are the ledger: the money was spent), so the old
   answer and the exact request that produced it stay readable;
3. how many answers actually changed, per split. Every kind alike: answers are compared as the stored JSON
   values, so an extract answer whose keys merely come back in another order is not a change.

Re-runnable: an interrupted relabel (budget, Ctrl-C, kill -9) leaves the rest stale; running it again
continues, and ``label_history`` has one row per (example, teacher, old call key).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from distill.errors import DistillError
from distill.labeling import SPLITS, label
from distill.project import Project
from distill.fewshot import teacher_prompts
from distill.task import cache_key


@dataclass
class RelabelReport:
    teacher: str
    dry_run: bool
    total: int = 0                                              # examples in all splits
    stale_by_split: dict[str, int] = field(default_factory=dict)   # ok labels made under another key
    failed_by_split: dict[str, int] = field(default_factory=dict)  # failed labels (any labelling run retries them)
    unlabelled_by_split: dict[str, int] = field(default_factory=dict)
    superseded: int = 0                 # stale labels replaced by this run (recorded in label_history)
    answers_changed_by_split: dict[str, int] = field(default_factory=dict)
    still_stale: int = 0                # left for the next run (budget / interruption)
    old_calls_kept: int = 0             # teacher_calls rows of the superseded labels, kept for audit
    label: dict[str, Any] | None = None  # the labelling run's LabelReport

    @property
    def stale(self) -> int:
        return sum(self.stale_by_split.values())

    def message(self) -> str:
        per = ", ".join(f"{s} {n}" for s, n in self.stale_by_split.items() if n) or "none"
        if self.dry_run:
            return (f"{self.teacher}: {self.stale} labels were made by a different teacher identity or prompt "
                    f"({per}); {sum(self.unlabelled_by_split.values())} inputs unlabelled. Nothing was asked (dry run).")
        changed = sum(self.answers_changed_by_split.values())
        return (f"{self.teacher}: {self.superseded} of {self.stale} stale labels replaced ({per}); {changed} answers "
                f"changed; {self.still_stale} still stale; {self.old_calls_kept} old calls kept in the ledger")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def stale_labels(project: Project, teacher: str) -> tuple[list[dict], dict[str, dict[str, int]]]:
    """(stale ok labels, counts) for ``teacher`` under the current spec. counts: total, stale, failed,
    unlabelled, each per split."""
    tspec = project.spec.get_teacher(teacher)
    identity = tspec.identity()
    rows = project.store.q(
        """SELECT e.id, e.text, e.segment, e.meta, e.split, l.status, l.answer, l.call_key, l.created_at
           FROM examples e LEFT JOIN labels l ON l.example_id = e.id AND l.teacher = ? ORDER BY e.id""",
        (tspec.name,))
    counts: dict[str, dict[str, int]] = {k: {s: 0 for s in SPLITS} for k in ("total", "stale", "failed", "unlabelled")}
    stale = []
    ok = []
    for r in rows:
        counts["total"][r["split"]] += 1
        if r["status"] is None:
            counts["unlabelled"][r["split"]] += 1
        elif r["status"] != "ok":
            counts["failed"][r["split"]] += 1
        else:
            ok.append(r)
    # rendered as the labeller renders them, few-shot demonstrations included
    for r, tp in zip(ok, teacher_prompts(project, ok, rationale=tspec.rationale)):
        keys = {cache_key(identity, tp.messages, a) for a in range(tspec.parse_retries + 1)}
        if r["call_key"] not in keys:
            counts["stale"][r["split"]] += 1
            stale.append(dict(r))
    return stale, counts


def relabel(project: Project, teacher: str | None = None, *, budget: float | None = None, dry_run: bool = False,
            accept_terms: bool = False, progress: bool = True) -> RelabelReport:
    """See the module docstring. ``budget`` caps the teacher's total ledger spend, as in ``label``."""
    tspec = project.spec.get_teacher(teacher)
    if tspec.kind == "ensemble":
        raise DistillError(f"teacher '{tspec.name}' is an ensemble: relabel its members one by one",
                           hint="`distill relabel PROJECT --teacher MEMBER` for each member, then `distill label`")
    stale, counts = stale_labels(project, tspec.name)
    report = RelabelReport(teacher=tspec.name, dry_run=dry_run, total=sum(counts["total"].values()),
                           stale_by_split=counts["stale"], failed_by_split=counts["failed"],
                           unlabelled_by_split=counts["unlabelled"])
    if dry_run:
        return report

    # 1. the audit trail first: a crash after this point loses nothing (rows without superseded_at)
    now = time.time()
    with project.store.tx() as c:
        c.executemany(
            """INSERT OR IGNORE INTO label_history(example_id, teacher, status, answer, call_key, labelled_at,
               recorded_at) VALUES(?,?,?,?,?,?,?)""",
            [(s["id"], tspec.name, s["status"], s["answer"], s["call_key"], s["created_at"], now) for s in stale])

    # 2. the labeller asks again wherever the key changed (and retries failed inputs, as it always does)
    lab = label(project, tspec.name, budget=budget, accept_terms=accept_terms, progress=progress)
    report.label = lab.to_dict()

    # 3. which old labels were really replaced, and did the answer change?
    old = {s["id"]: s for s in stale}
    replaced: list[tuple[float, str, str, str]] = []
    changed: dict[str, int] = {s: 0 for s in SPLITS}
    if old:
        marks = ",".join("?" * len(old))
        for r in project.store.q(f"SELECT example_id, status, answer, call_key FROM labels WHERE teacher=? "
                                 f"AND example_id IN ({marks})", (tspec.name, *old)):
            o = old[r["example_id"]]
            if r["call_key"] == o["call_key"]:
                continue
            replaced.append((time.time(), r["example_id"], tspec.name, o["call_key"]))
            if r["status"] != "ok" or json.loads(r["answer"]) != json.loads(o["answer"]):
                changed[o["split"]] += 1
    with project.store.tx() as c:
        c.executemany("UPDATE label_history SET superseded_at=? WHERE example_id=? AND teacher=? AND call_key IS ?",
                      replaced)
    report.superseded = len(replaced)
    report.still_stale = len(old) - len(replaced)
    report.answers_changed_by_split = changed
    keys = [o["call_key"] for o in old.values() if o["call_key"]]
    report.old_calls_kept = sum(
        project.store.one(f"SELECT COUNT(*) FROM teacher_calls WHERE key IN ({','.join('?' * len(chunk))})", chunk)
        for chunk in (keys[i:i + 500] for i in range(0, len(keys), 500)))
    return report
