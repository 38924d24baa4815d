"""Throughput and latency of `distill serve` (ONNX int8 backend) under bounded concurrent load, on loopback.

    .venv/bin/python bench/serve_throughput.py                     # ~1 min; writes bench/results/serve_throughput.json
    .venv/bin/python bench/serve_throughput.py --project DIR --seconds 20 --concurrency 8

Model: the CLINC150 student of bench/retention_intents.py (MiniLM, 150 intents) in ``bench/.work/retention-clinc150``,
exported to ONNX with dynamic int8 quantization (``distill.export.onnx.export_project``) if not yet exported.
No router.json is placed next to the export, so every request is answered by the student: this measures the
student path of the service (HTTP + JSON + micro-batcher + int8 model), not the teacher.

Method: start ``distill serve PROJECT --backend onnx --no-auth`` (loopback only) in a subprocess, wait for
/healthz, warm up for 2 s, then ``--concurrency`` httpx clients each send one ``POST /v1/classify`` with one
CLINC150 test query at a time (a closed loop: at most ``concurrency`` requests in flight) for ``--seconds``.
Latency is client-side wall time per request. Any non-200 answer or transport error counts as an error. The
service shares the 2 CPU cores with the load generator (and the machine with other jobs: see load_average).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def queries(n: int = 500) -> list[str]:
    with open(ROOT / "examples" / "clinc150" / "clinc150_subset.csv", newline="", encoding="utf-8") as f:
        rows = [r["text"] for r in csv.DictReader(f) if r["split"] == "test"]
    return rows[::max(1, len(rows) // n)][:n]


async def drive(url: str, texts: list[str], seconds: float, concurrency: int) -> dict:
    import httpx

    lat: list[float] = []
    errors: dict[str, int] = {}
    stop = time.perf_counter() + seconds

    async def worker(w: int, client: httpx.AsyncClient) -> None:
        i = w
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            try:
                r = await client.post(url, json={"texts": [texts[i % len(texts)]]})
                ok = r.status_code == 200 and len(r.json()["results"]) == 1
                key = None if ok else f"http_{r.status_code}"
            except (httpx.HTTPError, KeyError, ValueError) as e:
                key = type(e).__name__
            if key is None:
                lat.append(time.perf_counter() - t0)
            else:
                errors[key] = errors.get(key, 0) + 1
            i += concurrency

    t0 = time.perf_counter()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=30.0, limits=limits) as client:
        await asyncio.gather(*(worker(w, client) for w in range(concurrency)))
    wall = time.perf_counter() - t0
    a = np.asarray(lat)
    return {"seconds": round(wall, 3), "requests_ok": len(lat), "errors": sum(errors.values()),
            "errors_by_kind": errors, "requests_per_s": len(lat) / wall if wall else None,
            "latency_ms": {"p50": float(np.percentile(a, 50) * 1e3), "p90": float(np.percentile(a, 90) * 1e3),
                           "p99": float(np.percentile(a, 99) * 1e3), "mean": float(a.mean() * 1e3),
                           "max": float(a.max() * 1e3)} if len(a) else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--project", type=Path, default=HERE / ".work" / "retention-clinc150")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "serve_throughput.json")
    args = ap.parse_args(argv)

    from distill.errors import DistillError
    from distill.export.onnx import export_project
    from distill.project import Project
    from distill.runinfo import environment
    from distill.students.predictor import onnx_dir_for

    if not (args.project / "distill.yaml").exists():
        raise DistillError(f"{args.project}: no project", hint="run bench/retention_intents.py --dataset clinc150 first (it trains the student)")
    p = Project.open(args.project)
    # the bench measures speed, not quality: the trained student is pinned whether or not it was promoted
    ref = p.latest_model()
    if ref is None:
        raise DistillError(f"{args.project}: no trained model", hint="run bench/retention_intents.py --dataset clinc150 first")
    model, run_id = ref.path, ref.run_id
    p.close()
    export = None
    if onnx_dir_for(model) is None:
        export = export_project(args.project, model_path=model).to_dict()
    onnx_dir = onnx_dir_for(model)
    assert onnx_dir is not None and not (onnx_dir / "router.json").exists(), "a router.json would route to the teacher"

    env = environment()
    port = free_port()
    distill_bin = Path(sys.executable).parent / "distill"
    log = open(HERE / ".work" / "serve_throughput.server.log", "w")
    proc = subprocess.Popen([str(distill_bin), "serve", str(args.project), "--port", str(port), "--backend", "onnx",
                             "--model", str(model), "--no-auth"], stdout=log, stderr=subprocess.STDOUT)
    try:
        import httpx

        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"distill serve exited: {(HERE / '.work' / 'serve_throughput.server.log').read_text()[-2000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("distill serve did not become healthy within 120 s")
            time.sleep(0.2)
        url = f"http://127.0.0.1:{port}/v1/classify"
        texts = queries()
        asyncio.run(drive(url, texts, 2.0, args.concurrency))            # warm-up, not reported
        result = asyncio.run(drive(url, texts, args.seconds, args.concurrency))
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    out = {
        "benchmark": "serve_throughput",
        "command": "python bench/serve_throughput.py" + (f" --seconds {args.seconds:g}" if args.seconds != 20 else ""),
        "model": {"project": str(args.project.relative_to(ROOT) if args.project.is_relative_to(ROOT) else args.project),
                  "run_id": run_id, "onnx_dir": onnx_dir.name, "int8": (onnx_dir / "model.int8.onnx").exists(),
                  "export": export},
        "load": {"concurrency": args.concurrency, "texts_per_request": 1, "endpoint": "POST /v1/classify",
                 "router": "none (student answers every request)", "distinct_texts": len(texts)},
        "result": result,
        "server_metrics_excerpt": [ln for ln in metrics.splitlines() if ln and not ln.startswith("#")][:40],
        "environment": env,
        "load_average_end": list(os.getloadavg()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=1))
    return 0 if result["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
