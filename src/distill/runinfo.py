"""Facts about the run that every benchmark result and training record carries: package versions, git
SHA, CPU model and flags, load average. This machine is shared and noisy; without the load average a
number cannot be judged, and without versions and SHA it cannot be reproduced."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import hashlib
import json
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from distill.fsutil import write_text_atomic

PACKAGES = ("distill", "torch", "transformers", "peft", "accelerate", "datasets", "onnxruntime",
            "scikit-learn", "numpy", "httpx", "fastapi", "uvicorn")


def git_sha(cwd: Path | None = None) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd or Path(__file__).parent,
                             capture_output=True, text=True, timeout=5)
        sha = out.stdout.strip()
        if out.returncode != 0 or not sha:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=cwd or Path(__file__).parent, capture_output=True, text=True, timeout=5)
        return sha + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def versions(names=PACKAGES) -> dict[str, str | None]:
    out = {}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = None
    return out


def cpu() -> dict:
    info: dict = {"machine": platform.machine(), "cores": os.cpu_count()}
    try:
        text = Path("/proc/cpuinfo").read_text()
        for line in text.splitlines():
            if line.startswith("model name") and "model" not in info:
                info["model"] = line.split(":", 1)[1].strip()
            if line.startswith("flags") and "flags" not in info:
                flags = line.split(":", 1)[1].split()
                # the flags that matter for inference kernels; the full list is long and uninformative
                info["flags"] = sorted(f for f in flags if f.startswith(("avx", "fma", "amx", "sse4", "f16c")))
    except OSError:
        pass
    return info


def environment() -> dict:
    return {
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "git_sha": git_sha(),
        "versions": versions(),
        "cpu": cpu(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OPENBLAS_CORETYPE") if k in os.environ},
    }


def teacher_record(project: Any, teacher_name: str) -> dict[str, Any]:
    """The teacher's identity and terms (and the recording's sha256 for a replay teacher): the lineage every
    trained model carries, so a model can always say whose outputs it learned from and under which terms."""
    t = project.spec.get_teacher(teacher_name)
    rec: dict[str, Any] = {"identity": t.identity(), "terms": t.terms.model_dump()}
    if t.kind == "replay" and t.path:
        path = Path(t.path) if Path(t.path).is_absolute() else project.root / t.path
        rec["replay"] = {"path": t.path,
                         "sha256": hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None}
    return rec


# -- benchmark result files ----------------------------------------------------------------------------
# Every suite behind `distill bench` writes one JSON with this envelope (checked by distill.bench.check_result):
# the suite's own numbers go under "results"; every side-by-side ratio it measured under "ratios"; each
# target of the bench issue under "targets" with the measured value and whether it was met.
BENCH_KEYS = ("bench", "smoke", "command", "config", "environment", "environment_end", "wall_seconds",
              "results", "ratios", "targets")


def target(name: str, measured: float | None, op: str, bound: float, why: str = "") -> dict[str, Any]:
    """One target line: ``target("student speed-up vs teacher, batch 1", 271.0, ">=", 20)``. ``measured``
    None (not measured in this run) gives met None, never a pass."""
    if op not in (">=", "<="):
        raise ValueError(f"op must be '>=' or '<=', not {op!r}")
    met = None if measured is None else (measured >= bound if op == ">=" else measured <= bound)
    return {"name": name, "target": f"{op} {bound:g}", "measured": measured, "met": met, "why": why}


def bench_result(name: str, *, smoke: bool, config: dict, results: dict, ratios: dict[str, float | None],
                 targets: list[dict], started: float, environment_start: dict,
                 command: str | None = None) -> dict[str, Any]:
    """The envelope. ``started`` is a ``time.perf_counter()`` taken at the start of the suite and
    ``environment_start`` an ``environment()`` taken then (the load average at both ends is recorded:
    this machine is shared, and a ratio measured under load says so)."""
    return {
        "bench": name, "smoke": smoke,
        "command": command or " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "config": config, "environment": environment_start, "environment_end": environment(),
        "wall_seconds": round(time.perf_counter() - started, 2),
        "results": results, "ratios": ratios, "targets": targets,
    }


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON atomically (``distill.fsutil``): a killed bench never leaves half a file.
    Unlike ``fsutil.write_json_atomic`` a NaN is written as ``NaN``, as bench results always have been."""
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")
