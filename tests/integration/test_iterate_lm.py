"""`distill iterate` on an extract project: a tiny in-process Llama student, a replay teacher whose recording
answers every input the test uses (seed rows, queue texts, traffic).

Behaviour checked: failure-queue entries written the way the LM service writes them (JSON-text answers, all
four reasons) become examples by their hashed split (test-hashed ones are never trained on) without a
segment, the teacher labels them, each round trains a new causal-LM run with lineage, the serving marker
moves only on promotion, a gate failure and a segment whose field F1 falls beyond the margin are refused
with the reason, an unchanged test split reuses the serving model's evaluation, and a round that crashed
after training completes when re-run. The tiny model answers nonsense: the quality bar is set so the gate
gives the outcome each step wants, and no test depends on the student's numbers."""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))

import distill.iterate as it
from distill.data.importer import normalise, text_id
from distill.data.splits import assign_split
from distill.dataset import rows
from distill.iterate import SERVING_KEY, iterate
from distill.project import Project
from distill.serve import queue as fq
from distill.task import render_messages
from distill.teachers.replay import write_recording

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
splits: {{validation: 0.0, test: 0.3}}
quality: {{metric: field_f1, against: gold, overall: {overall}, worst_segment: 0.0, min_segment_size: 3}}
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
  max_steps: 2
  save_every: 100
  max_length: 96
  device: cpu
  cpu_threads: 1
"""
MAX_NEW = 8   # the tiny model's answers are nonsense anyway; generation is the slow part of an LM eval


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


def answer(text: str) -> dict:
    """The teacher's (and gold) answer: the intent from the verb, the city from the words."""
    city = next(c for c in CITIES if f" {c} " in f" {text} ")
    return {"intent": "weather" if text.startswith("rain") else "music", "slots": {"city": city}}


def make_text(i: int, tag: str) -> str:
    verb = "rain in" if i % 2 else "play songs from"
    return f"{verb} {CITIES[i % len(CITIES)]} {tag}{i}"


def split_of(project: Project, text: str) -> str:
    """The split the importer gives a new text (hashed from its normalised text)."""
    return assign_split(text_id(normalise(text)), project.spec.splits)


def pick(project: Project, tag: str, n_test: int, n_train: int) -> list[str]:
    """Texts that hash to test (n_test of them) and to train (n_train), in that order."""
    out: dict[str, list[str]] = {"test": [], "train": []}
    i = 0
    while len(out["test"]) < n_test or len(out["train"]) < n_train:
        t = make_text(i, tag)
        s = split_of(project, t)
        if s in out and len(out[s]) < (n_test if s == "test" else n_train):
            out[s].append(t)
        i += 1
    return out["test"] + out["train"]


def write_spec(root: Path, base_dir: Path, overall: float) -> None:
    (root / "distill.yaml").write_text(SPEC.format(base=base_dir, overall=overall), encoding="utf-8")


def reopen(project: Project, base_dir: Path, overall: float) -> Project:
    write_spec(project.root, base_dir, overall)
    project.close()
    return Project.open(project.root)


def record(project: Project, texts: list[str]) -> None:
    """(Re)write the replay recording with the teacher's answer to every text (the identity of a replay
    teacher is its path, so a longer recording does not make earlier labels stale)."""
    write_recording(project.root / "rec.jsonl", {"teacher": "rec", "model": "answer() in this test"},
                    [(render_messages(project.spec, t), json.dumps(answer(t))) for t in texts])


def make_project(root: Path, base_dir: Path, overall: float = 0.0) -> tuple[Project, list[str]]:
    """16 train + 8 test seed rows with gold (4 weather + 4 music in test) and a segment; not yet labelled."""
    proj = Project.init(root, "extract", SPEC.format(base=base_dir, overall=overall))
    now = time.time()
    seed = []
    with proj.store.tx() as c:
        for i in range(24):
            text = make_text(i, "s")
            ex_id, split = (f"t{i - 16}", "test") if i >= 16 else (f"s{i:02d}", "train")
            c.execute("INSERT INTO examples(id, text, norm, gold, segment, split, created_at) VALUES(?,?,?,?,?,?,?)",
                      (ex_id, text, text, json.dumps(answer(text)), answer(text)["intent"], split, now))
            seed.append(text)
    return proj, seed


def enqueue_lm(project: Project, texts: list[str]) -> None:
    """As the LM service does: the input, the reason, student and teacher answers as JSON text."""
    reasons = fq.REASONS
    for i, t in enumerate(texts):
        wrong = {"intent": "music", "slots": {}}
        fq.enqueue(project.store, t, reasons[i % len(reasons)], student_answer=json.dumps(wrong),
                   student_conf=0.3, teacher_answer=json.dumps(answer(t)) if i % 2 == 0 else None,
                   note="from the LM service")


def train_rows(project: Project) -> set[str]:
    return {r.text for r in rows(project, "rec", ("train",))}


def test_rounds_promote_refuse_gate_refuse_regression(tmp_path, base_dir, monkeypatch):
    t_start = time.perf_counter()
    # the evaluation fingerprint includes the git commit; another commit landing mid-test must not change it
    monkeypatch.setattr("distill.runinfo.git_sha", lambda cwd=None: "fixed-for-this-test")
    project, seed = make_project(tmp_path / "p", base_dir, overall=0.0)
    q1 = pick(project, "q", n_test=2, n_train=4)
    q2 = pick(project, "r", n_test=0, n_train=2)          # rounds 2 and 3 add no test rows
    traffic = pick(project, "tr", n_test=0, n_train=3)
    q3 = pick(project, "u", n_test=0, n_train=1)
    record(project, seed + q1 + q2 + traffic + q3)
    enqueue_lm(project, q1)

    # round 1: no serving model yet; the bar is 0.0, so the tiny model passes and is promoted ----------------
    r1 = iterate(project, progress=False, max_new_tokens=MAX_NEW)
    assert r1.round == 1 and r1.queue_consumed == 6 and set(r1.queue_by_reason) == set(fq.REASONS)
    assert r1.gate_passed and r1.promoted and r1.metric == "field_f1 vs gold", r1.reasons
    assert r1.parent_run_id is None and r1.comparison == []
    assert project.store.get_meta(SERVING_KEY) == r1.run_id
    assert project.store.latest_run("train_lm")["id"] == r1.run_id
    # the queue texts are examples in their hashed split, without a segment; all labelled by the teacher
    ex = {r["text"]: r for r in project.store.q("SELECT id, text, split, segment FROM examples")}
    assert all(ex[t]["split"] == split_of(project, t) for t in q1)
    assert all(ex[t]["segment"] is None for t in q1)
    labelled = {r["example_id"]: r for r in project.store.q("SELECT * FROM labels WHERE teacher='rec'")}
    assert all(labelled[ex[t]["id"]]["status"] == "ok" and json.loads(labelled[ex[t]["id"]]["answer"]) == answer(t)
               for t in q1)
    trained = train_rows(project)
    assert not set(q1[:2]) & trained and set(q1[2:]) <= trained          # test-hashed texts never trained on
    assert fq.list_entries(project.store, status="new") == []
    assert {e.round for e in fq.list_entries(project.store, status="consumed")} == {1}
    # the queue's test rows have no gold: they are scored vs the teacher, under the segment '(none)'
    ev1 = json.loads(Path(r1.evaluations[r1.run_id]["json_path"]).read_text())
    assert ev1["test"]["n"] == 10 and ev1["test"]["n_gold"] == 8
    segs = {s["segment"]: s for s in ev1["systems"]["student"]["segments"]}
    assert set(segs) == {"music", "weather", "(none)"} and "field_f1_vs_gold" not in segs["(none)"]
    assert ev1["systems"]["base"]["available"] is False                # iterate does not score the base
    # an LM promotion leaves the export and router to their own stages, and says so
    assert r1.router is None and any("--format gguf" in s for s in r1.next_steps)
    assert any("route calibrate" in s for s in r1.next_steps) and "Next: " in r1.message()
    rec1 = json.loads(project.store.q("SELECT record FROM runs WHERE id=?", (r1.run_id,))[0]["record"])
    assert rec1["lineage"]["round"] == 1 and rec1["lineage"]["promoted"] and rec1["lineage"]["parent_model"] is None
    assert rec1["lineage"]["data_sha256"] == rec1["data_hash"]

    # round 2: new queue entries + a traffic file, and a bar the tiny model cannot reach -> refused ----------
    project = reopen(project, base_dir, overall=0.99)
    enqueue_lm(project, q2)
    tfile = tmp_path / "traffic.jsonl"
    tfile.write_text("".join(json.dumps({"text": t}) + "\n" for t in traffic), encoding="utf-8")
    n_test = project.store.one("SELECT COUNT(*) FROM examples WHERE split='test'")
    r2 = iterate(project, new_traffic=tfile, progress=False, max_new_tokens=MAX_NEW)
    assert r2.run_id not in (None, r1.run_id) and r2.parent_run_id == r1.run_id
    assert r2.queue_consumed == 2 and r2.imported[str(tfile)]["added"] == 3
    assert not r2.gate_passed and not r2.promoted and r2.serving_model == r1.run_id
    assert any("fails the quality gate" in s and "quality.overall" in s for s in r2.reasons), r2.reasons
    assert project.store.get_meta(SERVING_KEY) == r1.run_id
    assert project.store.latest_run("train_lm")["id"] == r1.run_id     # defaults still take the serving model
    assert set(q2 + traffic) <= train_rows(project)
    # both models were compared on the same rows: overall and each gold segment
    assert {d.segment for d in r2.comparison} >= {"(overall)", "music", "weather"}
    # no new test rows, same teacher answers: the serving model's round-1 evaluation was reused, not re-run
    assert project.store.one("SELECT COUNT(*) FROM examples WHERE split='test'") == n_test
    assert r2.evaluations[r1.run_id]["reused"] and not r2.evaluations[r2.run_id]["reused"]
    rec2 = json.loads(project.store.q("SELECT record FROM runs WHERE id=?", (r2.run_id,))[0]["record"])
    assert rec2["lineage"] == {**rec2["lineage"], "round": 2, "parent_model": r1.run_id, "promoted": False,
                               "teacher": "rec"}
    assert r2.next_steps == []

    # round 3: passes the gate, but one gated segment's field F1 falls by more than the margin -> refused ----
    project = reopen(project, base_dir, overall=0.0)
    enqueue_lm(project, q3)
    real = it._evaluate

    def fake(project, report, run_id, path, teacher, settings, progress):
        res = copy.deepcopy(real(project, report, run_id, path, teacher, settings, progress))
        student = res["systems"]["student"]
        student["vs_gold"]["field_f1"]["value"] = 0.5
        for s in student["segments"]:
            if "field_f1_vs_gold" in s:
                old = run_id == r1.run_id
                s["field_f1_vs_gold"]["value"] = (0.9 if old else 0.4) if s["segment"] == "weather" else 0.5
        return res

    monkeypatch.setattr(it, "_evaluate", fake)
    r3 = iterate(project, progress=False, max_new_tokens=MAX_NEW)
    monkeypatch.setattr(it, "_evaluate", real)
    assert r3.gate_passed and not r3.promoted and r3.serving_model == r1.run_id
    assert r3.parent_run_id == r1.run_id and r3.run_id not in (r1.run_id, r2.run_id)
    text = " ".join(r3.reasons)
    assert "regression: segment 'weather' (n=4)" in text and "field_f1 vs gold fell from 0.900 to 0.400" in text, text
    assert "music" not in text and "overall:" not in text
    (weather,) = [d for d in r3.comparison if d.segment == "weather"]
    assert weather.gated and weather.delta == pytest.approx(-0.5)
    assert project.store.get_meta(SERVING_KEY) == r1.run_id
    assert [r["id"] for r in project.store.q("SELECT id FROM runs WHERE kind='iterate' ORDER BY id")] == \
        ["iterate-1", "iterate-2", "iterate-3"]
    decided = json.loads(project.store.q("SELECT record FROM runs WHERE id='iterate-3'")[0]["record"])
    assert decided["promoted"] is False and decided["serving_model"] == r1.run_id
    project.close()
    assert time.perf_counter() - t_start < 120


def test_crash_after_training_then_rerun_completes(tmp_path, base_dir, monkeypatch):
    project, seed = make_project(tmp_path / "p", base_dir, overall=0.0)
    queued = pick(project, "k", n_test=1, n_train=3)
    record(project, seed + queued)
    enqueue_lm(project, queued)

    def crash(*a, **k):
        raise RuntimeError("killed while evaluating")

    monkeypatch.setattr(it, "_evaluate", crash)
    with pytest.raises(RuntimeError, match="killed"):
        iterate(project, progress=False, max_new_tokens=MAX_NEW)
    monkeypatch.undo()
    assert project.store.get_meta("iterate_open") == "1"                 # the round is open
    assert {e.round for e in fq.list_entries(project.store, status="consumed")} == {1}
    (run_dir,) = [p for p in (project.root / "models").iterdir() if p.is_dir()]
    calls = project.store.one("SELECT COUNT(*) FROM teacher_calls")

    r = iterate(project, progress=False, max_new_tokens=MAX_NEW)
    assert r.round == 1 and r.resumed and r.promoted, r.reasons
    assert r.queue_consumed == 4 and r.run_id == run_dir.name           # the finished run, not a new one
    assert project.store.one("SELECT COUNT(*) FROM teacher_calls") == calls   # nothing asked twice
    assert project.store.get_meta("iterate_open") is None and project.store.get_meta("iterate_round") == "1"
    assert project.store.get_meta(SERVING_KEY) == r.run_id

    # a round with nothing new gives the serving model again: reported, nothing evaluated or decided
    r2 = iterate(project, progress=False, max_new_tokens=MAX_NEW)
    assert r2.round == 2 and r2.stopped == "no_data" and r2.serving_model == r.run_id and not r2.evaluations
    project.close()
