"""`distill bench`: run the benchmark suites of a distill checkout side by side and summarise them.

    distill bench                      # every suite, full size (~1 h on a 2-core CPU); JSON in bench/results/
    distill bench latency router       # some suites
    distill bench --smoke              # every suite, reduced (~3 min): checks that each runs and that its JSON
                                       # has the shape below; results go to bench/.work/smoke/, not results/

The suites are the scripts in ``bench/`` of the repository (they need its example datasets, so `distill bench`
runs from a clone, like the README's commands). Each runs in its own process -- a crash or an out-of-memory in
one does not take the others down, and each process's peak memory is its own -- and writes one JSON file with
the envelope of ``distill.runinfo.bench_result``: config, package versions, git SHA, CPU model and flags,
load average at start and end, the suite's results, every ratio it measured (``ratios``) and the targets of
the bench issue with the measured value and whether each was met (``targets``). This module checks that
envelope (``check_result``) and prints one table of all ratios and targets.

Suites run in the order below; ``cost`` comes last because it prices the latency and router results written
by this same run (it refuses results from another git SHA).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from distill.errors import DistillError
from distill.runinfo import BENCH_KEYS


@dataclass(frozen=True)
class Suite:
    name: str
    script: str          # path inside the repository
    result: str          # file name in the output folder
    what: str


SUITES: tuple[Suite, ...] = (
    Suite("labelling", "bench/labelling_throughput.py", "labelling_throughput.json",
          "labelling RPM achieved / limit against a loopback server with 429s; cache-hit rerun = 0 calls"),
    Suite("scale", "bench/scale.py", "scale.json",
          "volume: import, plan, label and plan again 100K and 1M synthetic inputs against the loopback server; "
          "seconds and peak RSS per stage, peak RSS 1M / 100K, labelling rate / RPM limit at 1M"),
    Suite("training", "bench/training_throughput.py", "training_throughput.json",
          "our training vs a plain Hugging Face Trainer: samples/s and peak RSS (encoder and LoRA LM)"),
    Suite("latency", "bench/latency.py", "latency.json",
          "student torch fp32 / ORT fp32 / ORT int8 vs the teacher, batch 1 and 32, same CPU"),
    Suite("retention-snips", "bench/retention_snips.py", "retention_snips.json",
          "SNIPS demo task with a real local teacher: student vs teacher vs gold-trained vs TF-IDF"),
    Suite("filters", "bench/filters.py", "filters.json",
          "SNIPS demo: no label filter vs the gold-free suspect-label filter vs teacher confidence vs the gold "
          "filter: drops vs the teacher's real errors, student accuracy, share of the gold filter's gain recovered"),
    Suite("retention", "bench/retention_intents.py", "retention_intents.json",
          "BANKING77 and CLINC150 with a real teacher (fine-tuned mpnet, recorded): distilled vs hard-label vs "
          "gold-trained students vs TF-IDF vs the teacher, worst segment, CIs"),
    Suite("router", "bench/router.py", "router.json",
          "router OOD matrix: SNIPS, BANKING77 and CLINC150 students x six OOD signals; far-OOD (the other "
          "datasets) and near-OOD (CLINC150 oos) recall at coverage 0.9, AUROC, FPR@95, achieved coverage, "
          "routed quality, router latency"),
    Suite("router-clinc150", "bench/router_clinc150.py", "router_clinc150.json",
          "CLINC150 router against the real teacher: coverage -> quality curve, OOS recall, routed quality and "
          "cost vs the teacher"),
    Suite("lm-serve", "bench/lm_serve.py", "lm_serve.json",
          "SNIPS-slots LM student: GGUF vs merged parity, schema-valid served answers, routed field F1 and cost "
          "vs the teacher, HTTP vs in-process throughput"),
    Suite("teacher-fewshot", "bench/teacher_fewshot.py", "teacher_fewshot.json",
          "few-shot teacher prompts: Qwen-1.5B field F1 on SNIPS slots with 0/4/8 retrieved demonstrations, "
          "BANKING77 accuracy with a retrieved shortlist"),
    Suite("lm-pair", "bench/lm_pair.py", "lm_pair.json",
          "Qwen2.5-Coder-0.5B + LoRA distilled from Qwen2.5-Coder-1.5B (8-shot) on SNIPS slots: SFT vs sparse "
          "top-k KD vs the untuned base vs the teacher, field F1 with CIs"),
    Suite("serve", "bench/serve.py", "serve.json",
          "distill serve (demo student, int8 ONNX, calibrated router) under autocannon at 1/4/16/64 connections vs "
          "raw onnxruntime in-process vs a FastAPI + transformers.pipeline server; soak at 80% of peak: errors, RSS"),
    Suite("cost", "bench/cost.py", "cost.json",
          "cost per 1M requests: teacher only vs routed vs student only, from this run's measurements"),
)
BY_NAME = {s.name: s for s in SUITES}


def repo_root(start: Path | None = None) -> Path:
    """The checkout that holds ``bench/``: the current directory or a parent of it, else the one this
    package was installed from in editable mode."""
    where = (start or Path.cwd()).resolve()
    for c in (where, *where.parents, Path(__file__).resolve().parents[2]):
        if (c / "bench" / "latency.py").exists() and (c / "src" / "distill").exists():
            return c
    raise DistillError("`distill bench` runs the benchmark scripts of a distill checkout, and none was found "
                       "here or above", hint="cd into your clone of the distill repository")


def check_result(obj: Any, suite: str | None = None) -> list[str]:
    """Problems with one result JSON's shape ([] = fine). Shape, not speed: smoke runs on tiny models must
    pass it too."""
    if not isinstance(obj, dict):
        return ["not a JSON object"]
    bad = [f"missing key '{k}'" for k in BENCH_KEYS if k not in obj]
    if bad:
        return bad
    if suite and obj["bench"] != suite:
        bad.append(f"'bench' is {obj['bench']!r}, expected {suite!r}")
    env = obj["environment"]
    for k in ("git_sha", "versions", "cpu", "load_average"):
        if not isinstance(env, dict) or k not in env:
            bad.append(f"environment lacks '{k}'")
    if isinstance(env, dict) and isinstance(env.get("cpu"), dict) and not env["cpu"].get("flags"):
        bad.append("environment.cpu lacks the CPU flags")
    if not isinstance(obj["ratios"], dict) or not obj["ratios"]:
        bad.append("'ratios' must be a non-empty object")
    else:
        for k, v in obj["ratios"].items():
            if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v)):
                bad.append(f"ratio '{k}' is {v!r}, not a finite number or null")
    if not isinstance(obj["targets"], list):
        bad.append("'targets' must be a list")
    else:
        for t in obj["targets"]:
            if not isinstance(t, dict) or not {"name", "target", "measured", "met"} <= set(t):
                bad.append(f"target {t!r} lacks name/target/measured/met")
            elif t["measured"] is None and t["met"] is not None:
                bad.append(f"target '{t['name']}' is marked met={t['met']} without a measured value")
    if not isinstance(obj["results"], dict) or not obj["results"]:
        bad.append("'results' must be a non-empty object")
    return bad


@dataclass
class SuiteRun:
    suite: Suite
    out: Path
    returncode: int
    seconds: float
    problems: list[str]
    result: dict | None


def run_suites(names: list[str] | None = None, *, smoke: bool = False, out_dir: Path | None = None,
               root: Path | None = None, say: Callable[[str], None] = print) -> list[SuiteRun]:
    root = root or repo_root()
    unknown = [n for n in names or [] if n not in BY_NAME]
    if unknown:
        raise DistillError(f"unknown bench suite(s) {unknown}", hint="choose from: " + ", ".join(BY_NAME))
    chosen = [s for s in SUITES if not names or s.name in names]
    out_dir = Path(out_dir) if out_dir else root / "bench" / (".work/smoke" if smoke else "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    runs: list[SuiteRun] = []
    for s in chosen:
        out = out_dir / s.result
        cmd = [sys.executable, str(root / s.script), "--out", str(out), *(["--smoke"] if smoke else [])]
        if s.name == "cost":
            cmd += ["--inputs", str(out_dir)]
        say(f"bench {s.name}: {s.what}\n  $ {' '.join(cmd[1:])}")
        before = out.stat().st_mtime if out.exists() else None
        t0 = time.perf_counter()
        # each suite in its own process; its output streams through so a long run shows progress
        rc = subprocess.call(cmd, cwd=root, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        secs = time.perf_counter() - t0
        result, problems = None, []
        if rc != 0:
            problems.append(f"exited with code {rc}")
        if not out.exists() or (before is not None and out.stat().st_mtime == before):
            problems.append(f"wrote no result to {out}")
        else:
            try:
                result = json.loads(out.read_text())
            except json.JSONDecodeError as e:
                problems.append(f"{out} is not valid JSON: {e}")
            else:
                problems += check_result(result, Path(s.result).stem)
                if bool(result.get("smoke")) != smoke:
                    problems.append(f"'smoke' is {result.get('smoke')!r} in a {'smoke' if smoke else 'full'} run")
        runs.append(SuiteRun(s, out, rc, secs, problems, result))
        say(f"bench {s.name}: {'ok' if not problems else 'FAILED: ' + '; '.join(problems)} ({secs:.0f} s)")
    return runs


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def summary(runs: list[SuiteRun]) -> str:
    """Plain-text table of every ratio and target of the runs."""
    lines = []
    for r in runs:
        lines.append(f"{r.suite.name} ({r.seconds:.0f} s){'' if not r.problems else '  FAILED'}")
        if not r.result:
            continue
        for k, v in r.result["ratios"].items():
            lines.append(f"  {k:<58} {_fmt(v)}")
        for t in r.result["targets"]:
            mark = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
            lines.append(f"  target: {t['name']} {t['target']}: {_fmt(t['measured'])} -> {mark}")
    return "\n".join(lines)
