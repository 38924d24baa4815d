"""Labelling throughput against a rate-limited provider, and the cost of a re-run.

    .venv/bin/python bench/labelling_throughput.py            # ~30 s at 600 RPM, writes bench/results/labelling_throughput.json
    .venv/bin/python bench/labelling_throughput.py --smoke    # a few seconds; writes to a temp file unless --out

Setup: tests/fake_openai_server.py on loopback enforces the limit itself (429 + Retry-After beyond it) and
injects 429s with Retry-After on a seeded share of requests; every real answer takes ``--latency-s``.
The project's teacher has the same limit client side. Two scenarios: RPM-bound (``--rpm``) and TPM-bound
(``--tpm``, no request limit; the server counts the real prompt + completion tokens of the answers it
charged over a sliding minute, the client estimates before each call and settles to the usage after).
Measured, per scenario:
- achieved request rate at the server (all requests it received, including the injected 429s, which
  consumed quota like any request) / the limit: the limiter's job is to get close to 1.0 without
  tripping the server's own limit (``server_rate_limited`` counts those trips);
- labels per minute (what the user gets; lower than the request rate by the injected 429 share);
- a second run over the same project: paid calls (must be 0) and requests reaching the server.

``bench/labelling_ray.py`` (a local teacher on 1 vs 2 Ray actors) writes its section into the same file; this script
keeps it when it rewrites the file.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from fake_openai_server import make_project, start_server  # noqa: E402

from distill.labeling import label  # noqa: E402
from distill.runinfo import bench_result, environment, target, write_json_atomic  # noqa: E402


def machine() -> dict:
    cpu = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            k, _, v = line.partition(":")
            k = k.strip()
            if k in ("model name", "flags") and k not in cpu:
                cpu[k] = v.strip()
    except OSError:
        pass
    try:
        git = dict(cwd=HERE.parent, capture_output=True, text=True)
        sha = subprocess.run(["git", "rev-parse", "HEAD"], **git).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], **git).stdout.strip())
    except OSError:
        sha, dirty = None, None
    versions = {}
    for pkg in ("distill", "httpx", "fastapi", "uvicorn", "rich", "pydantic"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    return {"git_sha": sha, "git_dirty": dirty, "python": platform.python_version(), "platform": platform.platform(),
            "cpu_model": cpu.get("model name"), "cpu_flags": cpu.get("flags"), "cpu_count": os.cpu_count(),
            "loadavg_at_start": list(os.getloadavg()), "packages": versions}


def scenario(args: argparse.Namespace, *, rpm: float | None, tpm: float | None, n: int) -> tuple[dict, int]:
    """Label ``n`` inputs against a server enforcing ``rpm`` / ``tpm`` (the client has the same limits), then
    re-run. Returns (results, paid calls of the re-run)."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["FAKE_KEY"] = "bench"
        faults = f"429:{args.p429},seed=7" if args.p429 > 0 else ""
        server = start_server(tmp, rpm=rpm, tpm=tpm, faults=faults, delay_s=args.latency_s, retry_after=1.0)
        try:
            project = make_project(tmp / "p", n, server.base_url, concurrency=args.concurrency, rpm=rpm, tpm=tpm,
                                   max_retries=8)
            t0 = time.monotonic()
            first = label(project, progress=False)
            wall = time.monotonic() - t0
            lines = server.log_lines()
            times = sorted(x["t"] for x in lines)
            span = times[-1] - times[0]
            rate = (len(times) - 1) / span * 60 if span > 0 else float("nan")
            charged = sorted((x["t"], x["tokens_in"] + x["tokens_out"]) for x in lines if x["charged"])
            # tokens per minute between the first and the last charged answer (the last one's tokens are the
            # end of the interval, so they are not counted in it)
            t_span = charged[-1][0] - charged[0][0] if len(charged) > 1 else 0.0
            tok_rate = sum(n for _, n in charged[:-1]) / t_span * 60 if t_span > 0 else float("nan")
            before = len(lines)
            second = label(project, progress=False)
            after = len(server.log_lines())
        finally:
            server.stop()
    limit, achieved = (rpm, rate) if rpm else (tpm, tok_rate)
    return {
        "limit": {"rpm": rpm, "tpm": tpm},
        "inputs": n,
        "labelled_ok": first.ok,
        "failed": first.failed_by_reason,
        "wall_s": round(wall, 3),
        "server_requests": before,
        "server_request_span_s": round(span, 3),
        "achieved_rpm": round(rate, 1),
        "achieved_tpm": round(tok_rate, 1),
        "achieved_over_limit": round(achieved / limit, 4),
        "labels_per_min": round(first.ok / wall * 60, 1),
        "injected_429": sum(1 for x in lines if x.get("fault") == "429"),
        "server_rate_limited": sum(1 for x in lines if x.get("fault") in ("rpm", "tpm")),
        "client_retries": first.retries,
        "rerun_calls": second.calls,
        "rerun_already_labelled": second.already_labelled,
        "rerun_server_requests": after - before,
        "rerun_wall_s": round(second.elapsed_s, 3),
    }, second.calls


def run(args: argparse.Namespace) -> dict:
    info = machine()
    rpm_res, rerun_a = scenario(args, rpm=args.rpm, tpm=None, n=int(args.rpm / 60 * args.seconds))
    # TPM-bound: no request limit, a token limit; as many inputs as the RPM scenario (~70 tokens each)
    tpm_res, rerun_b = scenario(args, rpm=None, tpm=args.tpm, n=int(args.rpm / 60 * args.seconds))
    config = {k: v for k, v in vars(args).items() if k not in ("out", "t0", "env0")}
    results = {"rpm_bound": rpm_res, "tpm_bound": tpm_res, "machine": info}
    rerun = float(rerun_a + rerun_b)
    ratios = {"achieved_over_rpm_limit": rpm_res["achieved_over_limit"],
              "achieved_over_tpm_limit": tpm_res["achieved_over_limit"], "rerun_calls": rerun}
    targets = [target("labelling rate achieved / RPM limit", rpm_res["achieved_over_limit"], ">=", 0.95,
                      "loopback server enforcing the limit, with injected 429 + Retry-After"),
               target("labelling tokens achieved / TPM limit", tpm_res["achieved_over_limit"], ">=", 0.95,
                      "server counts the real tokens of charged answers over a sliding minute"),
               target("paid calls on a cache-hit rerun", rerun, "<=", 0)]
    return bench_result("labelling_throughput", smoke=args.smoke, config=config, results=results, ratios=ratios,
                        targets=targets, started=args.t0, environment_start=args.env0)


def carry_over_ray(out: Path, record: dict) -> dict:
    """Keep the parts bench/labelling_ray.py wrote into the same file (results.ray_local_teacher, ratios ray_*,
    targets "ray: ..."): that script measures them, this one does not."""
    try:
        old = json.loads(out.read_text())
    except (OSError, json.JSONDecodeError):
        return record
    if "ray_local_teacher" in old.get("results", {}):
        record["results"]["ray_local_teacher"] = old["results"]["ray_local_teacher"]
    record["ratios"].update({k: v for k, v in old.get("ratios", {}).items() if k.startswith("ray_")})
    record["targets"] += [t for t in old.get("targets", []) if t.get("name", "").startswith("ray:")]
    return record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="a few seconds instead of ~30")
    ap.add_argument("--rpm", type=float, default=600.0, help="limit at the server and in the client")
    ap.add_argument("--tpm", type=float, default=30000.0, help="token limit of the TPM-bound scenario")
    ap.add_argument("--seconds", type=float, default=30.0, help="inputs = rpm/60 * seconds")
    ap.add_argument("--p429", type=float, default=0.05, help="share of requests answered 429 + Retry-After: 1")
    ap.add_argument("--latency-s", type=float, default=0.05, help="server time per real answer")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.smoke:
        args.rpm, args.seconds, args.tpm = 1200.0, 3.0, 60000.0
    out = args.out or (Path(tempfile.gettempdir()) / "labelling_throughput.smoke.json" if args.smoke
                       else HERE / "results" / "labelling_throughput.json")
    args.t0, args.env0 = time.perf_counter(), environment()
    record = run(args)
    write_json_atomic(out, carry_over_ray(out, record))
    print(json.dumps({k: v for k, v in record["results"].items() if k != "machine"}, indent=2))
    print(f"wrote {out}")
    if record["ratios"]["rerun_calls"] != 0:
        sys.exit("a re-run made paid calls: the cache is broken")


if __name__ == "__main__":
    main()
