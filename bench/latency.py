"""Latency suite: the encoder student (torch fp32, onnxruntime fp32, onnxruntime int8) vs the teacher it
replaces, on the same CPU, in one process, on the same texts.

    .venv/bin/python bench/latency.py          # ~4 min on 2 cores; writes bench/results/latency.json
    .venv/bin/python bench/latency.py --smoke  # SmolLM2-135M as the teacher, 3 rounds; a temp file unless --out

Texts: the SNIPS requests of the demo task (examples/snips-intents, the test split's kind of input).
Student: the packaged all-MiniLM-L6-v2 with the demo's 7-label head (random: the head is one small matmul,
so latency does not depend on training; a trained head's int8 parity is measured by `distill export`).
Teacher: the demo's teacher, Qwen2.5-Coder-1.5B-Instruct run locally with label scoring
(``distill.teachers.local``: one forward pass per input over the prompt after the cached system prompt,
plus the label trie) -- exactly what `distill label` runs. It answers one input at a time (the local
teacher serialises calls: two concurrent forwards on 2 cores are slower), so its batch-32 time per text
is its batch-1 time; that is stated, not measured twice.

Method: the student backends are interleaved round by round in a shuffled order (a load change hits all
alike), threads pinned to ``--threads`` everywhere (1 by default: on a shared 2-core VM OpenMP spin-waits
make 2-thread batch-1 latency 5-10x worse, which would measure the scheduler). The teacher is timed on
``--teacher-inputs`` texts after one warm-up call (which builds the prefix cache), then the student
backends are timed again on the same texts at batch 1, so both sides of the headline ratio were measured
minutes apart, not on different days. Ratios are of medians.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEMO = ROOT / "examples" / "snips-intents"


def _pct(v: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(v, q))


def _summary(v: list[float]) -> dict:
    return {"median_ms": statistics.median(v), "p95_ms": _pct(v, 95), "n": len(v)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds-b1", type=int, default=60)
    ap.add_argument("--rounds-b32", type=int, default=12)
    ap.add_argument("--teacher-inputs", type=int, default=12, help="texts the teacher answers (after 1 warm-up)")
    ap.add_argument("--teacher", default="qwen2.5-coder-1.5b-instruct", help="packaged causal LM or folder")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--smoke", action="store_true", help="SmolLM2-135M teacher, 3 rounds, 2 teacher inputs")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    if a.smoke:
        a.rounds_b1 = a.rounds_b32 = 3
        a.teacher_inputs = 2
        a.teacher = "smollm2-135m-instruct"
    out = a.out or (Path(tempfile.gettempdir()) / "latency_smoke.json" if a.smoke else HERE / "results" / "latency.json")

    import torch

    from distill.export.onnx import export_onnx
    from distill.runinfo import bench_result, environment, target, write_json_atomic
    from distill.students.classifier import ClassifierStudent
    from distill.students.predictor import OnnxPredictor
    from distill.task import TeacherSpec, load_spec, render_messages
    from distill.teachers.base import TeacherRequest
    from distill.teachers.local import LocalTeacher

    t_start, env0 = time.perf_counter(), environment()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    spec = load_spec(DEMO / "distill.yaml")
    with open(DEMO / "snips_intents.csv", newline="", encoding="utf-8") as f:
        pool = [r["text"] for r in csv.DictReader(f)]
    random.Random(0).shuffle(pool)
    need = 32 * a.rounds_b32 + a.rounds_b1 + a.teacher_inputs + 1
    pool = (pool * (need // len(pool) + 1))[:need]

    # -- student backends -------------------------------------------------------------------------------
    work = Path(tempfile.mkdtemp(prefix="bench_latency_"))
    student = ClassifierStudent.create("all-minilm-l6-v2", list(spec.label_names), device="cpu", max_length=64)
    model_dir = student.save(work / "final")
    exp = export_onnx(model_dir, work / "onnx")
    ort32 = OnnxPredictor(work / "onnx", int8=False, threads=a.threads)
    ort8 = OnnxPredictor(work / "onnx", int8=True, threads=a.threads)
    backends = {
        "torch_fp32": lambda xs: student.predict_proba(xs, batch_size=len(xs)),
        "ort_fp32": lambda xs: ort32.predict_proba(xs, batch_size=len(xs)),
        "ort_int8": lambda xs: ort8.predict_proba(xs, batch_size=len(xs)),
    }
    for fn in backends.values():      # warm-up: the first calls allocate and pick kernels
        fn(pool[:32])
        fn(pool[:1])

    def time_students(batches: list[list[str]]) -> dict[str, list[float]]:
        times: dict[str, list[float]] = {k: [] for k in backends}
        for r, xs in enumerate(batches):
            order = list(backends)
            random.Random(r).shuffle(order)
            for k in order:
                t = time.perf_counter()
                backends[k](xs)
                times[k].append((time.perf_counter() - t) * 1000)
        return times

    b1 = time_students([[x] for x in pool[: a.rounds_b1]])
    off = a.rounds_b1
    b32 = time_students([pool[off + 32 * i: off + 32 * (i + 1)] for i in range(a.rounds_b32)])

    # -- the teacher, then the students again on the teacher's texts ------------------------------------
    tspec = next(t for t in spec.teachers if t.kind == "local")
    tspec = TeacherSpec(**{**tspec.model_dump(), "path": a.teacher})
    teacher = LocalTeacher(tspec, None)
    t_load = time.perf_counter()
    teacher.load()
    t_load = time.perf_counter() - t_load
    t_texts = pool[-(a.teacher_inputs + 1):]

    def ask(text: str) -> float:
        req = TeacherRequest(key="bench", messages=render_messages(spec, text), kind="classify",
                             labels=list(spec.label_names))
        t = time.perf_counter()
        asyncio.run(teacher.ask(req))
        return (time.perf_counter() - t) * 1000

    ask(t_texts[0])                   # warm-up: builds the system-prompt KV cache
    teacher_ms = [ask(x) for x in t_texts[1:]]
    same_texts = time_students([[x] for x in t_texts[1:]])
    teacher.model = teacher.tokenizer = None      # free the 1.5B weights before the summaries

    # -- summaries and ratios ------------------------------------------------------------------------
    res_b1 = {k: _summary(v) for k, v in b1.items()}
    res_b32 = {k: {**_summary(v), "per_text_ms": statistics.median(v) / 32} for k, v in b32.items()}
    res_same = {k: _summary(v) for k, v in same_texts.items()}
    res_teacher = {**_summary(teacher_ms), "load_seconds": round(t_load, 1), "model": a.teacher,
                   "method": "label scoring, one input at a time (no batching): per text at batch 32 = batch 1"}
    t_med = res_teacher["median_ms"]
    ratios: dict[str, float | None] = {}
    for k in backends:
        ratios[f"teacher_over_{k}_b1"] = t_med / res_same[k]["median_ms"]
        ratios[f"teacher_over_{k}_b32_per_text"] = t_med / res_b32[k]["per_text_ms"]
    for k in ("ort_fp32", "ort_int8"):
        ratios[f"{k}_speedup_vs_torch_b1"] = res_b1["torch_fp32"]["median_ms"] / res_b1[k]["median_ms"]
        ratios[f"{k}_speedup_vs_torch_b32"] = res_b32["torch_fp32"]["median_ms"] / res_b32[k]["median_ms"]
    targets = [
        target("student (torch fp32) faster than the teacher, batch 1", ratios["teacher_over_torch_fp32_b1"], ">=", 20,
               "same texts, same CPU, same thread count"),
        target("student (ORT int8) faster than the teacher, batch 1", ratios["teacher_over_ort_int8_b1"], ">=", 20),
    ]
    result = bench_result(
        "latency", smoke=a.smoke, started=t_start, environment_start=env0,
        config={"texts": "examples/snips-intents/snips_intents.csv (SNIPS requests)", "threads": a.threads,
                "student": "all-minilm-l6-v2 + random 7-label head, max_length 64", "teacher": a.teacher,
                "teacher_spec": "examples/snips-intents/distill.yaml local teacher (label scoring)",
                "rounds_b1": a.rounds_b1, "rounds_b32": a.rounds_b32, "teacher_inputs": a.teacher_inputs,
                "onnx": {"opset": exp.opset, "quantization": "dynamic int8, per-channel weights"}},
        results={"student_batch_1": res_b1, "student_batch_32": res_b32, "student_batch_1_on_teacher_texts": res_same,
                 "teacher": res_teacher,
                 "sizes_bytes": {"torch": exp.torch_bytes, "onnx_fp32": exp.fp32_bytes, "onnx_int8": exp.int8_bytes}},
        ratios=ratios, targets=targets)
    write_json_atomic(out, result)
    print(f"teacher {t_med:.0f} ms/input; student b1 torch {res_same['torch_fp32']['median_ms']:.1f} ms, "
          f"int8 {res_same['ort_int8']['median_ms']:.1f} ms -> {ratios['teacher_over_torch_fp32_b1']:.0f}x / "
          f"{ratios['teacher_over_ort_int8_b1']:.0f}x; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
