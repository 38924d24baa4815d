"""Export: JSONL/Parquet that `datasets` reads back, with a provenance sidecar that matches the file."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from distill.data.export import export_data
from distill.data.importer import import_file
from distill.errors import DistillError
from distill.filters import run_filters
from distill.project import Project

ASSETS = Path(__file__).parent.parent / "assets"


def make_project(tmp_path: Path, kind: str = "classify") -> Project:
    root = tmp_path / "proj"
    root.mkdir(parents=True)
    shutil.copy(ASSETS / "recording.jsonl", root)
    return Project.init(root, kind, (ASSETS / f"{kind}_spec.yaml").read_text())


def load(fmt: str, path: Path, tmp_path: Path):
    import datasets

    return datasets.load_dataset(fmt, data_files=str(path), split="train", cache_dir=str(tmp_path / "hf"))


@pytest.fixture
def labelled(tmp_path) -> Project:
    """60 reviews: the teacher agrees with gold except on r002 (filtered out), r003 has no probs."""
    p = make_project(tmp_path)
    import_file(p, ASSETS / "reviews.csv", id="id", label="label")
    with p.store.tx() as c:
        for ex_id, gold in c.execute("SELECT id, gold FROM examples").fetchall():
            answer = "neutral" if ex_id == "r002" else json.loads(gold)
            probs = None if ex_id == "r003" else {lab: (0.8 if lab == answer else 0.1) for lab in p.spec.label_names}
            logprobs = [{"token": answer, "logprob": -0.22, "top_logprobs": [{"token": answer, "logprob": -0.22}]}]
            c.execute("INSERT INTO labels(example_id, teacher, status, answer, probs, confidence, rationale, logprobs,"
                      " created_at) VALUES(?,?,?,?,?,?,?,?,0)",
                      (ex_id, "rec", "ok", json.dumps(answer), json.dumps(probs) if probs else None, 0.8,
                       "because", json.dumps(logprobs)))
    run_filters(p)
    assert p.store.one("SELECT split FROM examples WHERE id='r002'") != "test"   # so the filter drops it
    return p


def test_jsonl_export_reads_back_with_datasets(labelled, tmp_path):
    p = labelled
    out = export_data(p, tmp_path / "out" / "data.jsonl")
    expected = p.store.one("SELECT COUNT(*) FROM examples WHERE split != 'test'") - 1   # r002 is dropped
    ds = load("json", out, tmp_path)
    assert len(ds) == expected and set(ds["split"]) <= {"train", "validation"}
    rec = next(r for r in ds if r["id"] == "r001")
    assert rec["label"] == "positive" and rec["gold"] == "positive" and rec["source"] == "teacher"
    assert rec["segment"] == "web" and rec["probs"]["positive"] == pytest.approx(0.8)
    assert rec["logprobs"][0]["top_logprobs"][0]["token"] == "positive"
    assert "r002" not in ds["id"]
    # no temp files left next to the export
    assert sorted(x.name for x in out.parent.iterdir()) == ["data.jsonl", "data.jsonl.provenance.json"]


def test_provenance_sidecar(labelled, tmp_path):
    out = export_data(labelled, tmp_path / "data.jsonl")
    prov = json.loads((tmp_path / "data.jsonl.provenance.json").read_text())
    assert prov["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert prov["rows"] == sum(1 for _ in out.open())
    assert prov["teacher"]["identity"]["name"] == "rec" and prov["teacher"]["identity"]["kind"] == "replay"
    assert prov["teacher"]["terms"]["outputs_may_train_models"] is True
    assert prov["teacher"]["replay"]["first_line"]["provenance"]["model"] == "gpt-4o-mini"  # recording line 1
    f = prov["filters"]
    assert f["settings"]["drop_disagree_with_gold"] is True and f["run_id"] == 1
    assert f["kept"] + f["dropped"] == labelled.store.one("SELECT COUNT(*) FROM examples WHERE split != 'test'")
    assert f["dropped_by_reason"] == {"disagrees_with_gold": 1}
    assert prov["distill_version"] and prov["labels"] == ["positive", "negative", "neutral"]
    assert "api_key" not in json.dumps(prov)


def test_parquet_export_and_test_split_only_when_asked(labelled, tmp_path):
    out = export_data(labelled, tmp_path / "all.parquet", fmt="parquet", splits=("train", "validation", "test"))
    ds = load("parquet", out, tmp_path)
    assert len(ds) == 60 - 1 and "test" in set(ds["split"])    # everything but r002
    assert json.loads((tmp_path / "all.parquet.provenance.json").read_text())["json_columns"] == []
    rec = next(r for r in ds if r["id"] == "r003")
    assert rec["probs"] is None and rec["label"] == "neutral"
    only_test = export_data(labelled, tmp_path / "t.jsonl", splits=("test",))
    assert set(load("json", only_test, tmp_path)["split"]) == {"test"}


def test_extract_parquet_with_nested_answers(tmp_path):
    p = make_project(tmp_path, "extract")
    import_file(p, ASSETS / "orders.jsonl", label="gold", split=None)
    with p.store.tx() as c:
        for ex_id, gold in c.execute("SELECT id, gold FROM examples").fetchall():
            c.execute("INSERT INTO labels(example_id, teacher, status, answer, created_at) VALUES(?,?,?,?,0)",
                      (ex_id, "rec", "ok", gold))
    out = export_data(p, tmp_path / "o.parquet", fmt="parquet", splits=("train", "validation", "test"))
    ds = load("parquet", out, tmp_path)
    assert len(ds) == 6
    assert {r["answer"]["intent"] for r in ds} == {"buy", "cancel", "ask"}


def test_bad_arguments_and_nothing_to_export(tmp_path, labelled):
    with pytest.raises(DistillError, match="unknown split"):
        export_data(labelled, tmp_path / "x.jsonl", splits=("holdout",))
    with pytest.raises(DistillError, match="unknown export format"):
        export_data(labelled, tmp_path / "x.csv", fmt="csv")
    empty = make_project(tmp_path / "empty")
    with pytest.raises(DistillError, match="nothing to export"):
        export_data(empty, tmp_path / "x.jsonl")
    assert not (tmp_path / "x.jsonl").exists()


def test_parquet_falls_back_to_json_text_for_mixed_nested_types(tmp_path):
    from distill.data.export import _write_parquet

    recs = [{"id": "a", "answer": {"n": 1}, "probs": None}, {"id": "b", "answer": {"n": "one"}, "probs": None}]
    assert _write_parquet(recs, tmp_path / "m.parquet") == ["answer", "probs"]
    ds = load("parquet", tmp_path / "m.parquet", tmp_path)
    assert [json.loads(x) for x in ds["answer"]] == [{"n": 1}, {"n": "one"}]


def test_failed_export_keeps_the_previous_file(labelled, tmp_path, monkeypatch):
    out = export_data(labelled, tmp_path / "data.jsonl")
    before = out.read_bytes()

    def half_then_crash(records, path):
        path.write_text('{"id": "half')
        raise OSError("disk full")

    monkeypatch.setattr("distill.data.export._write_jsonl", half_then_crash)
    with pytest.raises(DistillError, match="cannot write .*data.jsonl: disk full") as e:   # fsutil names the file
        export_data(labelled, out)
    assert "previous file is unchanged" in e.value.hint
    assert out.read_bytes() == before
    assert sorted(x.name for x in tmp_path.iterdir() if x.name.startswith(".")) == []


def test_export_target_rule(labelled, tmp_path):
    """The project, its store and what it points at are refused even with force; a file distill did not write
    is refused, or with force moved aside (never deleted); a previous export is replaced."""
    p = labelled
    db = (p.root / "distill.db").read_bytes()
    for bad in (p.root / "distill.db", p.root / "distill.yaml", p.root, p.root.parent, p.root / "recording.jsonl",
                p.root / "models"):
        for force in (False, True):
            with pytest.raises(DistillError, match="export target") as e:
                export_data(p, bad, force=force)
            assert str(bad) in str(e.value) and e.value.hint
    assert (p.root / "distill.db").read_bytes() == db
    theirs = tmp_path / "theirs.jsonl"
    theirs.write_text("precious\n")
    with pytest.raises(DistillError, match="--force"):
        export_data(p, theirs)
    told: list[str] = []
    export_data(p, theirs, force=True, say=told.append)
    aside = next(tmp_path.glob("theirs.jsonl.replaced-*"))
    assert aside.read_text() == "precious\n" and str(aside) in told[0]
    export_data(p, theirs)                                  # now a previous export: replaced without force
    assert len(list(tmp_path.glob("theirs.jsonl.replaced-*"))) == 1
    (tmp_path / "dir").mkdir()
    with pytest.raises(DistillError, match="is a folder"):
        export_data(p, tmp_path / "dir")
