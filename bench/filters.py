"""Filtering without gold: does the suspect-label filter recover what the gold filter buys? (issue #15)

    .venv/bin/python bench/filters.py              # ~25 min on a shared 2-core CPU -> bench/results/filters.json
    .venv/bin/python bench/filters.py --seeds 0    # one seed (~8 min)
    .venv/bin/python bench/filters.py --smoke      # 150 inputs, 1 epoch: checks the script; a temp file

The demo task (SNIPS intents, examples/snips-intents; teacher = the recorded Qwen2.5-Coder-1.5B, 0.906 vs gold
on test, wrong on 75 of the 948 train/validation inputs). Four ways to filter the teacher's labels, each
trained with the demo's student recipe (MiniLM, soft + hard targets) and evaluated on the locked test split:

- ``none``:        no label filter (malformed answers, near-duplicates of test and duplicates still go);
- ``suspect``:     ``filters.suspect_labels`` (distill/label_noise.py): confident learning, no gold; flags dropped;
- ``relabel``:     the same flags, ``action: relabel``: each flagged row kept and trained (one-hot) on the label
                   the combined probabilities favour;
- ``confidence``:  the teacher's own probability, thresholded to drop as many labels as ``suspect`` did (the
                   gold-free heuristic it must beat, at the same cost in training rows);
- ``gold``:        ``filters.drop_disagree_with_gold`` — what a user with gold on every input gets.

Measured: (1) each filter's drops against the teacher's actual errors on train/validation (gold is known for
the demo, so precision and recall of the drops are exact); (2) student accuracy vs gold on test per arm and
seed, and the share of the none -> gold gap each gold-free filter recovers:
``(acc_X - acc_none) / (acc_gold - acc_none)`` on the means over seeds (target >= 0.5).
Gold is read only to score; the suspect and confidence arms never see it. (3) When the retention bench's
projects exist, the same filter's drops against another teacher's real errors (BANKING77 / CLINC150, the
fine-tuned mpnet teacher): flags only, no training.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
EXAMPLE = ROOT / "examples" / "snips-intents"
ARMS = ("none", "suspect", "relabel", "confidence", "gold")
TARGET_GAP = 0.5


def build(work: Path, arm: str, filters: dict, limit: int | None) -> "object":
    """A demo project for one arm: the demo spec with ``filters`` replaced, imported and labelled (replay)."""
    from distill.data.importer import import_file
    from distill.demo import sample_csv
    from distill.labeling import label
    from distill.project import Project

    root = work / arm
    if not (root / "distill.yaml").exists():
        root.mkdir(parents=True, exist_ok=True)
        spec = yaml.safe_load((EXAMPLE / "distill.yaml").read_text())
        spec["filters"] = filters
        (root / "distill.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        for f in EXAMPLE.glob("teacher_*.jsonl"):
            shutil.copy(f, root / f.name)
    project = Project.open(root)
    data = EXAMPLE / "snips_intents.csv"
    if limit:
        data = sample_csv(data, root / f"subset_{limit}.csv", limit)
    import_file(project, data, text="text", label="intent", id="id")
    label(project, project.spec.get_teacher().name, progress=False)
    return project


def drops_vs_errors(project, run_id: int, teacher: str) -> dict:
    """Precision / recall of a filter run's label flags (drops, and relabels under ``action: relabel``) against
    the teacher's errors (answer != gold) on the train/validation rows the filter could judge (an ok teacher
    answer, not a near-duplicate of test); for relabels, how many fixed a wrong label and how many broke a
    right one; and the wrong labels left in training (a relabel counts by its new label)."""
    from distill.filters import RELABELLED

    rows = project.store.q(
        """SELECT e.id, e.gold, l.answer, d.kept, d.reason, fr.answer AS relabel FROM examples e
           JOIN labels l ON l.example_id = e.id AND l.teacher = ? AND l.status = 'ok'
           JOIN filter_decisions d ON d.example_id = e.id AND d.run_id = ?
           LEFT JOIN filter_relabels fr ON fr.example_id = e.id AND fr.run_id = d.run_id
           WHERE e.split IN ('train', 'validation') AND e.gold IS NOT NULL
             AND e.id NOT IN (SELECT example_id FROM contamination)""", (teacher, run_id))
    label_reasons = ("suspect_label", "low_confidence", "disagrees_with_gold")
    gold = [json.loads(r["gold"]) for r in rows]
    err = np.array([json.loads(r["answer"]) != g for r, g in zip(rows, gold)])
    dropped = np.array([r["reason"] in label_reasons for r in rows])
    relabelled = np.array([r["reason"] == RELABELLED for r in rows], dtype=bool)
    new_wrong = np.array([r["relabel"] is not None and json.loads(r["relabel"]) != g for r, g in zip(rows, gold)])
    flagged = dropped | relabelled
    kept = np.array([bool(r["kept"]) for r in rows], dtype=bool)
    tp = int((err & flagged).sum())
    out = {"judged": len(rows), "teacher_errors": int(err.sum()), "flagged": int(flagged.sum()),
           "dropped": int(dropped.sum()), "true_drops": tp,
           "precision": tp / int(flagged.sum()) if flagged.any() else None,
           "recall": tp / int(err.sum()) if err.any() else None,
           "errors_kept_for_training": int((kept & np.where(relabelled, new_wrong, err)).sum())}
    if relabelled.any():
        out.update(relabelled=int(relabelled.sum()), relabel_fixed=int((relabelled & err & ~new_wrong).sum()),
                   relabel_broke=int((relabelled & ~err & new_wrong).sum()),
                   relabel_still_wrong=int((relabelled & err & new_wrong).sum()))
    return out


def confidence_threshold(project, teacher: str, n_drop: int) -> float:
    """The min_confidence that drops the ``n_drop`` least confident labels (the teacher's p(answer))."""
    ps = sorted(r["p"] for r in project.store.q(
        """SELECT COALESCE(l.confidence, 1.0) AS p FROM labels l JOIN examples e ON e.id = l.example_id
           WHERE l.teacher = ? AND l.status = 'ok' AND e.split IN ('train', 'validation')""", (teacher,)))
    if n_drop <= 0:
        return 0.0
    # strictly above the n-th lowest so exactly those (ties aside) fall below it
    return float(np.nextafter(ps[min(n_drop, len(ps)) - 1], 1.0))


def copy_project(src: Path, dst: Path, filters: dict, keep_existing: bool = False):
    """Open a copy of the project at ``src`` at ``dst``, its spec's ``filters`` replaced: the store (SQLite
    backup) and the replay recordings beside it, so ``src``'s own filter runs and training rows stay as they are.
    ``keep_existing``: reopen a copy made before (its finished training runs are reused)."""
    import sqlite3

    from distill.project import Project

    if not (keep_existing and (dst / "distill.db").exists()):
        shutil.rmtree(dst, ignore_errors=True)
        dst.mkdir(parents=True)
        spec = yaml.safe_load((src / "distill.yaml").read_text())
        spec["filters"] = filters
        (dst / "distill.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        for f in src.glob("*.jsonl"):
            shutil.copy(f, dst / f.name)
        with sqlite3.connect(src / "distill.db") as a, sqlite3.connect(dst / "distill.db") as b:
            a.backup(b)
    return Project.open(dst)


def cross_check(work: Path, suspect: dict) -> dict:
    """The suspect filter's drops vs the real teacher errors on the BANKING77 / CLINC150 retention projects
    (another teacher: a fine-tuned mpnet; built by bench/retention_intents.py), flags only: no training. Run with
    ``action: relabel`` (the flags are the same either way) so the suggested labels are scored too. On a copy of
    each store so the retention project's own filter run is untouched."""
    from distill.filters import run_filters

    out = {}
    for name in ("banking77", "clinc150"):
        src = work / f"retention-{name}"
        if not (src / "distill.db").exists():
            out[name] = None
            continue
        p = copy_project(src, work / f"filters-cross-{name}",
                         {"drop_disagree_with_gold": False, "suspect_labels": {**suspect, "action": "relabel"}})
        t = time.perf_counter()
        fr = run_filters(p, "mpnet")
        out[name] = {"teacher": "mpnet (bench/intent_teacher.py)", "seconds": round(time.perf_counter() - t, 1),
                     "dropped_by_reason": fr.dropped_by_reason, **drops_vs_errors(p, fr.run_id, "mpnet")}
        p.close()
        print(f"[cross-check {name}] {out[name]}", file=sys.stderr)
    return out


def carry_cross_check(checked: dict, out: Path) -> dict:
    """The datasets this run could not check (their retention project is not built here) keep the last result
    file's cross-check, marked ``carried_from`` (its command, git SHA and time); measured ones replace it."""
    try:
        old = json.loads(out.read_text())
    except (OSError, ValueError):
        return checked
    prev = (old.get("results") or {}).get("cross_check_other_teacher") or {}
    env = old.get("environment") or {}
    for name, res in checked.items():
        if res is None and prev.get(name):
            carried = {k: v for k, v in prev[name].items() if k not in ("carried_from", "measured")}
            checked[name] = {**carried, "carried_from": prev[name].get("carried_from") or prev[name].get("measured") or {
                "command": old.get("command"), "git_sha": env.get("git_sha"), "time_utc": env.get("time_utc")}}
    return checked


def update_cross_check(out: Path, checked: dict, suspect: dict) -> None:
    """--cross-check-only: write the datasets checked now into the result file's cross-check, each marked with
    when and at which commit it was measured; the rest of the file (the SNIPS arms) stays as it was. Only with
    the settings the file's arms used: other settings are printed, not mixed in."""
    from distill.runinfo import environment, write_json_atomic

    if not out.exists():
        print(f"{out} not found: run the whole bench first; the cross-check is printed above", file=sys.stderr)
        return
    doc = json.loads(out.read_text())
    if doc["config"].get("suspect_labels") != suspect:
        print(f"--suspect differs from {out}'s settings: not written", file=sys.stderr)
        return
    env = environment()
    cross = doc["results"].get("cross_check_other_teacher") or {}
    for name, res in checked.items():
        if res is not None:
            cross[name] = {**res, "measured": {"command": "bench/filters.py --cross-check-only",
                                               "git_sha": env.get("git_sha"), "time_utc": env.get("time_utc")}}
    doc["results"]["cross_check_other_teacher"] = cross
    write_json_atomic(out, doc)
    print(f"updated the cross-check in {out}: {[n for n, r in checked.items() if r is not None]}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2", help="student training seeds (comma-separated)")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--work", type=Path, default=HERE / ".work")
    ap.add_argument("--suspect", default="{}", help="suspect_labels settings as JSON (default: the shipped defaults)")
    ap.add_argument("--cross-check-only", action="store_true", help="only the BANKING77/CLINC150 flag cross-check")
    args = ap.parse_args(argv)

    from distill.evaluate import evaluate
    from distill.filters import run_filters
    from distill.recipes.train import train
    from distill.runinfo import bench_result, environment, target, write_json_atomic
    from distill.task import SuspectSpec

    env0, t0 = environment(), time.perf_counter()
    seeds = [0] if args.smoke else [int(s) for s in args.seeds.split(",")]
    limit = 150 if args.smoke else None
    work = args.work / ("filters-smoke" if args.smoke else "filters")
    suspect = SuspectSpec.model_validate(json.loads(args.suspect)).model_dump(mode="json")
    if args.cross_check_only:
        checked = cross_check(args.work, suspect)
        print(json.dumps(checked, indent=1))
        update_cross_check(args.out or HERE / "results" / "filters.json", checked, suspect)
        return 0
    base = {"drop_disagree_with_gold": False, "min_confidence": None}
    arms: dict[str, dict] = {}
    for arm in ("none", "suspect", "relabel", "gold"):
        filters = {"none": base, "suspect": {**base, "suspect_labels": {**suspect, "action": "drop"}},
                   "relabel": {**base, "suspect_labels": {**suspect, "action": "relabel"}},
                   "gold": {**base, "drop_disagree_with_gold": True}}[arm]
        p = build(work, arm, filters, limit)
        arms[arm] = {"project": p, "filters": filters}
    teacher = arms["none"]["project"].spec.get_teacher().name
    res: dict[str, dict] = {}
    for arm in ("none", "suspect", "relabel", "gold"):
        p = arms[arm]["project"]
        t = time.perf_counter()
        fr = run_filters(p, teacher)
        res[arm] = {"filters": arms[arm]["filters"], "filter_seconds": round(time.perf_counter() - t, 2),
                    "kept": fr.kept, "dropped_by_reason": fr.dropped_by_reason,
                    "drops_vs_teacher_errors": drops_vs_errors(p, fr.run_id, teacher),
                    "relabelled": fr.relabelled, "review_first": fr.suspects[:10] if arm == "suspect" else None}
        print(f"[{arm}] kept {fr.kept}, dropped {fr.dropped_by_reason}, relabelled {fr.relabelled}, "
              f"{res[arm]['drops_vs_teacher_errors']}",
              file=sys.stderr)
    # the confidence arm drops as many labels as the suspect filter did, by the teacher's own probability
    n_suspect = res["suspect"]["dropped_by_reason"].get("suspect_label", 0)
    thr = confidence_threshold(arms["none"]["project"], teacher, n_suspect)
    p = build(work, "confidence", {**base, "min_confidence": thr}, limit)
    arms["confidence"] = {"project": p, "filters": {**base, "min_confidence": thr}}
    fr = run_filters(p, teacher)
    res["confidence"] = {"filters": arms["confidence"]["filters"], "kept": fr.kept,
                         "dropped_by_reason": fr.dropped_by_reason,
                         "drops_vs_teacher_errors": drops_vs_errors(p, fr.run_id, teacher)}
    print(f"[confidence] threshold {thr:.4f}: {res['confidence']['drops_vs_teacher_errors']}", file=sys.stderr)

    for arm in ARMS:
        p = arms[arm]["project"]
        res[arm]["students"] = []
        for seed in seeds:
            over = {"seed": seed, **({"epochs": 1} if args.smoke else {})}
            run = train(p, teacher=teacher, overrides=over, progress=False)
            d = evaluate(p, model_path=str(run.path), teacher=teacher, progress=False).to_dict()
            h = d["headline"]["student"]
            res[arm]["students"].append({"seed": seed, "run_id": run.run_id, "train_rows": run.record.get("counts", {}),
                                         "accuracy_vs_gold": h["accuracy (gold)"],
                                         "macro_f1_vs_gold": h["macro_f1 (gold)"]})
            print(f"[{arm}] seed {seed}: accuracy {h['accuracy (gold)']}", file=sys.stderr)
        accs = [s["accuracy_vs_gold"]["value"] for s in res[arm]["students"]]
        res[arm]["mean_accuracy_vs_gold"] = float(np.mean(accs))
        res[arm]["min_max_accuracy_vs_gold"] = [float(min(accs)), float(max(accs))]
        p.close()
    acc = {arm: res[arm]["mean_accuracy_vs_gold"] for arm in ARMS}
    res["cross_check_other_teacher"] = None if args.smoke else carry_cross_check(
        cross_check(args.work, suspect), args.out or HERE / "results" / "filters.json")
    gap = acc["gold"] - acc["none"]

    def recovered(arm: str) -> float | None:
        return (acc[arm] - acc["none"]) / gap if gap > 0 else None

    def per_seed(arm: str) -> list[float | None]:
        return [((s["accuracy_vs_gold"]["value"] - n["accuracy_vs_gold"]["value"])
                 / (g["accuracy_vs_gold"]["value"] - n["accuracy_vs_gold"]["value"]))
                if g["accuracy_vs_gold"]["value"] > n["accuracy_vs_gold"]["value"] else None
                for n, s, g in zip(res["none"]["students"], res[arm]["students"], res["gold"]["students"])]

    ratios = {"suspect_filter_gap_recovered": recovered("suspect"),
              "relabel_filter_gap_recovered": recovered("relabel"),
              "confidence_filter_gap_recovered": recovered("confidence"),
              "suspect_precision": res["suspect"]["drops_vs_teacher_errors"]["precision"],
              "suspect_recall": res["suspect"]["drops_vs_teacher_errors"]["recall"],
              "confidence_precision_same_drops": res["confidence"]["drops_vs_teacher_errors"]["precision"],
              "confidence_recall_same_drops": res["confidence"]["drops_vs_teacher_errors"]["recall"]}
    # lists: results, not ratios (ratios are numbers)
    res["suspect_gap_recovered_per_seed"] = per_seed("suspect")
    res["relabel_gap_recovered_per_seed"] = per_seed("relabel")
    why = f"gap = {gap:.4f} accuracy (gold {acc['gold']:.4f}, none {acc['none']:.4f}) on n=254 test rows"
    targets = [target("suspect filter, flags dropped, recovers >= 50% of the no-filter -> gold-filter gap (SNIPS "
                      "demo, mean over seeds)", recovered("suspect"), ">=", TARGET_GAP, why),
               target("suspect filter, flags relabelled (action: relabel), recovers >= 50% of the gap (SNIPS demo, "
                      "mean over seeds)", recovered("relabel"), ">=", TARGET_GAP, why)]
    config = {"task": "examples/snips-intents (SNIPS, 7 intents)", "teacher": teacher, "seeds": seeds,
              "suspect_labels": suspect, "limit": limit,
              "student": "the demo's student settings (examples/snips-intents/distill.yaml), seed overridden",
              "gap_recovered": "(mean acc_suspect - mean acc_none) / (mean acc_gold - mean acc_none), accuracy vs gold "
                               "on the locked test split",
              "drops_vs_teacher_errors": "train/validation rows with an ok teacher answer, not near-duplicates of test; "
                                         "a drop = reason suspect_label / low_confidence / disagrees_with_gold"}
    out = args.out or (Path(tempfile.gettempdir()) / "filters_smoke.json" if args.smoke else HERE / "results" / "filters.json")
    doc = bench_result("filters", smoke=args.smoke, config=config, results=res, ratios=ratios, targets=targets,
                       started=t0, environment_start=env0)
    write_json_atomic(out, doc)
    print(json.dumps({"mean_accuracy": acc, "ratios": ratios}, indent=1), file=sys.stderr)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
