"""Reading labelled examples out of the store, the one way every later stage does it.

The effective answer of an example is, in order: a human correction, else the teacher's label. Training
rows are the train (or validation) examples the latest filter run kept; contaminated inputs (near
duplicates of a test input) are never returned for train/validation. The test split is returned whole,
unfiltered: evaluation must not be flattered by dropping the hard cases.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterable

from distill.project import Project


@dataclass
class Row:
    id: str
    text: str
    split: str
    segment: str | None
    gold: Any                      # None when the input had no gold label
    answer: Any                    # effective answer: correction, else teacher label; None if unlabelled
    source: str                    # 'correction' | 'teacher' | 'none'
    probs: dict[str, float] | None
    confidence: float | None
    agreement: float | None
    rationale: str | None
    logprobs: list | None
    samples: list | None
    meta: dict


def latest_filter_run(project: Project, teacher: str) -> int | None:
    return project.store.one(
        "SELECT id FROM filter_runs WHERE teacher=? ORDER BY id DESC LIMIT 1", (teacher,)
    )


def rows(project: Project, teacher: str, splits: Iterable[str] = ("train", "validation", "test"),
         only_kept: bool = True) -> list[Row]:
    """Examples of ``splits`` with the effective answer of ``teacher``.

    ``only_kept`` applies to train/validation only: rows dropped by the latest filter run, rows the
    teacher failed on and contaminated rows are left out. Test rows are always all returned."""
    splits = list(splits)
    run_id = latest_filter_run(project, teacher)
    sql = f"""
      SELECT e.id, e.text, e.split, e.segment, e.gold, e.meta,
             l.status AS lstatus, l.answer AS lanswer, l.probs, l.confidence, l.agreement, l.rationale,
             l.logprobs, l.samples, c.answer AS canswer,
             fd.kept AS kept, ct.example_id AS contaminated
      FROM examples e
      LEFT JOIN labels l ON l.example_id = e.id AND l.teacher = ?
      LEFT JOIN corrections c ON c.example_id = e.id
      LEFT JOIN filter_decisions fd ON fd.example_id = e.id AND fd.run_id = ?
      LEFT JOIN contamination ct ON ct.example_id = e.id
      WHERE e.split IN ({",".join("?" * len(splits))})
      ORDER BY e.id"""
    out: list[Row] = []
    for r in project.store.q(sql, (teacher, run_id if run_id is not None else -1, *splits)):
        if r["canswer"] is not None:
            answer, source = json.loads(r["canswer"]), "correction"
        elif r["lstatus"] == "ok":
            answer, source = json.loads(r["lanswer"]), "teacher"
        else:
            answer, source = None, "none"
        if only_kept and r["split"] != "test":
            if r["contaminated"] is not None or answer is None:
                continue
            if run_id is not None and source != "correction" and not r["kept"]:
                continue
        out.append(Row(
            id=r["id"], text=r["text"], split=r["split"], segment=r["segment"],
            gold=None if r["gold"] is None else json.loads(r["gold"]),
            answer=answer, source=source,
            probs=None if r["probs"] is None else json.loads(r["probs"]),
            confidence=r["confidence"], agreement=r["agreement"], rationale=r["rationale"],
            logprobs=None if r["logprobs"] is None else json.loads(r["logprobs"]),
            samples=None if r["samples"] is None else json.loads(r["samples"]),
            meta=json.loads(r["meta"] or "{}"),
        ))
    return out
