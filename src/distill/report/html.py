"""``distill report``: one self-contained HTML file (+ JSON) from an evaluation.

Self-contained means: inline CSS, charts drawn here as inline SVG, no JavaScript, no fonts or images from
the network. The file can be mailed, attached to a ticket or opened years later and look the same. All
text that came from users or teachers (input texts, labels, segment names, paths) goes through ``_e``
(HTML escaping): a ``<script>`` in an input must show up as text, never run.

Sections, in reading order: verdict (the gate in plain words; the teacher named when it is no better than a
constant answer) → headline table → cost & latency → per segment → per class → calibration → confusions →
data funnel → filters and gold → lineage → notes.
"""

from __future__ import annotations

import html
import json
import math
import time
from pathlib import Path
from typing import Any

from distill import __version__
from distill.dataset import relabelled_count
from distill.errors import DistillError
from distill.fsutil import write_text_atomic
from distill.project import Project

SYSTEM_ORDER = ("student", "teacher", "base", "majority")
COLORS = {"student": "#2563eb", "teacher": "#d97706", "base": "#6b7280", "majority": "#a78bfa"}
PER_CLASS_SHOWN = 15   # worst classes in the HTML; the JSON has all of them (150 rows would bury the report)


def write_report(project: Project, result: dict | None = None) -> tuple[Path, Path]:
    """Write ``reports/report.html`` and ``reports/report.json`` (the evaluation plus the data funnel).
    Uses the latest ``eval`` run's JSON when ``result`` is None."""
    if result is None:
        result = _latest_eval(project)
    record = (result.get("lineage") or {}).get("training_record") or {}
    funnel = data_funnel(project, result.get("teacher"), record)
    doc = {**result, "funnel": funnel}
    if "filters_used" not in result and result.get("teacher"):   # an evaluation from before it was recorded
        from distill.evaluate.common import filters_used

        doc["filters_used"] = filters_used(project, result["teacher"], record)
    out_dir = project.reports_dir
    html_path, json_path = out_dir / "report.html", out_dir / "report.json"
    write_text_atomic(json_path, json.dumps(doc, indent=1, ensure_ascii=False, allow_nan=False))
    write_text_atomic(html_path, render_html(doc))
    return html_path, json_path


def _latest_eval(project: Project) -> dict:
    from distill.runs import latest_eval

    run, path = latest_eval(project.store, project.root)
    if run is None or path is None:
        raise DistillError(f"{project.root}: no evaluation to report on", hint="run `distill eval` first")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DistillError(f"{path}: the latest evaluation's JSON is missing", hint="re-run `distill eval`") from None
    except json.JSONDecodeError as e:
        raise DistillError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})", hint="re-run `distill eval`") from None


# ------------------------------------------------------------------------------------------------
# The data funnel, read from the store


def data_funnel(project: Project, teacher: str | None, training_record: dict) -> list[dict]:
    """Imported → deduplicated → split → labelled → filtered → trained, as rows ``{step, count, delta, note}``.
    ``delta`` is the (negative) number removed at that step, when the step removes rows."""
    s = project.store
    steps: list[dict] = []
    imp = s.q("SELECT COALESCE(SUM(rows_read),0) r, COALESCE(SUM(rejected),0) rej, "
              "COALESCE(SUM(dup_exact+dup_normalised+dup_existing),0) d, COUNT(*) n FROM imports")[0]
    n_examples = s.one("SELECT COUNT(*) FROM examples")
    if imp["n"]:
        steps.append({"step": "rows imported", "count": imp["r"], "note": f"{imp['n']} import(s)"})
        steps.append({"step": "rejected at import", "delta": -imp["rej"], "note": "too long, empty or invalid"})
        steps.append({"step": "duplicates removed", "delta": -imp["d"], "note": "exact, normalised, already present"})
    steps.append({"step": "unique inputs", "count": n_examples})
    n_test = s.one("SELECT COUNT(*) FROM examples WHERE split='test'")
    steps.append({"step": "locked test split", "delta": -n_test, "split": True,
                  "note": "set aside: never trained on, all of it is evaluated"})
    pool = n_examples - n_test
    steps.append({"step": "train + validation pool", "count": pool})
    contam = s.one("SELECT COUNT(*) FROM contamination c JOIN examples e ON e.id=c.example_id WHERE e.split!='test'")
    steps.append({"step": "near-duplicates of test removed", "delta": -contam, "note": "decontamination"})
    if teacher:
        lab = {r["status"]: r["n"] for r in s.q(
            "SELECT l.status, COUNT(*) n FROM labels l JOIN examples e ON e.id=l.example_id "
            "WHERE l.teacher=? AND e.split!='test' AND e.id NOT IN (SELECT example_id FROM contamination) "
            "GROUP BY l.status", (teacher,))}
        not_ok = pool - contam - lab.get("ok", 0)
        steps.append({"step": "teacher failed or not asked", "delta": -not_ok,
                      "note": f"{lab.get('failed', 0)} failed"})
        steps.append({"step": f"labelled by teacher '{teacher}'", "count": lab.get("ok", 0)})
        run_id = s.one("SELECT id FROM filter_runs WHERE teacher=? ORDER BY id DESC LIMIT 1", (teacher,))
        if run_id is not None:
            for r in s.q("SELECT COALESCE(reason,'(no reason)') reason, COUNT(*) n FROM filter_decisions "
                         "WHERE run_id=? AND kept=0 GROUP BY reason ORDER BY n DESC", (run_id,)):
                steps.append({"step": f"filter: {r['reason']}", "delta": -r["n"], "note": f"filter run {run_id}"})
            relabelled = relabelled_count(s, run_id)
            if relabelled:       # kept, so no delta: they train on the suspect filter's label, not the teacher's
                steps.append({"step": "filter: suspect labels relabelled (kept)", "delta": 0,
                              "note": f"{relabelled} train on the likely label; filter run {run_id}"})
            kept = s.one("SELECT COUNT(*) FROM filter_decisions WHERE run_id=? AND kept=1", (run_id,))
            steps.append({"step": "kept by the filters", "count": kept})
    counts = training_record.get("counts") if isinstance(training_record, dict) else None
    if isinstance(counts, dict):
        # The trainer's own view: rows it skipped (e.g. over max_train_examples) and what it fit / validated on.
        for reason, k in (counts.get("skipped") or {}).items():
            steps.append({"step": f"skipped by the trainer: {reason}", "delta": -int(k), "note": "training record"})
        for k in ("train", "validation"):
            if isinstance(counts.get(k), (int, float)):
                note = "carved from train" if k == "validation" and counts.get("validation_carved") else "training record"
                steps.append({"step": f"trained on: {k}", "count": counts[k], "note": note})
    return steps


# ------------------------------------------------------------------------------------------------
# Rendering


def render_html(d: dict) -> str:
    gate = d.get("gate") or {}
    passed = bool(gate.get("passed"))
    title = f"distill report — {d.get('task', '')}"
    created = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(d.get("created_at") or time.time()))
    parts = [
        f"<header><h1>{_e(title)}</h1><div class='sub'>model <b>{_e(d.get('model_run_id'))}</b> · teacher "
        f"<b>{_e(d.get('teacher'))}</b> · locked test split, n={_e(d['test']['n'])} "
        f"({_e(d['test']['n_gold'])} with gold) · {_e(created)}</div>"
        f"<div class='badge {'pass' if passed else 'fail'}'>{'GATE PASSED' if passed else 'GATE FAILED'}</div></header>",
        _section("Verdict", _verdict(d)),
        _section("Headline: student vs teacher vs baseline", _headline_table(d)),
        _section("Cost and latency", _cost_table(d)),
        _section("Per segment", _segments(d)),
        _section("Per class", _per_class(d)),
        _section("Calibration", _calibration(d)),
        _section("Where the student goes wrong", _confusions(d)),
        _section("Data funnel", _funnel(d.get("funnel") or [])),
        _section("Filters: which used gold", _filters(d)),
        _section("Lineage", _lineage(d)),
        _section("Notes", "<ul>" + "".join(f"<li>{_e(n)}</li>" for n in d.get("notes", [])) + "</ul>"),
        f"<footer>Generated by distill {_e(__version__)}. Self-contained: no scripts, no network. "
        f"The same numbers are in report.json next to this file.</footer>",
    ]
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>{_e(title)}</title><style>{CSS}</style></head><body><main>"
            + "\n".join(parts) + "</main></body></html>\n")


def _verdict(d: dict) -> str:
    g = d.get("gate") or {}
    metric, against = g.get("metric", "?"), g.get("against", "?")
    v = d.get("verdict") or {}
    problem = bool(v.get("teacher_problem"))
    out = [f"<p class='lead'>{_e(d.get('teacher_quality', ''))}</p>"]
    # the headline sentences: the teacher-problem one first when there is one, then the student's number
    out += [f"<p class='{'bad lead' if problem and i == 0 else 'lead'}'>{_e(line)}</p>"
            for i, line in enumerate(v.get("headline") or [])]
    if g.get("passed"):
        w = g.get("worst_segment") or {}
        seg = (f" and its worst segment '{_e(w.get('segment'))}' scores {_f(w.get('value'))} "
               f"(threshold {_f(g.get('worst_segment_threshold'))})") if w else ""
        out.append(f"<p class='ok'>The student <b>passes</b> the quality gate: {_e(metric)} vs {_e(against)} is "
                   f"<b>{_f(g.get('value'))}</b> {_ci(g.get('ci'))} (threshold {_f(g.get('overall_threshold'))}){seg}.</p>")
    else:
        out.append("<p class='bad'>The student <b>does not pass</b> the quality gate:</p><ul class='bad'>"
                   + "".join(f"<li>{_e(f)}</li>" for f in g.get("failures", [])) + "</ul>")
    if g.get("warnings"):
        out.append("<p class='warn'>Worth knowing:</p><ul class='warn'>"
                   + "".join(f"<li>{_e(w)}</li>" for w in g["warnings"]) + "</ul>")
    st = (d.get("systems") or {}).get("student") or {}
    ret = (st.get("retention") or {}).get("accuracy")
    cost = d.get("cost") or {}
    lat = d.get("latency") or {}
    facts = []
    systems = d.get("systems") or {}
    gold_note = ""
    if (d.get("filters_used") or {}).get("gold_dropped"):
        fu = d["filters_used"]
        gold_note = f"; trained with {fu['gold_dropped']} of {fu['labelled']} labels dropped by filters that read gold"
    if ret and not problem:
        lo, hi = ret["ci"]
        facts.append(("retention", f"{_f(ret['value'])}",
                      f"student / teacher accuracy on gold, 95% CI [{_f(lo)}, {_f(hi)}]{gold_note}"))
    elif (st.get("vs_gold") or {}).get("accuracy"):
        # a teacher no better than a constant: the student against gold and the trivial lines, not a ratio
        acc = st["vs_gold"]["accuracy"]
        lines = [f"{n} {_f(systems[n]['vs_gold']['accuracy']['value'])}" for n in ("majority", "base")
                 if (systems.get(n) or {}).get("vs_gold")]
        facts.append(("student accuracy vs gold", _f(acc["value"]),
                      f"95% CI [{_f(acc['ci'][0])}, {_f(acc['ci'][1])}]" + (f"; {', '.join(lines)}" if lines else "")
                      + gold_note))
    if cost.get("teacher_over_student"):
        r = cost["teacher_over_student"]
        facts.append(("cheaper" if r >= 1 else "more expensive", _x(r if r >= 1 else 1 / r),
                      "student vs teacher, cost per 1M requests"))
    if lat.get("teacher_over_student_p50"):
        r = lat["teacher_over_student_p50"]
        facts.append(("faster" if r >= 1 else "slower", _x(r if r >= 1 else 1 / r), "student vs teacher, p50 latency"))
    base = (d.get("systems") or {}).get("base") or {}
    if st.get("vs_gold") and base.get("vs_gold"):
        diff = st["vs_gold"]["accuracy"]["value"] - base["vs_gold"]["accuracy"]["value"]
        facts.append(("vs baseline", f"{diff:+.3f}", "student minus TF-IDF baseline accuracy"))
    if facts:
        out.append("<table class='facts'><tr>" + "".join(
            f"<td><div class='big'>{_e(v)}</div><div class='k'>{_e(k)}</div><div class='small'>{_e(s)}</div></td>"
            for k, v, s in facts) + "</tr></table>")
    return "".join(out)


def _headline_table(d: dict) -> str:
    systems = d.get("systems") or {}
    problem = bool((d.get("verdict") or {}).get("teacher_problem"))
    cols = [("vs_gold", "accuracy", "accuracy vs gold"), ("vs_gold", "macro_f1", "macro-F1 vs gold"),
            ("vs_teacher", "agreement", "agreement with teacher")]
    if not problem:   # retention against a teacher no better than a constant means nothing
        cols.append(("retention", "accuracy", "retention (acc.)"))
    rows = []
    for name in SYSTEM_ORDER:
        s = systems.get(name)
        if not s:
            continue
        if not s.get("available", True):
            rows.append(f"<tr><th>{_sys(name)}</th><td colspan='{len(cols) + 1}' class='muted'>not available: "
                        f"{_e(s.get('reason'))}</td></tr>")
            continue
        cells = []
        for group, m, _ in cols:
            v = (s.get(group) or {}).get(m)
            cells.append(f"<td>{_f(v['value'])}<br>{_ci(v['ci'])}</td>" if v else "<td class='muted'>—</td>")
        cal = s.get("calibration")
        cells.append(f"<td>{_f(cal['ece'])}</td>" if cal else "<td class='muted'>—</td>")
        rows.append(f"<tr><th>{_sys(name)}<div class='small'>{_e(s.get('description', ''))}</div></th>{''.join(cells)}</tr>")
    head = "".join(f"<th>{_e(c[2])}</th>" for c in cols) + "<th>ECE</th>"
    return (f"<table class='grid'><thead><tr><th>system</th>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
            "<p class='small'>Values with their 95% bootstrap confidence interval in brackets. Agreement is measured "
            "on the rows the teacher answered; accuracy counts a missing teacher answer as wrong. ECE = expected "
            "calibration error (lower is better)."
            + (" No retention column: the teacher is no better than the majority row, so a ratio to it means nothing."
               if problem else "") + "</p>")


def _cost_table(d: dict) -> str:
    lat, cost = d.get("latency") or {}, d.get("cost") or {}
    rows = []
    for name in SYSTEM_ORDER:
        l_, c_ = lat.get(name), cost.get(name)
        if not l_ and not c_:
            continue
        l_ = l_ or {}   # the majority row has a cost (0) but nothing to time
        b1 = l_.get("batch1") or {}
        tput = (l_.get("throughput") or {}).get("texts_per_s")
        size = l_.get("size_bytes")
        src = ("ledger, " + f"{l_.get('calls', 0)} calls" if name == "teacher" else
               f"measured, {b1.get('n', 0)} requests" if l_ else "not timed")
        rows.append(f"<tr><th>{_sys(name)}</th><td>{_ms(b1.get('p50_s'))}</td><td>{_ms(b1.get('p95_s'))}</td>"
                    f"<td>{'—' if not tput else f'{tput:,.1f}'}</td><td>{_bytes(size)}</td>"
                    f"<td>{_usd((c_ or {}).get('per_1m_usd'))}</td><td class='small'>{_e(src)}; "
                    f"{_e((c_ or {}).get('basis', ''))}</td></tr>")
    bars = []
    for key, label, unit in (("p50", "p50 latency", "ms"), ("cost", "cost per 1M requests", "USD")):
        vals = []
        for name in SYSTEM_ORDER:
            if key == "p50":
                v = ((lat.get(name) or {}).get("batch1") or {}).get("p50_s")
                v = None if v is None else v * 1000
            else:
                v = (cost.get(name) or {}).get("per_1m_usd")
            if v is not None:
                vals.append((name, v))
        if vals:
            bars.append(f"<div class='chart'><div class='k'>{_e(label)} ({unit}, log scale)</div>{_svg_log_bars(vals, unit)}</div>")
    ratio = []
    if cost.get("teacher_over_student"):
        r = cost["teacher_over_student"]
        ratio.append(f"the student is <b>{_x(r)} cheaper</b> per request" if r >= 1 else
                     f"the student is <b>{_x(1 / r)} more expensive</b> per request")
    if lat.get("teacher_over_student_p50"):
        r = lat["teacher_over_student_p50"]
        ratio.append(f"<b>{_x(r)} faster</b> at p50" if r >= 1 else f"<b>{_x(1 / r)} slower</b> at p50")
    return ("<table class='grid cost'><thead><tr><th>system</th><th>p50</th><th>p95</th><th>texts/s (batched)</th>"
            "<th>size</th><th>USD / 1M requests</th><th>basis</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>"
            + (f"<p>Compared with the teacher, {' and '.join(ratio)}.</p>" if ratio else "")
            + f"<p class='small'>Student and baseline latency: one text per request on this machine; cost uses "
              f"{_usd(cost.get('cpu_hour_usd'))} per CPU-hour. Teacher latency and cost come from the labelling ledger.</p>"
            + "<div class='charts'>" + "".join(bars) + "</div>")


def _segments(d: dict) -> str:
    systems = d.get("systems") or {}
    g = d.get("gate") or {}
    against = g.get("against") or ("gold" if d["test"]["n_gold"] else "teacher")
    metric = g.get("metric") or ("accuracy" if against == "gold" else "agreement")
    key = f"{metric}_vs_{against}"
    if d["test"].get("segmented") is False:
        return ("<p class='muted'>No segments: no test row has one (<code>segment_field</code> in distill.yaml), so "
                "there is no per-segment table and no worst-segment gate; the overall threshold still applies.</p>")
    segs: dict[str, dict] = {}
    for name in SYSTEM_ORDER:
        for s in (systems.get(name) or {}).get("segments") or []:
            if key in s:
                segs.setdefault(s["segment"], {})[name] = s[key]
    if not segs:
        return f"<p class='muted'>No per-segment numbers for {_e(key)}.</p>"
    worst = (g.get("worst_segment") or {}).get("segment")
    rows = []
    for seg in sorted(segs):
        by = segs[seg]
        n = next(iter(by.values()))["n"]
        gated = next(iter(by.values()))["gated"]
        cells = "".join(f"<td>{_f(by[n_]['value'])} {_ci(by[n_]['ci'])}</td>" if n_ in by else "<td class='muted'>—</td>"
                        for n_ in SYSTEM_ORDER if n_ in systems and systems[n_].get("available", True))
        flag = " <span class='tag bad'>worst</span>" if seg == worst else ("" if gated else " <span class='tag'>too small to gate</span>")
        rows.append(f"<tr><th>{_e(seg)}{flag}</th><td>{n}</td>{cells}</tr>")
    names = [n for n in SYSTEM_ORDER if n in systems and systems[n].get("available", True)]
    thr = g.get("worst_segment_threshold")
    return (f"<p>{_e(metric)} vs {_e(against)} per segment, with 95% CIs (whiskers). Segments under "
            f"{_e(g.get('min_segment_size', '?'))} rows are shown but not gated.</p>"
            + _svg_segments(segs, names, thr)
            + "<table class='grid'><thead><tr><th>segment</th><th>n</th>"
            + "".join(f"<th>{_sys(n)}</th>" for n in names) + "</tr></thead><tbody>" + "".join(rows) + "</tbody></table>")


def _per_class(d: dict) -> str:
    """Precision / recall / F1 / support per class vs gold for student, teacher and base, worst first by the
    student's F1 (the model you would ship); at most PER_CLASS_SHOWN rows, the rest are in the JSON."""
    systems = d.get("systems") or {}
    names = [n for n in ("student", "teacher", "base") if (systems.get(n) or {}).get("per_class")]
    if not names:
        return ("<p class='muted'>No per-class numbers: they need gold labels on the test split (extract tasks have "
                "per-field numbers in report.json).</p>")
    by: dict[str, dict] = {}
    for n in names:
        for r in systems[n]["per_class"]:
            by.setdefault(str(r["class"]), {})[n] = r
    first = names[0]
    order = sorted(by, key=lambda k: ((by[k][first]["f1"] if first in by[k] else 2.0),
                                      -max(r["support"] for r in by[k].values()), k))
    shown = order[:PER_CLASS_SHOWN]

    def cells(r: dict | None) -> str:
        if r is None:
            return "<td class='muted' colspan='3'>—</td>"
        bad = " class='bad'" if r["f1"] == 0 and r["support"] else ""
        return f"<td>{_f(r['precision'])}</td><td>{_f(r['recall'])}</td><td{bad}>{_f(r['f1'])}</td>"

    rows = [f"<tr><th>{_e(k)}</th><td class='num'>{max(r['support'] for r in by[k].values())}</td>"
            + "".join(cells(by[k].get(n)) for n in names) + "</tr>" for k in shown]
    more = len(order) - len(shown)
    return (f"<p>Precision, recall and F1 vs gold per class, sorted by the {_e(first)}'s F1, worst first"
            + (f"; the {len(shown)} worst of {len(order)} classes are shown, the other {more} are in report.json "
               "(<code>systems.&lt;name&gt;.per_class</code>)" if more else "") + ".</p>"
            "<table class='grid'><thead><tr><th rowspan='2'>class</th><th rowspan='2'>support</th>"
            + "".join(f"<th colspan='3'>{_sys(n)}</th>" for n in names) + "</tr><tr>"
            + "<th>P</th><th>R</th><th>F1</th>" * len(names) + "</tr></thead><tbody>" + "".join(rows)
            + "</tbody></table><p class='small'>support = gold rows of the class; P = precision, R = recall; 0/0 is "
              "shown as 0 (a class never predicted has precision 0).</p>")


def _filters(d: dict) -> str:
    """Each filter of the training labels' filter run with whether it reads gold and what it dropped."""
    f = d.get("filters_used")
    if not f:
        return "<p class='muted'>No filter run: the student trained on every label the teacher gave.</p>"
    rows = "".join(f"<tr><th>{_e(r['filter'])}</th><td><code>{_e(r.get('setting') or '')}</code></td>"
                   + ("<td class='bad'>yes</td>" if r["uses_gold"] else "<td>no</td>")
                   + f"<td class='num'>{r['dropped']:,}</td></tr>" for r in f["filters"])
    run = f"Filter run {_e(f['run_id'])} ({_e(f['source'])})"
    relabelled = (f" ({f['relabelled']:,} of them on the suspect filter's label instead of the teacher's; no gold read)"
                  if f.get("relabelled") else "")
    out = [f"<p>{run}: {f['kept']:,} training rows kept{relabelled}, {f['dropped']:,} dropped.</p>"]
    if f.get("gold_dropped"):
        hint = (" (set <code>filters.drop_disagree_with_gold: false</code> and retrain to measure it)"
                if "disagrees_with_gold" in f["gold_filters"] else "")
        out.append(f"<p class='warn'>{f['gold_dropped']:,} of {f['labelled']:,} training labels were dropped by "
                   f"filters that read gold ({_e(', '.join(f['gold_filters']))}). The student and the majority row (for "
                   "classify also the TF-IDF baseline) were built from these gold-filtered labels; a user without "
                   f"gold cannot filter this way and gets the figure of a student trained without it{hint}.</p>")
    return "".join(out) + ("<table class='grid'><thead><tr><th>filter (drop reason)</th><th>setting</th>"
                           "<th>uses gold</th><th>dropped</th></tr></thead><tbody>" + rows + "</tbody></table>"
                           if rows else "<p class='muted'>No filter was active and nothing was dropped.</p>")


def _calibration(d: dict) -> str:
    charts = []
    for name in SYSTEM_ORDER:
        cal = ((d.get("systems") or {}).get(name) or {}).get("calibration")
        if cal:
            charts.append(f"<div class='chart'><div class='k'>{_sys(name)}: ECE {_f(cal['ece'])} on n={_e(cal['n'])} "
                          f"(vs {_e(cal['against'])})</div>{_svg_reliability(cal['bins'], COLORS[name])}</div>")
    if not charts:
        return "<p class='muted'>No system reported probabilities.</p>"
    return ("<p>Reliability diagrams (Guo et al. 2017): each bar is the accuracy of the predictions whose confidence "
            "falls in that bin; a calibrated system follows the diagonal. Bars under the diagonal are over-confident.</p>"
            "<div class='charts'>" + "".join(charts) + "</div>")


def _confusions(d: dict) -> str:
    c = d.get("confusions") or {}
    pairs = c.get("pairs") or []
    if not pairs:
        return "<p>The student made no errors on the test split.</p>"
    rows = []
    for p in pairs:
        ex = "".join(f"<li>{_e(x['text'])} <span class='small'>[{_e(x['segment']) + '; ' if x.get('segment') else ''}teacher said "
                     f"{_e(x.get('teacher') if x.get('teacher') is not None else 'nothing')}]</span></li>"
                     for x in p.get("examples", []))
        pred = "no answer" if p["pred"] is None else p["pred"]
        rows.append(f"<tr><td>{_e(p['true'])}</td><td>{_e(pred)}</td><td>{_e(p['count'])}</td><td><ul class='ex'>{ex}</ul></td></tr>")
    return (f"<p>{_e(c.get('n_errors'))} errors of {_e(c.get('n'))} rows (student vs {_e(c.get('against'))}); "
            "the most frequent pairs:</p><table class='grid'><thead><tr>"
            f"<th>{_e(c.get('against'))}</th><th>student said</th><th>count</th><th>examples</th></tr></thead><tbody>"
            + "".join(rows) + "</tbody></table>")


def _funnel(steps: list[dict]) -> str:
    if not steps:
        return "<p class='muted'>No data in the store.</p>"
    top = max([s.get("count") or 0 for s in steps] + [1])
    rows = []
    for s in steps:
        if "count" in s:
            w = 100 * (s["count"] or 0) / top
            bar = f"<svg width='220' height='12' role='img'><rect width='{w * 2.2:.1f}' height='12' fill='#2563eb' rx='2'/></svg>"
            rows.append(f"<tr><th>{_e(s['step'])}</th><td class='num'>{s['count']:,}</td><td>{bar}</td>"
                        f"<td class='small'>{_e(s.get('note', ''))}</td></tr>")
        else:
            cls = "split" if s.get("split") else "drop" if s["delta"] else "zero"
            rows.append(f"<tr class='{cls}'><th>{_e(s['step'])}</th><td class='num'>{s['delta']:+,}</td><td></td>"
                        f"<td class='small'>{_e(s.get('note', ''))}</td></tr>")
    return "<table class='grid funnel'><tbody>" + "".join(rows) + "</tbody></table>"


def _lineage(d: dict) -> str:
    lin = d.get("lineage") or {}
    rec = lin.get("training_record") or {}
    # The teacher as recorded at training time wins over today's distill.yaml (which may have been edited since).
    t = _dig(rec, "teacher", "identity") or lin.get("teacher") or {}
    replay = _dig(rec, "teacher", "replay") or {}
    terms = _dig(rec, "teacher", "terms") or (lin.get("teacher") or {}).get("terms") or {}
    cfg = rec.get("config") if isinstance(rec.get("config"), dict) else {}
    items = [
        ("model run", lin.get("model_run_id")),
        ("model folder", lin.get("model_path")),
        ("student base model", cfg.get("base_model") or cfg.get("base") or cfg.get("model")),
        ("training", f"{rec.get('recipe')}, {rec.get('epochs_run')} epochs, {rec.get('train_seconds')} s on "
                     f"{rec.get('device')}" if rec.get("recipe") else None),
        ("teacher", f"{t.get('name')} ({t.get('kind')}: {t.get('model') or t.get('path') or ''})"),
        ("teacher endpoint", t.get("base_url")),
        ("teacher sampling", f"temperature {t.get('temperature')}, n {t.get('n')}, logprobs {t.get('logprobs')}"),
        ("teacher terms", f"{terms.get('url') or 'not recorded'}; outputs may train models: "
                          f"{'not checked' if terms.get('outputs_may_train_models') is None else terms.get('outputs_may_train_models')}"),
        ("teacher recording", f"{replay.get('path')} (sha256 {replay.get('sha256')})" if replay else None),
        ("training data hash", rec.get("data_sha256") or rec.get("data_hash")),
        ("filter settings", json.dumps(lin.get("filters"), sort_keys=True) if lin.get("filters") else None),
        ("filter run", json.dumps(lin.get("filter_run"), sort_keys=True) if lin.get("filter_run") else None),
        ("test split hash", lin.get("test_hash")),
        ("code at training (git SHA)", rec.get("git_sha") or _dig(rec, "env", "git_sha")),
        ("code at eval (git SHA)", lin.get("code_git_sha")),
        ("training config", json.dumps(cfg, sort_keys=True) if cfg else None),
    ]
    return "<table class='kv'>" + "".join(
        f"<tr><th>{_e(k)}</th><td><code>{_e(v)}</code></td></tr>" for k, v in items if v not in (None, "")) + "</table>"


# ------------------------------------------------------------------------------------------------
# SVG charts (hand-drawn: no JS library, no network)


def _svg_segments(segs: dict[str, dict], names: list[str], threshold: float | None) -> str:
    """Grouped horizontal bars per segment, one per system, with CI whiskers and the threshold line."""
    label_w, plot_w, bar_h, gap = 150, 560, 10, 10
    group_h = bar_h * len(names) + gap
    h = 24 + group_h * len(segs) + 20
    x = lambda v: label_w + plot_w * max(0.0, min(1.0, v))  # noqa: E731
    out = [f"<svg class='seg' width='{label_w + plot_w + 20}' height='{h}' viewBox='0 0 {label_w + plot_w + 20} {h}' "
           "xmlns='http://www.w3.org/2000/svg' role='img' font-family='system-ui, sans-serif' font-size='11'>"]
    for t in (0, 0.25, 0.5, 0.75, 1.0):
        out.append(f"<line x1='{x(t):.1f}' y1='16' x2='{x(t):.1f}' y2='{h - 16}' stroke='#e5e7eb'/>"
                   f"<text x='{x(t):.1f}' y='{h - 4}' text-anchor='middle' fill='#6b7280'>{t:g}</text>")
    y = 20
    for seg in sorted(segs):
        out.append(f"<text x='{label_w - 8}' y='{y + group_h / 2:.1f}' text-anchor='end' fill='#111827'>{_e(_short(seg, 22))}</text>")
        for k, name in enumerate(names):
            v = segs[seg].get(name)
            yy = y + k * bar_h
            if v and v.get("value") is not None:
                out.append(f"<rect x='{label_w}' y='{yy}' width='{x(v['value']) - label_w:.1f}' height='{bar_h - 2}' "
                           f"fill='{COLORS[name]}' opacity='0.85'><title>{_e(name)} {_f(v['value'])}</title></rect>")
                lo, hi = (v.get("ci") or [None, None])[:2]
                if lo is not None and hi is not None:
                    cy = yy + (bar_h - 2) / 2
                    out.append(f"<line x1='{x(lo):.1f}' y1='{cy:.1f}' x2='{x(hi):.1f}' y2='{cy:.1f}' stroke='#111827'/>"
                               f"<line x1='{x(lo):.1f}' y1='{cy - 3:.1f}' x2='{x(lo):.1f}' y2='{cy + 3:.1f}' stroke='#111827'/>"
                               f"<line x1='{x(hi):.1f}' y1='{cy - 3:.1f}' x2='{x(hi):.1f}' y2='{cy + 3:.1f}' stroke='#111827'/>")
        y += group_h
    if threshold is not None:
        out.append(f"<line x1='{x(threshold):.1f}' y1='14' x2='{x(threshold):.1f}' y2='{h - 16}' stroke='#dc2626' "
                   f"stroke-dasharray='4 3'/><text x='{x(threshold) + (-3 if threshold > 0.5 else 3):.1f}' y='12' "
                   f"text-anchor='{'end' if threshold > 0.5 else 'start'}' fill='#dc2626'>worst-segment "
                   f"threshold {threshold:g}</text>")
    out.append("</svg>")
    legend = "".join(f"<span class='key'><i style='background:{COLORS[n]}'></i>{_e(n)}</span>" for n in names)
    return "".join(out) + f"<div class='legend'>{legend}</div>"


def _svg_reliability(bins: list[dict], color: str) -> str:
    """Accuracy per confidence bin as bars, the diagonal as the ideal, bin counts as labels."""
    s, pad = 220, 30
    X = lambda v: pad + s * v  # noqa: E731
    Y = lambda v: pad + s * (1 - v)  # noqa: E731
    out = [f"<svg width='{s + 2 * pad}' height='{s + 2 * pad}' viewBox='0 0 {s + 2 * pad} {s + 2 * pad}' "
           "xmlns='http://www.w3.org/2000/svg' role='img' font-family='system-ui, sans-serif' font-size='10'>",
           f"<rect x='{pad}' y='{pad}' width='{s}' height='{s}' fill='#f9fafb' stroke='#d1d5db'/>"]
    for b in bins:
        if b["count"] and b["accuracy"] is not None:
            out.append(f"<rect x='{X(b['lo']) + 1:.1f}' y='{Y(b['accuracy']):.1f}' width='{s * (b['hi'] - b['lo']) - 2:.1f}' "
                       f"height='{s * b['accuracy']:.1f}' fill='{color}' opacity='0.8'><title>confidence "
                       f"{b['lo']:.1f}–{b['hi']:.1f}: accuracy {b['accuracy']:.3f}, n={b['count']}</title></rect>"
                       f"<text x='{X((b['lo'] + b['hi']) / 2):.1f}' y='{Y(b['accuracy']) - 3:.1f}' text-anchor='middle' "
                       f"fill='#374151'>{b['count']}</text>")
    out.append(f"<line x1='{X(0)}' y1='{Y(0)}' x2='{X(1)}' y2='{Y(1)}' stroke='#dc2626' stroke-dasharray='4 3'/>")
    for t in (0, 0.5, 1):
        out.append(f"<text x='{X(t):.1f}' y='{pad + s + 14}' text-anchor='middle' fill='#6b7280'>{t:g}</text>"
                   f"<text x='{pad - 4}' y='{Y(t) + 3:.1f}' text-anchor='end' fill='#6b7280'>{t:g}</text>")
    out.append(f"<text x='{X(0.5)}' y='{pad + s + 27}' text-anchor='middle' fill='#374151'>confidence</text>"
               f"<text x='10' y='{Y(0.5)}' fill='#374151' transform='rotate(-90 10 {Y(0.5)})' text-anchor='middle'>accuracy</text>"
               "</svg>")
    return "".join(out)


def _svg_log_bars(vals: list[tuple[str, float]], unit: str) -> str:
    """Horizontal bars on a log10 scale: student and teacher differ by orders of magnitude."""
    w, label_w, bar_h = 250, 70, 18
    pos = [v for _, v in vals if v > 0]
    lo = math.floor(math.log10(min(pos))) if pos else 0
    hi = math.ceil(math.log10(max(pos))) if pos else 1
    hi = hi if hi > lo else lo + 1
    h = bar_h * len(vals) + 8
    out = [f"<svg width='{label_w + w + 90}' height='{h}' xmlns='http://www.w3.org/2000/svg' role='img' "
           "font-family='system-ui, sans-serif' font-size='11'>"]
    for k, (name, v) in enumerate(vals):
        frac = 0 if v <= 0 else (math.log10(v) - lo) / (hi - lo)
        bw = max(2.0, w * frac)
        y = 4 + k * bar_h
        out.append(f"<text x='{label_w - 6}' y='{y + 12}' text-anchor='end'>{_e(name)}</text>"
                   f"<rect x='{label_w}' y='{y}' width='{bw:.1f}' height='{bar_h - 5}' fill='{COLORS.get(name, '#999')}' rx='2'/>"
                   f"<text x='{label_w + bw + 4:.1f}' y='{y + 11}' fill='#374151'>{_num(v)} {unit}</text>")
    out.append("</svg>")
    return "".join(out)


# ------------------------------------------------------------------------------------------------
# formatting


def _e(x: Any) -> str:
    return html.escape("" if x is None else str(x), quote=True)


def _f(x: Any) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def _ci(ci: Any) -> str:
    if not ci or ci[0] is None or ci[1] is None:
        return ""
    return f"<span class='ci'>[{ci[0]:.3f}, {ci[1]:.3f}]</span>"


def _sys(name: str) -> str:
    return f"<span class='key'><i style='background:{COLORS.get(name, '#999')}'></i>{_e(name)}</span>"


def _ms(s: float | None) -> str:
    if s is None:
        return "—"
    if s >= 1:
        return f"{s:,.2f} s"
    return f"{s * 1000:.2f} ms" if s >= 1e-4 else f"{s * 1e6:.1f} µs"


def _usd(v: float | None) -> str:
    return "—" if v is None else f"${v:,.2f}" if v >= 0.01 or v == 0 else f"${v:.2g}"


def _x(r: float) -> str:
    """A ratio as '1.4×' / '37×' / '1,200×': two significant digits are all the noise allows."""
    return f"{r:.2g}×" if r < 10 else f"{r:,.0f}×"


def _num(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"


def _bytes(n: int | None) -> str:
    if not n:
        return "—"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return str(n)


def _dig(d: Any, *keys: str) -> Any:
    for k in keys:
        d = d.get(k) if isinstance(d, dict) else None
    return d


def _short(s: str, k: int) -> str:
    return s if len(s) <= k else s[: k - 1] + "…"


def _section(title: str, body: str) -> str:
    anchor = "".join(ch if ch.isalnum() else "-" for ch in title.lower().split(":")[0]).strip("-")
    return f"<section id='{anchor}'><h2>{_e(title)}</h2>{body}</section>"


CSS = """
:root { --fg:#111827; --muted:#6b7280; --line:#e5e7eb; --bg:#ffffff; --panel:#f9fafb; }
* { box-sizing: border-box; }
body { margin:0; background:#f3f4f6; color:var(--fg); font:14px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
main { max-width: 1040px; margin: 24px auto; background: var(--bg); padding: 28px 36px; border: 1px solid var(--line); border-radius: 8px; }
header { position: relative; border-bottom: 2px solid var(--fg); padding-bottom: 12px; margin-bottom: 8px; }
h1 { font-size: 22px; margin: 0 0 4px; }
h2 { font-size: 16px; margin: 28px 0 10px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
.sub { color: var(--muted); }
.badge { position: absolute; right: 0; top: 0; padding: 6px 12px; border-radius: 4px; font-weight: 700; letter-spacing: .04em; color: #fff; }
.badge.pass { background: #15803d; } .badge.fail { background: #b91c1c; }
.lead { font-size: 15px; font-weight: 600; }
.ok { color: #166534; } .bad { color: #991b1b; } .warn { color: #92400e; }
table { border-collapse: collapse; }
table.grid { width: 100%; margin: 6px 0; }
table.grid th, table.grid td { border-bottom: 1px solid var(--line); padding: 6px 8px; text-align: left; vertical-align: top; }
table.grid thead th { background: var(--panel); font-weight: 600; font-size: 12px; color: #374151; }
table.grid tbody th { font-weight: 600; }
.key { white-space: nowrap; }
table.cost td { white-space: nowrap; } table.cost td.small { white-space: normal; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.drop th, tr.drop td { color: #991b1b; font-weight: normal; }
tr.split th, tr.split td { color: #1e40af; font-weight: normal; }
tr.zero th, tr.zero td { color: var(--muted); font-weight: normal; }
table.funnel th { width: 260px; }
table.kv th { text-align: left; padding: 4px 16px 4px 0; color: #374151; white-space: nowrap; vertical-align: top; }
table.kv td { padding: 4px 0; word-break: break-all; }
table.facts { width: 100%; margin-top: 10px; }
table.facts td { background: var(--panel); border: 1px solid var(--line); padding: 10px 14px; width: 25%; }
.big { font-size: 22px; font-weight: 700; } .k { font-weight: 600; color: #374151; }
.small { font-size: 12px; color: var(--muted); font-weight: normal; }
.muted { color: var(--muted); }
.ci { color: var(--muted); font-size: 12px; font-variant-numeric: tabular-nums; }
.key i { display: inline-block; width: 10px; height: 10px; border-radius: 2px; margin-right: 5px; vertical-align: baseline; }
.legend { margin: 2px 0 8px; } .legend .key { margin-right: 14px; }
.tag { font-size: 11px; background: #e5e7eb; color: #374151; border-radius: 3px; padding: 0 5px; font-weight: normal; }
.tag.bad { background: #fee2e2; color: #991b1b; }
.charts { display: flex; flex-wrap: wrap; gap: 18px; }
.chart { border: 1px solid var(--line); border-radius: 6px; padding: 8px 10px; background: #fff; }
ul.ex { margin: 0; padding-left: 16px; } ul.ex li { word-break: break-word; }
code { font-size: 12px; }
footer { margin-top: 28px; color: var(--muted); font-size: 12px; border-top: 1px solid var(--line); padding-top: 8px; }
"""
