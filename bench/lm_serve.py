"""`lm-serve` suite: an LM student for extraction (SNIPS slots) quantized, served with schema-constrained
decoding, and routed to its teacher — the figures of the LM-serving issue, measured in one run.

    .venv/bin/python bench/lm_serve.py                      # ~25 min on 2 cores from scratch; bench/results/lm_serve.json
    .venv/bin/python bench/lm_serve.py --project DIR        # reuse a project that already trained (any extract project)
    .venv/bin/python bench/lm_serve.py --smoke              # a tiny random LM: checks the script, not the numbers

Steps, each through the same code a user runs:
1. the project: examples/snips-slots copied to ``bench/.work/lm-serve`` (import, label with the recorded
   Qwen2.5-Coder-1.5B teacher, filter, train the SmolLM2-135M LoRA student as distill.yaml says; a finished
   training run with the same data and settings is reused);
2. ``distill export --format gguf`` of the newest trained model: bf16 merged folder + Q8_0 GGUF, with its
   parity report on the test split (quantized vs merged: field F1 vs gold, greedy tokens/s at batch 1,
   sizes) — read from the export's export.json;
3. ``distill route calibrate`` on the validation split (coverage target ``--coverage``);
4. ``distill serve`` (uvicorn on loopback, this process) answers every test input over HTTP, 8 concurrent
   requests: schema validity of what the client receives, field F1 vs gold of the routed system (student
   where it is confident, the teacher's recorded answer where routed, the teacher's answers come from the
   project's cache exactly as in production), routed share;
5. throughput: the same test prompts at 1 and 8 concurrent requests through HTTP (router off: the
   student answers everything) and through the engine in-process, side by side, interleaved.

Cost per 1M requests: teacher-only = the ledger's mean cost per teacher call (the recorded local teacher
is priced by its measured latency at $0.10/CPU-hour, distill.yaml); routed = routed share x teacher +
the student's measured in-process seconds per request at batch 1 x the same CPU-hour price (an upper
bound: batching makes a request cheaper).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
EXAMPLE = ROOT / "examples" / "snips-slots"
CPU_HOUR_USD = 0.10


def build_project(work: Path, smoke: bool) -> Path:
    """The example copied to ``work`` (spec, data, recording), imported, labelled, filtered and trained."""
    import yaml

    from distill.data.importer import import_file
    from distill.filters import run_filters
    from distill.labeling import label
    from distill.project import Project
    from distill.recipes.train import train

    work.mkdir(parents=True, exist_ok=True)
    for name in ("distill.yaml", "teacher_qwen2.5-coder-1.5b.jsonl"):
        if not (work / name).exists():
            shutil.copy(EXAMPLE / name, work / name)
    if smoke and not (work / "tiny-base").exists():
        _tiny_base(work / "tiny-base")
        spec = yaml.safe_load((work / "distill.yaml").read_text())
        spec["student"].update(base_model=str(work / "tiny-base"), max_steps=2, epochs=1, batch_size=2, grad_accum=1,
                               lora_rank=4, lora_alpha=8.0, max_length=160)
        (work / "distill.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    project = Project.open(work)
    import_file(project, EXAMPLE / "snips_slots.csv", id="id", label="gold")
    teacher = project.spec.get_teacher().name
    label(project, teacher, progress=False)
    run_filters(project, teacher)
    train(project, teacher=teacher, progress=not smoke)
    project.close()
    return work


def _tiny_base(folder: Path) -> None:
    """A 2-layer random Llama with the SmolLM2 tokenizer (llama.cpp's converter needs a real tokenizer)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from distill.models import resolve_model

    gguf = resolve_model("smollm2-135m-instruct").gguf
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)


class Server:
    """``distill serve``'s app under uvicorn on a free loopback port, in its own process (as in production: an
    in-process server would share the GIL with this script's client and the engine's Python loop)."""

    def __init__(self, work: Path, gguf_dir: Path, threads: int | None, pass_through: bool):
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.cmd = [sys.executable, __file__, "--serve", str(self.port), "--project", str(work), "--gguf", str(gguf_dir),
                    *(["--threads", str(threads)] if threads else []), *(["--pass-through"] if pass_through else [])]

    def __enter__(self) -> "Server":
        import subprocess

        import httpx

        self.proc = subprocess.Popen(self.cmd)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited with code {self.proc.returncode}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.proc.kill()
        raise SystemExit("the server did not start within 300 s")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def serve_only(port: int, work: Path, gguf_dir: Path, threads: int | None, pass_through: bool) -> None:
    import uvicorn

    from distill.serve.app import ServeConfig, create_app, uvicorn_config
    from distill.serve.lm_router import LMRouter

    app = create_app(work, config=ServeConfig(model_path=str(gguf_dir), require_key=False, n_threads=threads),
                     router=LMRouter.pass_through() if pass_through else None)
    uvicorn.Server(uvicorn_config(app, port=port, log_level="warning")).run()


def test_curve(student, router, spec, texts, gold, teacher_pred, thresholds, max_tokens, teacher_usd, student_usd,
               field_f1) -> list[dict]:
    """The validation curve's thresholds applied to the test split: coverage, routed system field F1 vs gold
    (teacher's recorded answer where routed) and cost relative to teacher-only, per threshold."""
    import json as _json

    from distill.task import render_messages

    futs = [student.engine.submit(student.request(render_messages(spec, t), max_tokens, schema=spec.json_schema,
                                                  want_embedding=router.needs_embedding)) for t in texts]
    res = [f.result() for f in futs]
    sig = [router.signals(r, t) for r, t in zip(res, texts)]
    ans = []
    for r in res:
        try:
            ans.append(_json.loads(r.text))
        except ValueError:
            ans.append(None)
    cfg = router.config
    out = []
    for target, t in thresholds:
        routed = [(s["ood"] is not None and s["ood"] > cfg.ood_threshold) or (s[cfg.confidence] is None)
                  or s[cfg.confidence] < t for s in sig]
        system = [teacher_pred[i] if routed[i] else ans[i] for i in range(len(texts))]
        share = sum(routed) / len(routed)
        out.append({"validation_target": target, "threshold": t, "test_coverage": 1 - share,
                    "system_field_f1": field_f1(system, gold),
                    "cost_over_teacher_only": (share * teacher_usd + student_usd) / teacher_usd if teacher_usd else None})
    return out


async def _http_pass(url: str, model: str, texts: list[str], concurrency: int, max_tokens: int) -> dict:
    """Every text once through /v1/chat/completions with ``concurrency`` requests in flight."""
    import httpx

    sem = asyncio.Semaphore(concurrency)
    out: list[dict | None] = [None] * len(texts)
    lat: list[float] = [0.0] * len(texts)

    async def one(client, i: int) -> None:
        async with sem:
            t0 = time.perf_counter()
            r = await client.post("/v1/chat/completions", json={
                "model": model, "max_tokens": max_tokens, "messages": [{"role": "user", "content": texts[i]}]})
            lat[i] = time.perf_counter() - t0
            r.raise_for_status()
            out[i] = r.json()

    t0 = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        await asyncio.gather(*(one(client, i) for i in range(len(texts))))
    wall = time.perf_counter() - t0
    tokens = sum(o["usage"]["completion_tokens"] for o in out)
    return {"responses": out, "wall_s": wall, "requests_per_s": len(texts) / wall, "tokens_per_s": tokens / wall,
            "latency_p50_s": statistics.median(lat), "completion_tokens": tokens}


async def _engine_pass(student, spec, texts: list[str], concurrency: int, max_tokens: int) -> dict:
    """The same requests straight into the engine (no HTTP, no router)."""
    from distill.task import render_messages

    sem = asyncio.Semaphore(concurrency)
    toks, lat = [0] * len(texts), [0.0] * len(texts)
    schema = spec.json_schema if spec.kind == "extract" else None

    async def one(i: int) -> None:
        async with sem:
            t0 = time.perf_counter()
            g = await student.engine.agenerate(student.request(render_messages(spec, texts[i]), max_tokens, schema=schema))
            lat[i] = time.perf_counter() - t0
            toks[i] = g.completion_tokens

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(len(texts))))
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "requests_per_s": len(texts) / wall, "tokens_per_s": sum(toks) / wall,
            "latency_p50_s": statistics.median(lat), "latency_mean_s": statistics.fmean(lat),
            "completion_tokens": sum(toks)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--project", type=Path, help="an extract project that already trained (default: build one)")
    ap.add_argument("--coverage", type=float, default=0.9)
    ap.add_argument("--quant", default="Q8_0")
    ap.add_argument("--parity-limit", type=int, default=None, help="test rows in the export's parity check (default all)")
    ap.add_argument("--throughput-inputs", type=int, default=32, help="test inputs per throughput pass")
    ap.add_argument("--threads", type=int, default=None, help="engine threads (default: every core)")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--serve", type=int, help=argparse.SUPPRESS)        # internal: run only the server, on this port
    ap.add_argument("--gguf", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--pass-through", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.serve:
        serve_only(a.serve, a.project, a.gguf, a.threads, a.pass_through)
        return 0
    out = a.out or (Path(tempfile.gettempdir()) / "lm_serve_smoke.json" if a.smoke else HERE / "results" / "lm_serve.json")
    if a.smoke:
        a.parity_limit, a.throughput_inputs = 3, 4

    import numpy as np

    from distill.cost import teacher_cost_per_request
    from distill.evaluate import common as C
    from distill.evaluate.lm import pair_counts
    from distill.export.gguf import export_gguf_project, gguf_export_for
    from distill.project import Project
    from distill.runinfo import bench_result, environment, target, write_json_atomic
    from distill.serve.lm_router import LMRouter, calibrate_lm_project
    from distill.students.gguf_engine import GGUFStudent

    t_start, env0 = time.perf_counter(), environment()
    work = a.project or HERE / ".work" / ("lm-serve-smoke" if a.smoke else "lm-serve")
    if a.project is None:
        build_project(work, a.smoke)
    project = Project.open(work)
    spec = project.spec
    if spec.kind != "extract":
        raise SystemExit(f"{work}: the lm-serve suite measures an extract project (field F1); this one is {spec.kind}")
    ref = project.latest_model()
    tname = spec.get_teacher().name

    # 2. export (reused when this model already has one) -------------------------------------------------
    t0 = time.perf_counter()
    gdir = gguf_export_for(project, ref.run_id)
    if gdir is None or not (gdir / "export.json").exists():
        gdir = export_gguf_project(project, run_id=ref.run_id, quant=a.quant, parity_limit=a.parity_limit,
                                   threads=a.threads, say=print).out_dir
    export_s = time.perf_counter() - t0
    export = json.loads((gdir / "export.json").read_text())
    parity = export.get("parity") or {}

    # 3. router on validation ------------------------------------------------------------------------------
    t0 = time.perf_counter()
    max_tokens = spec.get_teacher(tname).max_tokens or 128    # the same budget for calibration and serving
    rcfg = calibrate_lm_project(work, model_path=str(gdir), coverage=a.coverage, max_tokens=max_tokens,
                                n_threads=a.threads, progress=not a.smoke)
    calibrate_s = time.perf_counter() - t0

    # 4. the routed service on the test split -----------------------------------------------------------
    notes: list[str] = []
    test = C.test_table(project, tname, notes)
    texts, gold, teacher_pred = test["texts"], test["gold"], test["teacher_pred"]
    project.close()
    with Server(work, gdir, a.threads, pass_through=False) as srv:
        routed_pass = asyncio.run(_http_pass(srv.url, spec.name, texts, 8, max_tokens))
    answers, valid, routed, degraded, reasons = [], [], [], [], {}
    import jsonschema

    for r in routed_pass["responses"]:
        content = r["choices"][0]["message"]["content"]
        try:
            obj = json.loads(content)
            jsonschema.validate(obj, spec.json_schema)
            ok = True
        except (json.JSONDecodeError, jsonschema.ValidationError):
            obj, ok = None, False
        answers.append(obj)
        valid.append(ok)
        routed.append(r["distill"]["routed_to"] == "teacher" and not r["distill"]["degraded"])
        degraded.append(bool(r["distill"]["degraded"]))
        reasons[r["distill"]["reason"]] = reasons.get(r["distill"]["reason"], 0) + 1

    def field_f1(preds: list, refs: list) -> float:
        c = np.array([pair_counts(p, g) for p, g in zip(preds, refs)], float).reshape(-1, 3)
        return float(2 * c[:, 0].sum() / (c[:, 1].sum() + c[:, 2].sum()))

    has_gold = [i for i, g in enumerate(gold) if g is not None]
    sys_f1 = field_f1([answers[i] for i in has_gold], [gold[i] for i in has_gold])
    teacher_f1 = field_f1([teacher_pred[i] for i in has_gold], [gold[i] for i in has_gold])
    student_only = [answers[i] if not routed[i] else None for i in range(len(texts))]
    covered = [i for i in has_gold if not routed[i]]
    covered_f1 = field_f1([student_only[i] for i in covered], [gold[i] for i in covered]) if covered else None
    routed_share = sum(routed) / len(routed)

    # 5. throughput: HTTP (router off) vs in-process, interleaved ----------------------------------------
    tp_texts = (texts * (1 + a.throughput_inputs // max(1, len(texts))))[: a.throughput_inputs]
    student = GGUFStudent(gdir, n_threads=a.threads)
    tput: dict[str, dict] = {}
    with Server(work, gdir, a.threads, pass_through=True) as srv:
        for conc in (1, 8):
            tput[f"engine_c{conc}"] = asyncio.run(_engine_pass(student, spec, tp_texts, conc, max_tokens))
            h = asyncio.run(_http_pass(srv.url, spec.name, tp_texts, conc, max_tokens))
            tput[f"http_c{conc}"] = {k: v for k, v in h.items() if k != "responses"}

    # cost ------------------------------------------------------------------------------------------------
    project = Project.open(work)
    t_cost = teacher_cost_per_request(project, tname)
    project.close()
    teacher_usd = float(t_cost.get("usd") or 0.0)      # mean ledger cost per teacher call
    student_usd = tput["engine_c1"]["latency_mean_s"] * CPU_HOUR_USD / 3600
    routed_usd = routed_share * teacher_usd + student_usd
    # the trade-off on test: each validation threshold of the curve, applied to the test split
    g_texts = [texts[i] for i in has_gold]
    curve = test_curve(student, LMRouter.load(gdir), spec, g_texts, [gold[i] for i in has_gold],
                       [teacher_pred[i] for i in has_gold],
                       # a null threshold in the curve is "no cut" (JSON has no infinities)
                       [(c["target"], float("-inf") if c["threshold"] is None else c["threshold"]) for c in rcfg.curve],
                       max_tokens, teacher_usd, student_usd, field_f1)
    student.close()

    results = {
        "model_run_id": ref.run_id, "gguf_export": str(gdir.relative_to(work) if gdir.is_relative_to(work) else gdir),
        "export_seconds": round(export_s, 1), "calibrate_seconds": round(calibrate_s, 1),
        "parity": parity,
        "router": dataclasses.asdict(rcfg),
        "served_test": {"n": len(texts), "n_gold": len(has_gold), "schema_valid_served": sum(valid) / len(valid),
                        "routed_share": routed_share, "degraded": sum(degraded), "reasons": reasons,
                        "field_f1_routed_system_vs_gold": sys_f1, "field_f1_teacher_vs_gold": teacher_f1,
                        "field_f1_student_on_covered_vs_gold": covered_f1,
                        "http_c8": {k: v for k, v in routed_pass.items() if k != "responses"}},
        "throughput": tput,
        "test_curve": curve,
        "cost_per_1m_usd": {"teacher_only": teacher_usd * 1e6, "routed": routed_usd * 1e6, "student_only": student_usd * 1e6,
                            "teacher_ledger": t_cost, "cpu_hour_usd": CPU_HOUR_USD},
        "notes": notes,
    }

    def ratio(x, y):
        return None if x is None or not y else x / y

    ratios = {
        "quantized_over_merged_field_f1": (parity.get("vs_gold") or {}).get("ratio"),
        "quantized_vs_merged_field_f1": (parity.get("quantized_vs_merged") or {}).get("field_f1"),
        "quantized_over_merged_tokens_per_s_batch1": (parity.get("speed") or {}).get("ratio"),
        "quantized_over_merged_size": (parity.get("bytes") or {}).get("ratio"),
        "routed_system_over_teacher_field_f1": ratio(sys_f1, teacher_f1),
        "routed_over_teacher_only_cost": ratio(routed_usd, teacher_usd),
        "http_over_engine_requests_per_s_c1": ratio(tput["http_c1"]["requests_per_s"], tput["engine_c1"]["requests_per_s"]),
        "http_over_engine_requests_per_s_c8": ratio(tput["http_c8"]["requests_per_s"], tput["engine_c8"]["requests_per_s"]),
        "engine_c8_over_c1_tokens_per_s": ratio(tput["engine_c8"]["tokens_per_s"], tput["engine_c1"]["tokens_per_s"]),
    }
    targets = [
        target("schema_valid_served on the test split (constrained decoding)", results["served_test"]["schema_valid_served"],
               ">=", 1.0),
        target("quantized / merged field F1 vs gold", ratios["quantized_over_merged_field_f1"], ">=", 0.98),
        target("quantized / merged batch-1 tokens/s", ratios["quantized_over_merged_tokens_per_s_batch1"], ">=", 3.0),
        target("routed system / teacher field F1 vs gold", ratios["routed_system_over_teacher_field_f1"], ">=", 1.0),
        target("routed / teacher-only cost per 1M requests", ratios["routed_over_teacher_only_cost"], "<=", 0.30),
    ]
    result = bench_result("lm_serve", smoke=a.smoke, started=t_start, environment_start=env0,
                          config={"project": str(work), "coverage": a.coverage, "quant": a.quant,
                                  "parity_limit": a.parity_limit, "throughput_inputs": a.throughput_inputs,
                                  "threads": a.threads, "student": spec.student, "teacher": tname},
                          results=results, ratios=ratios, targets=targets)
    write_json_atomic(out, result)
    print(json.dumps({"ratios": ratios, "served_test": results["served_test"]}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
