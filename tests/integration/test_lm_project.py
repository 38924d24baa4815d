"""An extract project end to end on a tiny in-process Llama: train (recipes.train -> train_lm_project) ->
evaluate_lm -> report -> export_lm_project, plus reuse of a finished run and resume after a real kill -9.

The tiny model answers nonsense; these tests check that the stages connect, that the numbers are computed
(shape, ranges, values that can be derived by hand from the store), not the student's quality."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))

from distill.errors import DistillError  # noqa: E402
from distill.project import Project  # noqa: E402

CITIES = ["paris", "rome", "oslo", "lima", "kyiv", "bern", "doha", "baku"]
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
segment_field: intent
quality: {{metric: field_f1, against: gold, overall: 0.5, worst_segment: 0.4, min_segment_size: 3}}
teachers:
  - name: rec
    kind: replay
    path: rec.jsonl
teacher: rec
student:
  base: {base}
  lora_rank: 4
  lora_alpha: 8
  lora_dropout: 0.0
  lr: 0.03
  batch_size: 4
  max_steps: 3
  save_every: 100
  max_length: 96
  device: cpu
  cpu_threads: 1
"""


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)   # tiny matrices: thread hand-offs cost more than the maths
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    from tiny_lm import save_tiny_base

    return save_tiny_base(tmp_path_factory.mktemp("tiny_base"), seed=0)


def make_project(root: Path, base_dir: Path) -> Project:
    """16 train + 8 test rows. Teacher answers = gold, except test row t6 (failed: schema violation) and
    t7 (never labelled)."""
    proj = Project.init(root, "extract", SPEC.format(base=base_dir))
    now = time.time()
    with proj.store.tx() as c:
        for i in range(24):
            intent = "weather" if i % 2 else "music"
            city = CITIES[i % len(CITIES)]
            text = f"{'rain in' if intent == 'weather' else 'play songs from'} {city} {i}"
            ans = {"intent": intent, "slots": {"city": city}}
            ex_id, split = (f"t{i - 16}", "test") if i >= 16 else (f"x{i:02d}", "train")
            c.execute("INSERT INTO examples(id, text, norm, gold, segment, split, created_at) VALUES(?,?,?,?,?,?,?)",
                      (ex_id, text, text, json.dumps(ans), intent, split, now))
            if ex_id == "t6":
                c.execute("INSERT INTO labels(example_id, teacher, status, reason, created_at) VALUES(?,?,?,?,?)",
                          (ex_id, "rec", "failed", "schema_violation", now))
            elif ex_id != "t7":
                c.execute("INSERT INTO labels(example_id, teacher, status, answer, created_at) VALUES(?,?,?,?,?)",
                          (ex_id, "rec", "ok", json.dumps(ans), now))
    return proj


def test_train_eval_report_export_end_to_end(base_dir, tmp_path):
    from distill.evaluate import evaluate_lm
    from distill.export.lm import export_lm_project
    from distill.recipes.lm_project import train_lm_project
    from distill import runs
    from distill.recipes.train import train
    from distill.report.html import write_report

    t_start = time.perf_counter()
    proj = make_project(tmp_path / "proj", base_dir)

    rep = train(proj, progress=False)
    assert not rep.reused and rep.path.is_dir() and rep.path.parent == proj.models_dir / rep.run_id
    assert rep.record["counts"]["train"] == 16 and rep.record["steps"] == 3
    assert rep.record["teacher"]["identity"]["name"] == "rec"
    # the spec's `base:` and `lr:` are the older names of base_model and learning_rate
    assert rep.record["config"]["base_model"] == str(base_dir) and rep.record["config"]["learning_rate"] == 0.03
    run = proj.store.latest_run("train_lm")
    # registered with a path relative to the project folder (a moved project still finds its models)
    assert run["id"] == rep.run_id and run["path"] == str(rep.path.resolve().relative_to(proj.root.resolve()))
    assert proj.model(run_id=rep.run_id).path == rep.path.resolve()
    # same settings, same data: the finished run is reused, nothing is trained
    again = train_lm_project(proj, progress=False)
    assert again.reused and again.run_id == rep.run_id
    # an override that changes the weights is a different run
    other = train(proj, overrides={"max_steps": 2}, progress=False)
    assert other.run_id != rep.run_id and other.record["steps"] == 2
    with pytest.raises(DistillError, match="max_stepz"):
        train(proj, overrides={"max_stepz": 2}, progress=False)

    res = evaluate_lm(proj, model_path=str(rep.path), max_new_tokens=12, progress=False)
    assert res["model_run_id"] == rep.run_id and res["test"]["n"] == 8 and res["test"]["n_gold"] == 8
    assert set(res["systems"]) == {"student", "base", "teacher", "majority"}
    # the constant "most common training answer" matches 1 of the 8 test rows exactly: the teacher (6 of 8) is
    # not the problem, so retention stays in the headline
    assert res["systems"]["majority"]["vs_gold"]["accuracy"]["value"] == pytest.approx(1 / 8)
    assert res["verdict"]["teacher_problem"] is False and "retention" in res["headline"]["student"]
    for name in ("student", "base", "teacher"):
        s = res["systems"][name]
        for m in ("accuracy", "field_f1", "field_precision", "field_recall"):
            v = s["vs_gold"][m]
            assert v["n"] == 8 and len(v["ci"]) == 2
            assert v["value"] is None or 0.0 <= v["value"] <= 1.0
        assert 0.0 <= s["validity"]["schema_valid"]["value"] <= s["validity"]["json_valid"]["value"] <= 1.0
        assert {x["segment"] for x in s["segments"]} == {"weather", "music"}
    # the teacher matches gold on the 6 rows it answered; its failed and missing rows count as wrong
    t = res["systems"]["teacher"]
    assert t["vs_gold"]["accuracy"]["value"] == pytest.approx(6 / 8)
    assert t["vs_gold"]["field_f1"]["value"] == pytest.approx(2 * 12 / (12 + 16))
    assert t["validity"]["json_valid"]["value"] == pytest.approx(7 / 8)     # the schema violation was JSON
    assert t["validity"]["schema_valid"]["value"] == pytest.approx(6 / 8)
    assert res["systems"]["student"]["vs_teacher"]["agreement"]["n"] == 6
    assert res["test"]["teacher_failed"] == 1 and res["test"]["teacher_unlabelled"] == 1
    # latency and throughput were measured for both generating systems
    for name in ("student", "base"):
        lat = res["latency"][name]
        assert lat["batch1"]["n"] == 8 and lat["batch1"]["p50_s"] > 0
        assert lat["throughput"]["tokens_per_s"] > 0 and 0 < lat["tokens"]["new_mean"] <= 12
    assert isinstance(res["gate"]["passed"], bool) and res["gate"]["metric"] == "field_f1"
    assert "student" in res["headline"] and "schema_valid" in res["headline"]["student"]
    # written atomically as JSON, registered as an eval run, and the HTML report renders it
    on_disk = json.loads(Path(res["json_path"]).read_text())
    assert on_disk == json.loads(json.dumps(res))
    _, eval_json = runs.latest_eval(proj.store, proj.root)          # stored relative to the project folder
    assert eval_json == Path(res["json_path"]).resolve()
    html, _ = write_report(proj, res)
    assert "tiny-slots" in html.read_text()

    merged = export_lm_project(proj, rep.run_id)
    assert (merged / "config.json").exists() and not (merged / "adapter_config.json").exists()
    with pytest.raises(DistillError, match="not empty"):
        export_lm_project(proj, rep.run_id)
    res_m = evaluate_lm(proj, model_path=str(merged), max_new_tokens=12, base=False, progress=False)
    assert res_m["systems"]["base"]["available"] is False and res_m["model_run_id"] == f"{rep.run_id}-merged"
    assert res_m["lineage"]["training_record"]["run_id"] == rep.run_id
    # the merged model (bf16: its answers may differ from base + adapter, which test_train_causal_lm checks
    # weight by weight) is scored on the same test rows
    assert res_m["test"]["hash"] == res["test"]["hash"] and len(res_m["samples"]) == len(res["samples"])
    assert res_m["systems"]["student"]["vs_gold"]["field_f1"]["n"] == 8
    assert json.loads((merged / "distill_student.json").read_text())["merged_from"] == rep.run_id
    # --limit scores a fixed subset of the test rows
    # (and a merged student's base is loaded from the base named in its distill_student.json)
    res_l = evaluate_lm(proj, model_path=str(merged), max_new_tokens=4, limit=3, progress=False)
    assert res_l["test"]["n"] == 3 and res_l["test"]["n_total"] == 8
    assert res_l["systems"]["base"]["available"] and res_l["latency"]["base"]["batch1"]["n"] == 3
    proj.close()
    assert time.perf_counter() - t_start < 60


def test_user_errors(base_dir, tmp_path):
    from distill.evaluate import evaluate_lm
    from distill.export.lm import export_lm_project
    from distill.recipes.lm_project import train_lm_project
    from distill.recipes.train import train

    proj = make_project(tmp_path / "proj", base_dir)
    with pytest.raises(DistillError, match="no trained generative student"):
        evaluate_lm(proj, progress=False)
    with pytest.raises(DistillError, match="no finished generative-student run"):
        export_lm_project(proj)
    with pytest.raises(DistillError, match="both `base` and `base_model`"):
        train(proj, overrides={"base": "a", "base_model": "b"}, progress=False)
    # an override by its older name replaces the file's setting, whichever name the file used
    assert proj.spec.student_config({"base_model": "b"}).base_model == "b"
    assert proj.spec.student_config({"lr": 0.5}).learning_rate == 0.5
    with pytest.raises(DistillError, match="no teacher named 'nope'"):
        train_lm_project(proj, teacher="nope", progress=False)
    proj.close()


_KILL_SCRIPT = """
import functools, sys, time, torch
torch.set_num_threads(1)
from distill.project import Project
import distill.recipes.lm_project as lp
from distill.recipes.train import train
# a slow training run: sleep after every optimizer step so the parent can kill it mid-run
lp.train_lm = functools.partial(lp.train_lm, on_step=lambda step, entry, model: time.sleep(0.3))
train(Project.open({root!r}), overrides={{"max_steps": 6, "save_every": 1}}, progress=False)
"""


def test_rerun_after_kill_9_resumes_the_same_run(base_dir, tmp_path):
    import os
    import signal
    import subprocess

    from distill.recipes.train import train

    root = tmp_path / "proj"
    make_project(root, base_dir).close()
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT.format(root=str(root))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not list((root / "models").glob("*/checkpoints/step-000002")):
            assert proc.poll() is None, "the training subprocess ended before it could be killed"
            assert time.time() < deadline, "no checkpoint appeared within 120 s"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    proj = Project.open(root)
    (run_dir,) = [p for p in (root / "models").iterdir() if p.is_dir()]
    assert not (run_dir / "training_record.json").exists()
    assert proj.store.one("SELECT status FROM runs WHERE id=?", (run_dir.name,)) == "running"
    rep = train(proj, overrides={"max_steps": 6, "save_every": 1}, progress=False)
    assert rep.run_id == run_dir.name and not rep.reused
    assert rep.record["resumed_from"] is not None and 2 <= rep.record["resumed_from"] < 6
    assert len(rep.record["history"]) == 6
    assert proj.store.one("SELECT status FROM runs WHERE id=?", (rep.run_id,)) == "done"
    proj.close()


def test_snips_slots_example_imports_and_its_recording_replays(tmp_path):
    """The example's spec loads, every gold answer validates on import, and the recorded teacher answers are
    found by the real labeller (the recorder renders prompts exactly as `distill label` does)."""
    import shutil

    from distill.data.importer import import_file
    from distill.labeling import label
    from distill.teachers.replay import read_recording

    src = Path(__file__).resolve().parents[2] / "examples" / "snips-slots"
    root = tmp_path / "snips-slots"
    root.mkdir()
    for f in ("distill.yaml", "teacher_qwen2.5-coder-1.5b.jsonl"):
        shutil.copy(src / f, root / f)
    proj = Project.open(root)
    rep = import_file(proj, src / "snips_slots.csv", id="id", label="gold")
    assert rep.added == 399
    assert proj.store.one("SELECT COUNT(*) FROM examples WHERE gold IS NOT NULL") == 399
    assert proj.store.one("SELECT COUNT(DISTINCT segment) FROM examples") == 7
    _, replies = read_recording(root / "teacher_qwen2.5-coder-1.5b.jsonl")
    recorded = {json.loads(ln)["id"] for ln in open(root / "teacher_qwen2.5-coder-1.5b.jsonl") if '"reply"' in ln}
    r = label(proj, "qwen-1.5b-recorded", progress=False)
    rows = proj.store.q("SELECT example_id, status, reason FROM labels")
    answered = {x["example_id"] for x in rows if x["reason"] != "not_recorded"}
    ok = {x["example_id"] for x in rows if x["status"] == "ok"}
    # every recorded answer was found; the few that break the schema are failed with that reason, not lost
    assert answered == recorded and len(answered) == len(replies) >= 3 and len(ok) >= 0.8 * len(answered)
    assert {x["reason"] for x in rows if x["example_id"] in answered - ok} <= {"schema_violation", "bad_json", "empty"}
    assert r.failed_by_reason.get("not_recorded") == 399 - len(answered)
    proj.close()


@pytest.mark.slow
def test_smollm2_snips_slots_train_and_eval(tmp_path):
    """The real packaged SmolLM2-135M-Instruct on the SNIPS slots example: one LoRA step on gold-as-teacher
    answers, then evaluate_lm on 1 test row (student with adapter, base with the adapter switched off)."""
    import shutil

    from distill.data.importer import import_file
    from distill.evaluate import evaluate_lm
    from distill.recipes.train import train

    src = Path(__file__).resolve().parents[2] / "examples" / "snips-slots"
    root = tmp_path / "snips-slots"
    root.mkdir()
    shutil.copy(src / "distill.yaml", root / "distill.yaml")
    proj = Project.open(root)
    import_file(proj, src / "snips_slots.csv", id="id", label="gold")
    with proj.store.tx() as c:   # stand-in teacher answers: the gold answers of 8 train rows
        c.execute("INSERT INTO labels(example_id, teacher, status, answer, created_at) "
                  "SELECT id, 'qwen-1.5b-recorded', 'ok', gold, 0 FROM examples WHERE split='train' "
                  "ORDER BY id LIMIT 8")
    # one step of one sequence, one test row
    rep = train(proj, overrides={"max_steps": 1, "batch_size": 1, "grad_accum": 1}, progress=False)
    assert rep.record["steps"] == 1 and rep.record["data"]["truncated"] == 0
    res = evaluate_lm(proj, max_new_tokens=8, limit=1, progress=False)
    assert res["test"]["n"] == 1
    for name in ("student", "base"):
        assert res["latency"][name]["throughput"]["tokens_per_s"] > 0
    # `prompt: short`: the student is asked with the user turn alone, the untuned base with the teacher's prompt
    assert res["latency"]["student"]["tokens"]["prompt_mean"] < 100 < 400 < res["latency"]["base"]["tokens"]["prompt_mean"]
    proj.close()


def test_generate_eval_with_the_teacher_as_judge(base_dir, tmp_path, monkeypatch):
    """quality.judge on a generate project: student and base answers are graded by the teacher (here a fake
    that prefers answers equal to the reference), the grades land in the report, a re-run pays nothing."""
    import distill.teachers as teachers
    from distill.evaluate import evaluate_lm
    from distill.recipes.lm_project import train_lm_project
    from distill.teachers.base import TeacherReply

    spec = SPEC.format(base=base_dir).replace("kind: extract", "kind: generate").replace(
        "quality: {metric: field_f1, against: gold, overall: 0.5, worst_segment: 0.4, min_segment_size: 3}",
        "quality: {metric: exact_match, against: gold, overall: 0.5, worst_segment: 0.4, min_segment_size: 3, judge: true}")
    spec = spec[: spec.index("schema:")] + spec[spec.index("prompt:"):]
    proj = Project.init(tmp_path / "g", "generate", spec)
    now = time.time()
    with proj.store.tx() as c:
        for i in range(20):
            text, ans = f"say {CITIES[i % 8]} twice ({i})", f"{CITIES[i % 8]} {CITIES[i % 8]}"
            ex_id, split = (f"t{i}", "test") if i >= 16 else (f"x{i:02d}", "train")
            c.execute("INSERT INTO examples(id, text, norm, gold, segment, split, created_at) VALUES(?,?,?,?,?,?,?)",
                      (ex_id, text, text, json.dumps(ans), "all", split, now))
            c.execute("INSERT INTO labels(example_id, teacher, status, answer, created_at) VALUES(?,?,?,?,?)",
                      (ex_id, "rec", "ok", json.dumps(ans), now))
    asked = []

    class Judge:
        async def ask(self, req):
            asked.append(req.key)
            return TeacherReply(texts=["3"], tokens_in=50, tokens_out=1, latency_s=0.01)

    monkeypatch.setattr(teachers, "make_teacher", lambda tspec, project, limiter=None: Judge())
    train_lm_project(proj, progress=False)
    res = evaluate_lm(proj, max_new_tokens=6, progress=False)
    for name in ("student", "base"):
        j = res["systems"][name]["judge"]
        assert j["graded"] + j["ungraded"] == 4 and j["judge"] == "rec"
        # every non-empty answer was graded 3 by the fake; an empty answer gets 1 without a call
        assert set(k for k, v in j["histogram"].items() if v) <= {"1", "3"} and j["mean_grade"]["n"] == 4
    assert "judge" not in res["systems"]["teacher"] and "judge grade (1-5)" in res["headline"]["student"]
    n_calls = len(asked)
    assert n_calls >= 1 and proj.store.q("SELECT COUNT(*) AS n FROM teacher_calls")[0]["n"] == len(set(asked))
    again = evaluate_lm(proj, max_new_tokens=6, progress=False)
    assert len(asked) == n_calls and again["systems"]["student"]["judge"]["new_calls"] == 0
    proj.close()
