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
from fake_openai_server import make_project, start_server  # noqa: E402


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
    assert set(r["model"] for r in project.store.q("SELECT model FROM teacher_calls")) == {"fake-1", "fake-2"}
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
