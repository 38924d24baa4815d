"""Corrections: matched by id or normalised text, validated, stored with provenance, and they win."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from distill.data.corrections import import_corrections
from distill.data.importer import import_file
from distill.dataset import rows
from distill.errors import DistillError
from distill.filters import run_filters
from distill.project import Project

ASSETS = Path(__file__).parent.parent / "assets"


def make_project(tmp_path: Path, kind: str = "classify") -> Project:
    root = tmp_path / "proj"
    root.mkdir(parents=True)
    shutil.copy(ASSETS / "recording.jsonl", root)
    return Project.init(root, kind, (ASSETS / f"{kind}_spec.yaml").read_text())


def put_label(p: Project, ex_id: str, answer, teacher: str = "rec") -> None:
    with p.store.tx() as c:
        c.execute("INSERT OR REPLACE INTO labels(example_id, teacher, status, answer, confidence, created_at) "
                  "VALUES(?,?,?,?,0.2,0)", (ex_id, teacher, "ok", json.dumps(answer)))


def write(tmp_path: Path, name: str, text: str) -> Path:
    (tmp_path / name).write_text(text, encoding="utf-8")
    return tmp_path / name


def test_by_id_with_provenance_and_override(tmp_path):
    p = make_project(tmp_path)
    import_file(p, ASSETS / "reviews.csv", id="id")
    train_ids = [r[0] for r in p.store.q("SELECT id FROM examples WHERE split='train' ORDER BY id LIMIT 2")]
    for i in train_ids:
        put_label(p, i, "neutral")
    f = write(tmp_path, "fix.csv", f"id,label,note\n{train_ids[0]},Positive,typo in teacher\n{train_ids[1]},negative,\n")
    assert import_corrections(p, f, source="alice") == 2
    row = p.store.q("SELECT * FROM corrections WHERE example_id=?", (train_ids[0],))[0]
    assert json.loads(row["answer"]) == "positive" and row["note"] == "typo in teacher"
    prov = json.loads(row["source"])
    assert prov["by"] == "alice" and prov["file"] == "fix.csv"
    assert prov["sha256"] == hashlib.sha256(f.read_bytes()).hexdigest() and prov["at"]
    # the filters keep it (low teacher confidence does not matter) and training sees the human answer
    run_filters(p)
    got = {r.id: (r.answer, r.source) for r in rows(p, "rec", ("train",)) if r.id in train_ids}
    assert got == {train_ids[0]: ("positive", "correction"), train_ids[1]: ("negative", "correction")}


def test_by_normalised_text_when_no_id_column(tmp_path):
    p = make_project(tmp_path)
    import_file(p, ASSETS / "reviews.csv", id="id")
    f = write(tmp_path, "fix.csv", 'text,label\n"  the BLENDER works perfectly and was easy to clean ",neutral\n')
    assert import_corrections(p, f) == 1
    assert p.store.one("SELECT example_id FROM corrections") == "r001"


def test_unknown_inputs_are_listed_and_nothing_is_stored(tmp_path):
    p = make_project(tmp_path)
    import_file(p, ASSETS / "reviews.csv", id="id")
    f = write(tmp_path, "fix.csv", "id,label\nr001,positive\nnope-1,negative\nnope-2,neutral\n")
    with pytest.raises(DistillError) as ei:
        import_corrections(p, f)
    msg = str(ei.value)
    assert "2 row(s) match no imported input" in msg and "line 3: id 'nope-1'" in msg and "line 4: id 'nope-2'" in msg
    assert p.store.one("SELECT COUNT(*) FROM corrections") == 0


def test_invalid_answers_are_rejected(tmp_path):
    p = make_project(tmp_path)
    import_file(p, ASSETS / "reviews.csv", id="id")
    f = write(tmp_path, "fix.csv", "id,label\nr001,ecstatic\nr002,\nr003,positive\nr003,negative\n")
    with pytest.raises(DistillError) as ei:
        import_corrections(p, f)
    msg = str(ei.value)
    assert "fix.csv, line 2, column 'label': 'ecstatic' is not one of the labels" in msg
    assert "line 3: column 'label' is empty" in msg
    assert "line 5: corrects the same input as line 4" in msg
    assert p.store.one("SELECT COUNT(*) FROM corrections") == 0


def test_missing_columns(tmp_path):
    p = make_project(tmp_path)
    import_file(p, ASSETS / "reviews.csv", id="id")
    with pytest.raises(DistillError, match="no column 'label'"):
        import_corrections(p, write(tmp_path, "fix.csv", "id,answer\nr001,positive\n"))
    assert import_corrections(p, write(tmp_path, "fix2.csv", "id,answer\nr001,positive\n"), answer_col="answer") == 1


def test_extract_answers_validated_against_schema(tmp_path):
    p = make_project(tmp_path, "extract")
    import_file(p, ASSETS / "orders.jsonl", label="gold")
    f = tmp_path / "fix.jsonl"
    f.write_text(json.dumps({"text": "I want to buy a red scarf", "label": {"intent": "buy", "item": "scarf"}}) + "\n"
                 + json.dumps({"text": "Is the rain jacket waterproof?", "label": '{"intent": "sell", "item": "x"}'}) + "\n")
    with pytest.raises(DistillError, match="line 2, column 'label': does not match the schema at intent"):
        import_corrections(p, f)
    f.write_text(f.read_text().splitlines()[0] + "\n")
    assert import_corrections(p, f) == 1
    assert json.loads(p.store.one("SELECT answer FROM corrections")) == {"intent": "buy", "item": "scarf"}
