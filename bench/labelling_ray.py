"""Labelling with a local teacher on Ray actors: 2 actors vs 1, side by side in one run (and in-process).

    .venv/bin/python bench/labelling_ray.py            # ~8 min: SmolLM2-135M (packaged GGUF), 192 SNIPS inputs x 3 rounds
    .venv/bin/python bench/labelling_ray.py --smoke    # ~1 min: a tiny random LM; writes to a temp file unless --out

Writes its section into ``bench/results/labelling_throughput.json`` (the `labelling` suite's file): the results
under ``results.ray_local_teacher``, the ratios as ``ray_*`` and the targets named ``ray: ...``, replacing only
those; ``labelling_throughput.py`` carries them over when it rewrites the file.

Setup: one local Ray (loopback, no dashboard, num_cpus = this machine's cores) started by this script, so the
arms pay the actors' start (model load) but not Ray's own; that is measured once, separately. The teacher is
the classify teacher of the SNIPS intents demo (7 labels) with SmolLM2-135M-Instruct as the model (the
real packaged small model; the demo's 1.5B teacher would take ~2 s per input). Arms, each on its own copy of
the project (a fresh store, the same inputs):
- ``ray_1``: `distill label --engine ray --actors 1` (1 CPU, 1 torch thread);
- ``ray_2``: ``--actors 2`` (1 CPU, 1 torch thread each);
- ``inprocess``: plain `distill label` (one model, torch's default threads), once, for reference.
Rounds alternate the order of the Ray arms (1,2 then 2,1, ...) so load that drifts during the run hits both;
each round's ratio is kept with its load average (``per_round``).
Throughput per arm: ``steady`` = answers after the first batch / (last answer - first answer) (the
actors are all started before the first batch: Ray Data's ``wait_for_min_actors_s``), and ``end_to_end`` =
labels / the whole call (actor start and model load included). Answers of all arms must be identical.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "tests" / "unit"))   # tiny_lm, for --smoke

from distill.labeling import label  # noqa: E402
from distill.project import Project  # noqa: E402
from distill.ray_label import RayConfig, label_ray  # noqa: E402
from distill.runinfo import bench_result, environment, target, versions, write_json_atomic  # noqa: E402

RESULT = HERE / "results" / "labelling_throughput.json"
SNIPS = REPO / "examples" / "snips-intents"


def make_project(root: Path, model: str, texts: list[str]) -> Project:
    """The SNIPS intents task (labels and descriptions from the demo's distill.yaml) with a local teacher."""
    import yaml

    demo = yaml.safe_load((SNIPS / "distill.yaml").read_text())
    labels = "".join(f"  - name: {lab['name']}\n    description: {lab['description']}\n" for lab in demo["labels"])
    spec = (f"name: snips-ray\nkind: classify\ndescription: \"{demo['description']}\"\nlabels:\n{labels}"
            f"teachers:\n  - name: local\n    kind: local\n    path: {model}\n    device: cpu\n"
            "    terms: {outputs_may_train_models: true}\n")
    project = Project.init(root, "classify", spec_text=spec)
    with project.store.tx() as c:
        for i, text in enumerate(texts):
            c.execute("INSERT INTO examples(id, text, norm, split, created_at) VALUES(?,?,?,?,?)",
                      (f"ex{i:05d}", text, f"{text.lower()} {i}", "train", time.time()))
    return project


def answers(project: Project) -> dict[str, str]:
    return {r["example_id"]: r["answer"] for r in project.store.q("SELECT example_id, answer FROM labels")}


def ray_arm(work: Path, name: str, model: str, texts: list[str], actors: int, batch_size: int) -> tuple[dict, dict]:
    project = make_project(work / name, model, texts)
    load0 = os.getloadavg()
    t0 = time.monotonic()
    rr = label_ray(project, config=RayConfig(actors=actors, batch_size=batch_size), progress=False)
    wall = time.monotonic() - t0
    r = rr.report
    window = (rr.last_answer_s or 0) - (rr.first_answer_s or 0)
    steady = (rr.answered - batch_size) / window if window > 0 else None
    out = {"actors": actors, "labelled_ok": r.ok, "failed": r.failed_by_reason, "calls": r.calls, "wall_s": round(wall, 3),
           "first_answer_s": rr.first_answer_s, "last_answer_s": rr.last_answer_s,
           "steady_labels_per_s": round(steady, 4) if steady else None,
           "end_to_end_labels_per_s": round(r.ok / wall, 4), "nodes": len(rr.node_ids),
           "loadavg_before": list(load0), "loadavg_after": list(os.getloadavg())}
    got = answers(project)
    project.close()
    return out, got


def inprocess_arm(work: Path, model: str, texts: list[str]) -> tuple[dict, dict]:
    project = make_project(work / "inprocess", model, texts)
    load0 = os.getloadavg()
    t0 = time.monotonic()
    r = label(project, progress=False)
    wall = time.monotonic() - t0
    out = {"labelled_ok": r.ok, "calls": r.calls, "wall_s": round(wall, 3),
           "end_to_end_labels_per_s": round(r.ok / wall, 4), "torch_threads": _torch_threads(),
           "loadavg_before": list(load0), "loadavg_after": list(os.getloadavg())}
    got = answers(project)
    project.close()
    return out, got


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def start_local_ray(object_store_mb: int) -> float:
    """The local Ray every arm shares, started as `distill label --engine ray` starts one; seconds taken."""
    import logging

    import ray

    t0 = time.monotonic()
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False,
             object_store_memory=object_store_mb << 20, _node_ip_address="127.0.0.1",
             logging_level=logging.WARNING, log_to_driver=False)
    return round(time.monotonic() - t0, 3)


def run(args: argparse.Namespace, work: Path) -> dict:
    import ray

    texts = [r["text"] for r in csv.DictReader((SNIPS / "snips_intents.csv").open())][: args.inputs]
    if args.smoke:
        from tiny_lm import save_tiny_base

        model = str(save_tiny_base(work / "tiny_model"))
    else:
        from distill.models import load_causal_lm

        model = "smollm2-135m-instruct"
        load_causal_lm(model, device="cpu")     # converts the GGUF once into the cache, outside every arm's time
    ray_start_s = start_local_ray(args.object_store_mb)
    arms: dict[str, list[dict]] = {"ray_1": [], "ray_2": []}
    got: dict[str, dict] = {}
    try:
        for rnd in range(args.rounds):
            order = (1, 2) if rnd % 2 == 0 else (2, 1)
            for actors in order:
                name = f"ray_{actors}"
                res, got[f"{name}#{rnd}"] = ray_arm(work, f"{name}_r{rnd}", model, texts, actors, args.batch_size)
                arms[name].append(res)
                print(f"round {rnd} {name}: {res['steady_labels_per_s']} labels/s steady, "
                      f"{res['end_to_end_labels_per_s']} end to end", flush=True)
    finally:
        ray.shutdown()
    inproc, got["inprocess"] = inprocess_arm(work, model, texts)
    print(f"inprocess: {inproc['end_to_end_labels_per_s']} labels/s end to end", flush=True)
    reference = got["inprocess"]
    agree = min(sum(a.get(k) == v for k, v in reference.items()) / len(reference) for a in got.values())

    def total_rate(name: str, key: str) -> float | None:
        # pooled over rounds: all answers / all seconds, so each round weighs by its own length
        rates = [a[key] for a in arms[name]]
        return None if any(r is None for r in rates) else round(len(rates) / sum(1 / r for r in rates), 4)

    # each round's own ratio, with the load it ran under: on a shared machine the spread says more than the mean
    per_round = [{"round": i, "ratio_2_over_1_steady": round(b["steady_labels_per_s"] / a["steady_labels_per_s"], 4)
                  if a["steady_labels_per_s"] and b["steady_labels_per_s"] else None,
                  "loadavg_1min": [a["loadavg_before"][0], b["loadavg_before"][0]]}
                 for i, (a, b) in enumerate(zip(arms["ray_1"], arms["ray_2"]))]
    steady = {n: total_rate(n, "steady_labels_per_s") for n in arms}
    e2e = {n: total_rate(n, "end_to_end_labels_per_s") for n in arms}
    ratio = round(steady["ray_2"] / steady["ray_1"], 4) if steady["ray_1"] and steady["ray_2"] else None
    ratios = {"ray_2_over_1_actors": ratio,
              "ray_2_over_1_actors_end_to_end": round(e2e["ray_2"] / e2e["ray_1"], 4),
              "ray_2_actors_over_inprocess_end_to_end": round(e2e["ray_2"] / inproc["end_to_end_labels_per_s"], 4),
              "ray_answers_equal_inprocess": round(agree, 4)}
    section = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "t0", "env0")} | {"model": model},
        "environment": args.env0, "environment_end": environment(), "ray_version": versions(("ray",))["ray"],
        "local_ray_start_s": ray_start_s, "cores": os.cpu_count(),
        "arms": {**arms, "inprocess": inproc},
        "steady_labels_per_s": steady, "end_to_end_labels_per_s": e2e, "per_round": per_round,
    }
    targets = [target("ray: answers equal to in-process labelling (share of inputs, every arm)", agree, ">=", 1.0,
                      "same keys and answers; scores may differ in float round-off only"),
               target("ray: 2 actors / 1 actor, steady labels/s", ratio, ">=", 1.5,
                      f"{os.cpu_count()} cores shared with other jobs: 2.0 is the ceiling")]
    return {"section": section, "ratios": ratios, "targets": targets}


def merge(out: Path, measured: dict, args: argparse.Namespace) -> dict:
    """The labelling suite's file with this script's parts replaced; a new envelope when there is none."""
    try:
        record = json.loads(out.read_text())
    except (OSError, json.JSONDecodeError):
        record = bench_result("labelling_throughput", smoke=args.smoke, config={}, results={}, ratios={},
                              targets=[], started=args.t0, environment_start=args.env0)
    record["results"]["ray_local_teacher"] = measured["section"]
    record["ratios"] = {k: v for k, v in record["ratios"].items() if not k.startswith("ray_")} | measured["ratios"]
    record["targets"] = [t for t in record["targets"] if not t["name"].startswith("ray:")] + measured["targets"]
    return record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="a tiny random LM and a few inputs (~1 min)")
    ap.add_argument("--inputs", type=int, default=192, help="SNIPS inputs per arm")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the two Ray arms, order alternated")
    ap.add_argument("--batch-size", type=int, default=8, help="inputs per actor call")
    ap.add_argument("--object-store-mb", type=int, default=256)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.smoke:
        args.inputs, args.rounds, args.batch_size = 24, 1, 4
    out = args.out or (Path(tempfile.gettempdir()) / "labelling_throughput.smoke.json" if args.smoke else RESULT)
    args.t0, args.env0 = time.perf_counter(), environment()
    work = Path(tempfile.mkdtemp(prefix="labelling_ray."))
    try:
        measured = run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_json_atomic(out, merge(out, measured, args))
    print(json.dumps(measured["ratios"], indent=2))
    print(f"wrote {out}")
    if measured["ratios"]["ray_answers_equal_inprocess"] < 1.0:
        sys.exit("the Ray arms answered differently from in-process labelling")


if __name__ == "__main__":
    main()
