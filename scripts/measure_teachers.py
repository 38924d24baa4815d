"""Measure a candidate local teacher: zero-shot accuracy vs gold, seconds per input, peak RSS.

    python scripts/measure_teachers.py --model smollm2-135m-instruct --n 40
    python scripts/measure_teachers.py --model qwen2.5-coder-1.5b-instruct --n 40
    python scripts/measure_teachers.py --from-recording examples/snips-intents/teacher_qwen2.5-coder-1.5b.jsonl

One model per process, so ``ru_maxrss`` is that model's peak. Inputs are a seeded random sample of the
upstream SNIPS test files (``validate_<Intent>.json``), rendered with the SNIPS demo's distill.yaml, i.e.
exactly the prompt the demo's teacher sees, and scored by ``LocalTeacher`` (label scoring, see
distill/teachers/local.py). ``--from-recording`` scores a recording made by record_teacher.py against the
gold intents of the demo CSV instead (no model is run; latencies are the recorded ones).

Each run appends one result to bench/results/teacher_candidates.json; existing results are never edited.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import datetime as dt
import json
import math
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SNIPS = Path("/work/shared/datasets/snips_nlu_benchmark_2017")
DEMO = ROOT / "examples" / "snips-intents"
OUT = ROOT / "bench" / "results" / "teacher_candidates.json"

sys.path.insert(0, str(DEMO))
from make_csv import INTENTS, read_utterances  # noqa: E402  (the demo's own reader of the upstream files)

from distill.runinfo import write_json_atomic  # noqa: E402
from distill.task import load_spec, render_messages  # noqa: E402
from distill.teachers.base import TeacherRequest  # noqa: E402


def wilson(k: int, n: int, z: float = 1.959964) -> list[float]:
    """95% Wilson score interval for k successes out of n (Wilson 1927)."""
    if n == 0:
        return [0.0, 1.0]
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)]


def run_info() -> dict:
    import torch
    import transformers

    try:
        sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain"], capture_output=True,
                                    text=True).stdout.strip())
    except OSError:
        sha, dirty = "unknown", None
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "unknown")
    return {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "git_sha": sha,
            "git_dirty": dirty, "cpu": cpu, "cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "torch_threads": torch.get_num_threads()}


def snips_test_sample(n: int, seed: int) -> list[tuple[str, str]]:
    pool = [(text, intent) for intent in INTENTS
            for text in read_utterances(SNIPS / intent / f"validate_{intent}.json", intent)]
    return random.Random(seed).sample(pool, n)


def measure_model(model: str, n: int, seed: int) -> dict:
    from distill.teachers.local import LocalTeacher
    from distill.task import TeacherSpec

    spec = load_spec(DEMO / "distill.yaml")
    from distill.models import converted_dir, resolve_model

    resolved = resolve_model(model)
    # a first load also joins/hashes the parts and converts the GGUF: slower and a higher RSS peak
    converted_now = resolved.gguf is not None and not (converted_dir(resolved) / "config.json").exists()
    teacher = LocalTeacher(TeacherSpec(name=model, kind="local", path=model), None)
    t0 = time.perf_counter()
    teacher.load()
    load_s = time.perf_counter() - t0
    load_before = os.getloadavg()
    right, lat, per_intent = 0, [], {}
    t0 = time.perf_counter()
    for i, (text, gold) in enumerate(snips_test_sample(n, seed), start=1):
        msgs = render_messages(spec, text, segment=None)
        reply = asyncio.run(teacher.ask(TeacherRequest(key=str(i), messages=msgs, kind="classify",
                                                       labels=spec.label_names)))
        ok = reply.texts[0] == gold
        right += ok
        lat.append(reply.latency_s)
        k = per_intent.setdefault(gold, [0, 0])
        k[0] += ok
        k[1] += 1
        print(f"{i}/{n} acc={right / i:.3f} {reply.latency_s:.2f}s", flush=True)
    wall = time.perf_counter() - t0
    return {
        "teacher": teacher.resolved.upstream, "model": model, "package": teacher.resolved.package,
        "weights_sha256": teacher.resolved.sha256, "task": "SNIPS 7 intents (validate_<I>.json, upstream test set)",
        "config": {"n": n, "seed": seed, "prompt": "examples/snips-intents/distill.yaml (default classify template)",
                   "method": "summed log-prob of label + end-of-turn, argmax", "device": str(teacher.model.device),
                   "dtype": str(teacher.model.dtype)},
        "n": n, "correct": right, "accuracy": round(right / n, 4), "accuracy_95ci_wilson": wilson(right, n),
        "per_intent_correct_of_n": per_intent,
        "seconds_per_input_mean": round(statistics.mean(lat), 3),
        "seconds_per_input_median": round(statistics.median(lat), 3),
        "wall_seconds": round(wall, 1), "load_seconds": round(load_s, 1), "load_included_gguf_conversion": converted_now,
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2, 2),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }


def _vm_hwm_gb(pid: int) -> float | None:
    """Peak resident set of a running process (Linux /proc), e.g. the recorder before it is stopped."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024 ** 2, 2)
    return None


def measure_recording(path: Path, recorder_pid: int | None = None) -> dict:
    gold = {r["id"]: r["intent"] for r in csv.DictReader(open(DEMO / "snips_intents_all.csv", newline="", encoding="utf-8"))}
    lines = [json.loads(ln) for ln in open(path, encoding="utf-8") if ln.strip()]
    prov, recs = lines[0]["provenance"], lines[1:]
    right = sum(r["reply"]["texts"][0] == gold[r["id"]] for r in recs)
    lat = [r["reply"]["latency_s"] for r in recs]
    seg = {}
    rows = {r["id"]: r for r in csv.DictReader(open(DEMO / "snips_intents_all.csv", newline="", encoding="utf-8"))}
    for r in recs:
        s = seg.setdefault(rows[r["id"]]["length"], [0, 0])
        s[0] += r["reply"]["texts"][0] == gold[r["id"]]
        s[1] += 1
    n = len(recs)
    return {
        "teacher": prov["model"], "model": prov["teacher"], "package": prov["package"],
        "weights_sha256": prov["sha256"], "task": "SNIPS 7 intents, the recorded part of the demo sample "
        "(snips_intents_all.csv: train_<I>_full + validate_<I>), scored from the recording",
        "config": {"recording": str(path.relative_to(ROOT)), "recording_provenance": prov},
        "n": n, "correct": right, "accuracy": round(right / n, 4), "accuracy_95ci_wilson": wilson(right, n),
        "per_length_segment_correct_of_n": seg,
        "seconds_per_input_mean": round(statistics.mean(lat), 3),
        "seconds_per_input_median": round(statistics.median(lat), 3),
        "peak_rss_gb": _vm_hwm_gb(recorder_pid) if recorder_pid else None,
        "note": "latencies as recorded (CPU shared with other jobs, load average 3-12); peak RSS is the "
                "recorder process's VmHWM" if recorder_pid else "latencies as recorded; RSS not recorded",
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="packaged model name or path")
    ap.add_argument("--from-recording", type=Path)
    ap.add_argument("--recorder-pid", type=int, help="with --from-recording: read the live recorder's peak RSS")
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    info = run_info()
    result = measure_recording(args.from_recording.resolve(), args.recorder_pid) if args.from_recording else \
        measure_model(args.model, args.n, args.seed)
    result["run_info"] = info
    data = json.loads(args.out.read_text()) if args.out.exists() else {
        "about": "Zero-shot local teacher candidates, measured by scripts/measure_teachers.py on this machine. "
                 "Appended, never edited.", "results": []}
    data["results"].append(result)
    write_json_atomic(args.out, data)
    print(json.dumps({k: result[k] for k in ("teacher", "n", "accuracy", "accuracy_95ci_wilson",
                                             "seconds_per_input_mean", "peak_rss_gb")}))


if __name__ == "__main__":
    main()
