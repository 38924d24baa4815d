"""`serve` suite: `distill serve` at the hardware limit — HTTP next to raw onnxruntime, next to a plain
FastAPI + transformers.pipeline server, all in one run, load from an external generator (autocannon).

    npm ci --prefix bench                                # once: autocannon, pinned in bench/package-lock.json
    .venv/bin/python bench/serve.py                      # ~15 min (10 of them the soak); bench/results/serve.json
    .venv/bin/python bench/serve.py --soak-seconds 60    # a shorter soak
    .venv/bin/python bench/serve.py --smoke              # < 1 min once the smoke demo project exists; a temp file unless --out

Model: the demo student (``bench/.work/retention-snips``, made by ``distill.demo.run_demo`` if missing; --smoke:
``run_demo(limit=150, epochs=1)`` in ``retention-snips-smoke``) — the run its report evaluated, served from its int8
ONNX export. The project is copied to a temporary folder first and only the copy is changed: exported there if it
has no export, and its router calibrated there with ``distill route calibrate COPY --coverage 0.9`` (the
production config: the student behind its calibrated router).

Texts: the SNIPS test split, minus the texts that router sends to the teacher or nearly does (decided in-process
with the server's own calls, ``Router.student_features`` + ``Router.decide`` on the same predictor, in batches of
1 to 32: see ``student_texts``), so every request is answered by the student and the bench measures the student
path. The HTTP warm-up sends each text once and checks ``routed_to == "student"``; ``/metrics`` after the runs
says whether the teacher was ever asked (``teacher_inputs_*``, 0 expected). Each request is
``POST /v1/classify {"texts": [one text]}``; bodies rotate over the texts (``autocannon_run.js``).

Side by side, in this order (one process per server, both on the same cores):
1. raw onnxruntime in-process, before: the predictor ``distill serve`` builds (``load_predictor(path, "onnx",
   "cpu")``, same intra-op threads; ``--threads`` sets both) called as its micro-batcher calls it (tokenizer + session.run): batch-1
   latency p50/p90 and texts/s at batch 32. Also batch 1 with the router's scoring, to show what it adds;
2. `distill serve COPY --no-auth` on loopback, autocannon at 1/4/16/64 connections (``--seconds`` each):
   latency p50/p90/p99 (float ms, every 2xx answer), requests/s, errors/timeouts/non-2xx; the server's CPU
   seconds and RSS, the client's CPU seconds;
3. raw onnxruntime again, after (the reference is both passes pooled: a load change shows as a gap);
4. the baseline (``hf_pipeline_server.py``: FastAPI + ``pipeline("text-classification")`` on the run's torch
   folder, the one the ONNX graph was exported from) at 1 and 16 connections;
5. the soak: `distill serve` (still the server of step 2) at a fixed rate of 80% of its peak requests/s
   (autocannon ``overallRate``) for ``--soak-seconds``; errors, RSS every second, the RSS slope over the second half;
6. the workers x threads grid (``--grid``; skipped with a note while `distill serve` has no ``--workers``): requests/s
   at 16 and 64 connections per point.

Pinning: with 4+ cores the client gets the last quarter of them (``taskset``) and the servers and the in-process
reference the rest; with fewer the two cannot be kept apart without starving the server, so nothing is pinned and
the result says so (and records the client's CPU seconds: what it took from the server). ``--pin S/C`` forces
CPU lists.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RUNNER = HERE / "autocannon_run.js"
COVERAGE = 0.9
SOAK_SHARE = 0.8              # the soak's rate, as a share of the peak requests/s measured just before
MIXES = (1, 2, 4, 8, 16, 32)   # batch sizes the texts are scored at to decide which stay on the student ...
CONF_MARGIN = 0.02            # ... with this much confidence above the router's cut
OOD_MARGIN = 0.10             # ... and an OOD score this share of the cut below it (see student_texts)
RSS_SLOPE_FLAT = 1.0          # MB/min; why this bound: see the soak target below


# ------------------------------------------------------------------------------------------------
# processes: start, wait, measure


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_pids(root: int) -> list[int]:
    """``root`` and every process below it (uvicorn's --workers are children of its supervisor)."""
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d.name))
    out = [root]
    for pid in out:
        out += kids.get(pid, [])
    return out


def rss_mb(root: int) -> float | None:
    """VmRSS summed over the process tree (with several workers shared pages count once per worker: an upper bound)."""
    total, seen = 0.0, False
    for pid in tree_pids(root):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
                    seen = True
        except OSError:
            continue
    return round(total, 1) if seen else None


def cpu_seconds(root: int) -> float:
    """User + system CPU seconds of the process tree so far (/proc/PID/stat utime, stime)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in tree_pids(root):
        try:
            f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(f[11]) + int(f[12])
        except (OSError, IndexError, ValueError):
            continue
    return total / tick


def slope_mb_per_min(samples: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, MB) samples, in MB/min."""
    ts, ys = [t for t, _ in samples], [y for _, y in samples]
    if len(samples) < 3 or len(set(ts)) < 2:
        return None
    return statistics.linear_regression(ts, ys).slope * 60


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, round(q * (len(v) - 1)))]


def taskset(cpus: str | None) -> list[str]:
    return ["taskset", "-c", cpus] if cpus else []


def parse_cpus(spec: str) -> set[int]:
    """A taskset CPU list ("0-2,5") as a set."""
    out: set[int] = set()
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


class Server:
    """One server in its own process on a free loopback port, pinned with taskset when asked; waits for
    /healthz. ``cmd`` gets ``--port PORT`` appended by the caller through ``{port}``."""

    def __init__(self, name: str, cmd: list[str], log: Path, cpus: str | None, timeout_s: float = 180,
                 env: dict | None = None):
        self.name, self.port, self.log_path, self.timeout_s, self.env = name, free_port(), log, timeout_s, env
        self.cmd = taskset(cpus) + [c.replace("{port}", str(self.port)) for c in cmd]
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "Server":
        import httpx

        self.log = open(self.log_path, "w")
        t0 = time.perf_counter()
        # taskset execs the command, so the pid is the server's own
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, env=self.env)
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name} exited with code {self.proc.returncode}:\n"
                                 + self.log_path.read_text()[-3000:])
            try:
                r = httpx.get(self.url + "/healthz", timeout=2)
                if r.status_code == 200:
                    self.health = r.json()
                    break
            except httpx.HTTPError:
                pass
            if time.perf_counter() - t0 > self.timeout_s:
                self.__exit__()
                raise SystemExit(f"{self.name} did not answer /healthz within {self.timeout_s:.0f} s")
            time.sleep(0.1)
        self.startup_s = round(time.perf_counter() - t0, 2)
        return self

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()

    @property
    def pid(self) -> int:
        return self.proc.pid


class RssSampler:
    """RSS of a process tree every ``every`` seconds, in a thread, while the block runs."""

    def __init__(self, pid: int, every: float = 1.0):
        self.pid, self.every, self.samples = pid, every, []
        self._stop = threading.Event()

    def _run(self) -> None:
        t0 = time.monotonic()
        while not self._stop.is_set():
            v = rss_mb(self.pid)
            if v is not None:
                self.samples.append((round(time.monotonic() - t0, 2), v))
            self._stop.wait(self.every)

    def __enter__(self) -> "RssSampler":
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)


# ------------------------------------------------------------------------------------------------
# load: autocannon (node) and a Python warm-up that checks the answers


def check_autocannon() -> str:
    node = shutil.which("node")
    if node is None or not (HERE / "node_modules" / "autocannon").is_dir():
        raise SystemExit("bench/serve.py drives its load with autocannon: install it with `npm ci --prefix bench` "
                         "(needs Node.js and npm)")
    return node


def autocannon(url: str, bodies: list[str], connections: int, seconds: float, work: Path, *,
               rate: int | None = None, cpus: str | None = None, server_pid: int | None = None) -> dict:
    """One autocannon run (``autocannon_run.js``): its JSON, plus the server's CPU seconds and RSS after it."""
    cfg = work / f"autocannon-{connections}.json"
    cfg.write_text(json.dumps({"url": url, "path": "/v1/classify", "bodies": bodies, "connections": connections,
                               "duration": seconds, "overallRate": rate, "timeout": 10}))
    cpu0 = cpu_seconds(server_pid) if server_pid else None
    busy0 = model_busy(url)
    p = subprocess.run(taskset(cpus) + [check_autocannon(), str(RUNNER), str(cfg)], capture_output=True, text=True,
                       timeout=seconds + 120)
    if p.returncode != 0 or not p.stdout.strip():
        raise SystemExit(f"autocannon failed ({p.returncode}): {p.stderr[-2000:]}")
    out = json.loads(p.stdout.strip().splitlines()[-1])
    if server_pid:
        out["server_cpu_seconds"] = round(cpu_seconds(server_pid) - cpu0, 2)
        out["server_rss_mb_after"] = rss_mb(server_pid)
    out["failed"] = out["errors"] + out["timeouts"] + out["non2xx"]
    busy1 = model_busy(url)
    # share of the run the model thread(s) were computing: ~1 per worker = model-bound, lower = the HTTP side limits
    out["model_busy_share"] = None if busy0 is None or busy1 is None else (busy1 - busy0) / out["duration_s"]
    return out


def model_busy(url: str) -> float | None:
    """``distill_model_busy_seconds_total`` summed over models (None for a server that does not export it)."""
    import httpx

    try:
        text = httpx.get(url + "/metrics", timeout=10).text
    except httpx.HTTPError:
        return None
    vals = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith("distill_model_busy_seconds_total")]
    return sum(vals) if vals else None


def warm_up(url: str, texts: list[str]) -> dict:
    """Each text once, one at a time: every model shape and code path warm, and the answers checked."""
    import httpx

    routed, bad, labels, lat = {}, 0, [], []
    with httpx.Client(timeout=30) as c:
        for t in texts:
            t0 = time.perf_counter()
            r = c.post(url + "/v1/classify", json={"texts": [t]})
            lat.append((time.perf_counter() - t0) * 1e3)
            if r.status_code != 200:
                bad += 1
                labels.append(None)
                continue
            res = r.json()["results"][0]
            labels.append(res["label"])
            # distill serve says who answered; the baseline has no router
            if "routed_to" in res:
                routed[res["routed_to"]] = routed.get(res["routed_to"], 0) + 1
    return {"requests": len(texts), "non_200": bad, "routed_to": routed or None, "labels": labels,
            "python_client_p50_ms": pct(lat, 0.5)}


def teacher_inputs(url: str) -> float | None:
    """Texts the teacher answered so far, from /metrics (``distill_inputs_total{routed_to="teacher"}``);
    None when the exposition does not have that line."""
    import httpx

    try:
        text = httpx.get(url + "/metrics", timeout=5).text
    except httpx.HTTPError:
        return None
    found = [float(m.group(1)) for m in re.finditer(
        r'^distill_inputs_total\{[^}]*routed_to="teacher"[^}]*\}\s+([0-9.eE+-]+)\s*$', text, re.M)]
    return sum(found) if found else None


# ------------------------------------------------------------------------------------------------
# the model: a copy of the demo project, exported and calibrated


def prepare(source: Path, smoke: bool, work: Path) -> dict:
    """Copy ``source`` (built by the demo if missing) to ``work``; export and calibrate there."""
    from distill.export.onnx import export_project
    from distill.students.predictor import onnx_dir_for

    if not (source / "reports" / "report.json").exists():
        from distill.demo import run_demo

        run_demo(source, limit=150 if smoke else None, epochs=1 if smoke else None)
    copy = work / "project"
    # the store and the recordings and the model the demo evaluated; never the source's model files
    shutil.copytree(source, copy, ignore=shutil.ignore_patterns("*.lock", "reports", "*.db-shm"))
    report = json.loads((source / "reports" / "report.json").read_text())
    model = copy / report["model_path"]
    notes = []
    export_s = None
    if onnx_dir_for(model) is None:
        t0 = time.perf_counter()
        export_project(copy, model_path=model)
        export_s = round(time.perf_counter() - t0, 1)
        notes.append(f"the source project had no ONNX export of {report['model_run_id']}; exported in the copy "
                     f"({export_s} s)")
    onnx_dir = onnx_dir_for(model)
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "distill.cli", "route", "calibrate", str(copy), "--coverage",
                        str(COVERAGE), "--model", str(model)], capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"distill route calibrate failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    calibrate_s = round(time.perf_counter() - t0, 1)
    return {"source": str(source), "copy": copy, "model": model, "onnx_dir": onnx_dir, "run_id": report["model_run_id"],
            "export_seconds": export_s, "calibrate_seconds": calibrate_s,
            "calibrate_output": [ln for ln in p.stdout.splitlines() if ln.startswith(("served", "achieved", "warning"))],
            "notes": notes}


def student_texts(m: dict, pred, router) -> tuple[list[str], dict]:
    """The test split's texts the router keeps on the student with room to spare, decided with the server's own
    calls. Why not once at batch 1: the int8 graph quantizes activations per batch (dynamic quantization), so a
    text's scores move with its batch mates, and the micro-batcher mixes texts as the load comes (on the demo
    student the Mahalanobis score of a text moves by 3% of the cut at the median, 47% at worst). So each text is
    scored in ``MIXES`` seeded shuffles at batch sizes 1 to 32, and kept when its worst confidence clears the cut
    by ``CONF_MARGIN`` and its worst OOD score stays ``OOD_MARGIN`` (share of the cut) below it. Checked on that
    student: of the 222 texts kept, none crossed the cut in 24 further shuffles."""
    import math
    import random

    from distill.dataset import rows
    from distill.project import Project

    project = Project.open(m["copy"])
    try:
        test = [r.text for r in rows(project, project.spec.get_teacher().name, ("test",), only_kept=False)]
    finally:
        project.close()
    cfg = router.config
    conf_cut = cfg.conf_threshold + CONF_MARGIN if math.isfinite(cfg.conf_threshold) else cfg.conf_threshold
    ood_cut = (cfg.ood_threshold - OOD_MARGIN * abs(cfg.ood_threshold) if math.isfinite(cfg.ood_threshold)
               else cfg.ood_threshold)
    ok = dict.fromkeys(test, True)
    rng = random.Random(0)
    for size in MIXES:
        order = test[:]
        rng.shuffle(order)
        for i in range(0, len(order), size):
            batch = order[i:i + size]
            logits, feats = router.student_features(pred, batch)
            full = router.features(feats, batch)
            _, conf, ood = router.scores(logits, full)
            for t, d, c, o in zip(batch, router.decide(logits, full), conf, ood):
                far = c >= conf_cut and (cfg.ood == "none" or o <= ood_cut)
                ok[t] = ok[t] and d.routed_to == "student" and bool(far)
    keep = [t for t in test if ok[t]]
    return keep, {"test_split": len(test), "kept_on_student": len(keep), "left_out": len(test) - len(keep),
                  "decided": f"student in shuffles at batch sizes {list(MIXES)}, confidence >= cut + {CONF_MARGIN}, "
                             f"OOD score <= cut - {OOD_MARGIN:.0%} of it"}


# ------------------------------------------------------------------------------------------------
# the reference: onnxruntime in this process


def measure_raw(pred, router, texts: list[str], seconds: float) -> dict:
    """Batch-1 latency and batch-32 texts/s of the forward pass the server's micro-batcher runs
    (``router.student_features``: tokenizer + session.run), on ``texts``; at least one pass over them, then
    until ``seconds`` have gone by. Batch 1 with the router's scoring too (what the router adds per request)."""
    for t in texts[:10]:                                  # warm-up: first calls allocate
        router.student_features(pred, [t])
    b1, b1_router = [], []
    i, end = 0, time.perf_counter() + seconds
    while i < len(texts) or time.perf_counter() < end:
        t = texts[i % len(texts)]
        t0 = time.perf_counter()
        logits, feats = router.student_features(pred, [t])
        t1 = time.perf_counter()
        router.decide(logits, router.features(feats, [t]))
        t2 = time.perf_counter()
        b1.append((t1 - t0) * 1e3)
        b1_router.append((t2 - t0) * 1e3)
        i += 1
    n, j = 0, 0
    t0, c0 = time.perf_counter(), time.process_time()
    while n < len(texts) or time.perf_counter() - t0 < seconds:
        router.student_features(pred, [texts[(j + k) % len(texts)] for k in range(32)])
        n += 32
        j += 32
    b32_s, b32_cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"batch1_ms": b1, "batch1_with_router_ms": b1_router, "batch32_texts": n, "batch32_seconds": b32_s,
            "batch32_cpu_seconds": b32_cpu}


def raw_summary(*passes: dict) -> dict:
    b1 = [x for p in passes for x in p["batch1_ms"]]
    b1r = [x for p in passes for x in p["batch1_with_router_ms"]]
    return {"batch1_p50_ms": pct(b1, 0.5), "batch1_p90_ms": pct(b1, 0.9), "batch1_n": len(b1),
            "batch1_with_router_p50_ms": pct(b1r, 0.5),
            "batch32_texts_per_s": sum(p["batch32_texts"] for p in passes) / sum(p["batch32_seconds"] for p in passes),
            # CPU (all threads of this process) per text at batch 32: the model's share of a served request
            "batch32_cpu_ms_per_text": 1e3 * sum(p["batch32_cpu_seconds"] for p in passes)
            / sum(p["batch32_texts"] for p in passes)}


# ------------------------------------------------------------------------------------------------


def serve_cli_has(option: str) -> bool:
    p = subprocess.run([sys.executable, "-m", "distill.cli", "serve", "--help"], capture_output=True, text=True,
                       env={**os.environ, "COLUMNS": "200"})
    return option in p.stdout


def cpu_plan(pin: str) -> dict:
    """Which CPUs the servers (and the in-process reference) and the load generator get."""
    cpus = sorted(os.sched_getaffinity(0))
    if pin == "none":
        return {"server": None, "client": None, "note": "not pinned (--pin none)"}
    if pin != "auto":
        server, client = pin.split("/")
        return {"server": server, "client": client, "note": f"pinned by --pin: servers on {server}, client on {client}"}
    if len(cpus) < 4:
        return {"server": None, "client": None,
                "note": f"not pinned: {len(cpus)} cores; giving the client one of them would halve the server's, so "
                        "client and server share all cores (client_cpu_seconds says what the client took)"}
    n_client = max(1, len(cpus) // 4)
    fmt = lambda xs: ",".join(map(str, xs))  # noqa: E731
    return {"server": fmt(cpus[:-n_client]), "client": fmt(cpus[-n_client:]),
            "note": f"client pinned to the last {n_client} of {len(cpus)} cores, servers and the reference to the rest"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--project", type=Path, help="demo project to copy (default bench/.work/retention-snips[-smoke])")
    ap.add_argument("--connections", default="1,4,16,64", help="autocannon connection counts against distill serve")
    ap.add_argument("--hf-connections", default="1,16", help="... against the transformers.pipeline baseline")
    ap.add_argument("--seconds", type=float, help="per autocannon run (default 10; smoke 2)")
    ap.add_argument("--raw-seconds", type=float, help="per in-process measurement and batch size (default 5; smoke 0.5)")
    ap.add_argument("--soak-seconds", type=float, help="the soak (default 600; smoke 10)")
    ap.add_argument("--soak-connections", type=int, help="default: the count that reached the peak (a closed-loop "
                    "connection cannot send faster than one request per latency, so fewer may not hold the rate)")
    ap.add_argument("--grid", help="workers x threads points, e.g. '1x2,2x1' (default; smoke '2x1'); '' = none")
    ap.add_argument("--threads", type=int, help="onnxruntime intra-op threads, for `distill serve --threads` and the "
                    "in-process reference alike (default: onnxruntime's, as `distill serve` without --threads)")
    ap.add_argument("--pin", default="auto", help="auto | none | SERVER_CPUS/CLIENT_CPUS (taskset lists, e.g. 0-5/6-7)")
    ap.add_argument("--before", help="a git ref: also run the service as it was there, back to back with this one "
                                     "(1/16/64 connections), for a before/after of a change")
    ap.add_argument("--keep-work", action="store_true", help="keep the temporary project copy and server logs")
    ap.add_argument("--smoke", action="store_true", help="the smoke demo project, 2 s runs, 10 s soak")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    seconds = a.seconds or (2.0 if a.smoke else 10.0)
    raw_seconds = a.raw_seconds or (0.5 if a.smoke else 5.0)
    soak_seconds = a.soak_seconds if a.soak_seconds is not None else (10.0 if a.smoke else 600.0)
    grid_spec = a.grid if a.grid is not None else ("2x1" if a.smoke else "1x2,2x1")
    conns = [int(c) for c in a.connections.split(",")]
    hf_conns = [int(c) for c in a.hf_connections.split(",")]
    out = a.out or (Path(tempfile.gettempdir()) / "serve_smoke.json" if a.smoke else HERE / "results" / "serve.json")
    source = a.project or HERE / ".work" / ("retention-snips-smoke" if a.smoke else "retention-snips")

    from distill.runinfo import bench_result, environment, target, write_json_atomic

    t_start = time.perf_counter()
    env0 = environment()
    check_autocannon()
    plan = cpu_plan(a.pin)
    if plan["server"]:
        # this process measures the in-process reference: on the servers' cores, set before onnxruntime starts
        # its threads (they inherit the mask); the load generator gets its own cores through taskset
        os.sched_setaffinity(0, parse_cpus(plan["server"]))
    (HERE / ".work").mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="serve-", dir=HERE / ".work"))
    notes: list[str] = []
    phases: dict[str, float] = {}        # wall seconds per step: where the suite's time goes
    last = [time.perf_counter()]

    def phase(name: str) -> None:
        now = time.perf_counter()
        phases[name] = round(now - last[0], 1)
        last[0] = now

    try:
        from distill.serve.router import Router
        from distill.students.predictor import load_predictor

        m = prepare(source, a.smoke, work)
        notes += m["notes"]
        phase("prepare: copy, export, calibrate")
        # Two references: onnxruntime's defaults (its pool threads spin between runs: the fastest batch-1 in a tight
        # loop), and the session exactly as `distill serve` builds it (spinning off: measured faster in the server,
        # where those cycles are the event loop's). Overhead targets are against the second (the same model call),
        # throughput against the better of the two.
        pred = load_predictor(m["model"], "onnx", "cpu", threads=a.threads)
        pred_served = load_predictor(m["model"], "onnx", "cpu", threads=a.threads, spin=False)
        router = Router.load(pred.path)
        texts, text_counts = student_texts(m, pred, router)
        if not texts:
            raise SystemExit("the router sends every test text to the teacher: nothing to measure on the student path")
        bodies = [json.dumps({"texts": [t]}, ensure_ascii=False) for t in texts]
        print(f"serve bench: {len(texts)} of {text_counts['test_split']} test texts stay on the student; {plan['note']}",
              flush=True)
        phase("choose texts")

        # 1. the reference, before
        raw_before = measure_raw(pred, router, texts, raw_seconds)
        print(f"raw onnxruntime (before): {json.dumps(raw_summary(raw_before))}", flush=True)
        served_before = measure_raw(pred_served, router, texts, raw_seconds)
        print(f"raw onnxruntime as served (before): {json.dumps(raw_summary(served_before))}", flush=True)
        phase("raw before")

        # 2. distill serve at 1/4/16/64 connections
        serve_base = [sys.executable, "-m", "distill.cli", "serve", str(m["copy"]), "--port", "{port}", "--no-auth",
                      "--backend", "onnx", "--model", str(m["model"])]
        serve_cmd = serve_base + (["--threads", str(a.threads)] if a.threads else [])
        distill: dict = {}
        hf: dict = {}
        before_after: dict = {}
        with Server("distill serve", serve_cmd, work / "distill-serve.log", plan["server"]) as srv:
            distill["startup_seconds"] = srv.startup_s
            distill["health"] = srv.health
            distill["rss_mb_idle"] = rss_mb(srv.pid)
            wu = warm_up(srv.url, texts)
            distill["warm_up"] = {k: v for k, v in wu.items() if k != "labels"}
            if (wu["routed_to"] or {}).get("teacher") or wu["non_200"]:
                notes.append(f"warm-up: {wu['routed_to']} routed, {wu['non_200']} non-200: the teacher answered some "
                             "texts over HTTP although the in-process router kept them")
            autocannon(srv.url, bodies, max(conns), min(2.0, seconds / 2), work, cpus=plan["client"])   # warm-up
            runs = {}
            for c in conns:
                runs[str(c)] = autocannon(srv.url, bodies, c, seconds, work, cpus=plan["client"], server_pid=srv.pid)
                r = runs[str(c)]
                print(f"distill serve, {c} connections: {r['requests_per_s']:.1f} requests/s, p50 "
                      f"{r['latency_ms']['p50']:.2f} ms, p99 {r['latency_ms']['p99']:.2f} ms, failed {r['failed']}",
                      flush=True)
            distill["runs"] = runs
            phase("distill serve: start, warm up, runs")

            # 2b. before/after (--before REF): the service as it was at REF (its code checked out in a git worktree,
            # run on this venv) against the current one, each connection count back to back, same texts and client
            if a.before:
                before_dir = work / "before"
                subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(before_dir), a.before],
                               check=True, capture_output=True)
                try:
                    env = {**os.environ, "PYTHONPATH": str(before_dir / "src")}
                    with Server("distill serve (before)", serve_base, work / "before.log", plan["server"],
                                env=env) as old:
                        warm_up(old.url, texts)
                        for c in [c for c in (1, 16, 64) if c in conns]:
                            pair = {}
                            for who, s_ in (("before", old), ("after", srv)):
                                r = autocannon(s_.url, bodies, c, seconds, work, cpus=plan["client"], server_pid=s_.pid)
                                pair[who] = {k: r[k] for k in ("requests_per_s", "latency_ms", "failed",
                                                                "server_cpu_seconds", "requests_2xx")}
                            before_after[str(c)] = pair
                            print(f"before {a.before} / after, {c} connections: {pair['before']['requests_per_s']:.1f} / "
                                  f"{pair['after']['requests_per_s']:.1f} requests/s, p50 "
                                  f"{pair['before']['latency_ms']['p50']:.2f} / {pair['after']['latency_ms']['p50']:.2f} "
                                  "ms", flush=True)
                finally:
                    subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(before_dir)],
                                   capture_output=True)
                phase(f"before/after vs {a.before}")
            distill["teacher_inputs_after_runs"] = teacher_inputs(srv.url)
            if distill["teacher_inputs_after_runs"]:
                notes.append(f"{distill['teacher_inputs_after_runs']:.0f} texts were answered by the teacher during "
                             "the runs (a text near the router's cut, in another batch mix): not all student path")

            # 3. the reference, after (the server idles meanwhile)
            served_after = measure_raw(pred_served, router, texts, raw_seconds)
            print(f"raw onnxruntime as served (after): {json.dumps(raw_summary(served_after))}", flush=True)
            raw_after = measure_raw(pred, router, texts, raw_seconds)
            print(f"raw onnxruntime (after): {json.dumps(raw_summary(raw_after))}", flush=True)
            # how the model call scales with onnxruntime threads (the session as served): the basis of the
            # workers x threads advice for machines with more cores than this one
            scaling = {}
            for th in sorted({1, 2, os.cpu_count() or 1}):
                p_th = load_predictor(m["model"], "onnx", "cpu", threads=th, spin=False)
                scaling[str(th)] = raw_summary(measure_raw(p_th, router, texts, raw_seconds))
                print(f"raw onnxruntime as served, {th} threads: {json.dumps(scaling[str(th)])}", flush=True)
                del p_th
            phase("raw after")

            # 4. the baseline, on the same cores, while distill serve idles
            hf_cmd = [sys.executable, str(HERE / "hf_pipeline_server.py"), str(m["model"]), "{port}"]
            with Server("transformers.pipeline server", hf_cmd, work / "hf-server.log", plan["server"]) as base:
                hf["startup_seconds"] = base.startup_s
                hf["rss_mb_idle"] = rss_mb(base.pid)
                hwu = warm_up(base.url, texts)
                same = [x == y for x, y in zip(hwu["labels"], wu["labels"]) if x is not None and y is not None]
                hf["warm_up"] = {k: v for k, v in hwu.items() if k != "labels"}
                # the same model? fp32 torch vs int8 ONNX: nearly every label agrees
                hf["label_agreement_with_distill"] = sum(same) / len(same) if same else None
                autocannon(base.url, bodies, max(hf_conns), min(2.0, seconds / 2), work, cpus=plan["client"])
                hf["runs"] = {}
                for c in hf_conns:
                    r = autocannon(base.url, bodies, c, seconds, work, cpus=plan["client"], server_pid=base.pid)
                    hf["runs"][str(c)] = r
                    print(f"transformers.pipeline server, {c} connections: {r['requests_per_s']:.1f} requests/s, p50 "
                          f"{r['latency_ms']['p50']:.2f} ms, failed {r['failed']}", flush=True)
            phase("transformers.pipeline server: start, warm up, runs")

            # 5. the soak: this server, at 80% of its peak
            peak_c, peak = max(((c, r["requests_per_s"]) for c, r in runs.items()), key=lambda x: x[1])
            soak_c = a.soak_connections or int(peak_c)
            # autocannon splits the rate into whole requests per connection per second: at least 1 each
            rate = max(soak_c, round(SOAK_SHARE * peak))
            soak: dict = {"seconds": soak_seconds, "rate_requests_per_s": rate, "peak_requests_per_s": peak,
                          "peak_connections": int(peak_c), "connections": soak_c}
            if soak_seconds > 0:
                print(f"soak: {soak_seconds:.0f} s at {rate} requests/s ({SOAK_SHARE:.0%} of {peak:.1f})", flush=True)
                with RssSampler(srv.pid, 1.0) as rs:
                    r = autocannon(srv.url, bodies, soak_c, soak_seconds, work, rate=rate,
                                   cpus=plan["client"], server_pid=srv.pid)
                half = [s for s in rs.samples if s[0] >= soak_seconds / 2]
                slope = slope_mb_per_min(half)
                soak.update({
                    "autocannon": r, "errors": r["failed"],
                    "achieved_over_rate": r["requests_per_s"] / rate,
                    "rss_mb": {"start": rs.samples[0][1] if rs.samples else None,
                               "end": rs.samples[-1][1] if rs.samples else None,
                               "max": max((v for _, v in rs.samples), default=None),
                               "slope_second_half_mb_per_min": slope,
                               "flat": None if slope is None else abs(slope) <= RSS_SLOPE_FLAT,
                               "samples": rs.samples},
                    "teacher_inputs_after": teacher_inputs(srv.url)})
                print(f"soak: {r['requests_per_s']:.1f} requests/s, failed {r['failed']}, RSS "
                      f"{soak['rss_mb']['start']} -> {soak['rss_mb']['end']} MB, slope {slope} MB/min", flush=True)

            phase("soak")

        # 6. workers x threads
        grid: dict = {"spec": grid_spec, "points": {}}
        if grid_spec and not serve_cli_has("--workers"):
            grid["skipped"] = "`distill serve` has no --workers option yet (checked with `distill serve --help`)"
            notes.append("workers grid skipped: " + grid["skipped"])
        elif grid_spec:
            for point in grid_spec.split(","):
                w, t = point.lower().split("x")
                cmd = serve_base + ["--workers", w, "--threads", t]
                with Server(f"distill serve {point}", cmd, work / f"distill-serve-{point}.log", plan["server"]) as g:
                    warm_up(g.url, texts[:50])
                    autocannon(g.url, bodies, 64, min(2.0, seconds / 2), work, cpus=plan["client"])
                    res = {"startup_seconds": g.startup_s, "workers": int(w), "threads": int(t)}
                    for c in (16, 64):
                        r = autocannon(g.url, bodies, c, seconds, work, cpus=plan["client"], server_pid=g.pid)
                        res[str(c)] = {k: r[k] for k in ("requests_per_s", "latency_ms", "failed", "server_cpu_seconds",
                                                         "server_rss_mb_after", "client_cpu_seconds", "model_busy_share")}
                        print(f"grid {point}, {c} connections: {r['requests_per_s']:.1f} requests/s", flush=True)
                    grid["points"][point] = res
        phase("workers grid")
    finally:
        if a.keep_work:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    # ------------------------------------------------------------------------------------------------
    raw = raw_summary(raw_before, raw_after)
    raw["before"], raw["after"] = raw_summary(raw_before), raw_summary(raw_after)
    raw["intra_op_threads"] = pred.session.get_session_options().intra_op_num_threads or "onnxruntime default"
    raw["spinning"] = "onnxruntime default (on)"
    served_raw = raw_summary(served_before, served_after)
    served_raw["before"], served_raw["after"] = raw_summary(served_before), raw_summary(served_after)
    served_raw["spinning"] = "off (session.intra_op.allow_spinning=0, as distill serve builds it)"
    raw["as_served"] = served_raw
    raw["as_served_by_threads"] = scaling
    best_raw = max(raw["batch32_texts_per_s"], served_raw["batch32_texts_per_s"])

    def ratio(x, y):
        return None if x is None or not y else x / y

    best_c = max((c for c in ("16", "64") if c in runs), key=lambda c: runs[c]["requests_per_s"], default=None)
    best = runs[best_c]["requests_per_s"] if best_c else None
    c1 = runs.get("1")
    # what serving adds to the same model call: HTTP, JSON, the hop to the model thread and the router's scoring
    overhead = None if c1 is None else c1["latency_ms"]["p50"] - served_raw["batch1_p50_ms"]
    overhead_default = None if c1 is None else c1["latency_ms"]["p50"] - raw["batch1_p50_ms"]
    hf16 = hf["runs"].get("16", {}).get("requests_per_s")
    ratios = {
        "http_over_raw_throughput": ratio(best, best_raw),
        **{f"http_c{c}_over_raw_batch32_throughput": ratio(r["requests_per_s"], best_raw) for c, r in runs.items()},
        "raw_as_served_over_default_batch32": ratio(served_raw["batch32_texts_per_s"], raw["batch32_texts_per_s"]),
        "raw_as_served_over_default_batch1_p50": ratio(served_raw["batch1_p50_ms"], raw["batch1_p50_ms"]),
        "over_hf_pipeline_throughput": ratio((runs.get("16") or {}).get("requests_per_s"), hf16),
        "over_hf_pipeline_throughput_c1": ratio((runs.get("1") or {}).get("requests_per_s"),
                                                hf["runs"].get("1", {}).get("requests_per_s")),
        "http_c1_p50_over_raw_batch1_p50": ratio(c1 and c1["latency_ms"]["p50"], raw["batch1_p50_ms"]),
        "raw_after_over_before_batch32": ratio(raw["after"]["batch32_texts_per_s"], raw["before"]["batch32_texts_per_s"]),
        "soak_achieved_over_rate": soak.get("achieved_over_rate"),
        # each grid point against W in-process sessions of T threads (what its workers' models could do alone)
        **{f"grid_{pt}_over_raw_same_threads": ratio(
            max(v["16"]["requests_per_s"], v["64"]["requests_per_s"]),
            v["workers"] * scaling[str(v["threads"])]["batch32_texts_per_s"] if str(v["threads"]) in scaling else None)
           for pt, v in grid.get("points", {}).items()},
        **{f"after_over_before_c{c}_throughput": ratio(p["after"]["requests_per_s"], p["before"]["requests_per_s"])
           for c, p in before_after.items()},
        **{f"before_over_after_c{c}_p50": ratio(p["before"]["latency_ms"]["p50"], p["after"]["latency_ms"]["p50"])
           for c, p in before_after.items()},
    }
    slope = (soak.get("rss_mb") or {}).get("slope_second_half_mb_per_min")
    soak_note = "" if soak_seconds >= 600 else f" (this run's soak: {soak_seconds:.0f} s, not the issue's 10 minutes)"
    targets = [
        target("http_over_raw_throughput: best HTTP requests/s at 16 or 64 connections / raw onnxruntime texts/s at "
               "batch 32 (the better of its default and the served session)", ratios["http_over_raw_throughput"], ">=", 0.8),
        target("http_p50_overhead_ms: 1-connection HTTP p50 - in-process batch-1 p50 of the same session (spinning "
               "off, as served)", overhead, "<=", 1.0,
               why="the same model call on both sides; against onnxruntime's spinning default see "
                   "results.http_p50_overhead_vs_ort_default_ms"),
        target("over_hf_pipeline_throughput: distill serve / FastAPI + transformers.pipeline requests/s, 16 connections",
               ratios["over_hf_pipeline_throughput"], ">=", 5.0),
        target("soak_errors at 80% of peak" + soak_note, soak.get("errors"), "<=", 0),
        target("soak_rss_slope_mb_per_min: |RSS slope| over the soak's second half" + soak_note,
               None if slope is None else abs(slope), "<=", RSS_SLOPE_FLAT,
               why="a leak of 1 MB/min is 1.4 GB a day, plain on any dashboard; below that, five minutes of samples of "
                   "a few-hundred-MB process cannot tell a leak from allocator and arena noise"),
    ]
    # CPU per served request (server process, all threads) next to the model's own CPU per text at batch 32: the
    # difference is what HTTP, JSON, the hop to the model thread and the router cost in CPU (under --workers, each
    # worker's event loop needs that much of a core per request)
    cpu_per_request = {c: {"server_cpu_ms": 1e3 * r["server_cpu_seconds"] / r["requests_2xx"],
                           "model_cpu_ms_at_batch32": served_raw["batch32_cpu_ms_per_text"]}
                       for c, r in runs.items() if r.get("requests_2xx") and r.get("server_cpu_seconds") is not None}
    results = {
        "cpu_per_request": cpu_per_request,
        "model": {"project": m["source"], "run_id": m["run_id"], "onnx": "int8", "backend": distill["health"].get("backend"),
                  "router": distill["health"].get("router"), "export_seconds": m["export_seconds"],
                  "calibrate_seconds": m["calibrate_seconds"], "calibrate_output": m["calibrate_output"],
                  "hf_baseline_model": "the run's torch folder (" + str(Path(m["model"]).relative_to(m["copy"])) + ")"},
        "texts": text_counts,
        "raw_onnxruntime": raw,
        "http_p50_overhead_ms": overhead,
        "http_p50_overhead_vs_ort_default_ms": overhead_default,
        "distill_serve": distill,
        "hf_pipeline_server": hf,
        "soak": soak,
        "before_after": {"ref": a.before, "runs": before_after} if a.before else None,
        "workers_grid": grid,
        "notes": notes,
        "phase_seconds": phases,
    }
    config = {"connections": conns, "hf_connections": hf_conns, "seconds_per_run": seconds, "raw_seconds": raw_seconds,
              "soak_seconds": soak_seconds, "soak_share_of_peak": SOAK_SHARE, "soak_connections": soak.get("connections"),
              "grid": grid_spec, "threads": a.threads, "coverage": COVERAGE, "endpoint": "POST /v1/classify, one text per request",
              "bodies": len(bodies), "load_generator": "autocannon 8.0.0 (bench/autocannon_run.js)",
              "cpu_count": os.cpu_count(), "pinning": plan}
    result = bench_result("serve", smoke=a.smoke, started=t_start, environment_start=env0, config=config,
                          results=results, ratios=ratios, targets=targets)
    write_json_atomic(out, result)
    print(json.dumps({"ratios": ratios, "targets": [(t["name"].split(":")[0], t["measured"], t["met"]) for t in targets]},
                     indent=1, default=str))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
