"""`distill route calibrate` on a tiny extract project with the real packaged SmolLM2-135M GGUF as the student:
the router is fitted on validation, saved next to the .gguf, prints its coverage -> field-F1 curve, and its
decisions on new inputs follow the saved thresholds.

The untuned 135M model answers poorly; nothing here depends on what it answers (no exact floats or texts)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from distill.cli import app
from distill.project import Project

pytestmark = pytest.mark.slow

SPEC = """
name: tiny-weather-slots
kind: extract
description: "Weather or music request."
schema:
  type: object
  properties:
    intent: {enum: [weather, music]}
    slots: {type: object, additionalProperties: {type: string}}
  required: [intent, slots]
  additionalProperties: false
teachers:
  - name: rec
    kind: replay
    path: rec.jsonl
teacher: rec
"""
CITIES = ["paris", "rome", "oslo", "lima", "kyiv", "bern", "doha", "baku", "riga", "cork"]


@pytest.fixture(scope="module")
def gguf_folder(tmp_path_factory) -> Path:
    """A GGUF student folder as the export writes it: the .gguf, the HF tokenizer, distill_student.json."""
    from transformers import AutoTokenizer

    from distill.models import converted_dir, resolve_model

    m = resolve_model("smollm2-135m-instruct")
    folder = tmp_path_factory.mktemp("gguf_student")
    cached = converted_dir(m)      # the same tokenizer, cached as an HF folder: <1 s instead of ~9 s from the GGUF
    tok = (AutoTokenizer.from_pretrained(cached) if (cached / "tokenizer.json").exists()
           else AutoTokenizer.from_pretrained(m.gguf.parent, gguf_file=m.gguf.name))
    tok.save_pretrained(folder)
    (folder / "distill_student.json").write_text(json.dumps(
        {"prompt": "short", "input_prefix": "", "base_model": "smollm2-135m-instruct"}))
    (folder / m.gguf.name).symlink_to(m.gguf)
    return folder


def make_project(root: Path) -> Project:
    """20 train rows (teacher-labelled), 20 validation rows (the teacher labelled the first 12; all have gold),
    4 test rows (never read by calibration)."""
    proj = Project.init(root, "extract", SPEC)
    now = time.time()
    with proj.store.tx() as c:
        for i in range(44):
            split, j = ("train", i) if i < 20 else ("validation", i - 20) if i < 40 else ("test", i - 40)
            intent = "weather" if i % 2 else "music"
            city = CITIES[i % len(CITIES)]
            verb = "will it rain in" if intent == "weather" else "play songs from"
            text = f"{verb} {city} {'today' if i % 3 else 'now'} {i}"
            ans = {"intent": intent, "slots": {"city": city}}
            ex_id = f"{split[:2]}{j:02d}"
            c.execute("INSERT INTO examples(id, text, norm, gold, segment, split, created_at) VALUES(?,?,?,?,?,?,?)",
                      (ex_id, text, text, json.dumps(ans), intent, split, now))
            if split == "train" or (split == "validation" and j < 12):
                c.execute("INSERT INTO labels(example_id, teacher, status, answer, created_at) VALUES(?,?,?,?,?)",
                          (ex_id, "rec", "ok", json.dumps(ans), now))
    return proj


def expected_reason(sig: dict, cfg) -> str:
    if cfg.route_invalid and sig["invalid_unconstrained"]:
        return "invalid_unconstrained"
    if sig["ood"] is not None and sig["ood"] > cfg.ood_threshold:
        return "ood"
    conf = sig[cfg.confidence]
    return "low_confidence" if (-math.inf if conf is None else conf) < cfg.conf_threshold else "confident"


def test_route_calibrate_lm_project(gguf_folder, tmp_path):
    from distill.serve.lm_router import LM_KNN_FILE, LM_ROUTER_FILE, LMRouter
    from distill.students.gguf_engine import GGUFStudent
    from distill.task import render_messages

    root = tmp_path / "proj"
    make_project(root).close()
    runner = CliRunner()

    # a classify-only option is refused before any model is loaded
    bad = runner.invoke(app, ["route", "calibrate", str(root), "--confidence", "max_prob", "--model", str(gguf_folder)])
    assert bad.exit_code == 2 and "mean_logprob" in bad.output

    t0 = time.perf_counter()
    res = runner.invoke(app, ["route", "calibrate", str(root), "--model", str(gguf_folder), "--coverage", "0.8",
                              "--k", "5", "--max-tokens", "32", "--threads", "1"])
    took = time.perf_counter() - t0
    assert res.exit_code == 0, res.output
    out = res.output
    # the curve table and the summary lines
    assert "coverage → field_f1" in out and "student" in out and "system" in out   # (headers wrap at 80 columns)
    assert "0.500" in out and "1.000" in out                          # the curve's coverage levels
    assert "plain threshold" in out and "guaranteed threshold: none" in out and "needs n >=" in out
    assert "only 20 validation rows" in out and "right = vs teacher 'rec'" in out
    assert f"wrote {gguf_folder / LM_ROUTER_FILE}" in out

    # written next to the .gguf that is served, with its kNN reference of the 20 train inputs (frozen MiniLM
    # embeddings of their text, the default ood_source)
    assert (gguf_folder / LM_ROUTER_FILE).exists() and (gguf_folder / LM_KNN_FILE).exists()
    assert np.load(gguf_folder / LM_KNN_FILE).shape[0] == 20
    router = LMRouter.load(gguf_folder)
    cfg = router.config
    assert router.calibrated and router.needs_text and not router.needs_embedding
    assert np.load(gguf_folder / LM_KNN_FILE).shape[1] == 384 and cfg.ood_source == "text"
    assert cfg.kind == "extract" and cfg.n_validation == 20 and cfg.n_reference == 20 and cfg.k == 5
    assert cfg.n_vs_teacher == 12 and cfg.n_vs_gold == 8 and "else vs gold" in cfg.right
    assert cfg.max_tokens == 32 and cfg.model["gguf_file"].endswith(".gguf") and cfg.created_at > 0
    # 20 rows cannot support a promise at 80%: the plain threshold is served, and meets the target on validation
    assert cfg.threshold_rule == "plain" and cfg.guaranteed_conf_threshold is None
    assert cfg.n_for_guarantee > 20 and cfg.achieved_coverage >= 0.8
    assert [p["target"] for p in cfg.curve] == [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0]
    for p in cfg.curve:
        assert 0.0 <= p["coverage"] <= 1.0 and p["answered"] == round(p["coverage"] * 20)
        for key in ("student_field_f1", "system_field_f1"):
            assert p[key] is None or 0.0 <= p[key] <= 1.0
    assert cfg.curve[-1]["coverage"] >= cfg.curve[0]["coverage"]

    # decisions on new inputs obey the saved thresholds
    spec = Project.open(root).spec
    student = GGUFStudent(gguf_folder, n_ctx_per_seq=1024, max_batch=4, n_threads=1)
    try:
        texts = ["will it rain in vienna now", "play songs from accra today",
                 "Translate into German: the quarterly report is late",
                 "def f(x): return [i**2 for i in range(x)]"]
        futures = [student.engine.submit(student.request(render_messages(spec, t), 32, schema=spec.json_schema,
                                                         want_embedding=router.needs_embedding)) for t in texts]
        for t, f in zip(texts, futures):
            d = router.decide(f.result(), t)
            assert d.reason == expected_reason(d.signals, cfg)
            assert d.routed_to == ("student" if d.reason == "confident" else "teacher")
            assert d.signals["ood"] is not None and d.signals["ood"] >= -1e-6
    finally:
        student.close()
    assert took < 120, f"calibration took {took:.0f} s"
