"""ReplayTeacher: hits return the recorded reply, misses raise NoAnswer, provenance is kept, and bad
recordings fail with a DistillError naming the line."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from distill.errors import DistillError
from distill.task import TeacherSpec
from distill.teachers.base import NoAnswer, TeacherRequest
from distill.teachers.replay import ReplayTeacher, messages_sha256

PROV = {"teacher": "qwen-1.5b", "model": "Qwen/Qwen2.5-Coder-1.5B-Instruct", "sha256": "ab" * 32,
        "command": "python record.py", "date": "2026-01-01T00:00:00+00:00", "machine": "test"}


def _msgs(text: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": "Pick a label: A, B."}, {"role": "user", "content": text}]


def _write(path: Path, lines: list[dict], tail: str = "") -> None:
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) + tail, encoding="utf-8")


def _reply(label: str, p: float) -> dict:
    return {"texts": [label], "label_probs": {"A": p, "B": 1 - p}, "tokens_in": 12, "tokens_out": 0,
            "latency_s": 2.5, "raw": {"scores": {"A": -0.1, "B": -2.3}}}


@pytest.fixture
def project(tmp_path):
    _write(tmp_path / "rec.jsonl", [
        {"provenance": PROV},
        {"id": "1", "messages": _msgs("first"), "reply": _reply("A", 0.9)},
        {"messages": _msgs("second"), "reply": _reply("B", 0.2)},
    ])
    return SimpleNamespace(root=tmp_path)


def _teacher(project, path="rec.jsonl") -> ReplayTeacher:
    return ReplayTeacher(TeacherSpec(name="rec", kind="replay", path=path), project)


def _ask(t, text):
    return asyncio.run(t.ask(TeacherRequest(key="whatever", messages=_msgs(text), kind="classify", labels=["A", "B"])))


def test_hit_returns_the_recorded_reply(project):
    t = _teacher(project)
    r = _ask(t, "second")
    assert r.texts == ["B"]
    assert r.label_probs == {"A": 0.2, "B": 0.8}
    assert (r.tokens_in, r.tokens_out) == (12, 0)
    assert r.raw["scores"] == {"A": -0.1, "B": -2.3}
    assert r.raw["recorded_latency_s"] == 2.5
    assert r.latency_s == 2.5 and r.raw["replay_s"] < 1.0   # the ledger gets what the teacher took
    assert len(t) == 2


def test_miss_raises_no_answer(project):
    with pytest.raises(NoAnswer) as e:
        _ask(_teacher(project), "never recorded")
    assert e.value.reason == "not_recorded"


def test_match_is_on_messages_not_on_dict_key_order(project):
    reordered = [{"content": m["content"], "role": m["role"]} for m in _msgs("first")]
    assert messages_sha256(reordered) == messages_sha256(_msgs("first"))
    r = asyncio.run(_teacher(project).ask(TeacherRequest(key="k", messages=reordered, kind="classify")))
    assert r.texts == ["A"]


def test_provenance_is_exposed(project):
    assert _teacher(project).provenance == PROV


def test_absolute_path_and_later_lines_win(tmp_path):
    path = tmp_path / "abs.jsonl"
    _write(path, [{"provenance": PROV}, {"messages": _msgs("x"), "reply": _reply("A", 0.6)},
                  {"messages": _msgs("x"), "reply": _reply("B", 0.3)}])
    t = _teacher(SimpleNamespace(root=tmp_path / "elsewhere"), path=str(path))
    assert _ask(t, "x").texts == ["B"]


def test_partial_last_line_from_a_killed_recorder_is_ignored(project):
    path = project.root / "rec.jsonl"
    path.write_text(path.read_text() + '{"messages": [{"role": "user", "con', encoding="utf-8")
    assert _ask(_teacher(project), "first").texts == ["A"]


def test_bad_recordings_are_clear_errors(tmp_path):
    root = SimpleNamespace(root=tmp_path)
    with pytest.raises(DistillError, match="not found"):
        _teacher(root, "missing.jsonl")
    _write(tmp_path / "noprov.jsonl", [{"messages": _msgs("x"), "reply": _reply("A", 0.5)}])
    with pytest.raises(DistillError, match=r"noprov.jsonl:1: the first line must be"):
        _teacher(root, "noprov.jsonl")
    _write(tmp_path / "badjson.jsonl", [{"provenance": PROV}], tail="{not json\n")
    with pytest.raises(DistillError, match=r"badjson.jsonl:2: not valid JSON"):
        _teacher(root, "badjson.jsonl")
    _write(tmp_path / "shape.jsonl", [{"provenance": PROV}, {"messages": _msgs("x"), "answer": "A"}])
    with pytest.raises(DistillError, match=r"shape.jsonl:2: expected"):
        _teacher(root, "shape.jsonl")
