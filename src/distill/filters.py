"""Filters: which teacher labels are good enough to train on.

``run_filters`` decides, for every train and validation example (never test: evaluation must see the
hard cases too), keep or drop, and stores one ``filter_decisions`` row per example under a new
``filter_runs`` row. ``distill.dataset.rows`` then trains on the latest run's kept rows.

A dropped example gets the FIRST failing reason, in this fixed order (cheap and certain before costly
and heuristic, so the reason shown is the most fundamental one):

1. ``no_label``                   the teacher has no label for it yet
2. ``teacher_failed:<reason>``    the teacher's answer did not parse (label_not_in_set, bad_json, ...)
3. ``contaminated``               near-duplicates a test input (see data/decontam.py)
4. ``disagrees_with_gold``        gold exists and the teacher's answer differs (filters.drop_disagree_with_gold)
5. ``low_confidence``             p(answer) < filters.min_confidence
6. ``low_margin``                 p(top1) - p(top2) < filters.min_margin
7. ``high_entropy``               entropy of the label distribution (nats) > filters.max_entropy
8. ``low_agreement``              share of samples / ensemble members agreeing < filters.min_agreement
9. ``suspect_label``              confident learning flags the label as probably wrong, without gold
                                  (filters.suspect_labels; distill/label_noise.py). Computed over all the rows
                                  that pass checks 1-3 at once; the detail holds its review rank. With
                                  ``action: relabel`` the row is kept instead, reason ``suspect_relabelled``,
                                  and trains on the label the combined probabilities favour
                                  (``filter_relabels``; ``distill.dataset.rows`` reads it)
10. ``duplicate``                 same text (after strong normalisation) with the same answer already kept

Confidence-type filters follow the common practice of keeping only confident pseudo-labels (e.g. the
confidence threshold of FixMatch, Sohn et al. 2020, arXiv 2001.07685, and the agreement/self-consistency
vote of Wang et al. 2022, arXiv 2203.11171). A check whose input is missing (no probabilities for the
margin, no agreement for a single sample) does not drop: we cannot say the label is bad.

A human correction (``corrections`` table) replaces the teacher's answer: the example is kept with reason
``corrected``, skipping the label, gold and confidence checks; only contamination still drops it (a human
label does not make a copy of a test input safe to train on). Corrected examples are visited first, so a
teacher-labelled duplicate of a corrected example is the one dropped.

Re-runnable: each call makes a new run; the same store and spec give the same decisions.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

from distill.data.decontam import strong_norm
from distill.dataset import correction_join, latest_filter_run
from distill.project import Project
from distill.task import FilterSpec, ProjectSpec, answer_key

REASONS = ("no_label", "teacher_failed", "contaminated", "disagrees_with_gold", "low_confidence",
           "low_margin", "high_entropy", "low_agreement", "suspect_label", "duplicate")
RELABELLED = "suspect_relabelled"   # a kept row's reason when the suspect filter changed its label
# The one reason whose check reads gold labels: a user distilling traffic without gold cannot have it, so
# reports say when it was used (the student's number then owes something to gold).
USES_GOLD = frozenset({"disagrees_with_gold"})


@dataclass
class FilterReport:
    run_id: int
    teacher: str
    kept: int = 0
    dropped_by_reason: dict[str, int] = field(default_factory=dict)
    by_split: dict[str, dict[str, int]] = field(default_factory=dict)   # split -> {"kept": n, "dropped": m}
    suspects: list[dict] = field(default_factory=list)   # suspect flags (dropped or relabelled), most suspect first
    relabelled: int = 0        # kept rows that train on the suspect filter's label (suspect_labels.action relabel)

    @property
    def dropped(self) -> int:
        return sum(self.dropped_by_reason.values())


# ------------------------------------------------------------------------------------------------
# Pure measures and one pure check per filter (each returns a detail string when it drops, else None).


def _normalised(probs: dict[str, float]) -> list[float]:
    ps = [max(float(p), 0.0) for p in probs.values()]
    total = sum(ps)
    return [p / total for p in ps] if total > 0 else ps


def entropy_nats(probs: dict[str, float]) -> float:
    """H(p) = -sum_i p_i ln p_i over the label distribution (renormalised to sum 1; 0 ln 0 = 0).
    Uniform over k labels gives ln k, a one-hot distribution gives 0."""
    return -sum(p * math.log(p) for p in _normalised(probs) if p > 0)


def margin(probs: dict[str, float]) -> float:
    """p(top1) - p(top2); with a single label the runner-up probability is 0."""
    ps = sorted(_normalised(probs), reverse=True) + [0.0]
    return ps[0] - ps[1]


def top_probability(confidence: float | None, probs: dict[str, float] | None) -> float | None:
    """The teacher's stated confidence, else the largest probability, else unknown (None)."""
    if confidence is not None:
        return float(confidence)
    if probs:
        return max(_normalised(probs))
    return None


def check_disagrees_with_gold(spec: ProjectSpec, answer: Any, gold: Any) -> str | None:
    if gold is None or not spec.filters.drop_disagree_with_gold:
        return None
    if answer_key(spec, answer) != answer_key(spec, gold):
        return f"teacher {_short(answer)} != gold {_short(gold)}"
    return None


def check_low_confidence(confidence: float | None, probs: dict | None, fs: FilterSpec) -> str | None:
    p = top_probability(confidence, probs)
    if fs.min_confidence is None or p is None or p >= fs.min_confidence:
        return None
    return f"confidence {p:.3f} < {fs.min_confidence}"


def check_low_margin(probs: dict | None, fs: FilterSpec) -> str | None:
    if fs.min_margin is None or not probs:
        return None
    m = margin(probs)
    return f"margin {m:.3f} < {fs.min_margin}" if m < fs.min_margin else None


def check_high_entropy(probs: dict | None, fs: FilterSpec) -> str | None:
    if fs.max_entropy is None or not probs:
        return None
    h = entropy_nats(probs)
    return f"entropy {h:.3f} nats > {fs.max_entropy}" if h > fs.max_entropy else None


def check_low_agreement(agreement: float | None, fs: FilterSpec) -> str | None:
    if fs.min_agreement is None or agreement is None or agreement >= fs.min_agreement:
        return None
    return f"agreement {agreement:.3f} < {fs.min_agreement}"


def _short(x: Any) -> str:
    s = json.dumps(x, ensure_ascii=False, sort_keys=True)
    return s if len(s) <= 60 else s[:57] + "..."


# ------------------------------------------------------------------------------------------------
# The run


def decide(spec: ProjectSpec, ex: dict, suspect: str | None = None) -> tuple[str | None, str | None]:
    """(reason, detail) of the first failing check for one example, (None, None) to keep, ('corrected',
    None) for a kept human correction. ``ex`` holds the joined row (see ``run_filters``); the suspect and
    duplicate checks need the other examples: ``suspect`` is this row's suspect detail (None: not flagged),
    computed by the caller, which also does the duplicate check."""
    if ex["correction"] is not None:
        return ("contaminated", ex["contaminated"]) if ex["contaminated"] else ("corrected", None)
    if ex["lstatus"] is None:
        return "no_label", None
    if ex["lstatus"] != "ok":
        return f"teacher_failed:{ex['lreason'] or 'unknown'}", None
    if ex["contaminated"]:
        return "contaminated", ex["contaminated"]
    answer, gold = json.loads(ex["answer"]), (None if ex["gold"] is None else json.loads(ex["gold"]))
    probs = None if ex["probs"] is None else json.loads(ex["probs"])
    fs = spec.filters
    checks = (
        ("disagrees_with_gold", lambda: check_disagrees_with_gold(spec, answer, gold)),
        ("low_confidence", lambda: check_low_confidence(ex["confidence"], probs, fs)),
        ("low_margin", lambda: check_low_margin(probs, fs)),
        ("high_entropy", lambda: check_high_entropy(probs, fs)),
        ("low_agreement", lambda: check_low_agreement(ex["agreement"], fs)),
        ("suspect_label", lambda: suspect),
    )
    for reason, check in checks:
        detail = check()
        if detail is not None:
            return reason, detail
    return None, None


def run_filters(project: Project, teacher: str | None = None) -> FilterReport:
    """Filter the train/validation labels of ``teacher`` (default: the spec's teacher) into a new run."""
    spec = project.spec
    teacher_name = spec.get_teacher(teacher).name
    store = project.store
    rows = store.q(
        f"""SELECT e.id, e.text, e.split, e.gold,
                  l.status AS lstatus, l.reason AS lreason, l.answer, l.probs, l.confidence, l.agreement,
                  c.answer AS correction,
                  CASE WHEN ct.example_id IS NULL THEN NULL
                       ELSE 'near-duplicate of test ' || ct.test_id || ' (' || ct.method || ', ' || ct.score || ')' END
                       AS contaminated
           FROM examples e
           LEFT JOIN labels l ON l.example_id = e.id AND l.teacher = ?
           {correction_join(project)}
           LEFT JOIN contamination ct ON ct.example_id = e.id
           WHERE e.split IN ('train', 'validation')
           ORDER BY (c.answer IS NULL), e.id""",
        (teacher_name,),
    )
    rows = [dict(r) for r in rows]
    report = FilterReport(run_id=-1, teacher=teacher_name)
    suspects = _suspects(spec, rows, report) if spec.filters.suspect_labels is not None else {}
    relabel = spec.filters.suspect_labels is not None and spec.filters.suspect_labels.action == "relabel"
    likely = {s["id"]: s["likely"] for s in report.suspects}
    decisions: list[tuple[str, int, str | None, str | None]] = []
    relabels: list[tuple[str, str]] = []        # (example id, JSON answer) of the kept rows relabelled
    kept_keys: set[tuple[str, str]] = set()
    for ex in rows:
        reason, detail = decide(spec, ex, suspects.get(ex["id"]))
        new_answer = None
        if reason == "suspect_label" and relabel:
            # kept, on the label the combined probabilities favour; the rank stays in the detail for review
            reason, new_answer = RELABELLED, likely[ex["id"]]
        if reason in (None, "corrected", RELABELLED):
            answer = new_answer if new_answer is not None else json.loads(
                ex["correction"] if ex["correction"] is not None else ex["answer"])
            key = (strong_norm(ex["text"]), answer_key(spec, answer))
            if reason != "corrected" and spec.filters.drop_duplicates and key in kept_keys:
                reason, detail = "duplicate", "same text and answer as an example already kept"
                new_answer = None
            else:
                kept_keys.add(key)
        kept = reason in (None, "corrected", RELABELLED)
        decisions.append((ex["id"], int(kept), reason, detail))
        if new_answer is not None:
            relabels.append((ex["id"], json.dumps(new_answer)))
            report.relabelled += 1
        bucket = report.by_split.setdefault(ex["split"], {"kept": 0, "dropped": 0})
        if kept:
            report.kept += 1
            bucket["kept"] += 1
        else:
            report.dropped_by_reason[reason] = report.dropped_by_reason.get(reason, 0) + 1
            bucket["dropped"] += 1
    config = {"filters": spec.filters.model_dump(mode="json"),
              "decontamination": spec.decontamination.model_dump(mode="json")}
    with store.tx() as conn:
        cur = conn.execute(
            "INSERT INTO filter_runs(teacher, config, kept, dropped, created_at) VALUES(?,?,?,?,?)",
            (teacher_name, json.dumps(config, sort_keys=True), report.kept, report.dropped, time.time()),
        )
        report.run_id = cur.lastrowid
        conn.executemany(
            "INSERT INTO filter_decisions(run_id, example_id, kept, reason, detail) VALUES(?,?,?,?,?)",
            [(report.run_id, *d) for d in decisions],
        )
        conn.executemany("INSERT INTO filter_relabels(run_id, example_id, answer) VALUES(?,?,?)",
                         [(report.run_id, *r) for r in relabels])
    report.dropped_by_reason = dict(sorted(report.dropped_by_reason.items()))
    acted_on = {d[0] for d in decisions if d[2] in ("suspect_label", RELABELLED)}
    report.suspects = [s for s in report.suspects if s["id"] in acted_on]
    return report


def suspect_rank(detail: str | None) -> int:
    """The review rank in a suspect decision's detail ("review rank N: ..."); a large number when absent."""
    try:
        return int((detail or "").split(":", 1)[0].rsplit(" ", 1)[1])
    except (IndexError, ValueError):
        return 1 << 30


def list_suspects(project: Project, teacher: str | None = None) -> list[dict]:
    """The latest filter run's suspect flags (dropped or relabelled) in review order: id, text, teacher answer,
    what was done, detail."""
    teacher_name = project.spec.get_teacher(teacher).name
    run_id = latest_filter_run(project, teacher_name)
    if run_id is None:
        return []
    got = project.store.q(
        """SELECT d.example_id, d.detail, d.reason, e.text, l.answer FROM filter_decisions d
           JOIN examples e ON e.id = d.example_id
           LEFT JOIN labels l ON l.example_id = d.example_id AND l.teacher = ?
           WHERE d.run_id = ? AND d.reason IN ('suspect_label', ?)""", (teacher_name, run_id, RELABELLED))
    return sorted(({"id": r["example_id"], "text": r["text"], "teacher": json.loads(r["answer"]) if r["answer"] else None,
                    "action": "relabelled" if r["reason"] == RELABELLED else "dropped", "detail": r["detail"],
                    "rank": suspect_rank(r["detail"])}
                   for r in got), key=lambda d: (d["rank"], d["id"]))


def _suspects(spec: ProjectSpec, rows: list[dict], report: FilterReport) -> dict[str, str]:
    """{example id: detail} of the labels confident learning flags, over every row that has a usable label
    (a correction, or an ok teacher answer in the label set) and is not contaminated. Corrections train the
    cheap model but are never flagged. Fills ``report.suspects`` in review order."""
    from distill.label_noise import find_suspects

    labels = spec.label_names
    use = []
    for ex in rows:
        if ex["contaminated"]:
            continue
        if ex["correction"] is not None:
            given, probs = json.loads(ex["correction"]), None
        elif ex["lstatus"] == "ok":
            given, probs = json.loads(ex["answer"]), (None if ex["probs"] is None else json.loads(ex["probs"]))
        else:
            continue
        if given in labels:
            use.append((ex, given, probs))
    if len(use) < 2:
        return {}
    found = find_suspects([ex["text"] for ex, _, _ in use], [g for _, g, _ in use], [p for _, _, p in use],
                          labels, spec.filters.suspect_labels, flaggable=[ex["correction"] is None for ex, _, _ in use])
    out = {}
    for s in found:
        ex = use[s.index][0]
        out[ex["id"]] = (f"review rank {s.rank}: teacher {s.given!r}, likely {s.likely!r} "
                         f"(p(given) {s.self_confidence:.3f}, confident learning)")
        report.suspects.append({"id": ex["id"], "rank": s.rank, "text": ex["text"], "teacher": s.given,
                                "likely": s.likely, "p_given": round(s.self_confidence, 4)})
    return out
