"""What every evaluation shares, whatever the student kind: the locked test table, bootstrap CIs, the
quality gate, the headline, the teacher's ledger figures, cost per 1M requests, and writing + registering
the result. ``evaluate.classify`` and ``evaluate.lm`` are the two recipes built on it.

Every CI uses the same resamples and seed (``RESAMPLES``, ``SEED``), so systems are compared on the same
resamples (paired) and classify and LM numbers are comparable.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np

from distill import metrics as M
from distill.dataset import relabelled_count, rows as dataset_rows
from distill.errors import DistillError
from distill.filters import USES_GOLD
from distill.fsutil import write_json_atomic
from distill.project import Project

RESAMPLES = 1000   # bootstrap draws per CI; >= 1000 keeps the 2.5% tail stable (25 draws beyond it)
SEED = 0           # one seed for every CI, so systems are compared on the same resamples (paired)
EXAMPLE_CHARS = 300  # example texts are cut so the JSON/HTML stay small


def say(msg: str) -> None:
    from rich.console import Console

    Console(stderr=True).print(msg, highlight=False, markup=False)


def fmt(x) -> str:
    return "n/a" if is_missing(x) else f"{x:.3f}"


def is_missing(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def cut(text: str) -> str:
    return text if len(text) <= EXAMPLE_CHARS else text[: EXAMPLE_CHARS - 1] + "…"


def safe_name(s: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in s)


def jsonable(x):
    """NaN/inf -> None (JSON has no NaN), numpy scalars -> Python, tuples -> lists."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return None if math.isnan(x) or math.isinf(x) else x
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def record_teacher(record: dict) -> str | None:
    """The teacher a model was trained on: the training record stores {identity: {name, ...}, terms, ...}."""
    t = record.get("teacher")
    if isinstance(t, dict):
        return (t.get("identity") or {}).get("name") or t.get("name")
    return t if isinstance(t, str) else None


def metric(stat: Callable[[np.ndarray], float], n: int) -> dict:
    """{value, ci, n}: the statistic on all ``n`` rows and its seeded percentile-bootstrap 95% CI."""
    lo, hi = M.bootstrap_ci(stat, n, resamples=RESAMPLES, seed=SEED)
    return {"value": stat(np.arange(n)), "ci": [lo, hi], "n": n}


def test_table(project: Project, teacher: str, notes: list[str], limit: int | None = None) -> dict:
    """The locked test split as parallel lists, plus the teacher's *own* answer per row (not corrections:
    the teacher is scored on its work), its probability of that answer (classify) and whether the answer
    was valid JSON / valid against the schema (extract). Test rows are never filtered: dropping the hard
    cases would flatter everyone. ``limit`` keeps a fixed pseudo-random subset (by hashed id), the same
    rows on every run — generation is slow on a CPU."""
    rows = dataset_rows(project, teacher, ("test",))
    if not rows:
        raise DistillError(f"{project.root}: the test split is empty",
                           hint="import more inputs (splits.test in distill.yaml sets the share that goes to test)")
    n_total = len(rows)
    if limit is not None and limit < len(rows):
        rows = sorted(rows, key=lambda r: hashlib.sha256(r.id.encode()).hexdigest())[:limit]
        rows.sort(key=lambda r: r.id)
        notes.append(f"--limit {limit}: scored a fixed hashed subset of {len(rows)} of the {n_total} test rows")
    labels = {r["example_id"]: r for r in project.store.q(
        "SELECT example_id, status, answer, probs, confidence, reason FROM labels WHERE teacher=? AND example_id IN "
        "(SELECT id FROM examples WHERE split='test')", (teacher,))}
    pred, conf, json_ok, schema_ok, failed, unlabelled, reasons = [], [], [], [], 0, 0, {}
    for r in rows:
        lab = labels.get(r.id)
        if lab is not None and lab["status"] == "ok":
            ans = json.loads(lab["answer"])
            pr = json.loads(lab["probs"]) if lab["probs"] else None
            pred.append(ans)
            # the teacher's probability of its own answer: from its distribution when stored, else its confidence
            conf.append(float(pr[ans]) if pr and isinstance(ans, str) and ans in pr else lab["confidence"])
            json_ok.append(1.0)
            schema_ok.append(1.0)
            continue
        pred.append(None)
        conf.append(None)
        schema_ok.append(0.0)
        # the labeller stores the parser's reason: a schema violation was valid JSON, anything else was not
        json_ok.append(1.0 if lab is not None and lab["reason"] == "schema_violation" else 0.0)
        if lab is None:
            unlabelled += 1
        else:
            failed += 1
            reasons[lab["reason"] or "unknown"] = reasons.get(lab["reason"] or "unknown", 0) + 1
    if unlabelled:
        notes.append(f"{unlabelled} test rows have no answer from teacher '{teacher}' (run `distill label`); "
                     "they count as wrong for the teacher")
    gold = [r.gold for r in rows]
    segmented = any(r.segment is not None for r in rows)
    h = hashlib.sha256(json.dumps([[r.id, r.gold] for r in rows], sort_keys=True).encode()).hexdigest()[:16]
    return {
        "ids": [r.id for r in rows], "texts": [r.text for r in rows], "segments": [r.segment for r in rows],
        "metas": [r.meta for r in rows], "gold": gold, "teacher_pred": pred, "teacher_conf": conf,
        "teacher_validity": {"json_valid": np.array(json_ok), "schema_valid": np.array(schema_ok)},
        "n": len(rows), "n_total": n_total, "n_gold": sum(g is not None for g in gold),
        "teacher_failed": failed, "teacher_unlabelled": unlabelled, "teacher_failed_reasons": reasons,
        "gold_counts": M.counts([json.dumps(g, sort_keys=True) if isinstance(g, (dict, list)) else g
                                 for g in gold if g is not None]),
        # A project without segments (no test row has one) gets no per-segment table and no worst-segment gate;
        # with some rows segmented, the others are the segment "(none)".
        "segmented": segmented,
        "segment_counts": M.counts(["(none)" if r.segment is None else r.segment for r in rows]) if segmented else {},
        "hash": h,
    }


def majority_answer(project: Project, teacher: str, key: Callable[[Any], str] = str) -> dict | None:
    """The most frequent answer among the kept train rows' effective answers — the labels the student (and the
    TF-IDF baseline) trained on, i.e. what a user has without gold — as ``{answer, count, n_train}``; None when
    there are none. ``key`` canonicalises an answer (extract: ``task.answer_key``); ties go to the smallest
    key, so the choice is deterministic."""
    answers = [r.answer for r in dataset_rows(project, teacher, ("train",)) if r.answer is not None]
    if not answers:
        return None
    counts = Counter(key(a) for a in answers)
    best, count = min(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return {"answer": next(a for a in answers if key(a) == best), "count": count, "n_train": len(answers)}


def majority_row(scores: dict, maj: dict) -> dict:
    """The scored constant system (``scores`` from the kind's ``_score_system``) with its answer and note."""
    return {**scores, "answer": maj["answer"], "train_count": maj["count"], "n_train": maj["n_train"],
            "description": f"answers {shown(maj['answer'])} to every input: the most frequent of the {maj['n_train']} kept train "
                           f"labels ({maj['count']} of them), the labels the student trained on — what you have without gold "
                           "or any model; cost and latency ≈ 0"}


def shown(answer: Any) -> str:
    """An answer quoted for a sentence: 'label', or compact JSON for an extract answer (cut to EXAMPLE_CHARS)."""
    return repr(cut(answer)) if isinstance(answer, str) else cut(json.dumps(answer, ensure_ascii=False, sort_keys=True))


def latest_filter_run(project: Project, teacher: str) -> dict | None:
    rows = project.store.q("SELECT * FROM filter_runs WHERE teacher=? ORDER BY id DESC LIMIT 1", (teacher,))
    if not rows:
        return None
    r = rows[0]
    return {"id": r["id"], "config": json.loads(r["config"]), "kept": r["kept"], "dropped": r["dropped"]}


# filter reason -> the distill.yaml setting (under ``filters:``) that switches it on
FILTER_SETTINGS = {"disagrees_with_gold": "drop_disagree_with_gold", "low_confidence": "min_confidence",
                   "low_margin": "min_margin", "high_entropy": "max_entropy", "low_agreement": "min_agreement",
                   "suspect_label": "suspect_labels", "duplicate": "drop_duplicates"}


def uses_gold(reason: str) -> bool:
    """Whether a filter reason reads gold labels: the ones ``distill.filters.USES_GOLD`` names
    (``disagrees_with_gold``); every other reason (confidence, margin, entropy, agreement, duplicate,
    contaminated, ``teacher_failed:*``, ``suspect_label``) is gold-free, and so is any unknown one unless its
    name says gold."""
    head = reason.split(":", 1)[0]
    return head in USES_GOLD or "gold" in head.lower()


def filters_used(project: Project, teacher: str, record: dict) -> dict | None:
    """Which filters shaped the training labels, and whether each read gold: the filter run the model was
    trained on (its training record's ``filter.run_id``), else the teacher's latest run; None without one.
    One row per filter the run's config switched on plus one per reason that dropped rows (unknown reasons
    too), each with its drop count from ``filter_decisions``. ``gold_dropped`` counts the rows gold-using
    filters dropped: a user without gold cannot drop them, so the student's figure flatters what they get."""
    store = project.store
    rid = (record.get("filter") or {}).get("run_id") if isinstance(record.get("filter"), dict) else None
    runs = store.q("SELECT * FROM filter_runs WHERE id=?", (rid,)) if rid is not None else []
    source = "the filter run the model was trained on"
    if not runs:
        runs = store.q("SELECT * FROM filter_runs WHERE teacher=? ORDER BY id DESC LIMIT 1", (teacher,))
        source = f"the latest filter run of teacher '{teacher}'"
    if not runs:
        return None
    run = runs[0]
    cfg = (json.loads(run["config"]) or {}).get("filters") or {}
    drops = {r["reason"]: r["n"] for r in store.q(
        "SELECT COALESCE(reason,'(no reason)') reason, COUNT(*) n FROM filter_decisions WHERE run_id=? AND kept=0 "
        "GROUP BY reason", (run["id"],))}
    rows = []
    for reason, setting in FILTER_SETTINGS.items():
        if cfg.get(setting) not in (None, False) or reason in drops:
            rows.append({"filter": reason, "setting": f"filters.{setting}: {json.dumps(cfg[setting])}" if setting in cfg
                         else None, "uses_gold": uses_gold(reason), "dropped": drops.get(reason, 0)})
    rows += [{"filter": reason, "setting": None, "uses_gold": uses_gold(reason), "dropped": drops[reason]}
             for reason in sorted(set(drops) - set(FILTER_SETTINGS))]
    gold = [r for r in rows if r["uses_gold"] and r["dropped"]]
    return {"run_id": run["id"], "source": source, "kept": run["kept"], "dropped": run["dropped"],
            # rows with an answer (the teacher's or a human's): what a gold filter could drop from
            "labelled": run["kept"] + run["dropped"] - sum(k for r, k in drops.items()
                                                           if r == "no_label" or r.startswith("teacher_failed")),
            "filters": rows, "gold_dropped": sum(r["dropped"] for r in gold), "gold_filters": [r["filter"] for r in gold],
            # kept rows trained on the suspect filter's label, not the teacher's (no gold read)
            "relabelled": relabelled_count(store, run["id"])}


def teacher_ledger(project: Project, teacher: str) -> dict:
    """The teacher's real latency and cost, from every call in the ledger (all splits, retries included)."""
    calls = project.store.q("SELECT latency_s, cost FROM teacher_calls WHERE teacher=?", (teacher,))
    lat = [float(r["latency_s"]) for r in calls]
    costs = [float(r["cost"]) for r in calls]
    return {"source": "ledger", "calls": len(calls), "total_cost_usd": float(sum(costs)),
            "mean_cost_usd": float(np.mean(costs)) if costs else None, "batch1": M.latency_percentiles(lat)}


def cost_per_1m(latency: dict, teacher_per_hour: float, cpu_hour_usd: float) -> dict:
    """USD per 1M requests. Student/base: measured mean seconds per single request × CPU-hour price.
    Teacher: mean ledger cost per call × 1e6. For a local teacher priced by the hour the labeller already
    charges wall time into the ledger, so the per-hour estimate is shown separately and only used when the
    ledger holds no cost at all (never added, which would count the same hours twice)."""
    out: dict[str, Any] = {"cpu_hour_usd": cpu_hour_usd}
    for name in ("student", "base"):
        if name in latency:
            mean_s = latency[name]["batch1"]["mean_s"]
            tput = latency[name]["throughput"]["texts_per_s"]
            out[name] = {
                "per_1m_usd": None if mean_s is None else mean_s * cpu_hour_usd / 3600 * 1e6,
                "per_1m_usd_batched": None if not tput else (1 / tput) * cpu_hour_usd / 3600 * 1e6,
                "basis": "mean seconds per request at batch 1 × cpu_hour_usd",
            }
    t = latency["teacher"]
    ledger = None if t["mean_cost_usd"] is None else t["mean_cost_usd"] * 1e6
    hourly = (t["batch1"]["mean_s"] * teacher_per_hour / 3600 * 1e6
              if teacher_per_hour and t["batch1"]["mean_s"] is not None else None)
    use = ledger if ledger else hourly if hourly is not None else ledger
    out["teacher"] = {"per_1m_usd": use, "ledger_per_1m_usd": ledger, "per_hour_usd": teacher_per_hour or None,
                      "per_hour_per_1m_usd": hourly,
                      "basis": "ledger mean cost per call" if ledger else
                      ("spec price.per_hour × mean ledger latency" if hourly is not None else "no calls in the ledger")}
    s = out["student"]["per_1m_usd"]
    out["teacher_over_student"] = use / s if use and s else None
    tl, sl = t["batch1"]["p50_s"], latency["student"]["batch1"]["p50_s"]
    latency["teacher_over_student_p50"] = tl / sl if tl and sl else None
    return out


def apply_gate(q, student: dict, key: str, against: str, failures: list[str], warnings: list[str],
               noun: str = "labels", segmented: bool = True) -> dict:
    """The gate once the metric ``key`` is known; shared by classify (here) and extract/generate
    (``distill.evaluate_lm``), so both kinds fail and warn the same way. ``segmented=False`` (no test row has a
    segment): only the overall threshold applies — there is no worst segment to gate on."""
    scores = student.get(f"vs_{against}")
    label = f"student {key} vs {against}"
    if not scores:
        failures.append(f"cannot compute {label}: the test split has no "
                        + (f"gold {noun} (import a gold column, or set quality.against: teacher)" if against == "gold"
                           else f"teacher {noun} (run `distill label`)"))
        return {"passed": False, "metric": key, "against": against, "failures": failures, "warnings": warnings}
    s = scores[key]
    check_threshold(f"{label} = {fmt(s['value'])} [95% CI {fmt(s['ci'][0])}, {fmt(s['ci'][1])}] on n={s['n']}",
           s, q.overall, "quality.overall", failures, warnings)
    segs = [x[f"{key}_vs_{against}"] for x in student["segments"] if f"{key}_vs_{against}" in x]
    worst = M.worst_segment(segs)
    small = [x["segment"] for x in segs if not x["gated"]]
    if worst is None and segmented:
        warnings.append(f"no segment has >= {q.min_segment_size} rows (quality.min_segment_size); "
                        "worst-segment check skipped")
    elif worst is not None:
        check_threshold(f"worst segment '{worst['segment']}' (n={worst['n']}): {label} = {fmt(worst['value'])} "
               f"[95% CI {fmt(worst['ci'][0])}, {fmt(worst['ci'][1])}]", worst, q.worst_segment,
               "quality.worst_segment", failures, warnings)
    if small:
        warnings.append(f"segments smaller than {q.min_segment_size} rows are reported but not gated: {small}")
    return {"passed": not failures, "metric": key, "against": against, "overall_threshold": q.overall,
            "worst_segment_threshold": q.worst_segment, "min_segment_size": q.min_segment_size, "segmented": segmented,
            "value": s["value"], "ci": s["ci"], "worst_segment": worst, "failures": failures, "warnings": warnings}


def check_threshold(what: str, s: dict, threshold: float, name: str, failures: list, warnings: list) -> None:
    v = s["value"]
    if v is None or (isinstance(v, float) and math.isnan(v)) or v < threshold:
        failures.append(f"{what} is below the threshold {name} = {threshold:g}")
    elif s["ci"][0] is not None and s["ci"][0] < threshold:
        warnings.append(f"{what} passes {name} = {threshold:g}, but the CI's lower end is below it: "
                        "more test rows are needed to be sure")


def headline(systems: dict, retention: bool = True) -> dict:
    """name -> {metric: {value, ci}}, the table the CLI prints. ``retention=False`` leaves retention out (the
    teacher is no better than a constant answer, so a ratio to it means nothing; see ``verdict``)."""
    out = {}
    for name, s in systems.items():
        if not s.get("available"):
            continue
        row = {}
        for m, v in (s.get("vs_gold") or {}).items():
            row[f"{m} (gold)"] = {"value": v["value"], "ci": v["ci"]}
        for m, v in (s.get("vs_teacher") or {}).items():
            row[f"{m} (teacher)" if m != "agreement" else "agreement"] = {"value": v["value"], "ci": v["ci"]}
        if s.get("retention") and retention:
            r = s["retention"]["accuracy"]
            row["retention"] = {"value": r["value"], "ci": r["ci"]}
        out[name] = {k: v for k, v in row.items() if not is_missing(v["value"])}
    return jsonable(out)


def verdict(systems: dict, filters: dict | None, metrics: list[tuple[str, str]], base_name: str) -> dict:
    """Whether the teacher is the problem, and the headline sentences ``distill eval`` prints and the report leads with.

    The rule (``rule`` in the result): the teacher is the problem when, vs gold on the locked test split, it
    scores at or below the majority row — the constant answer a user has without any model — on *either*
    ``metrics`` (``[(key, label)]``, the accuracy-type metric first; point estimates decide, as in the gate).
    Losing to a constant on accuracy makes accuracy retention meaningless (a student that always answers the
    majority keeps >= 100%); losing on macro-F1 (extract: field F1) means its labels carry no more about the
    classes than the label prior. Retention is then left out of the headline, which becomes the student vs
    gold against the majority and baseline rows. Without gold, or without a majority row, nothing is decided
    (``teacher_problem`` None). A gold-using filter that dropped training rows is named next to the
    student's number."""
    t, maj, st, base = (systems.get(k) or {} for k in ("teacher", "majority", "student", "base"))
    key, label = metrics[0]
    rule = ("teacher vs gold " + " or ".join(f"{lab} <= the majority row's {lab}" for _, lab in metrics)
            + " (point estimates on the locked test split)")
    tg, mg = t.get("vs_gold"), maj.get("vs_gold") if maj.get("available") else None
    compared, problem = None, None
    if tg and mg:
        compared = {m: {"teacher": tg[m]["value"], "majority": mg[m]["value"],
                        "teacher_at_or_below": _at_or_below(tg[m]["value"], mg[m]["value"])} for m, _ in metrics}
        problem = any(c["teacher_at_or_below"] for c in compared.values())
    lines = []
    if problem:
        worse = "; ".join(f"{lab} {fmt(compared[m]['teacher'])} <= {fmt(compared[m]['majority'])}"
                          for m, lab in metrics if compared[m]["teacher_at_or_below"])
        lines.append(f"The teacher is the problem: vs gold it is no better than answering {shown(maj['answer'])} to every "
                     f"input ({worse}), so retention against it means nothing and is not the headline. Fix the "
                     "prompt or choose another teacher; `distill teacher check` compares candidates.")
    sg = (st.get("vs_gold") or {}).get(key)
    if sg:
        vs = [f"{name} {fmt(((s.get('vs_gold') or {}).get(key) or {}).get('value'))}"
              for name, s in (("majority", maj), (base_name, base), ("teacher", t))
              if s.get("available", True) and s.get("vs_gold")]
        line = (f"student {label} vs gold {fmt(sg['value'])} [{fmt(sg['ci'][0])}, {fmt(sg['ci'][1])}]"
                + (f" (against {', '.join(vs)})" if vs else ""))
        ret = (st.get("retention") or {}).get("accuracy")
        if ret and not problem and not is_missing(ret["value"]):
            line += f"; retention {fmt(ret['value'])} [{fmt(ret['ci'][0])}, {fmt(ret['ci'][1])}] of the teacher's accuracy"
        if filters and filters["gold_dropped"]:
            why = ("because they disagreed with gold" if filters["gold_filters"] == ["disagrees_with_gold"] else
                   "by filters that read gold (" + ", ".join(f"{r['filter']}: {r['dropped']}" for r in filters["filters"]
                                                              if r["uses_gold"] and r["dropped"]) + ")")
            line += (f" — trained with {filters['gold_dropped']} of {filters['labelled']} labels dropped {why}; a user "
                     "without gold gets the figure of a student trained without that filter")
        lines.append(line)
    elif (st.get("vs_teacher") or {}).get("agreement"):
        a = st["vs_teacher"]["agreement"]
        lines.append(f"student agreement with the teacher {fmt(a['value'])} [{fmt(a['ci'][0])}, {fmt(a['ci'][1])}] "
                     "(no gold on the test split: quality vs gold unknown)")
    return {"teacher_problem": problem, "rule": rule, "teacher_vs_majority": compared,
            "headline_figure": ("student_vs_teacher" if not sg else "retention" if st.get("retention") and not problem
                                else "student_vs_gold"),
            "headline": lines}


def _at_or_below(teacher: float | None, majority: float | None) -> bool:
    if is_missing(majority):
        return False
    return is_missing(teacher) or teacher <= majority


def write_result(project: Project, model_run_id: str, result: dict, teacher: str) -> Path:
    """Write ``result`` to ``reports/eval-<model run id>.json`` (atomically) and register it as the model's
    ``eval`` run with its gate verdict. Sets ``result["json_path"]``."""
    from distill.runs import record_eval

    out = project.reports_dir / f"eval-{safe_name(model_run_id)}.json"
    result["json_path"] = str(out)
    write_json_atomic(out, jsonable(result))
    record_eval(project.store, project.root, model_run_id, out, bool(result["gate"]["passed"]),
                {"teacher": teacher, "headline": result.get("headline")})
    return out


def promote_if_passed(project: Project, result: dict) -> str:
    """After `distill eval`: a model whose gate passed becomes the serving model (one sentence says what
    happened). A model that failed is never promoted, and a pinned folder that is not a training run of the
    project cannot be (pin it at serve time instead)."""
    from distill import runs

    rid = result["model_run_id"]
    current = project.store.get_meta(runs.SERVING_KEY)
    if not result["gate"]["passed"]:
        return (f"gate failed: {rid} is not the serving model"
                + (f" (still {current})" if current else " (nothing is served until a model passes)"))
    row = runs.get_run(project.store, rid)
    if row is None or row["kind"] not in runs.MODEL_KINDS:
        return f"{rid} passed, but it is not a training run of this project, so it cannot be promoted"
    if current == rid:
        return f"{rid} passed and stays the serving model"
    project.promote(rid, f"its eval passed the quality gate ({result['gate'].get('metric')} vs "
                         f"{result['gate'].get('against')})")
    return f"{rid} passed the gate and is now the serving model" + (f" (was {current})" if current else "")
