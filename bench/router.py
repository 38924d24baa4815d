"""Router OOD matrix: does the router send what the student does not know to the teacher, across datasets?

    .venv/bin/python bench/router.py            # three students (SNIPS demo, BANKING77, CLINC150); ~15 min when the
                                                # retention benches' students exist, ~45 more if it must train them
    .venv/bin/python bench/router.py --smoke    # tiny students, 1 epoch: checks the script, not the numbers

For each student (trained on one dataset's in-scope intents, on its teacher's labels):
- **in-domain**: its own test split (never seen in training or calibration);
- **far OOD**: the *other* datasets' texts, minus the intents a user of this student would call in-scope (a voice
  assistant's 'weather' is CLINC150's 'weather': see ``EXCLUDE``, each line says why);
- **near OOD**: CLINC150's own out-of-scope test queries (``oos_test``, 1,000; Larson et al. 2019).

Every router is calibrated exactly as ``distill route calibrate`` does (``distill.serve.router.calibrate``): on the
validation split only, against the teacher's answers, coverage target 0.9, the library's default ``ood_keep``,
``delta`` and guaranteed threshold; the OOD statistics are fitted on the train split's inputs and the teacher's
labels. Then frozen and applied to test and the OOD sets. Signals: confidence only (max softmax probability,
Hendrycks & Gimpel 2017), energy (Liu et al. 2020), Mahalanobis on the last layer only (what the router did before
#16), Mahalanobis over every layer (Lee et al. 2018; the default), kNN on the frozen packaged MiniLM (Sun et al.
2022), and their combination.

Per student x signal: achieved coverage on in-domain test; the accuracy (vs gold and vs the teacher) of what the
student keeps; the routed system's accuracy vs gold next to the teacher's (teacher answers what is routed) and its
API cost share (routed share of in-domain requests; the student's own compute is not counted, see bench/cost.py);
per OOD set: recall (share routed), the share still answered, the share whose confidence alone passes the cut,
AUROC and FPR at 95% in-domain TPR of the OOD score alone. Latency the router adds per request at batch 1
(interleaved, same texts, torch student): the per-layer features over the plain forward pass, the scoring, and for
kNN the frozen encoder's pass.

Teachers: SNIPS, the demo's recorded Qwen2.5-Coder-1.5B; BANKING77/CLINC150, the recorded fine-tuned mpnet (issue
#15), its argmax over the student's intents. Data: examples/ (licences there).
"""

from __future__ import annotations

import argparse
import csv
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import retention_intents as RI  # noqa: E402  (the BANKING77/CLINC150 students and their projects)
from intent_teacher import read_teacher  # noqa: E402

COVERAGE = 0.9
OOD_CAP = 1000          # texts per OOD set (a seeded sample)
OOD_KEEP_SWEEP = (0.9, 0.95, 0.98, 0.99)
SIGNALS = {             # name -> RouterConfig settings (everything else: the library's defaults)
    "confidence_only": {"ood": "none"},
    "energy": {"ood": "energy"},
    "mahalanobis_last_layer": {"ood": "mahalanobis", "layers": [-1]},
    "mahalanobis": {"ood": "mahalanobis"},
    "mahalanobis_layers_2_4_6": {"ood": "mahalanobis", "layers": [2, 4, 6]},
    "knn_frozen_minilm": {"ood": "knn"},
    "combined": {"ood": "combined"},
}
# Far-OOD texts a user of the student would call in-scope are left out (an honest far-OOD set is out of scope):
EXCLUDE = {
    ("snips", "clinc150"): {"intents": ["weather", "play_music", "update_playlist", "what_song",
                                        "restaurant_reservation", "restaurant_suggestion", "restaurant_reviews",
                                        "confirm_reservation", "cancel_reservation", "accept_reservations",
                                        "how_busy"],
                            "why": "SNIPS serves GetWeather, PlayMusic, AddToPlaylist and BookRestaurant"},
    ("banking77", "clinc150"): {"domains": ["banking", "credit_cards"], "intents": ["exchange_rate", "direct_deposit"],
                                "why": "BANKING77 is card and account banking; CLINC150's banking and credit-card "
                                       "domains, exchange rates and direct deposits are its topics"},
    ("clinc150", "snips"): {"intents": ["GetWeather", "PlayMusic", "AddToPlaylist", "BookRestaurant"],
                            "why": "CLINC150 has weather, play_music, update_playlist and restaurant_reservation"},
    ("clinc150", "banking77"): {"all": True,
                                "why": "every BANKING77 intent is a card/account question CLINC150's banking and "
                                       "credit-card domains cover: there is no far-OOD BANKING77 text for it"},
}


# ------------------------------------------------------------------------------------------------
# data


def _csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def pool_texts(dataset: str) -> list[dict]:
    """Every text of ``dataset`` usable as someone else's OOD input: {text, intent, domain}."""
    if dataset == "snips":
        return [{"text": r["text"], "intent": r["intent"], "domain": ""}
                for r in _csv(ROOT / "examples/snips-intents/snips_intents.csv")]
    if dataset == "banking77":
        return [{"text": r["text"], "intent": r["category"], "domain": ""} for r in _csv(ROOT / "examples/banking77/test.csv")]
    return [{"text": r["text"], "intent": r["intent"], "domain": r["domain"]}
            for r in _csv(ROOT / "examples/clinc150/clinc150_subset.csv") if r["split"] == "test" and r["intent"] != "oos"]


def ood_sets(student: str, cap: int) -> tuple[dict[str, list[str]], dict[str, str]]:
    """{set name: texts} for a student: far OOD from each other dataset (minus EXCLUDE), near = CLINC150 oos_test."""
    sets, notes = {}, {}
    rng = random.Random(0)
    for other in ("snips", "banking77", "clinc150"):
        if other == student:
            continue
        ex = EXCLUDE.get((student, other), {})
        name = f"far_{other}"
        if ex.get("all"):
            notes[name] = "not measured: " + ex["why"]
            continue
        rows = [r for r in pool_texts(other) if r["intent"] not in set(ex.get("intents", []))
                and r["domain"] not in set(ex.get("domains", []))]
        rng.shuffle(rows)
        sets[name] = [r["text"] for r in rows[:cap]]
        if ex:
            notes[name] = f"left out: {', '.join(ex.get('domains', []) + ex.get('intents', []))} ({ex['why']})"
    oos = [r["text"] for r in _csv(ROOT / "examples/clinc150/clinc150_subset.csv")
           if r["split"] == "test" and r["intent"] == "oos"]
    rng.shuffle(oos)
    sets["near_clinc150_oos"] = oos[:cap]
    return sets, notes


def snips_student(work: Path, smoke: bool) -> dict:
    """The demo's student (run_demo: import -> label -> filter -> train -> eval), and its splits from the store."""
    from distill.dataset import rows
    from distill.demo import run_demo
    from distill.project import Project
    from distill.recipes.train import train

    folder = work / ("retention-snips-smoke" if smoke else "retention-snips")
    if not (folder / "reports" / "report.json").exists():
        run_demo(folder, limit=150 if smoke else None, epochs=1 if smoke else None)
    project = Project.open(folder)
    try:
        teacher = project.spec.get_teacher().name
        rep = train(project, progress=False)                # the demo's finished run, reused
        data = rows(project, teacher, ("train", "validation", "test"), only_kept=False)
    finally:
        project.close()
    return {"path": rep.path, "run_id": rep.run_id, "teacher": f"{teacher} (recorded, examples/snips-intents)",
            "train": [(r.text, r.answer) for r in data if r.split == "train" and r.answer is not None],
            "validation": [(r.text, r.answer) for r in data if r.split == "validation" and r.answer is not None],
            "test": [(r.text, r.gold, r.answer) for r in data if r.split == "test"]}


def intents_student(dataset: str, work: Path, smoke: bool) -> dict:
    """The retention bench's distilled student (RI.build + train reuse its finished run), and the recording's
    rows: traffic (train), validation, test; the teacher's answer is its argmax over the student's intents."""
    from distill.recipes.train import train

    in_scope, _ = RI.read_rows(dataset, smoke)
    project, _ = RI.build(work / f"retention-{dataset}{'-smoke' if smoke else ''}", dataset, in_scope,
                          RI.student_config(dataset, smoke))
    try:
        rep = train(project, teacher=RI.TEACHER_NAME, overrides={"signal": RI.STUDENTS["distilled"]}, progress=False)
        labels = set(project.spec.label_names)
    finally:
        project.close()
    ids = {r["text"] for r in in_scope}

    def t_answer(r):
        probs = {k: v for k, v in r["probs"].items() if k in labels}
        return max(probs, key=probs.get)

    _, lines = read_teacher(dataset)
    lines = [r for r in lines if r["text"] in ids]
    return {"path": rep.path, "run_id": rep.run_id, "teacher": RI.teacher_info(dataset)["kind"],
            "train": [(r["text"], t_answer(r)) for r in lines if r["role"] == "traffic"],
            "validation": [(r["text"], t_answer(r)) for r in lines if r["role"] == "validation"],
            "test": [(r["text"], r["gold"], t_answer(r)) for r in lines if r["role"] == "test"]}


# ------------------------------------------------------------------------------------------------
# metrics


def auroc_fpr95(in_scores: np.ndarray, out_scores: np.ndarray) -> tuple[float, float]:
    """AUROC of separating OOD (positive, higher score) from in-domain, and the share of OOD inputs kept when the
    threshold keeps 95% of in-domain inputs (FPR@95, the usual OOD convention)."""
    from sklearn.metrics import roc_auc_score

    y = np.r_[np.zeros(len(in_scores)), np.ones(len(out_scores))]
    auc = float(roc_auc_score(y, np.r_[in_scores, out_scores]))
    t = np.quantile(in_scores, 0.95)
    return auc, float(np.mean(out_scores <= t))


def one_student(name: str, st: dict, sets: dict[str, list[str]], latency_n: int) -> dict:
    import torch

    from distill.fewshot import Embedder
    from distill.serve.router import DEFAULT_EMBEDDER, Router, RouterConfig, calibrate, fit_ood
    from distill.students.predictor import EncoderTorchPredictor

    pred = EncoderTorchPredictor(st["path"], device="cpu")
    labels = list(pred.labels)
    embed = Embedder(DEFAULT_EMBEDDER)
    texts = {"train": [t for t, _ in st["train"]], "validation": [t for t, _ in st["validation"]],
             "test": [t for t, _, _ in st["test"]], **sets}
    t0 = time.perf_counter()
    student = {k: pred.logits_and_layers(v, batch_size=64) for k, v in texts.items()}
    frozen = {k: embed(v) for k, v in texts.items()}
    features_s = time.perf_counter() - t0
    feats = {k: {"layers": student[k][1], "frozen": frozen[k]} for k in texts}
    gold = np.array([g for _, g, _ in st["test"]], dtype=object)
    t_test = np.array([a for _, _, a in st["test"]], dtype=object)
    s_test = np.array(labels, dtype=object)[student["test"][0].argmax(-1)]
    has_t = np.array([a is not None for a in t_test])

    out: dict = {"labels": len(labels), "rows": {k: len(v) for k, v in texts.items()}, "features_seconds": round(features_s, 1),
                 "teacher_accuracy_vs_gold": float(np.mean(t_test[has_t] == gold[has_t])) if has_t.any() else None,
                 "student_accuracy_vs_gold": float(np.mean(s_test == gold)), "signals": {}}
    routers = {}
    for sig, settings in SIGNALS.items():
        cfg = RouterConfig(labels=labels, **settings)
        stats = fit_ood(cfg, [a for _, a in st["train"]], student["train"][1], frozen["train"])
        cal = calibrate(None, feats["validation"], [a for _, a in st["validation"]], COVERAGE,
                        val_logits=student["validation"][0], labels=labels, settings=cfg, stats=stats)
        router = Router(cal, stats, embed=embed)
        routers[sig] = router

        def routed_and_scores(split: str):
            _, conf, ood = router.scores(student[split][0], feats[split])
            r = conf < cal.conf_threshold
            if cal.ood != "none":
                r |= ood > cal.ood_threshold
            return r, conf, (-conf if cal.ood == "none" else ood)

        r_test, conf_test, sc_test = routed_and_scores("test")
        kept = ~r_test
        # the plain cut (meets the target on validation only), for comparison with the guaranteed one served
        plain_kept = conf_test >= cal.plain_conf_threshold
        if cal.ood != "none":
            plain_kept &= sc_test <= cal.ood_threshold
        final = np.where(r_test & has_t, t_test, s_test)
        res = {
            "threshold_rule": cal.threshold_rule, "conf_threshold": cal.conf_threshold,
            "ood_threshold": None if cal.ood == "none" else cal.ood_threshold,
            "validation_coverage": cal.achieved_coverage, "guaranteed_coverage": cal.guaranteed_coverage,
            "achieved_coverage": float(kept.mean()),
            "plain_cut_coverage": float(plain_kept.mean()), "n_validation": cal.n_validation,
            "kept_accuracy_vs_gold": float(np.mean(s_test[kept] == gold[kept])) if kept.any() else None,
            "kept_agreement_with_teacher": (float(np.mean(s_test[kept & has_t] == t_test[kept & has_t]))
                                            if (kept & has_t).any() else None),
            "routed_system_accuracy_vs_gold": float(np.mean(final == gold)),
            "api_cost_share": float(r_test.mean()),
            "ood": {},
        }
        if out["teacher_accuracy_vs_gold"]:
            res["routed_over_teacher_accuracy"] = res["routed_system_accuracy_vs_gold"] / out["teacher_accuracy_vs_gold"]
        for s in sets:
            r, conf, sc = routed_and_scores(s)
            auc, fpr = auroc_fpr95(sc_test, sc)
            res["ood"][s] = {"n": len(r), "recall": float(r.mean()), "answered_share": float(1 - r.mean()),
                             "confident_share": float(np.mean(conf >= cal.conf_threshold)),
                             "auroc": auc, "fpr_at_95_tpr": fpr}
        out["signals"][sig] = res
        print(f"[{name}] {sig:24s} coverage {res['achieved_coverage']:.3f} "
              + " ".join(f"{s}={v['recall']:.3f}" for s, v in res["ood"].items()), file=sys.stderr)

    # where the default signal's routing budget goes: the OOD cut's share of in-domain validation (ood_keep)
    out["ood_keep_sweep"] = {}
    for keep in OOD_KEEP_SWEEP:
        cfg = RouterConfig(labels=labels, ood_keep=keep)
        stats = fit_ood(cfg, [a for _, a in st["train"]], student["train"][1])
        cal = calibrate(None, feats["validation"], [a for _, a in st["validation"]], COVERAGE,
                        val_logits=student["validation"][0], labels=labels, settings=cfg, stats=stats)
        router = Router(cal, stats)

        def routed(split: str):
            _, conf, ood = router.scores(student[split][0], feats[split])
            return (conf < cal.conf_threshold) | (ood > cal.ood_threshold)
        out["ood_keep_sweep"][str(keep)] = {
            "threshold_rule": cal.threshold_rule, "achieved_coverage": float(1 - routed("test").mean()),
            **{f"{s}_recall": float(routed(s).mean()) for s in sets}}

    # latency the router adds per request, batch 1, interleaved on the same texts
    torch.set_num_threads(max(1, torch.get_num_threads()))
    lat = {k: [] for k in ("forward_plain", "forward_layers", "frozen_encoder",
                           *(f"score_{s}" for s in SIGNALS))}
    xs = texts["test"]
    for i in range(latency_n):
        x = [xs[i % len(xs)]]
        t = time.perf_counter()
        pred.logits_and_embeddings(x, batch_size=1)
        lat["forward_plain"].append(time.perf_counter() - t)
        t = time.perf_counter()
        lo, la = pred.logits_and_layers(x, batch_size=1)
        lat["forward_layers"].append(time.perf_counter() - t)
        t = time.perf_counter()
        fz = embed(x)
        lat["frozen_encoder"].append(time.perf_counter() - t)
        for sig, router in routers.items():
            t = time.perf_counter()
            router.scores(lo, {"layers": la, "frozen": fz})      # softmax, confidence, OOD score
            lat[f"score_{sig}"].append(time.perf_counter() - t)
    p50 = {k: float(np.median(v)) * 1000 for k, v in lat.items()}
    # the per-layer features' extra cost: median of the paired per-request differences (robust to load spikes)
    layers_ms = max(0.0, float(np.median(np.subtract(lat["forward_layers"], lat["forward_plain"]))) * 1000)
    out["layer_features_extra_ms"] = layers_ms
    out["latency_ms_p50"] = p50
    out["router_added_ms"] = {
        sig: p50[f"score_{sig}"] + (layers_ms if RouterConfig(**SIGNALS[sig]).needs_layers else 0.0)
        + (p50["frozen_encoder"] if RouterConfig(**SIGNALS[sig]).needs_frozen else 0.0)
        for sig in SIGNALS}
    out["latency_samples"] = latency_n
    return out


def lm_student(project_dir: Path, cap: int) -> dict:
    """An extract/generate project's served GGUF student with its calibrated LM router (lm_router.json, as `distill
    route calibrate` wrote it): the share routed of its own test inputs and of the SNIPS student's OOD sets (the
    slot-filling task is SNIPS), each input generated as the service does (schema grammar, answer log-probs, the
    prompt's hidden state for the kNN signal)."""
    from distill.dataset import rows
    from distill.errors import DistillError
    from distill.project import Project
    from distill.serve.lm_router import LMRouter, gguf_folder
    from distill.students.gguf_engine import GGUFStudent
    from distill.task import render_messages

    project = Project.open(project_dir)
    try:
        spec = project.spec
        try:
            folder = gguf_folder(project)
        except DistillError:
            # no serving model (e.g. never evaluated): the newest GGUF export that has a calibrated router
            cands = sorted((d for d in (project_dir / "exports").glob("*") if (d / "lm_router.json").is_file()),
                           key=lambda d: d.stat().st_mtime)
            if not cands:
                raise
            folder = cands[-1]
        router = LMRouter.load(folder)
        tspec = spec.get_teacher()
        test = [r.text for r in rows(project, tspec.name, splits=("test",))]
    finally:
        project.close()
    schema = spec.json_schema if spec.kind == "extract" else None
    max_tokens = router.config.max_tokens or tspec.max_tokens
    sets, notes = ood_sets("snips", cap)
    student = GGUFStudent(folder, max_batch=4)
    out: dict = {"project": str(project_dir), "gguf": str(folder), "router": {
        k: getattr(router.config, k) for k in ("coverage", "threshold_rule", "achieved_coverage", "n_validation",
                                               "n_reference", "signals", "ood_keep", "k", "confidence",
                                               "ood_source", "embedder")},
        "ood_notes": notes, "sets": {}}
    try:
        for name, texts in {"in_domain_test": test, **sets}.items():
            futs = [student.engine.submit(student.request(render_messages(spec, t), max_tokens, schema=schema,
                                                          want_embedding=router.needs_embedding)) for t in texts]
            reasons: dict[str, int] = {}
            for t, f in zip(texts, futs):
                d = router.decide(f.result(), t) if router.needs_text else router.decide(f.result())
                reasons[d.reason] = reasons.get(d.reason, 0) + 1
            routed = sum(v for k, v in reasons.items() if k != "confident")
            out["sets"][name] = {"n": len(texts), "routed": routed / max(len(texts), 1), "reasons": reasons}
            print(f"[lm] {name}: routed {routed / max(len(texts), 1):.3f} {reasons}", file=sys.stderr)
    finally:
        student.close()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--work", type=Path, default=HERE / ".work")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--students", default="snips,banking77,clinc150")
    ap.add_argument("--latency-samples", type=int, default=200)
    ap.add_argument("--lm-project", type=Path, help="also measure an extract/generate project's GGUF student and its "
                                                    "calibrated LM router (SNIPS slots: its OOD sets are the SNIPS "
                                                    "student's), e.g. the lm-serve suite's project")
    ap.add_argument("--lm-cap", type=int, default=300, help="OOD texts per set for the LM student (generation is slow)")
    a = ap.parse_args(argv)

    from distill.runinfo import bench_result, environment, target, write_json_atomic
    from distill.serve.router import RouterConfig

    env0, t0 = environment(), time.perf_counter()
    out = a.out or (Path(tempfile.gettempdir()) / "router_smoke.json" if a.smoke else HERE / "results" / "router.json")
    if a.smoke:
        RI.MIN_SEGMENT = 5
    cap = 60 if a.smoke else OOD_CAP
    results, notes = {}, {}
    for name in [s.strip() for s in a.students.split(",") if s.strip()]:
        st = snips_student(a.work, a.smoke) if name == "snips" else intents_student(name, a.work, a.smoke)
        sets, notes[name] = ood_sets(name, cap)
        results[name] = {"student_run": st["run_id"], "teacher": st["teacher"], "ood_notes": notes[name],
                         **one_student(name, st, sets, 20 if a.smoke else a.latency_samples)}

    lm = lm_student(a.lm_project, a.lm_cap) if a.lm_project else None
    default = RouterConfig()
    # the SIGNALS entry whose settings are the library's defaults
    dsig = next(name for name, settings in SIGNALS.items()
                if all(getattr(default, k) == v for k, v in settings.items())
                and (default.layers is None) == ("layers" not in settings))
    far = [v["recall"] for r in results.values() for s, v in r["signals"][dsig]["ood"].items() if s.startswith("far_")]
    cov = [r["signals"][dsig]["achieved_coverage"] for r in results.values()]
    clinc_oos = (results.get("clinc150") or {}).get("signals", {}).get(dsig, {}).get("ood", {}).get("near_clinc150_oos")
    lat = [r["router_added_ms"][dsig] for r in results.values()]
    ratios = {
        "far_ood_recall_at_0.9_min": min(far) if far else None,
        "clinc_oos_recall_at_0.9": clinc_oos["recall"] if clinc_oos else None,
        "achieved_coverage_max_abs_error": max(abs(c - COVERAGE) for c in cov) if cov else None,
        "router_added_ms_max": max(lat) if lat else None,
    }
    for name, r in results.items():
        for sig, s in r["signals"].items():
            far_s = [v["recall"] for k, v in s["ood"].items() if k.startswith("far_")]
            ratios[f"{name}.{sig}.far_ood_recall_min"] = min(far_s) if far_s else None
            ratios[f"{name}.{sig}.near_oos_recall"] = s["ood"]["near_clinc150_oos"]["recall"]
            ratios[f"{name}.{sig}.achieved_coverage"] = s["achieved_coverage"]
            ratios[f"{name}.{sig}.routed_over_teacher_accuracy"] = s.get("routed_over_teacher_accuracy")
    if lm:
        for set_name, v in lm["sets"].items():
            ratios[f"lm_student.{set_name}.routed"] = v["routed"]
    targets = [
        target(f"far-OOD recall at coverage 0.9, every student and far set (default signal: {dsig})",
               ratios["far_ood_recall_at_0.9_min"], ">=", 0.95),
        target("CLINC150 out-of-scope recall at coverage 0.9, CLINC150 student (published best ~0.66 on this split)",
               ratios["clinc_oos_recall_at_0.9"], ">=", 0.85),
        target("|achieved coverage on test - 0.9|, every student", ratios["achieved_coverage_max_abs_error"], "<=", 0.02),
        target("latency the router adds per request, batch 1 (ms), every student", ratios["router_added_ms_max"],
               "<=", 0.5, "torch student; per-layer features over the plain forward pass + scoring (+ the frozen "
                          "encoder for knn/combined)"),
    ]
    result = bench_result(
        "router", smoke=a.smoke, started=t0, environment_start=env0,
        config={"coverage": COVERAGE, "default_signal": dsig, "router_defaults": {
                    k: getattr(default, k) for k in ("ood", "layers", "ood_keep", "delta", "guarantee", "k", "embedder",
                                                     "confidence")},
                "signals": SIGNALS, "ood_cap": cap, "exclusions": {f"{a_}->{b_}": v for (a_, b_), v in EXCLUDE.items()}},
        results={**results, **({"lm_student": lm} if lm else {})}, ratios=ratios, targets=targets)
    write_json_atomic(out, result)
    for t in targets:
        print(f"{t['name']}: {t['measured']} ({t['target']}) {'met' if t['met'] else 'MISSED'}", file=sys.stderr)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
