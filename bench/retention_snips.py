"""Retention on the demo task (SNIPS, 7 intents): distilled student vs teacher vs gold-trained student vs
TF-IDF baseline, on the locked test split, with bootstrap CIs; plus the student/teacher latency and cost ratios.

    python bench/retention_snips.py          # ~3 min on 2 CPU cores -> bench/results/retention_snips.json
    python bench/retention_snips.py --smoke  # 150 inputs, 1 epoch; a temp file unless --out

The teacher is Qwen2.5-Coder-1.5B-Instruct run locally, replayed from examples/snips-intents (its recorded
answers and latencies). The gold-trained student uses the same inputs, the same kept rows and the same
recipe with `signal: gold`: it shows how much of the gap to gold is the teacher's, not the recipe's.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from distill.demo import run_demo
from distill.evaluate import evaluate
from distill.project import Project
from distill.recipes.train import train
from distill.runinfo import bench_result, environment, target, write_json_atomic

HERE = Path(__file__).resolve().parent

# Published reference, for orientation only: a different split (Goo et al. 2018's SNIPS test set of 700) and
# a model 5x our student's size, so it is not comparable to our 254-row test split.
PUBLISHED = {"model": "BERT-base (joint intent + slots)", "snips_intent_accuracy": 0.986,
             "source": "Chen, Zhuo, Wang 2019, BERT for Joint Intent Classification and Slot Filling, arXiv 1902.10909",
             "caveat": "different test split (Goo et al. 2018) and a 110M-parameter model"}


def segment_retention(d: dict) -> list[dict]:
    """Per segment: student accuracy / teacher accuracy, both vs gold (point estimates; the CIs of the
    parts are in the report)."""
    seg = {s["segment"]: s for s in d["systems"]["teacher"]["segments"]}
    out = []
    for s in d["systems"]["student"]["segments"]:
        t = seg[s["segment"]]["accuracy_vs_gold"]["value"]
        v = s["accuracy_vs_gold"]["value"]
        out.append({"segment": s["segment"], "n": s["n"], "student": v, "teacher": t, "retention": v / t if t else None})
    return sorted(out, key=lambda r: r["retention"] if r["retention"] is not None else 9)


def figures(d: dict) -> dict:
    h = d["headline"]
    seg = d["gate"].get("worst_segment") or {}
    return {
        "segment_retention_worst_first": segment_retention(d),
        "accuracy_vs_gold": h["student"]["accuracy (gold)"],
        "macro_f1_vs_gold": h["student"]["macro_f1 (gold)"],
        "agreement_with_teacher": h["student"].get("agreement"),
        "retention": h["student"].get("retention"),
        "worst_segment": seg,
        "gate_passed": d["gate"]["passed"],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, default=None, help="project folder (default bench/.work/retention-snips[-smoke])")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--limit", type=int, default=None, help="use only the first N inputs")
    ap.add_argument("--smoke", action="store_true", help="first 150 inputs, 1 epoch: checks the script, not the numbers")
    args = ap.parse_args(argv)
    if args.smoke:
        args.limit = args.limit or 150
    work = args.dir or HERE / ".work" / ("retention-snips-smoke" if args.smoke else "retention-snips")
    out = args.out or (Path(tempfile.gettempdir()) / "retention_snips_smoke.json" if args.smoke
                       else HERE / "results" / "retention_snips.json")
    env0 = environment()
    t0 = time.perf_counter()
    run_demo(work, limit=args.limit, epochs=1 if args.smoke else None)   # import → label → filter → train → eval
    project = Project.open(work)
    teacher = project.spec.get_teacher().name
    distilled = json.loads((work / "reports" / "report.json").read_text())
    # the same student settings, trained on gold labels instead of the teacher's
    gold_run = train(project, teacher=teacher, overrides={"signal": "gold", **({"epochs": 1} if args.smoke else {})},
                     progress=False)
    gold = evaluate(project, model_path=str(gold_run.path), teacher=teacher, progress=False).to_dict()
    h = distilled["headline"]
    d_fig, g_fig = figures(distilled), figures(gold)
    tfidf = {"accuracy_vs_gold": h["base"]["accuracy (gold)"], "agreement_with_teacher": h["base"].get("agreement"),
             "retention": h["base"].get("retention")}
    latency = {"student_p50_s": distilled["latency"]["student"]["batch1"]["p50_s"],
               "teacher_p50_s": distilled["latency"]["teacher"]["batch1"]["p50_s"],
               "teacher_over_student_p50": distilled["latency"].get("teacher_over_student_p50"),
               "note": "teacher latency is what the recorded local 1.5B teacher took per input on this CPU"}
    results = {
        "teacher": distilled["teacher_quality"],
        "test_rows": distilled["test"],
        "distilled_student": d_fig,
        "gold_trained_student": g_fig,
        "tfidf_baseline": tfidf,
        "teacher_metrics": h["teacher"],
        "latency": latency,
        "cost_per_1m_usd": {"student": distilled["cost"]["student"]["per_1m_usd"],
                            "teacher": distilled["cost"]["teacher"]["per_1m_usd"],
                            "teacher_over_student": distilled["cost"].get("teacher_over_student")},
        "published_reference": PUBLISHED,
    }

    def val(x):
        return x.get("value") if isinstance(x, dict) else x

    worst = d_fig["segment_retention_worst_first"][0]["retention"] if d_fig["segment_retention_worst_first"] else None
    ratios = {
        "retention_distilled": val(d_fig["retention"]),
        "retention_worst_segment": worst,
        "retention_gold_trained": val(g_fig["retention"]),
        "retention_tfidf": val(tfidf["retention"]),
        "distilled_over_tfidf_accuracy": val(d_fig["accuracy_vs_gold"]) / val(tfidf["accuracy_vs_gold"]),
        "teacher_over_student_latency_p50": latency["teacher_over_student_p50"],
    }
    targets = [target("SNIPS retention overall (distilled student / teacher accuracy vs gold)",
                      ratios["retention_distilled"], ">=", 0.99),
               target("SNIPS retention, worst segment", worst, ">=", 0.95)]
    result = bench_result("retention_snips", smoke=args.smoke, started=t0, environment_start=env0,
                          config={"project": str(work), "limit": args.limit, "student": project.spec.student,
                                  "teacher": teacher},
                          results=results, ratios=ratios, targets=targets)
    write_json_atomic(out, result)
    print(json.dumps({k: results[k] for k in ("distilled_student", "gold_trained_student", "tfidf_baseline", "latency")},
                     indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
