"""ReplayTeacher: hits return the recorded reply, misses raise NoAnswer, provenance is kept, and bad
recordings fail with a DistillError naming the line. write_recording / RecordingAppender write files it
replays exactly."""

from __future__ import annotations

import asyncio
import gzip
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from distill.errors import DistillError
from distill.task import TeacherSpec
from distill.teachers.base import NoAnswer, TeacherReply, TeacherRequest
from distill.teachers.replay import RecordingAppender, ReplayTeacher, messages_sha256, read_recording, write_recording

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


# -- writing recordings -------------------------------------------------------------------------------

REPLIED = ("texts", "label_probs", "logprobs", "tokens_in", "tokens_out", "latency_s")


def _entries():
    logprobs = [{"token": "A", "logprob": -0.1, "top_logprobs": [{"token": "B", "logprob": -2.4}]}]
    return [
        (_msgs("teacher reply"), TeacherReply(texts=["A", "B"], label_probs={"A": 0.7, "B": 0.3}, logprobs=logprobs,
                                              tokens_in=31, tokens_out=2, latency_s=1.25, retries=3,
                                              raw={"id": "chatcmpl-1"}), {"id": "r1"}),
        (_msgs("reply dict"), {"texts": ["B"], "tokens_in": 9, "tokens_out": 1, "latency_s": 0.0}),
        (_msgs("bare answer"), "A"),
        (_msgs("json answer"), ["not", "a", "reply"]),          # any other value: its JSON text
        (_msgs("ünïcode ✓"), TeacherReply(texts=["A"])),
    ]


def test_write_recording_round_trips_through_the_replay_teacher(tmp_path):
    entries = _entries()
    path = write_recording(tmp_path / "sub" / "rec.jsonl", PROV, entries)
    assert path == tmp_path / "sub" / "rec.jsonl"
    assert [p.name for p in path.parent.iterdir()] == ["rec.jsonl"]      # no temporary file left
    lines = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]
    assert lines[0] == {"provenance": PROV} and len(lines) == 1 + len(entries)
    assert lines[1]["id"] == "r1" and "retries" not in lines[1]["reply"]
    assert lines[2]["reply"] == entries[1][1] and "raw" not in lines[5]["reply"]   # None / empty fields left out

    t = _teacher(SimpleNamespace(root=tmp_path), "sub/rec.jsonl")
    assert t.provenance == PROV and len(t) == len(entries)
    want = [entries[0][1], TeacherReply(texts=["B"], tokens_in=9, tokens_out=1), TeacherReply(texts=["A"]),
            TeacherReply(texts=['["not", "a", "reply"]']), TeacherReply(texts=["A"])]
    for (msgs, _, *_extra), w in zip(entries, want):
        got = asyncio.run(t.ask(TeacherRequest(key="k", messages=msgs, kind="classify")))
        assert {f: getattr(got, f) for f in REPLIED} == {f: getattr(w, f) for f in REPLIED}
        assert got.retries == 0 and {k: got.raw[k] for k in w.raw} == w.raw
    # and read_recording sees exactly what was written
    prov, replies = read_recording(path)
    assert prov == PROV and set(replies) == {messages_sha256(e[0]) for e in entries}


def test_a_gzipped_recording_replays_the_same_and_is_never_appended_to(tmp_path):
    entries = _entries()
    plain = write_recording(tmp_path / "rec.jsonl", PROV, entries)
    gz = tmp_path / "rec.jsonl.gz"
    with gzip.open(gz, "wb") as f:
        f.write(plain.read_bytes())
    assert read_recording(gz) == read_recording(plain)
    t = _teacher(SimpleNamespace(root=tmp_path), "rec.jsonl.gz")
    got = asyncio.run(t.ask(TeacherRequest(key="k", messages=entries[0][0], kind="classify")))
    assert got.texts == entries[0][1].texts
    with pytest.raises(DistillError, match="not gzip"):
        RecordingAppender(gz, PROV)


def test_write_recording_is_atomic(tmp_path):
    path = write_recording(tmp_path / "rec.jsonl", PROV, _entries()[:2])
    before = path.read_bytes()

    def crashing():
        yield _entries()[2]
        raise RuntimeError("recorder crashed")

    with pytest.raises(RuntimeError):
        write_recording(path, PROV, crashing())
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["rec.jsonl"]


def test_write_recording_refuses_what_the_replay_could_not_read(tmp_path):
    with pytest.raises(DistillError, match="provenance"):
        write_recording(tmp_path / "a.jsonl", {}, [])
    with pytest.raises(DistillError, match="unknown|only these keys"):
        write_recording(tmp_path / "b.jsonl", PROV, [(_msgs("x"), {"texts": ["A"], "answer": "A"})])
    with pytest.raises(DistillError, match="messages must be a list"):
        write_recording(tmp_path / "c.jsonl", PROV, [("just text", "A")])
    with pytest.raises(DistillError, match="may not be"):
        write_recording(tmp_path / "d.jsonl", PROV, [(_msgs("x"), "A", {"reply": 1})])
    assert list(tmp_path.iterdir()) == []


def test_appender_resumes_after_a_kill_and_keeps_the_first_provenance(tmp_path):
    path = tmp_path / "rec.jsonl"
    with RecordingAppender(path, PROV) as rec:
        assert rec.provenance == PROV and len(rec) == 0
        rec.add(_msgs("one"), TeacherReply(texts=["A"], tokens_in=5, latency_s=0.5), {"id": "1"})
        rec.add(_msgs("two"), "B")
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"id": "3", "messages": [{"role": "us')                 # killed mid-line
    other = {**PROV, "sha256": "cd" * 32}
    with RecordingAppender(path, other) as rec:
        assert rec.provenance == PROV                                 # the file's header, to compare against
        assert _msgs("one") in rec and _msgs("two") in rec and _msgs("three") not in rec and len(rec) == 2
        rec.add(_msgs("three"), {"texts": ["A"], "label_probs": {"A": 1.0, "B": 0.0}})
    assert path.read_text(encoding="utf-8").endswith("\n")
    t = _teacher(SimpleNamespace(root=tmp_path))
    assert len(t) == 3 and t.provenance == PROV
    assert [_ask(t, x).texts for x in ("one", "two", "three")] == [["A"], ["B"], ["A"]]
    assert _ask(t, "one").latency_s == 0.5 and _ask(t, "three").label_probs == {"A": 1.0, "B": 0.0}
