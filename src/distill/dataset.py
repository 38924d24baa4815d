"""Reading labelled examples out of the store, the one way every later stage does it.

The effective answer of an example is, in order: a human correction, else the label the latest filter run put in
place of the teacher's (``filters.suspect_labels.action: relabel``; train/validation only), else the teacher's
label. A correction is
a reviewer's decision or a corrections file (trusted), or a client's `/v1/feedback` answer (source ``feedback:...``,
less trusted: used only when the spec says ``feedback.use: train``; see ``correction_join``). Training
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
    answer: Any                    # effective answer: correction, else filter relabel, else teacher label; None if unlabelled
    source: str                    # 'correction' | 'feedback' | 'relabelled' | 'teacher' | 'none'
    probs: dict[str, float] | None
    confidence: float | None
    agreement: float | None
    rationale: str | None
    logprobs: list | None
    samples: list | None
    meta: dict


FEEDBACK_SOURCE = "feedback:"     # corrections.source prefix of a client's /v1/feedback answer (iterate.apply_feedback)


def correction_join(project: Project, alias: str = "c", *, feedback: bool | None = None) -> str:
    """``LEFT JOIN corrections <alias>`` on ``e.id`` with the corrections that count: every trusted one, and a
    client's feedback answer only when ``feedback`` (default: the spec's ``feedback.use == 'train'``). Teacher
    checks and few-shot pools pass ``feedback=False``: an unverified answer is no reference for either."""
    if feedback is None:
        feedback = project.spec.feedback.use == "train"
    cond = "" if feedback else f" AND {alias}.source NOT LIKE '{FEEDBACK_SOURCE}%'"
    return f"LEFT JOIN corrections {alias} ON {alias}.example_id = e.id{cond}"


def latest_filter_run(project: Project, teacher: str) -> int | None:
    return project.store.one(
        "SELECT id FROM filter_runs WHERE teacher=? ORDER BY id DESC LIMIT 1", (teacher,)
    )


def relabelled_count(store, run_id: int) -> int:
    """Kept rows of filter run ``run_id`` that train on the suspect filter's label instead of the teacher's
    (``filters.suspect_labels.action: relabel``): what status, the evaluation and the report show."""
    return store.one("SELECT COUNT(*) FROM filter_relabels WHERE run_id = ?", (run_id,))


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
             l.logprobs, l.samples, c.answer AS canswer, c.source AS csource,
             fd.kept AS kept, fr.answer AS ranswer, ct.example_id AS contaminated
      FROM examples e
      LEFT JOIN labels l ON l.example_id = e.id AND l.teacher = ?
      {correction_join(project)}
      LEFT JOIN filter_decisions fd ON fd.example_id = e.id AND fd.run_id = ?
      LEFT JOIN filter_relabels fr ON fr.example_id = e.id AND fr.run_id = fd.run_id
      LEFT JOIN contamination ct ON ct.example_id = e.id
      WHERE e.split IN ({",".join("?" * len(splits))})
      ORDER BY e.id"""
    out: list[Row] = []
    for r in project.store.q(sql, (teacher, run_id if run_id is not None else -1, *splits)):
        if r["canswer"] is not None:
            answer = json.loads(r["canswer"])
            source = "feedback" if r["csource"].startswith(FEEDBACK_SOURCE) else "correction"
        elif r["ranswer"] is not None and r["lstatus"] == "ok" and r["split"] != "test":
            answer, source = json.loads(r["ranswer"]), "relabelled"
        elif r["lstatus"] == "ok":
            answer, source = json.loads(r["lanswer"]), "teacher"
        else:
            answer, source = None, "none"
        if only_kept and r["split"] != "test":
            if r["contaminated"] is not None or answer is None:
                continue
            if run_id is not None and source in ("teacher", "relabelled") and not r["kept"]:
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


def fixes(project: Project, teacher: str) -> dict[str, dict[str, Any]]:
    """The corrections training would use now, on train/validation inputs that are not contaminated: example id ->
    {answer (JSON text, canonical), source, teacher (the teacher's answer, JSON text, or None), text}. What
    ``iterate`` snapshots per round to say which fixes changed a round's training data."""
    out: dict[str, dict[str, Any]] = {}
    for r in project.store.q(
            f"""SELECT e.id, e.text, c.answer, c.source, l.answer AS teacher, l.status FROM examples e
                {correction_join(project)}
                LEFT JOIN labels l ON l.example_id = e.id AND l.teacher = ?
                WHERE e.split IN ('train', 'validation') AND c.example_id IS NOT NULL
                  AND e.id NOT IN (SELECT example_id FROM contamination) ORDER BY e.id""", (teacher,)):
        canon = lambda s: None if s is None else json.dumps(json.loads(s), sort_keys=True, ensure_ascii=False)  # noqa: E731
        out[r["id"]] = {"answer": canon(r["answer"]), "source": r["source"], "text": r["text"],
                        "teacher": canon(r["teacher"]) if r["status"] == "ok" else None}
    return out


def fix_kind(source: str) -> str:
    """'review' (distill review), 'feedback' (a client's /v1/feedback answer) or 'file' (distill correct)."""
    if source.startswith(FEEDBACK_SOURCE):
        return "feedback"
    return "review" if source.startswith("review:") else "file"
