"""`distill iterate`: one round of the production loop — what the service struggled with becomes training data,
and a new model replaces the serving one only if it is better where it counts. Every project kind: classify
(encoder student) and extract / generate (causal-LM student).

    distill iterate PROJECT [--traffic FILE] [--budget USD] [--margin 0.02]

The round, top to bottom (``iterate``):

1. open the round: ``meta.iterate_open`` = N (a crashed round is resumed under the same number);
2. take the failure queue's 'new' entries (``serve/queue.py``: routed, shadow disagreements, feedback,
   degraded) and write their texts to ``rounds/round-NNN/queue.jsonl``; import it and the optional
   ``traffic`` file with the importer (``data/importer.py``), so dedupe, hashed splits, the locked test
   split and decontamination all apply: an input that hashes to test *is* test and is never trained on;
   then mark those queue entries consumed with round N. (Import first, mark after: a crash in between
   re-imports the same texts, which dedupe, instead of losing them.) The teacher labels every new input; the
   student's and teacher's answers the service stored are not trusted as gold. A client's `/v1/feedback` answer
   becomes a correction with the lower trust level (``apply_feedback``; ``feedback.use`` in the spec says
   whether training uses it), and an entry a person reviewed in `distill review` (accept or correct) a trusted
   one (``apply_reviews``, applied after, so the reviewer wins). The round records which corrections are new
   since the previous round and, for classify, whether the new model follows them (``_fixes``). A queue text has no segment (the
   service does not know it), so when the spec has ``segment_field`` those rows have segment None and are
   evaluated under '(none)';
3. label with the teacher (``labeling.label``: cache and budget respected; a budget stop ends the round
   early, resumable with a larger budget), filter (``filters.run_filters``);
4. train (``recipes.train.train``: the classifier or the causal-LM recipe by kind): the run id hashes the
   data, so new data is a new run; a crashed training resumes from its last checkpoint;
5. evaluate the new model *and* the serving one on today's locked test split with the kind's evaluator
   (``evaluate.evaluate_project``; new traffic may have added test rows, so both are scored on the same
   rows). extract / generate: generation is slow on a CPU, so the untuned base model is not scored (it does
   not enter the decision; ``distill eval`` scores it), and an evaluation is reused when nothing it depends
   on changed (``_evaluate``: same model, same test rows with the same gold and teacher answers, same
   prompt/schema/segment settings, same generation settings and code) — typically the serving model's
   evaluation from the previous round when no new input hashed to test;
6. decide: promote only if the new model passes the gate (``spec.quality``) and neither the overall score
   nor any gated segment (>= ``quality.min_segment_size`` rows) drops by more than ``regression_margin``
   (absolute, on the gate's metric: accuracy / macro F1 for classify, field F1 or exact match for extract,
   exact match for generate). Otherwise the serving model stays and the report says which segment fell by
   how much;
7. record: the new train run's record gets ``lineage`` (round, parent model, data hash, teacher,
   promoted), an ``iterate-N`` run holds the whole decision, ``meta.serving_model`` names the promoted run.

The serving marker. ``meta.serving_model`` (``distill.runs``) names the model serve, export and route
calibrate use; a refused model is never served. The serving model's run row is also rewritten last (its
``created_at`` becomes the newest), so "the latest trained model" — what `distill eval` scores by
default — is the serving one after a refusal too. classify: if the serving model had a calibrated router,
the promoted model is calibrated with the same settings (``route calibrate``); an ONNX export has to be
redone (``distill export``). extract / generate: the old model's export and router belong to the old model;
the report's ``next_steps`` say to re-export and recalibrate (iterate does not run them).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from distill.errors import DistillError
from distill.project import Project
from distill.runs import SERVING_KEY, get_run
from distill.serve import queue as fq

OPEN_KEY = "iterate_open"
DONE_KEY = "iterate_round"


@dataclass
class SegmentDelta:
    segment: str          # '(overall)' for the whole test split
    n: int
    old: float | None
    new: float | None
    delta: float | None   # new - old
    gated: bool


@dataclass
class IterateReport:
    round: int
    teacher: str
    resumed: bool = False
    queue_consumed: int = 0
    reviewed_applied: int = 0          # reviewed queue entries whose answer became a correction (distill review)
    feedback: dict[str, int] = field(default_factory=dict)   # /v1/feedback answers by outcome (apply_feedback)
    fixes: dict[str, Any] = field(default_factory=dict)      # which corrections are new in this round (_fixes)
    queue_by_reason: dict[str, int] = field(default_factory=dict)
    traffic: str | None = None
    imported: dict[str, Any] = field(default_factory=dict)       # source -> {added, by_split, dup_existing, ...}
    label: dict[str, Any] | None = None
    filter: dict[str, Any] | None = None
    run_id: str | None = None
    parent_run_id: str | None = None
    data_sha256: str | None = None
    metric: str | None = None          # the gate's metric, e.g. 'accuracy vs gold'
    gate_passed: bool | None = None
    gate_failures: list[str] = field(default_factory=list)
    comparison: list[SegmentDelta] = field(default_factory=list)
    promoted: bool = False
    serving_model: str | None = None   # after the round
    reasons: list[str] = field(default_factory=list)   # why (not) promoted, one sentence each
    stopped: str | None = None         # 'budget' | 'no_data' when the round ended before a decision
    router: str | None = None
    evaluations: dict[str, dict[str, Any]] = field(default_factory=dict)   # run id -> {json_path, reused}
    next_steps: list[str] = field(default_factory=list)   # commands to run after a promotion (LM: export, router)
    elapsed_s: float = 0.0

    def message(self) -> str:
        head = f"round {self.round}: "
        if self.stopped:
            return head + "; ".join(self.reasons)
        verdict = f"promoted {self.run_id}" if self.promoted else f"kept {self.serving_model} (new model {self.run_id} refused)"
        nxt = (". Next: " + "; ".join(self.next_steps)) if self.next_steps else ""
        return head + verdict + ": " + "; ".join(self.reasons) + nxt + self._fixes_line()

    def _fixes_line(self) -> str:
        f = self.fixes
        if not f or not f.get("new"):
            return ""
        kinds = ", ".join(f"{v} {k}" for k, v in sorted(f["by_kind"].items()))
        line = (f"\nfixes new since {f['since']}: {f['new']} ({kinds}), {f['changed_teacher_label']} of them change the "
                f"teacher's answer")
        e = f.get("effect")
        if e:
            line += (f"; on those inputs the new model gives the fixed answer for {e['new_model_follows']}/{e['n']}"
                     + (f" (the serving model: {e['old_model_follows']}/{e['n']})" if e.get("old_model_follows") is not None else ""))
        return line

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------------
# the serving marker


def serving_run(project: Project):
    """The serving model's train run row (``distill.runs``: promoted, or passed its gate), or None."""
    from distill import runs

    ref = runs.serving_model_or_none(project.store, project.root, project.spec.kind)
    return None if ref is None else runs.get_run(project.store, ref.run_id)


def _set_meta(project: Project, key: str, value: str | None) -> None:
    with project.store.tx() as c:
        if value is None:
            c.execute("DELETE FROM meta WHERE key=?", (key,))
        else:
            c.execute("INSERT OR REPLACE INTO meta(key, value) VALUES(?, ?)", (key, value))


def _touch_run(project: Project, row, **record_updates: Any) -> None:
    """Rewrite a train run's row with extra record keys; its created_at becomes now (see module docstring)."""
    record = json.loads(row["record"] or "{}")
    record.update(record_updates)
    # the stored path as it is (already project-relative): record_run would resolve it against the cwd
    project.store.put_run(row["id"], row["kind"], row["status"], row["path"], record)


# ------------------------------------------------------------------------------------------------
# step 2: new inputs


def _take_queue(project: Project, round_no: int, round_dir: Path) -> tuple[Path | None, list[int], dict[str, int]]:
    """Write the 'new' queue entries (plus, on a resumed round, the ones already taken by it) to a JSONL
    file for the importer. Returns (file or None, ids still to mark, per-reason counts of the round)."""
    new = fq.list_entries(project.store, status="new")
    taken = project.store.q("SELECT * FROM failure_queue WHERE round=? AND status='consumed'", (round_no,))
    texts = [e.text for e in new] + [r["text"] for r in taken]
    by_reason: dict[str, int] = {}
    for reason in [e.reason for e in new] + [r["reason"] for r in taken]:
        by_reason[reason] = by_reason.get(reason, 0) + 1
    if not texts:
        return None, [], by_reason
    round_dir.mkdir(parents=True, exist_ok=True)
    f = round_dir / "queue.jsonl"
    tmp = f.with_suffix(".jsonl.tmp")
    col = project.spec.splits.column
    if col:
        # the project takes splits from a column; queue texts have none, so give them the hashed split the
        # importer would (an input that hashes to test stays test)
        from distill.data.importer import normalise, text_id
        from distill.data.splits import assign_split

        rows = [{"text": t, col: assign_split(text_id(normalise(t)), project.spec.splits)} for t in texts]
    else:
        rows = [{"text": t} for t in texts]
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(f)
    return f, [e.id for e in new], by_reason


def apply_reviews(project: Project, round_no: int) -> int:
    """The round's queue entries a person reviewed (`distill review`, accept or correct): the reviewer's answer
    becomes a correction of the example the entry's text was imported as, with the reviewer as its source, so it
    overrides the teacher in this round's training. Train/validation only (an input that hashed to test keeps the
    teacher's label: the test split's labels are never touched). Idempotent: a resumed round applies it again."""
    from distill.data.importer import normalise

    n = 0
    with project.store.tx() as c:
        for e in c.execute("SELECT id, text FROM failure_queue WHERE round=?", (round_no,)).fetchall():
            d = c.execute("""SELECT answer, reviewer, created_at FROM review_decisions WHERE item=? AND undone_at IS NULL
                             AND action IN ('accept', 'correct') ORDER BY id DESC LIMIT 1""", (f"queue:{e['id']}",)).fetchone()
            if d is None:
                continue
            ex = c.execute("SELECT id, split FROM examples WHERE norm=?", (normalise(e["text"]),)).fetchone()
            if ex is None or ex["split"] == "test":
                continue
            c.execute("INSERT OR REPLACE INTO corrections(example_id, answer, source, note, created_at) VALUES(?,?,?,?,?)",
                      (ex["id"], d["answer"], f"review:failures:{d['reviewer']}", f"failure-queue entry {e['id']}",
                       d["created_at"]))
            n += 1
    return n


def apply_feedback(project: Project, round_no: int) -> dict[str, int]:
    """The round's `/v1/feedback` entries: the answer a client said is right becomes a correction with the lower
    trust level (source ``feedback:queue:<entry>``, ``dataset.FEEDBACK_SOURCE``) of the example the text was
    imported as. It never replaces a trusted correction (a reviewer's decision, a corrections file) and is replaced
    by one; train/validation only; an answer the task no longer accepts (a label since removed, JSON the schema
    refuses) is counted, not stored. Clients who disagree on one input: the latest answer, counted as
    ``conflicting``. ``feedback.use: train`` trains on them, ``review`` stores them for a reviewer, ``ignore`` skips
    this. Idempotent: a resumed round applies it again. Returns counts by outcome."""
    from distill.data.importer import normalise
    from distill.dataset import FEEDBACK_SOURCE
    from distill.review import valid_answer
    from distill.task import answer_key

    out = {"stored": 0, "kept_trusted": 0, "test": 0, "invalid": 0, "not_imported": 0, "conflicting": 0}
    if project.spec.feedback.use == "ignore":
        return out
    by_example: dict[str, list[tuple[int, Any, float]]] = {}
    for e in project.store.q("""SELECT id, text, teacher_answer, created_at FROM failure_queue
                                WHERE round=? AND reason='feedback' ORDER BY id""", (round_no,)):
        ex = project.store.q("SELECT id, split FROM examples WHERE norm=?", (normalise(e["text"]),))
        if not ex:
            out["not_imported"] += 1        # the importer refused the text (too long, empty)
            continue
        if ex[0]["split"] == "test":
            out["test"] += 1
            continue
        try:
            answer = valid_answer(project, json.loads(e["teacher_answer"]) if e["teacher_answer"] else None)
        except (DistillError, ValueError):
            out["invalid"] += 1
            continue
        by_example.setdefault(ex[0]["id"], []).append((e["id"], answer, e["created_at"]))
    with project.store.tx() as c:
        for ex_id, votes in by_example.items():
            entry, answer, at = votes[-1]
            if len({answer_key(project.spec, a) for _, a, _ in votes}) > 1:
                out["conflicting"] += 1
            note = f"/v1/feedback, failure-queue entry {entry}" + (f" (latest of {len(votes)})" if len(votes) > 1 else "")
            cur = c.execute(f"""INSERT INTO corrections(example_id, answer, source, note, created_at) VALUES(?,?,?,?,?)
                          ON CONFLICT(example_id) DO UPDATE SET answer=excluded.answer, source=excluded.source,
                          note=excluded.note, created_at=excluded.created_at
                          WHERE corrections.source LIKE '{FEEDBACK_SOURCE}%'""",
                      (ex_id, json.dumps(answer), f"{FEEDBACK_SOURCE}queue:{entry}", note, at))
            # rowcount 0: the WHERE kept a trusted correction (the cursor's count, not SQLite-only changes())
            out["stored" if cur.rowcount else "kept_trusted"] += 1
    return out


def _mark_consumed(project: Project, ids: list[int], round_no: int) -> None:
    with project.store.tx() as c:
        c.executemany("UPDATE failure_queue SET status='consumed', round=? WHERE id=? AND status='new'",
                      [(round_no, i) for i in ids])


def _import(project: Project, path: Path, report: IterateReport) -> None:
    from distill.data.importer import import_file

    r = import_file(project, path)
    report.imported[str(path)] = {"rows_read": r.rows_read, "added": r.added, "by_split": r.by_split,
                                  "dup_existing": r.dup_existing, "rejected": r.rejected,
                                  "contaminated_removed": r.contaminated_removed, "warnings": r.warnings}


# ------------------------------------------------------------------------------------------------
# which fixes changed this round

FIX_ITEMS = 200    # new fixes listed one by one in the round's record (all are counted)


def _fixes(project: Project, round_no: int, teacher: str) -> dict[str, Any]:
    """The corrections in this round's training data that the previous round's did not have (new, or a different
    answer), by kind (review / feedback / file), and how many of them change the teacher's answer; the full
    snapshot (example id -> answer) is kept for the next round to compare with. Round 1 compares with no fixes."""
    from distill.dataset import fix_kind, fixes

    now = fixes(project, teacher)
    prev_row = get_run(project.store, f"iterate-{round_no - 1}") if round_no > 1 else None
    prev = (json.loads(prev_row["record"] or "{}").get("fixes") or {}).get("snapshot", {}) if prev_row else {}
    new = [(i, f) for i, f in now.items() if prev.get(i) != f["answer"]]
    by_kind: dict[str, int] = {}
    for _, f in new:
        by_kind[fix_kind(f["source"])] = by_kind.get(fix_kind(f["source"]), 0) + 1
    changed = [(i, f) for i, f in new if f["answer"] != f["teacher"]]
    return {"since": f"round {round_no - 1}" if prev_row else "the start", "new": len(new), "by_kind": by_kind,
            "changed_teacher_label": len(changed), "withdrawn": sum(1 for i in prev if i not in now),
            "items": [{"id": i, "text": f["text"][:300], "teacher": _loads(f["teacher"]), "fix": _loads(f["answer"]),
                       "kind": fix_kind(f["source"]), "source": f["source"]} for i, f in changed[:FIX_ITEMS]],
            "snapshot": {i: f["answer"] for i, f in now.items()}}


def _loads(s: str | None) -> Any:
    return None if s is None else json.loads(s)


def _fix_effect(items: list[dict], new_path: Path, old_path: Path | None) -> dict[str, Any]:
    """classify: on the inputs whose new fix changed the teacher's label, how often the new model (and the serving
    one) answers the fixed label: whether the round's fixes reached the model, input by input."""
    from distill.students.predictor import load_predictor

    texts = [it["text"] for it in items]
    out: dict[str, Any] = {"n": len(items), "old_model_follows": None}
    for key, path in (("new", new_path), ("old", old_path)):
        if path is None:
            continue
        pred = load_predictor(path)
        answers = [pred.labels[int(p.argmax())] for p in pred.predict_proba(texts, 64)]
        for it, a in zip(items, answers):
            it[f"{key}_model"] = a
        out[f"{key}_model_follows"] = sum(a == it["fix"] for it, a in zip(items, answers))
    return out


# ------------------------------------------------------------------------------------------------
# step 6: compare per segment


def _scores(result: dict) -> tuple[str, dict[str, tuple[float | None, int, bool]]]:
    """(metric label, {segment: (value, n, gated)}) of the student on the gate's metric, '(overall)' included."""
    gate = result["gate"]
    key, against = gate["metric"], gate["against"]
    student = result["systems"]["student"]
    out: dict[str, tuple[float | None, int, bool]] = {}
    overall = (student.get(f"vs_{against}") or {}).get(key)
    if overall:
        out["(overall)"] = (overall["value"], overall["n"], True)
    for s in student.get("segments", []):
        b = s.get(f"{key}_vs_{against}")
        if b:
            out[s["segment"]] = (b["value"], b["n"], bool(b.get("gated", True)))
    return f"{key} vs {against}", out


def compare(old: dict, new: dict, margin: float) -> tuple[str, list[SegmentDelta], list[str]]:
    """Per-segment deltas new - old on the gate metric, and one sentence per gated regression > margin."""
    metric, o = _scores(old)
    _, n = _scores(new)
    deltas, regressions = [], []
    for seg in sorted(set(o) | set(n), key=lambda s: (s != "(overall)", s)):
        ov, nv = o.get(seg, (None, 0, False))[0], n.get(seg, (None, 0, False))[0]
        size, gated = n.get(seg, o.get(seg, (None, 0, False)))[1:]
        d = None if ov is None or nv is None else nv - ov
        deltas.append(SegmentDelta(seg, size, ov, nv, d, gated))
        if d is not None and gated and d < -margin:
            where = "overall" if seg == "(overall)" else f"segment '{seg}' (n={size})"
            regressions.append(f"{where}: {metric} fell from {ov:.3f} to {nv:.3f} ({d:+.3f}, more than the "
                               f"margin {margin:g})")
    return metric, deltas, regressions


# ------------------------------------------------------------------------------------------------
# the recipe


def iterate(project: Project, *, teacher: str | None = None, new_traffic: Path | None = None,
            budget: float | None = None, regression_margin: float = 0.02, progress: bool = True,
            latency_samples: int = 200, max_new_tokens: int | None = None) -> IterateReport:
    """One round of the production loop. See the module docstring for the steps and guarantees.
    ``latency_samples`` is for classify evaluations, ``max_new_tokens`` for extract/generate ones (default:
    the evaluator's)."""
    from distill.filters import run_filters
    from distill.labeling import label
    from distill.recipes.train import train

    t0 = time.monotonic()
    spec = project.spec
    if not 0.0 <= regression_margin <= 1.0:
        raise DistillError(f"--margin must be in [0, 1] (absolute, on the gate metric), got {regression_margin}")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise DistillError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if new_traffic is not None and not Path(new_traffic).is_file():
        raise DistillError(f"{new_traffic}: no such file", hint="pass a CSV/JSONL/Parquet file of new inputs (column 'text')")
    tname = spec.get_teacher(teacher).name
    spec.student_config()   # a bad `student:` fails before anything is consumed or paid

    # 1. open (or resume) the round ------------------------------------------------------------------
    with project.exclusive("iterate"):
        open_round = project.store.get_meta(OPEN_KEY)
        resumed = open_round is not None
        round_no = int(open_round) if resumed else int(project.store.get_meta(DONE_KEY) or 0) + 1
        if not resumed:
            _set_meta(project, OPEN_KEY, str(round_no))
        report = IterateReport(round=round_no, teacher=tname, resumed=resumed,
                               traffic=str(new_traffic) if new_traffic else None)
        say = _say if progress else (lambda *_: None)
        say(f"iterate: round {round_no}" + (" (resuming)" if resumed else ""))

        # the serving model before this round: the promoted one, else what the service serves by default
        serving = serving_run(project)
        if serving is not None and project.store.get_meta(SERVING_KEY) != serving["id"]:
            project.promote(serving["id"], "adopted by iterate: its eval had passed the quality gate")
            report.reasons.append(f"adopted the evaluated model {serving['id']} as the serving model")
        report.parent_run_id = serving["id"] if serving is not None else None

        # 2. new inputs: failure queue + traffic file ----------------------------------------------------
        round_dir = project.root / "rounds" / f"round-{round_no:03d}"
        qfile, ids, by_reason = _take_queue(project, round_no, round_dir)
        if qfile is not None:
            _import(project, qfile, report)
        if new_traffic is not None:
            _import(project, Path(new_traffic), report)
        _mark_consumed(project, ids, round_no)
        report.feedback = apply_feedback(project, round_no)
        report.reviewed_applied = apply_reviews(project, round_no)     # after feedback: a reviewer's word wins
        report.queue_by_reason = by_reason
        report.queue_consumed = sum(by_reason.values())
        say(f"iterate: {report.queue_consumed} queue entries ({report.reviewed_applied} reviewed), "
            f"{sum(v['added'] for v in report.imported.values())} new inputs")

    # 3. label + filter (the labeller takes the project lock itself) ------------------------------------
    lab = label(project, tname, budget=budget, progress=progress)
    report.label = lab.to_dict()
    if lab.stopped == "budget":
        report.stopped = "budget"
        report.reasons.append(lab.message() + f"; the round stays open: `distill iterate {project.root} --budget MORE`")
        return _finish(report, t0)
    report.filter = asdict(run_filters(project, tname))
    report.fixes = _fixes(project, round_no, tname)

    # 4. train -----------------------------------------------------------------------------------------
    rep = train(project, teacher=tname, progress=progress)
    report.run_id = rep.run_id
    report.data_sha256 = rep.record.get("data_sha256") or rep.record.get("data_hash")   # classify | LM record
    new_row = get_run(project.store, rep.run_id)
    if serving is not None and rep.run_id == serving["id"]:
        report.reasons.append("the training data did not change, so training gave the serving model again")
        report.serving_model = serving["id"]
        report.stopped = "no_data"
        _close_round(project, report)
        return _finish(report, t0)

    # 5. evaluate new and serving model on today's locked test split -------------------------------------
    settings = {"latency_samples": latency_samples, "max_new_tokens": max_new_tokens}
    new_eval = _evaluate(project, report, rep.run_id, rep.path, tname, settings, progress)
    report.metric = f"{new_eval['gate']['metric']} vs {new_eval['gate']['against']}"
    report.gate_passed = bool(new_eval["gate"]["passed"])
    report.gate_failures = list(new_eval["gate"]["failures"])
    regressions: list[str] = []
    if serving is not None:
        old_eval = _evaluate(project, report, serving["id"], project.serving_model().path, tname, settings, progress)
        report.metric, report.comparison, regressions = compare(old_eval, new_eval, regression_margin)

    # 6. decide ------------------------------------------------------------------------------------------
    report.promoted = report.gate_passed and not regressions
    if not report.gate_passed:
        report.reasons += [f"the new model fails the quality gate: {f}" for f in report.gate_failures]
    report.reasons += [f"regression: {r}" for r in regressions]
    if report.promoted:
        gain = next((d.delta for d in report.comparison if d.segment == "(overall)"), None)
        report.reasons.append("passes the gate" + (f"; {report.metric} {gain:+.3f} overall and no gated segment "
                                                   f"fell by more than {regression_margin:g}" if gain is not None
                                                   else "; there was no serving model to compare with"))

    if spec.kind == "classify" and report.fixes.get("items"):
        report.fixes["effect"] = _fix_effect(report.fixes["items"], rep.path,
                                             project.serving_model().path if serving is not None else None)

    # 7. record: lineage on the new run, the decision, the marker (serving row written last) ---------------
    lineage = {"round": round_no, "parent_model": report.parent_run_id, "data_sha256": report.data_sha256,
               "teacher": tname, "promoted": report.promoted, "decided_at": time.time()}
    if report.promoted:
        if serving is not None:
            _touch_run(project, serving, serving=False)
        _touch_run(project, new_row, lineage=lineage, serving=True)
        project.promote(rep.run_id, f"promoted by iterate round {round_no}: passed the gate, no segment regressed")
        report.serving_model = rep.run_id
        if spec.kind == "classify":
            report.router = _recalibrate(project, serving, rep.path)
        else:
            # the LM service's export (GGUF) and router were made for the old model; both are separate
            # stages, run by hand (a GGUF conversion takes minutes, calibration generates with the student)
            report.next_steps = [f"distill export {project.root} --format gguf",
                                 f"distill route calibrate {project.root}"]
    else:
        _touch_run(project, new_row, lineage=lineage, serving=False)
        if serving is not None:
            _touch_run(project, get_run(project.store, serving["id"]), serving=True)
        report.serving_model = serving["id"] if serving is not None else None
    _close_round(project, report)
    return _finish(report, t0)


# ------------------------------------------------------------------------------------------------
# step 5: evaluate (reused for extract/generate when nothing it depends on changed)

EVAL_CACHE = Path("rounds") / "evals"


def _evaluate(project: Project, report: IterateReport, run_id: str, path: Path, teacher: str,
              settings: dict[str, Any], progress: bool) -> dict:
    """The result dict of ``distill.evaluate.evaluate_project`` for one model on today's test split.

    classify: always evaluated (seconds). extract / generate: generation takes minutes on a CPU, so the
    result is kept under ``rounds/evals/<run>-<fingerprint>.json`` and reused when the fingerprint
    (``_eval_fingerprint``) is the same — the same answers would be generated and scored the same way.
    Either way ``report.evaluations[run_id]`` says which JSON the decision read and whether it was reused."""
    # evaluate_project is looked up at call time, so a test can replace it
    from distill import evaluate as ev
    from distill.evaluate.lm import DEFAULT_MAX_NEW_TOKENS
    from distill.fsutil import write_json_atomic

    if project.spec.kind == "classify":
        result = ev.evaluate_project(project, model_path=str(path), teacher=teacher, progress=progress,
                                     latency_samples=settings["latency_samples"])
        report.evaluations[run_id] = {"json_path": result.get("json_path"), "reused": False}
        return result
    max_new = settings["max_new_tokens"] or DEFAULT_MAX_NEW_TOKENS[project.spec.kind]
    fp = _eval_fingerprint(project, run_id, teacher, {"max_new_tokens": max_new, "base": False})
    cached = project.root / EVAL_CACHE / f"{run_id}-{fp[:16]}.json"
    if cached.is_file():
        result = json.loads(cached.read_text(encoding="utf-8"))
        report.evaluations[run_id] = {"json_path": str(cached), "reused": True}
        return result
    result = ev.evaluate_project(project, model_path=str(path), teacher=teacher, max_new_tokens=max_new,
                                 base=False, progress=progress)
    write_json_atomic(cached, {**result, "iterate_fingerprint": fp})
    report.evaluations[run_id] = {"json_path": result.get("json_path"), "reused": False}
    return result


def _eval_fingerprint(project: Project, run_id: str, teacher: str, settings: dict[str, Any]) -> str:
    """sha256 over everything an LM evaluation's comparison numbers depend on: the model (run id: it hashes
    settings, data and teacher), the test rows (id, text, segment, meta, gold) with the teacher's label of
    each (status, answer, reason), the teacher's identity, the parts of the spec that shape the prompt, the
    parsing and the segments (not ``student:``, not the gate thresholds: iterate reads the values, not the
    old verdict), the generation settings and the code version (git commit; uncommitted edits of the
    evaluator are not seen)."""
    from distill import __version__
    from distill.runinfo import git_sha

    spec = project.spec
    test = project.store.q(
        """SELECT e.id, e.text, e.segment, e.meta, e.gold, l.status, l.answer, l.reason FROM examples e
           LEFT JOIN labels l ON l.example_id = e.id AND l.teacher = ? WHERE e.split = 'test' ORDER BY e.id""",
        (teacher,))
    blob = {
        "model": run_id, "settings": settings, "teacher": spec.get_teacher(teacher).identity(),
        "spec": spec.model_dump(mode="json", exclude={"student", "teachers", "teacher", "filters", "quality"}),
        "quality": spec.quality.model_dump(mode="json", include={"metric", "against", "min_segment_size"}),
        "test": [list(r) for r in test], "code": [__version__, git_sha()],
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()


def _recalibrate(project: Project, old_serving, new_path: Path) -> str | None:
    """Calibrate the promoted model's router with the old router's settings, if the old model had one."""
    if old_serving is None or not old_serving["path"]:
        return None
    from distill.runs import from_store_path
    from distill.serve.router import ROUTER_FILE, RouterConfig, calibrate_project

    old = from_store_path(project.root, old_serving["path"])
    f = next((d / ROUTER_FILE for d in (old, old.parent / "onnx") if (d / ROUTER_FILE).is_file()), None)
    if f is None:
        return None
    cfg = RouterConfig.from_json(f.read_text(encoding="utf-8"), where=str(f))
    new = calibrate_project(project.root, model_path=new_path, coverage=cfg.coverage, confidence_kind=cfg.confidence,
                            ood=cfg.ood, ood_keep=cfg.ood_keep, delta=cfg.delta, guarantee=cfg.guarantee,
                            k=cfg.k, embedder=cfg.embedder, layers=cfg.layers, backend="torch")
    return (f"router recalibrated for the new model (coverage target {cfg.coverage:g}, achieved "
            f"{new.achieved_coverage:.3f} on validation); re-run `distill export` for an ONNX export")


def _close_round(project: Project, report: IterateReport) -> None:
    rec = report.to_dict()
    project.record_run(f"iterate-{report.round}", "iterate", "done", None, rec)
    with project.store.tx() as c:
        c.execute("INSERT OR REPLACE INTO meta(key, value) VALUES(?, ?)", (DONE_KEY, str(report.round)))
        c.execute("DELETE FROM meta WHERE key=?", (OPEN_KEY,))


def _finish(report: IterateReport, t0: float) -> IterateReport:
    report.elapsed_s = round(time.monotonic() - t0, 3)
    return report


def _say(msg: str) -> None:
    from rich.console import Console

    Console(stderr=True).print(msg, highlight=False, markup=False)
