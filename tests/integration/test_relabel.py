"""`distill relabel` against the fake OpenAI teacher on loopback: a changed model name makes every label
stale; the dry run counts them per split and pays nothing; the real run asks again, records the superseded
labels and keeps the old ledger rows."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from distill.labeling import label
from distill.project import Project
from distill.relabel import relabel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fake_openai_server import make_project, start_server


@pytest.fixture
def server(tmp_path):
    h = start_server(tmp_path, labels=("positive", "negative", "neutral"))
    os.environ["FAKE_KEY"] = "k"
    yield h
    h.stop()


def test_model_change_dry_run_then_relabel(tmp_path, server):
    project = make_project(tmp_path / "p", 12, server.base_url)
    with project.store.tx() as c:   # spread the examples over the three splits
        c.execute("UPDATE examples SET split='test' WHERE id IN ('ex00000','ex00001','ex00002')")
        c.execute("UPDATE examples SET split='validation' WHERE id IN ('ex00003','ex00004')")
    first = label(project, "api", progress=False)
    assert first.ok == 12 and first.calls == 12
    old_labels = {r["example_id"]: r["call_key"] for r in project.store.q("SELECT example_id, call_key FROM labels")}

    # unchanged teacher: nothing is stale
    assert relabel(project, "api", dry_run=True).stale == 0

    spec_file = project.root / "distill.yaml"
    spec_file.write_text(spec_file.read_text().replace("model: fake-1", "model: fake-2"))
    project.close()
    project = Project.open(project.root)

    dry = relabel(project, "api", dry_run=True)
    assert dry.stale_by_split == {"train": 7, "validation": 2, "test": 3}
    assert len(server.log_lines()) == 12                       # the dry run asked nobody
    assert project.store.one("SELECT COUNT(*) FROM label_history") == 0

    rep = relabel(project, "api", progress=False)
    assert rep.label["calls"] == 12 and rep.superseded == 12 and rep.still_stale == 0
    assert rep.old_calls_kept == 12
    assert project.store.one("SELECT COUNT(*) FROM teacher_calls") == 24      # old calls kept, new ones added
    assert {r["model"] for r in project.store.q("SELECT model FROM teacher_calls")} == {"fake-1", "fake-2"}
    hist = {r["example_id"]: r for r in project.store.q("SELECT * FROM label_history")}
    assert {k: h["call_key"] for k, h in hist.items()} == old_labels
    assert all(h["superseded_at"] is not None for h in hist.values())
    new_keys = {r["example_id"]: r["call_key"] for r in project.store.q("SELECT example_id, call_key FROM labels")}
    assert all(new_keys[k] != old_labels[k] for k in old_labels)
    # the fake teacher's answer does not depend on the model name, so no answer changed
    assert sum(rep.answers_changed_by_split.values()) == 0
    assert json.loads(hist["ex00000"]["answer"]) in ("positive", "negative", "neutral")

    # done: a second relabel finds nothing stale and pays nothing
    again = relabel(project, "api", progress=False)
    assert again.stale == 0 and again.label["calls"] == 0
    project.close()


def test_budget_stops_and_rerun_continues(tmp_path, server):
    project = make_project(tmp_path / "p", 10, server.base_url)
    label(project, "api", progress=False)
    spec_file = project.root / "distill.yaml"
    spec_file.write_text(spec_file.read_text().replace("model: fake-1", "model: fake-2"))
    project.close()
    project = Project.open(project.root)
    spent = project.store.spend("api")
    # the budget caps the teacher's total ledger spend; a call starts only if its worst case (prompt + 256
    # max_tokens at $2/1M, ~$0.0006 here) fits, so $0.0015 more leaves room for 2 calls
    rep = relabel(project, "api", budget=spent + 0.0015, progress=False)
    assert rep.label["stopped"] == "budget" and 0 < rep.superseded < 10 and rep.still_stale == 10 - rep.superseded
    rest = relabel(project, "api", progress=False)
    assert rest.stale == 10 - rep.superseded and rest.superseded == rest.stale and rest.still_stale == 0
    assert project.store.one("SELECT COUNT(*) FROM label_history") == 10   # one row per old label, not per run
    project.close()


EXTRACT_SPEC = """
name: slots
kind: extract
description: "Weather request."
schema:
  type: object
  properties: {{city: {{type: string}}, day: {{type: string}}}}
  required: [city]
  additionalProperties: false
prompt:
  system: "{system}"
segment_field: region
teachers:
  - name: rec
    kind: replay
    path: rec.jsonl
teacher: rec
"""


def test_extract_prompt_change_relabels_json_answers(tmp_path):
    """extract: a changed prompt makes every JSON label stale; the relabel asks again (here a replay
    recording of the teacher under both prompts), counts the answers that really changed — compared as JSON,
    so key order does not count as a change — and keeps the old answers in label_history."""
    import time

    from distill.task import render_messages
    from distill.teachers.replay import write_recording

    cities = ["paris", "rome", "oslo", "lima", "kyiv", "bern"]
    root = tmp_path / "p"
    project = Project.init(root, "extract", EXTRACT_SPEC.format(system="JSON:"))
    with project.store.tx() as c:
        for i, city in enumerate(cities):
            c.execute("INSERT INTO examples(id, text, norm, segment, split, created_at) VALUES(?,?,?,?,?,?)",
                      (f"e{i}", f"rain in {city} tomorrow", f"rain in {city} tomorrow", "eu" if i % 2 else None,
                       ("train", "train", "train", "validation", "test", "test")[i], time.time()))
    texts = [f"rain in {c} tomorrow" for c in cities]
    spec_file = root / "distill.yaml"
    new_spec = EXTRACT_SPEC.format(system="Answer in JSON only:")
    entries = [(render_messages(project.spec, t), json.dumps({"city": c, "day": "tomorrow"})) for t, c in zip(texts, cities)]
    spec_file.write_text(new_spec)
    project.close()
    project = Project.open(root)
    # under the new prompt: the same answers with the keys in another order, except e1 and e4, whose day changed
    entries += [(render_messages(project.spec, t),
                 json.dumps({"day": "monday" if i in (1, 4) else "tomorrow", "city": c}))
                for i, (t, c) in enumerate(zip(texts, cities))]
    write_recording(root / "rec.jsonl", {"teacher": "rec", "model": "this test"}, entries)

    spec_file.write_text(EXTRACT_SPEC.format(system="JSON:"))
    project.close()
    project = Project.open(root)
    first = label(project, "rec", progress=False)
    assert first.ok == 6
    assert relabel(project, "rec", dry_run=True).stale == 0

    spec_file.write_text(new_spec)
    project.close()
    project = Project.open(root)
    dry = relabel(project, "rec", dry_run=True)
    assert dry.stale_by_split == {"train": 3, "validation": 1, "test": 2}
    rep = relabel(project, "rec", progress=False)
    assert rep.superseded == 6 and rep.still_stale == 0 and rep.old_calls_kept == 6
    assert rep.answers_changed_by_split == {"train": 1, "validation": 0, "test": 1}
    answers = {r["example_id"]: json.loads(r["answer"]) for r in project.store.q("SELECT * FROM labels")}
    assert answers["e1"] == {"city": "rome", "day": "monday"} and answers["e0"] == {"city": "paris", "day": "tomorrow"}
    hist = {r["example_id"]: json.loads(r["answer"]) for r in project.store.q("SELECT * FROM label_history")}
    assert hist["e1"] == {"city": "rome", "day": "tomorrow"} and len(hist) == 6
    assert relabel(project, "rec", progress=False).stale == 0
    project.close()
