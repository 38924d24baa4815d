"""CLINC150 router proof: does student + router keep the teacher's in-scope accuracy *and* catch out-of-scope
inputs, at a fraction of the teacher's cost?

    .venv/bin/python bench/router_clinc150.py            # reuses the retention bench's CLINC150 student (~5 min; ~25 more if it must train it)
    .venv/bin/python bench/router_clinc150.py --smoke    # 8 intents, 1 epoch, ~1 min; writes to a temp file unless --out

Data: examples/clinc150/clinc150_subset.csv (CLINC150 ``data_small`` subset, CC BY 3.0, Larson et al. 2019,
arXiv 1909.02027), through the recorded teacher's roles (bench/intent_teacher.py): validation = 10 queries per
intent + the 100 ``oos_val``; test = all 4,500 in-scope + 1,000 ``oos_test`` queries.

Teacher: **all-mpnet-base-v2 fine-tuned on 10 gold queries per intent** (issue #15; before, gold replayed as a
perfect stand-in), recorded with its full distribution for every input (examples/clinc150/teacher_mpnet.jsonl.gz).
It has no out-of-scope class, so, as a deployed classifier would, it answers ``oos`` when its top probability
is below a threshold (maximum softmax probability, Hendrycks and Gimpel 2017, arXiv 1610.02136) set on
validation so that 95% of the in-scope validation queries keep their answer.

Student: the retention bench's distilled CLINC150 student (MiniLM, ``signal: mix`` on the teacher's labels of
~90 train queries per intent — 20 until 2026-11-30; it never saw gold): bench/retention_intents.py trains it, or this script does
through the same code and settings (the same run is reused either way).

Recipe:
1. the student's logits and embeddings on validation, test and its training traffic (Mahalanobis statistics);
2. the router calibrated on validation only, against the *teacher's* answers there (no gold: what `distill route
   calibrate` does), at coverage 0.9, once per OOD score (energy, Mahalanobis, none); frozen, applied to test;
3. on test: the final answer is the student's where it is kept and the teacher's where routed; in-scope accuracy
   and OOS recall (share of oos queries whose final answer is ``oos``) of student alone / routed / teacher
   alone, reported separately as in Larson et al.; the router's own OOS catch rate (share of oos routed); routed
   share; cost per 1M requests on two bases — this teacher's measured compute (its recorded batch-1 latency at
   $0.10/CPU-hour, same as the student's), and an API teacher at an assumed price (gpt-4o-mini list price on a
   chars/4 token estimate of the 150-label prompt, the scenario the bench priced before); the coverage -> quality
   curve (each point calibrated on validation, measured on test).
4. the router ``distill route calibrate`` fits today (``routed_default``: the #16 defaults — Mahalanobis on every
   layer, ``ood_keep`` 0.95, the guaranteed cut), on the same student, validation and teacher answers, with its
   own target lines; the three above keep this suite's older settings so their history stays comparable.
   Two bounds hold whatever the router does: OOS recall cannot pass the teacher's own (an oos query is caught
   only if routed *and* the teacher then answers ``oos``), and the routed share cannot fall below the oos
   share of the traffic times the recall wanted (18% of this test set is oos).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import retention_intents as RI  # noqa: E402  (the same project, teacher replay and student settings)
from intent_teacher import read_teacher  # noqa: E402

ASSUMED_PRICE = {"input_per_1m": 0.15, "output_per_1m": 0.60}   # gpt-4o-mini list price (assumption, see docstring)
COVERAGE = 0.9
CURVE = [0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 1.0]
TEACHER_IN_SCOPE_KEEP = 0.95    # the teacher's MSP threshold keeps this share of in-scope validation answers


def recorded_rows(intents: set[str], smoke: bool) -> list[dict]:
    """The recording's traffic/validation/test rows of ``intents`` (the student's labels) and of oos, as
    {text, gold, role, probs}; with ``smoke`` a few per intent and role, 20 oos per role."""
    _, lines = read_teacher("clinc150")
    rows = [r for r in lines if r["role"] in ("traffic", "validation", "test")
            and (r["gold"] in intents or (r["gold"] == "oos" and r["role"] != "traffic"))]
    if smoke:
        caps, seen, out = {"traffic": 10, "validation": 3, "test": 6}, {}, []
        for r in rows:
            k = (r["gold"], r["role"])
            if seen.get(k, 0) < (20 if r["gold"] == "oos" else caps[r["role"]]):
                seen[k] = seen.get(k, 0) + 1
                out.append(r)
        rows = out
    return rows


def teacher_answers(rows: list[dict], labels: list[str], threshold: float) -> np.ndarray:
    """The teacher's answer per row: its argmax over the project's labels, or 'oos' below ``threshold``."""
    out = []
    for r in rows:
        probs = {k: v for k, v in r["probs"].items() if k in labels}
        top = max(probs, key=probs.get)
        out.append(top if probs[top] / max(sum(probs.values()), 1e-12) >= threshold else "oos")
    return np.array(out)


def msp_threshold(rows: list[dict], labels: list[str]) -> float:
    """The top-probability threshold that keeps TEACHER_IN_SCOPE_KEEP of the in-scope validation answers."""
    tops = []
    for r in rows:
        if r["role"] == "validation" and r["gold"] != "oos":
            probs = {k: v for k, v in r["probs"].items() if k in labels}
            tops.append(max(probs.values()) / max(sum(probs.values()), 1e-12))
    return float(np.quantile(tops, 1 - TEACHER_IN_SCOPE_KEEP))


def route_metrics(routed: np.ndarray, student: np.ndarray, teacher: np.ndarray, gold: np.ndarray) -> dict:
    """Test-split figures of one routing decision vector: the final answer is the teacher's where routed,
    the student's elsewhere; in-scope accuracy and OOS recall of that final answer, vs gold."""
    final = np.where(routed, teacher, student)
    oos = gold == "oos"
    ins = ~oos
    return {
        "in_scope_accuracy": float((final[ins] == gold[ins]).mean()),
        "oos_recall": float((final[oos] == "oos").mean()) if oos.any() else None,
        "oos_routed_share": float(routed[oos].mean()) if oos.any() else None,
        "routed_share_all": float(routed.mean()),
        "routed_share_in_scope": float(routed[ins].mean()),
        "student_answered_accuracy_in_scope": (float((student[ins & ~routed] == gold[ins & ~routed]).mean())
                                               if (ins & ~routed).any() else None),
    }


def per_1m(teacher_usd: float, student_usd: float, routed_share: float) -> float:
    """USD per 1M requests: the student runs on every request, the teacher on the routed share."""
    return 1e6 * (routed_share * teacher_usd + student_usd)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="8 intents, 1 epoch: checks the script, not the numbers")
    ap.add_argument("--work", type=Path, default=HERE / ".work", help="folder of the retention bench's projects")
    ap.add_argument("--out", type=Path, help="result JSON (default: bench/results/router_clinc150.json)")
    ap.add_argument("--cpu-hour-usd", type=float, default=0.10)
    ap.add_argument("--latency-samples", type=int, default=300)
    ap.add_argument("--model", type=Path, help="the distilled student's folder (default: train or reuse it through "
                                               "the retention bench's project)")
    args = ap.parse_args(argv)

    from distill.ratelimit import estimate_prompt_tokens
    from distill.recipes.train import train
    from distill.runinfo import bench_result, environment, target, write_json_atomic
    from distill.serve.router import OodStats, Router, RouterConfig, calibrate, fit_mahalanobis, fit_ood, label_indices
    from distill.students.predictor import EncoderTorchPredictor
    from distill.task import render_messages

    env_start = environment()
    t_start = time.perf_counter()
    out = args.out or (Path(tempfile.gettempdir()) / "router_clinc150_smoke.json" if args.smoke
                       else HERE / "results" / "router_clinc150.json")
    if args.smoke:
        RI.MIN_SEGMENT = 5

    # 1. the retention bench's distilled student (trained here if that bench has not run) ----------------
    in_scope, _ = RI.read_rows("clinc150", args.smoke)
    student_cfg = RI.student_config("clinc150", args.smoke)
    folder = args.work / f"retention-clinc150{'-smoke' if args.smoke else ''}"
    if args.model:
        # that run's folder, read only: the retention bench may still hold the project (its other students)
        from distill.project import Project

        project = Project.open(folder)
        rep = type("Pinned", (), {"path": args.model, "run_id": args.model.parent.name, "reused": True,
                                  "record": json.loads((args.model / "training_record.json").read_text())
                                  if (args.model / "training_record.json").exists() else {}})()
    else:
        project, built = RI.build(folder, "clinc150", in_scope, student_cfg)
        rep = train(project, teacher=RI.TEACHER_NAME, overrides={"signal": RI.STUDENTS["distilled"]}, progress=False)
    pred = EncoderTorchPredictor(rep.path, device="auto")
    labels = list(pred.labels)

    rows = recorded_rows(set(labels), args.smoke)
    tau = msp_threshold(rows, labels)

    def part(role: str) -> tuple[list[dict], list[str]]:
        sel = [r for r in rows if r["role"] == role]
        return sel, [r["text"] for r in sel]

    t0 = time.perf_counter()
    val_rows, val_x = part("validation")
    test_rows, test_x = part("test")
    train_rows, train_x = part("traffic")
    val_logits, val_feats = pred.logits_and_embeddings(val_x, batch_size=64)
    test_logits, test_feats = pred.logits_and_embeddings(test_x, batch_size=64)
    _, train_feats = pred.logits_and_embeddings(train_x, batch_size=64)
    infer_s = time.perf_counter() - t0
    # Mahalanobis class statistics from the student's own training inputs and the labels it learned (the teacher's)
    train_t = teacher_answers(train_rows, labels, 0.0)
    maha = fit_mahalanobis(train_feats, label_indices(list(train_t), labels), len(labels))

    gold = np.array([r["gold"] for r in test_rows])
    is_oos = gold == "oos"
    t_test = teacher_answers(test_rows, labels, tau)
    t_val = teacher_answers(val_rows, labels, tau)
    s_test = np.array(labels)[test_logits.argmax(-1)]

    # batch-1 latency (what one served request costs), student and teacher side by side on the same texts,
    # interleaved, when the teacher's trained folder is here (bench/intent_teacher.py leaves it in --work);
    # else the teacher's latency recorded with its answers (another run, another load: said in the JSON)
    prov, _ = read_teacher("clinc150")
    finals = sorted((args.work / "teacher-clinc150" / "models").glob("*/final"))
    teacher_model = None
    if len(finals) == 1 and not args.smoke:
        teacher_dir = finals[0]
        from distill.students.classifier import ClassifierStudent

        teacher_model = ClassifierStudent.load(teacher_dir)
    lat, t_lat = [], []
    for i in range(args.latency_samples):
        x = [test_x[i % len(test_x)]]
        t = time.perf_counter()
        pred.logits_and_embeddings(x, batch_size=1)
        lat.append(time.perf_counter() - t)
        if teacher_model is not None:
            t = time.perf_counter()
            teacher_model.predict_proba(x, batch_size=1)
            t_lat.append(time.perf_counter() - t)
    student_p50_s = float(np.percentile(lat, 50))
    student_usd = student_p50_s * args.cpu_hour_usd / 3600
    teacher_p50_s = float(np.percentile(t_lat, 50)) if t_lat else prov["batch1_latency_s"]["p50"]
    teacher_latency_source = ("measured here, interleaved with the student's, same texts" if t_lat
                              else "recorded with the teacher's answers (another run: not side by side)")
    teacher_usd = teacher_p50_s * args.cpu_hour_usd / 3600
    # the API scenario: the same answers from a paid API, priced on the 150-label prompt (chars/4 tokens)
    msgs = render_messages(project.spec, test_x[0])
    api_usd = (estimate_prompt_tokens(msgs) * ASSUMED_PRICE["input_per_1m"] + 4 * ASSUMED_PRICE["output_per_1m"]) / 1e6

    # 2-3. routers calibrated on validation against the teacher's answers, measured on test ----------------
    def fitted(ood: str, coverage: float):
        # the settings this suite has always measured (last-layer Mahalanobis, ood_keep 0.99, the plain cut):
        # its results stay comparable run to run; bench/router.py measures the current defaults across datasets
        stats = OodStats(layers=[-1], maha=[maha]) if ood == "mahalanobis" else None
        settings = RouterConfig(labels=labels, ood=ood, layers=[-1], ood_keep=0.99, guarantee=False)
        cfg = calibrate(None, val_feats, list(t_val), coverage, val_logits=val_logits, labels=labels,
                        settings=settings, stats=stats)
        router = Router(cfg, stats)
        _, conf, score = router.scores(test_logits, test_feats)
        is_ood = (score > cfg.ood_threshold) if ood != "none" else np.zeros(len(conf), bool)
        routed = is_ood | (conf < cfg.conf_threshold)
        return cfg, routed, is_ood

    def costed(m: dict) -> dict:
        m["cost_per_1m_usd"] = per_1m(teacher_usd, student_usd, m["routed_share_all"])
        m["cost_per_1m_usd_api_teacher"] = per_1m(api_usd, student_usd, m["routed_share_all"])
        return m

    routers = {}
    for ood in ("energy", "mahalanobis", "none"):
        cfg, routed, is_ood = fitted(ood, COVERAGE)
        m = costed(route_metrics(routed, s_test, t_test, gold))
        m["routed_by_ood_score_share"] = float(is_ood.mean())
        routers[ood] = {"validation": {"achieved_coverage": cfg.achieved_coverage, "conf_threshold": cfg.conf_threshold,
                                       "ood_threshold": cfg.ood_threshold if math.isfinite(cfg.ood_threshold) else None,
                                       "ood_keep": cfg.ood_keep, "n": cfg.n_validation},
                        "test": m}
        print(f"router ood={ood}: {json.dumps(m)}", file=sys.stderr)

    # the router `distill route calibrate` fits today (#16 defaults: Mahalanobis on every layer's mean-pooled
    # state, ood_keep 0.95, the guaranteed cut when validation is big enough) -- the same student, validation
    # and teacher answers; the three above keep the settings this suite measured before, for comparison
    t1 = time.perf_counter()
    layers = {role: pred.logits_and_layers(x, batch_size=64)[1] for role, x in
              (("traffic", train_x), ("validation", val_x), ("test", test_x))}
    default = RouterConfig(labels=labels)
    d_stats = fit_ood(default, list(train_t), layers["traffic"])
    # as `distill route calibrate` does: in-domain validation rows carry the teacher's answer (its argmax: a
    # replayed teacher has no threshold), out-of-scope ones (gold not a label: the oos_val queries) are flagged,
    # set no threshold, and the coverage target counts in-domain rows only
    val_oos = [r["gold"] == "oos" for r in val_rows]
    val_answers = [None if o else a for o, a in zip(val_oos, teacher_answers(val_rows, labels, 0.0))]
    d_cfg = calibrate(None, {"layers": layers["validation"]}, val_answers, COVERAGE, val_logits=val_logits,
                      labels=labels, settings=default, stats=d_stats, oos=val_oos)
    _, d_conf, d_score = Router(d_cfg, d_stats).scores(test_logits, {"layers": layers["test"]})
    d_ood = d_score > d_cfg.ood_threshold
    m = costed(route_metrics(d_ood | (d_conf < d_cfg.conf_threshold), s_test, t_test, gold))
    m["routed_by_ood_score_share"] = float(d_ood.mean())
    routers["default"] = {"validation": {"achieved_coverage": d_cfg.achieved_coverage,
                                         "conf_threshold": d_cfg.conf_threshold, "threshold_rule": d_cfg.threshold_rule,
                                         "guaranteed_coverage": d_cfg.guaranteed_coverage,
                                         "ood_threshold": d_cfg.ood_threshold, "ood_keep": d_cfg.ood_keep,
                                         "layers": "every layer (None)", "n": d_cfg.n_validation},
                          "test": m, "seconds": round(time.perf_counter() - t1, 1)}
    print(f"router default (#16): {json.dumps(m)}", file=sys.stderr)

    curve = {}
    for ood in ("energy", "mahalanobis"):
        pts = []
        for c in CURVE:
            cfg, routed, _ = fitted(ood, c)
            m = costed(route_metrics(routed, s_test, t_test, gold))
            pts.append({"target_coverage": c, "validation_coverage": cfg.achieved_coverage,
                        "test_student_share": 1 - m["routed_share_all"], **m})
        curve[ood] = pts

    n_in, n_oos = int((~is_oos).sum()), int(is_oos.sum())
    never = np.zeros(len(gold), bool)
    student_alone = costed(route_metrics(never, s_test, t_test, gold))
    teacher_alone = route_metrics(~never, s_test, t_test, gold)
    teacher_alone.update(cost_per_1m_usd=1e6 * teacher_usd, cost_per_1m_usd_api_teacher=1e6 * api_usd)
    results = {
        "teacher": {
            "kind": "all-mpnet-base-v2 fine-tuned on 10 gold queries per intent, recorded (bench/intent_teacher.py)",
            "recording": "examples/clinc150/teacher_mpnet.jsonl.gz", "date": prov.get("date"),
            "oos": f"answers 'oos' when its top probability < {tau:.4f} (keeps {TEACHER_IN_SCOPE_KEEP:.0%} of in-scope "
                   "validation answers; maximum softmax probability)",
            "msp_threshold": tau,
            "batch1_latency_s_p50": teacher_p50_s, "latency_source": teacher_latency_source,
            "cost_per_call_usd": teacher_usd,
            "api_scenario": {"assumed_price_usd_per_1m_tokens": ASSUMED_PRICE, "cost_per_call_usd": api_usd,
                             "basis": "chars/4 token estimate of the 150-label prompt + 4 output tokens"},
        },
        "data": {"source": "examples/clinc150/clinc150_subset.csv via the recording's roles (CC BY 3.0, Larson et al. "
                           "2019, arXiv 1909.02027)",
                 "student_traffic": len(train_rows),
                 "validation_in_scope": sum(r["gold"] != "oos" for r in val_rows),
                 "validation_oos": sum(r["gold"] == "oos" for r in val_rows),
                 "test_in_scope": n_in, "test_oos": n_oos, "intents": len(labels)},
        "student": {"run_id": rep.run_id, "project": str(project.root), "config": rep.record.get("config"),
                    "epochs_run": rep.record.get("epochs_run"), "train_seconds": rep.record.get("train_seconds"),
                    "reused_finished_run": rep.reused, "inference_seconds_all_parts": round(infer_s, 2),
                    "batch1_latency_s": {"mean": float(np.mean(lat)), "p50": student_p50_s,
                                         "p99": float(np.percentile(lat, 99)), "n": len(lat), "backend": "torch fp32"},
                    "cost_per_request_usd": student_usd, "cpu_hour_usd": args.cpu_hour_usd},
        "at_coverage": COVERAGE,
        "systems_on_test": {"student_alone": student_alone,
                            "routed_energy": routers["energy"]["test"],
                            "routed_mahalanobis": routers["mahalanobis"]["test"],
                            "routed_confidence_only": routers["none"]["test"],
                            "routed_default": routers["default"]["test"],
                            "teacher_alone": teacher_alone},
        "routers": routers,
        "curve": curve,
        "definitions": {
            "in_scope_accuracy": "share of the in-scope test queries whose final answer (teacher's if routed, else "
                                 "the student's) is the gold intent",
            "oos_recall": "share of oos_test queries whose final answer is 'oos' (routed, and the teacher's top "
                          "probability is below its threshold), reported separately as in Larson et al. 2019",
            "oos_routed_share": "share of oos_test queries the router sends to the teacher (what the router catches)",
            "routed_share_all": "share of all test queries (in-scope + oos) sent to the teacher",
            "cost_per_1m_usd": "1e6 x (routed_share_all x teacher cost per call + student cost per request), both at "
                               "their batch-1 p50 latency x $/CPU-hour",
            "cost_per_1m_usd_api_teacher": "the same with the teacher priced as an API (assumed price)",
            "thresholds": "fitted on validation only (in-scope + oos_val) against the teacher's answers, frozen, "
                          "then applied to test",
        },
    }
    routed, d_test = results["systems_on_test"]["routed_mahalanobis"], routers["default"]["test"]
    ratios = {
        "routed_over_teacher_in_scope_accuracy": routed["in_scope_accuracy"] / teacher_alone["in_scope_accuracy"],
        "student_over_teacher_in_scope_accuracy": student_alone["in_scope_accuracy"] / teacher_alone["in_scope_accuracy"],
        "routed_over_teacher_cost": routed["cost_per_1m_usd"] / teacher_alone["cost_per_1m_usd"],
        "routed_over_api_teacher_cost": routed["cost_per_1m_usd_api_teacher"] / teacher_alone["cost_per_1m_usd_api_teacher"],
        "student_over_teacher_latency_p50": student_p50_s / teacher_p50_s,
        "routed_oos_recall": routed["oos_recall"],
        "routed_oos_routed_share": routed["oos_routed_share"],
        "teacher_oos_recall": teacher_alone["oos_recall"],
        "routed_share": routed["routed_share_all"],
        # the router distill fits today (routed_default), beside the pre-#16 settings above
        "default_routed_over_teacher_in_scope_accuracy": d_test["in_scope_accuracy"] / teacher_alone["in_scope_accuracy"],
        "default_routed_over_teacher_cost": d_test["cost_per_1m_usd"] / teacher_alone["cost_per_1m_usd"],
        "default_routed_over_api_teacher_cost": (d_test["cost_per_1m_usd_api_teacher"]
                                                 / teacher_alone["cost_per_1m_usd_api_teacher"]),
        "default_routed_oos_recall": d_test["oos_recall"],
        "default_routed_oos_routed_share": d_test["oos_routed_share"],
        "default_routed_share": d_test["routed_share_all"],
        "test_oos_share": n_oos / (n_in + n_oos),
    }
    targets = [
        target("routed in-scope accuracy / teacher's, at 90% target coverage (Mahalanobis router)",
               ratios["routed_over_teacher_in_scope_accuracy"], ">=", 1.0,
               "teacher = mpnet fine-tuned on 10 gold per intent (real, imperfect)"),
        target("routed cost / teacher-only cost (this teacher's measured compute)", ratios["routed_over_teacher_cost"],
               "<=", 0.15, "both priced at batch-1 p50 latency x $/CPU-hour; the API-priced ratio is in ratios"),
        target("CLINC150 OOS recall of the routed system at 90% coverage", ratios["routed_oos_recall"], ">=", 0.8,
               "final answer 'oos' = routed and the teacher's top probability below its threshold"),
        target("routed in-scope accuracy / teacher's, at 90% target coverage (the current default router)",
               ratios["default_routed_over_teacher_in_scope_accuracy"], ">=", 1.0,
               "teacher = mpnet fine-tuned on 10 gold per intent (real, imperfect)"),
        target("routed cost / teacher-only cost (current default router; this teacher's measured compute)",
               ratios["default_routed_over_teacher_cost"], "<=", 0.15,
               f"floor: the {ratios['test_oos_share']:.0%} of test traffic that is oos must reach the teacher to be caught"),
        target("CLINC150 OOS recall of the routed system at 90% coverage (current default router)",
               ratios["default_routed_oos_recall"], ">=", 0.8,
               f"ceiling: the teacher alone catches {ratios['teacher_oos_recall']:.3f} of oos"),
    ]
    result = bench_result("router_clinc150", smoke=args.smoke, started=t_start, environment_start=env_start,
                          command="python bench/router_clinc150.py" + (" --smoke" if args.smoke else ""),
                          config={"student": student_cfg, "coverage": COVERAGE, "curve": CURVE,
                                  "cpu_hour_usd": args.cpu_hour_usd, "latency_samples": args.latency_samples,
                                  "teacher_in_scope_keep": TEACHER_IN_SCOPE_KEEP},
                          results=results, ratios=ratios, targets=targets)
    project.close()
    write_json_atomic(out, result)
    print(json.dumps({"ratios": ratios}, indent=1), file=sys.stderr)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
