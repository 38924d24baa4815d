"""``distill eval`` for classify students: student vs teacher vs a cheap baseline on the locked test split,
with a quality gate.

The recipe, top to bottom (``evaluate``):

1. Load the student (the latest ``train`` run unless a folder is pinned; ``students.predictor``) and the test split. Test rows are
   never filtered (``dataset.rows``): dropping the hard cases would flatter everyone.
2. Four systems answer every test row:
   - **student**: argmax of ``predict_proba``;
   - **teacher**: its stored label. Rows where it failed or never answered count as *wrong* against gold
     (counted in ``test.teacher_failed``). Human corrections are not the teacher's work, so the teacher is
     scored on its own label even where a correction exists;
   - **base**: TF-IDF + logistic regression fit on the same kept train rows the student saw. It is the
     first thing a sceptic tries; a student that does not beat it is not worth serving;
   - **majority**: the most frequent of those kept train labels, for every input (``common.majority_answer``):
     what a user has without gold or any model. A teacher that does not beat it is the problem
     (``common.verdict``), and retention against such a teacher is not the headline.
3. Each system is scored vs **gold** (accuracy, macro-F1) and vs the **teacher** (agreement), with seeded
   percentile-bootstrap 95% CIs; retention = student/teacher on gold, recomputed per resample; per segment
   (only when some test row has a segment); per class (precision / recall / F1 / support vs gold, student,
   teacher and base); calibration (ECE); the student's top confusions with example texts.
4. Latency and cost: the student and base are timed here; the teacher's latency and cost come from the
   ledger (``teacher_calls``), i.e. what labelling actually took and cost.
5. The gate (``spec.quality``) turns all that into pass/fail with sentences a person can act on; the verdict
   (``common.verdict``) says whether the teacher is the problem and which filters read gold
   (``common.filters_used``).
6. The JSON is written atomically to ``reports/eval-<model run id>.json`` and registered as an ``eval`` run
   (``common.write_result``); `distill eval` then promotes a model whose gate passed (``common.promote_if_passed``).

Extract/generate students: ``evaluate.lm``. What both share: ``evaluate.common``.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np

from distill import metrics as M
from distill.dataset import rows as dataset_rows
from distill.errors import DistillError
from distill.evaluate import common as C
from distill.project import Project
from distill.runinfo import git_sha
from distill.runs import to_store_path

N_BINS = 10        # reliability-diagram bins (Guo et al. use 15; 10 reads better at test-set sizes)
TOP_CONFUSIONS = 10
EXAMPLES_PER_CONFUSION = 3
BATCH = 32           # throughput batch size


@dataclass
class EvalResult:
    """Everything ``distill eval`` measured. ``to_dict()`` is the JSON written to ``reports/``."""

    model_run_id: str
    model_path: str | None
    teacher: str
    task: str
    created_at: float
    test: dict                       # n, n_gold, teacher_failed, label counts, test-set hash
    systems: dict                    # name -> scores (see _score_system)
    headline: dict                   # name -> {metric: {value, ci}} (the table the CLI prints)
    teacher_quality: str             # the teacher's own quality vs gold, in one sentence
    confusions: dict                 # student vs gold (or teacher) top confused pairs with examples
    latency: dict
    cost: dict
    lineage: dict
    gate: dict                       # {passed, metric, against, failures, warnings}
    verdict: dict = field(default_factory=dict)   # teacher_problem, rule, headline sentences (common.verdict)
    filters_used: dict | None = None              # filters of the training labels, gold or not (common.filters_used)
    notes: list[str] = field(default_factory=list)
    json_path: str | None = None
    version: int = 1

    def to_dict(self) -> dict:
        return C.jsonable(asdict(self))


def evaluate(project: Project, *, model_path: str | None = None, student=None, teacher: str | None = None,
             cpu_hour_usd: float = 0.10, latency_samples: int = 200, progress: bool = True) -> EvalResult:
    """Evaluate the student (a folder, the latest trained model, or an already loaded ``student`` object with
    ``labels``, ``predict_proba(texts, batch_size)`` and ``size_bytes()``) on the locked test split."""
    spec = project.spec
    say = C.say if progress else (lambda *a: None)
    if spec.kind != "classify":
        raise DistillError(
            f"`distill eval` supports kind 'classify' today; this project is '{spec.kind}'",
            hint="extract/generate students are evaluated by their own recipes for now",
        )
    if cpu_hour_usd < 0:
        raise DistillError(f"--cpu-hour-usd must be >= 0, got {cpu_hour_usd}")
    if latency_samples < 0:
        raise DistillError(f"latency_samples must be >= 0, got {latency_samples}")

    # 1. model, teacher, test split ------------------------------------------------------------------
    student, run_id, path, record = _resolve_student(project, model_path, student)
    # project-relative in the result (a copied project's report names its own folder)
    shown_path = to_store_path(project.root, path) if path else None
    tname = teacher or C.record_teacher(record) or spec.get_teacher(None).name
    tspec = spec.get_teacher(tname)
    notes: list[str] = []
    test = C.test_table(project, tname, notes)
    n = len(test["ids"])
    classes = list(spec.label_names)
    extra = sorted({g for g in test["gold"] if g is not None and g not in classes}, key=str)
    if extra:
        notes.append(f"gold labels not in the spec's label set were kept as their own classes: {extra}")
        classes += extra
    unknown = [lab for lab in student.labels if lab not in classes]
    if unknown:
        raise DistillError(
            f"the model at {path} predicts labels that are not in distill.yaml: {unknown}",
            hint="the label set changed after training; retrain with `distill train`",
        )
    say(f"eval: {n} test rows ({test['n_gold']} with gold), teacher '{tname}', model {run_id}")

    # 2. four systems answer --------------------------------------------------------------------------
    say("eval: student predictions")
    texts = test["texts"]
    _ = student.predict_proba(texts[:2], batch_size=BATCH)  # warm-up (lazy init, allocator) before timing
    t0 = time.perf_counter()
    probs = np.asarray(student.predict_proba(texts, batch_size=BATCH), dtype=float)
    student_batch_s = time.perf_counter() - t0
    if probs.shape != (n, len(student.labels)):
        raise DistillError(f"the model returned probabilities of shape {probs.shape}, expected ({n}, {len(student.labels)})",
                           hint="the model folder may be damaged; retrain it")
    s_pred = [student.labels[i] for i in probs.argmax(axis=1)]
    s_conf = probs.max(axis=1).tolist()

    say("eval: TF-IDF + logistic regression baseline")
    base, base_reason = train_baseline(project, tname)
    if base is not None:
        bp = base.predict_proba(texts)
        b_pred = [str(base.classes_[i]) for i in bp.argmax(axis=1)]
        b_conf = bp.max(axis=1).tolist()
        unknown_b = sorted({b for b in b_pred if b not in classes})
        if unknown_b:  # the teacher answered something outside the label set; keep it visible as a class
            classes += unknown_b
    maj = C.majority_answer(project, tname)
    if maj is not None and maj["answer"] not in classes:
        classes.append(maj["answer"])

    # 3. scores ---------------------------------------------------------------------------------------
    say("eval: scoring with bootstrap CIs")
    t_pred, t_conf = test["teacher_pred"], test["teacher_conf"]
    for t in t_pred:
        if t is not None and t not in classes:
            classes.append(t)
    codes = _Codes(classes, test["gold"], t_pred, test["segments"] if test["segmented"] else None)
    min_seg = spec.quality.min_segment_size
    f1_vs_teacher = spec.quality.against == "teacher" and spec.quality.metric == "macro_f1"
    systems: dict[str, dict] = {
        "student": _score_system("student", s_pred, s_conf, codes, min_seg, f1_vs_teacher),
        "teacher": _score_system("teacher", t_pred, t_conf, codes, min_seg),
    }
    cfg = record.get("config") if isinstance(record.get("config"), dict) else {}
    systems["student"]["description"] = f"distilled student ({cfg.get('base_model') or cfg.get('base') or cfg.get('model') or path})"
    systems["teacher"]["description"] = f"teacher '{tname}' ({tspec.kind}: {tspec.model or tspec.path or ''})"
    if base is not None:
        systems["base"] = _score_system("base", b_pred, b_conf, codes, min_seg)
        systems["base"]["description"] = "TF-IDF (1-2 grams) + logistic regression on the same kept train labels"
    else:
        systems["base"] = {"available": False, "reason": base_reason}
    if maj is not None:
        systems["majority"] = C.majority_row(_score_system("majority", [maj["answer"]] * n, [None] * n, codes, min_seg),
                                             maj)
    else:
        systems["majority"] = {"available": False, "reason": "no kept train labels"}
    if codes.n_gold:
        for name, pred in (("student", s_pred), ("teacher", t_pred), ("base", b_pred if base is not None else None)):
            if pred is not None:
                systems[name]["per_class"] = _per_class(codes, codes.encode(pred))
    for name in ("student", "base"):
        if systems[name].get("available", True) and codes.n_gold:
            systems[name]["retention"] = _retention(codes, codes.encode(s_pred if name == "student" else b_pred),
                                                    codes.teacher)

    confusions = _confusions(codes, s_pred, test)

    # 4. latency and cost -----------------------------------------------------------------------------
    say(f"eval: latency ({latency_samples} requests at batch 1)")
    latency = {"student": _time_student(student, texts, latency_samples, student_batch_s),
               "teacher": C.teacher_ledger(project, tname)}
    latency["student"]["size_bytes"] = int(student.size_bytes())
    if base is not None:
        latency["base"] = _time_base(base, texts, latency_samples)
    cost = C.cost_per_1m(latency, tspec.price.per_hour, cpu_hour_usd)
    if maj is not None:
        cost["majority"] = {"per_1m_usd": 0.0, "basis": "a constant answer: no model to run"}

    # 5. gate, headline -------------------------------------------------------------------------------
    gate = _gate(spec.quality, systems["student"], codes)
    filters = C.filters_used(project, tname, record)
    verdict = C.verdict(systems, filters, [("accuracy", "accuracy"), ("macro_f1", "macro-F1")], "TF-IDF")
    headline = C.headline(systems, retention=not verdict["teacher_problem"])
    tq = _teacher_sentence(tname, systems["teacher"], test)
    lineage = {
        "model_run_id": run_id,
        "model_path": shown_path,
        "training_record": record,
        "teacher": {"name": tname, **tspec.identity(), "terms": tspec.terms.model_dump()},
        "filters": spec.filters.model_dump(),
        "filter_run": C.latest_filter_run(project, tname),
        "test_hash": test["hash"],
        "code_git_sha": git_sha(),
    }
    res = EvalResult(
        model_run_id=run_id, model_path=shown_path, teacher=tname, task=spec.name, created_at=time.time(),
        test={k: test[k] for k in ("n", "n_gold", "teacher_failed", "teacher_unlabelled", "teacher_failed_reasons",
                                   "gold_counts", "segmented", "segment_counts", "hash")},
        systems=systems, headline=headline, teacher_quality=tq, confusions=confusions, latency=latency,
        cost=cost, lineage=lineage, gate=gate, verdict=verdict, filters_used=filters, notes=notes + _standing_notes(test),
    )

    # 6. write + register -----------------------------------------------------------------------------
    out = C.write_result(project, run_id, res.to_dict(), tname)
    res.json_path = str(out)
    say(f"eval: {tq}")
    for line in verdict["headline"]:
        say(f"eval: {line}")
    say(f"eval: wrote {out}")
    return res


# ------------------------------------------------------------------------------------------------
# 1. inputs


def _resolve_student(project: Project, model_path: str | None, student) -> tuple[Any, str, str | None, dict]:
    """(predictor, model run id, folder, training record): the pinned folder, else the latest trained model
    (eval scores the candidate you just trained; serving is decided from its gate). An already loaded
    ``student`` is evaluated as given, with the latest run as its lineage."""
    if model_path is None and student is not None:
        ref = project.latest_model()
        return student, (ref.run_id if ref else "student"), (str(ref.path) if ref else None), (ref.record if ref else {})
    ref = project.model(pinned=model_path)
    if student is None:
        from distill.students.predictor import load_predictor

        # torch unless the pinned folder is itself an ONNX export (eval then measures what would be served)
        onnx = (ref.path / "model.onnx").exists() or (ref.path / "model.int8.onnx").exists()
        student = load_predictor(ref.path, backend="onnx" if onnx else "torch")
    return student, ref.run_id, str(ref.path), ref.record


def baseline_pipeline():
    """The unfitted TF-IDF + logistic regression baseline (also `distill teacher check`'s, cross-validated)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    # sublinear tf and word 1-2 grams: the standard strong linear text baseline (e.g. Wang & Manning 2012).
    return make_pipeline(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1),
                         LogisticRegression(max_iter=2000, C=10.0))


def train_baseline(project: Project, teacher: str):
    """TF-IDF + logistic regression on the kept train rows' effective answers (the student's training data)."""
    train = [r for r in dataset_rows(project, teacher, ("train",)) if r.answer is not None]
    ys = [str(r.answer) for r in train]
    if len(set(ys)) < 2:
        return None, f"needs kept train rows with at least two different labels; found {len(train)} rows, {len(set(ys))} labels"
    pipe = baseline_pipeline()
    pipe.fit([r.text for r in train], ys)
    pipe.n_train_ = len(train)
    return pipe, None


# ------------------------------------------------------------------------------------------------
# 3. scores


class _Codes:
    """Integer-coded gold / teacher / segments, so each bootstrap resample is a few numpy ops."""

    def __init__(self, classes: list, gold: list, teacher: list, segments: list | None):
        self.classes = classes
        self.k = len(classes)
        self.gold = M.encode(gold, classes)          # -1 = no gold
        self.teacher = M.encode(teacher, classes)    # -1 = teacher failed
        self.segments = segments                     # None: no test row has a segment (no per-segment scores)
        self.gi = np.flatnonzero(self.gold >= 0)     # rows with gold
        self.ti = np.flatnonzero(self.teacher >= 0)  # rows where the teacher answered
        self.n_gold = len(self.gi)

    def encode(self, pred: list) -> np.ndarray:
        return M.encode(pred, self.classes)


def _gold_stats(c: _Codes, p: np.ndarray) -> dict[str, Callable[[np.ndarray], float]]:
    g, pg = c.gold[c.gi], p[c.gi]
    right = (pg == g).astype(float)
    return {"accuracy": lambda i: float(right[i].sum()) / len(i) if len(i) else math.nan,
            "macro_f1": lambda i: M.macro_f1_codes(g[i], pg[i], c.k)}


def _teacher_stats(c: _Codes, p: np.ndarray) -> dict[str, Callable[[np.ndarray], float]]:
    t, pt = c.teacher[c.ti], p[c.ti]
    same = (pt == t).astype(float)
    return {"agreement": lambda i: float(same[i].sum()) / len(i) if len(i) else math.nan,
            "macro_f1": lambda i: M.macro_f1_codes(t[i], pt[i], c.k)}


def _score_system(name: str, pred: list, conf: list, c: _Codes, min_seg: int, seg_teacher_f1: bool = False) -> dict:
    """vs gold, vs teacher, per segment and calibration for one system's predictions."""
    p = c.encode(pred)
    out: dict[str, Any] = {"available": True, "n": len(pred), "no_answer": int((p < 0).sum())}
    segmented = c.segments is not None   # no test row has a segment: no per-segment scores, no "(none)" segment
    seg_gold = [c.segments[i] for i in c.gi] if segmented else []
    seg_teacher = [c.segments[i] for i in c.ti] if segmented else []
    segs: dict[str, dict] = {}
    if c.n_gold:
        gs = _gold_stats(c, p)
        out["vs_gold"] = {m: C.metric(f, c.n_gold) for m, f in gs.items()}
        for m, f in (gs.items() if segmented else ()):
            for b in M.per_segment(seg_gold, f, min_size=min_seg, resamples=C.RESAMPLES, seed=C.SEED):
                segs.setdefault(b["segment"], {"segment": b["segment"]})[f"{m}_vs_gold"] = b
    else:
        out["vs_gold"] = None
    if name != "teacher" and len(c.ti):
        ts = _teacher_stats(c, p)
        out["vs_teacher"] = {m: C.metric(f, len(c.ti)) for m, f in ts.items()}
        # Per segment vs the teacher: agreement only, unless the gate scores macro-F1 against the teacher
        # (each per-segment CI is another 1000 resamples per segment).
        for m, f in (ts.items() if segmented else ()):
            if m == "macro_f1" and not seg_teacher_f1:
                continue
            for b in M.per_segment(seg_teacher, f, min_size=min_seg, resamples=C.RESAMPLES, seed=C.SEED):
                segs.setdefault(b["segment"], {"segment": b["segment"]})[f"{m}_vs_teacher"] = b
    else:
        out["vs_teacher"] = None
    for s in segs.values():
        s["n"] = sum(1 for x in c.segments if ("(none)" if x is None else str(x)) == s["segment"])
    out["segments"] = [segs[k] for k in sorted(segs)]
    out["calibration"] = _calibration(p, conf, c)
    return out


def _per_class(c: _Codes, p: np.ndarray) -> list[dict]:
    """Precision, recall, F1 and support of each class vs gold (scikit-learn's
    ``precision_recall_fscore_support``), worst F1 first (ties: larger support first). The classes are those
    in gold or predictions, the ones macro-F1 averages; a missing answer is a false negative of its gold class
    and nobody's false positive; 0/0 counts as 0 (``zero_division=0``; ``predicted`` = 0 tells that case apart)."""
    from sklearn.metrics import precision_recall_fscore_support

    g, pg = c.gold[c.gi], p[c.gi]
    present = sorted(set(g.tolist()) | set(pg[pg >= 0].tolist()))
    prec, rec, f1, support = precision_recall_fscore_support(g, pg, labels=present, zero_division=0)
    predicted = np.bincount(pg[pg >= 0], minlength=c.k)
    rows = [{"class": c.classes[k], "precision": float(prec[j]), "recall": float(rec[j]), "f1": float(f1[j]),
             "support": int(support[j]), "predicted": int(predicted[k])} for j, k in enumerate(present)]
    return sorted(rows, key=lambda r: (r["f1"], -r["support"], str(r["class"])))


def _calibration(p: np.ndarray, conf: list, c: _Codes) -> dict | None:
    """ECE + reliability bins against gold where there is gold, else against the teacher."""
    ref, idx, against = (c.gold, c.gi, "gold") if c.n_gold else (c.teacher, c.ti, "teacher")
    rows = [i for i in idx if conf[i] is not None and p[i] >= 0]
    if not rows:
        return None
    cf = [float(conf[i]) for i in rows]
    right = [bool(p[i] == ref[i]) for i in rows]
    return {"against": against, "n": len(rows), "ece": M.ece(cf, right, N_BINS),
            "bins": M.reliability_bins(cf, right, N_BINS), "mean_confidence": float(np.mean(cf)),
            "accuracy": float(np.mean(right))}


def _retention(c: _Codes, p: np.ndarray, t: np.ndarray) -> dict:
    """system metric / teacher metric on gold, with the ratio recomputed on each (paired) resample."""
    sg, tg = _gold_stats(c, p), _gold_stats(c, t)
    out = {}
    for m in ("accuracy", "macro_f1"):
        f = (lambda i, m=m: M.retention(sg[m](i), tg[m](i)))
        out[m] = C.metric(f, c.n_gold)
    return out


def _confusions(c: _Codes, s_pred: list, test: dict) -> dict:
    against = "gold" if c.n_gold else "teacher"
    idx = c.gi if c.n_gold else c.ti
    ref = [test["gold"][i] if against == "gold" else test["teacher_pred"][i] for i in idx]
    pred = [s_pred[i] for i in idx]
    pairs = M.confused_pairs(ref, pred, top=TOP_CONFUSIONS)
    for pr in pairs:
        rows = [idx[r] for r in pr.pop("rows")]
        pr["examples"] = [{"id": test["ids"][i], "text": C.cut(test["texts"][i]), "segment": test["segments"][i],
                           "teacher": test["teacher_pred"][i]} for i in rows[:EXAMPLES_PER_CONFUSION]]
    return {"system": "student", "against": against, "n": len(idx), "n_errors": sum(r != p for r, p in zip(ref, pred)),
            "pairs": pairs}


# ------------------------------------------------------------------------------------------------
# 4. latency and cost


def _time_student(student, texts: list[str], samples: int, batch_s: float) -> dict:
    """p50/p95 of single-text requests (what one API call to a served student costs) and throughput at
    batch 32 from the full test-set pass (what bulk scoring costs)."""
    lat = []
    for i in range(samples):
        t = texts[i % len(texts)]
        t0 = time.perf_counter()
        student.predict_proba([t], batch_size=1)
        lat.append(time.perf_counter() - t0)
    out = {"batch1": M.latency_percentiles(lat)}
    out["throughput"] = {"batch_size": BATCH, "n": len(texts), "seconds": batch_s,
                         "texts_per_s": len(texts) / batch_s if batch_s > 0 else None}
    return out


def _time_base(base, texts: list[str], samples: int) -> dict:
    lat = []
    for i in range(samples):
        t0 = time.perf_counter()
        base.predict_proba([texts[i % len(texts)]])
        lat.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    base.predict_proba(texts)
    s = time.perf_counter() - t0
    return {"batch1": M.latency_percentiles(lat),
            "throughput": {"batch_size": len(texts), "n": len(texts), "seconds": s,
                           "texts_per_s": len(texts) / s if s > 0 else None}}


# ------------------------------------------------------------------------------------------------
# 5. gate and summary


def _gate(q, student: dict, c: _Codes) -> dict:
    """Apply ``spec.quality`` to the student. Point estimates decide; a CI reaching below the threshold is a
    warning (the test set is too small to be sure), not a failure."""
    metric, against = q.metric, q.against
    failures: list[str] = []
    warnings: list[str] = []
    if metric == "agreement":
        against = "teacher"
    if metric in ("field_f1",):
        failures.append(f"quality.metric '{metric}' applies to extract tasks; use accuracy, macro_f1 or agreement")
        return {"passed": False, "metric": metric, "against": against, "failures": failures, "warnings": warnings}
    if metric == "exact_match":
        warnings.append("quality.metric exact_match on a classify task is accuracy")
    key = {"gold": {"accuracy": "accuracy", "exact_match": "accuracy", "macro_f1": "macro_f1"},
           "teacher": {"accuracy": "agreement", "exact_match": "agreement", "agreement": "agreement",
                       "macro_f1": "macro_f1"}}[against][metric]
    return C.apply_gate(q, student, key, against, failures, warnings, noun="labels", segmented=c.segments is not None)


def _teacher_sentence(name: str, t: dict, test: dict) -> str:
    g = t.get("vs_gold")
    if not g:
        return (f"teacher {name}: quality vs gold unknown — the test split has no gold labels, so the student is "
                "only measured against the teacher")
    a, f1 = g["accuracy"], g["macro_f1"]
    miss = test["teacher_failed"] + test["teacher_unlabelled"]
    return (f"teacher {name}: accuracy {C.fmt(a['value'])} [{C.fmt(a['ci'][0])}, {C.fmt(a['ci'][1])}], macro-F1 "
            f"{C.fmt(f1['value'])} [{C.fmt(f1['ci'][0])}, {C.fmt(f1['ci'][1])}] vs gold on n={a['n']}"
            + (f" ({miss} {'row' if miss == 1 else 'rows'} without a teacher answer counted as wrong)" if miss else ""))


def _standing_notes(test: dict) -> list[str]:
    return [
        "all rows of the locked test split are scored; nothing is filtered out",
        f"rows where the teacher failed ({test['teacher_failed']}) or never answered ({test['teacher_unlabelled']}) "
        "count as wrong for the teacher vs gold; agreement with the teacher is measured on the rows it answered",
        "CIs are seeded percentile-bootstrap 95% intervals over test rows (1000 resamples); retention is "
        "recomputed per resample",
    ]


# ------------------------------------------------------------------------------------------------
# helpers


