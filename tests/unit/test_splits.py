"""Splits: deterministic hashing, split-column aliases, and the locked test split."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from distill.data.importer import import_file
from distill.data.splits import canonical_split, hash_split, parse_split_value, split_uniform
from distill.errors import DistillError
from distill.project import SPEC_FILE, Project

ASSETS = Path(__file__).parent.parent / "assets"


def make_project(tmp_path: Path) -> Project:
    root = tmp_path / "proj"
    root.mkdir(parents=True)
    shutil.copy(ASSETS / "recording.jsonl", root)
    return Project.init(root, "classify", (ASSETS / "classify_spec.yaml").read_text())


def respec(project: Project, **splits) -> Project:
    """Edit `splits:` in distill.yaml, as a user would, and reopen the project."""
    path = project.root / SPEC_FILE
    raw = yaml.safe_load(path.read_text())
    raw["splits"].update(splits)
    path.write_text(yaml.safe_dump(raw))
    project.close()
    return Project.open(project.root)


def splits_of(project: Project) -> dict[str, str]:
    return {r[0]: r[1] for r in project.store.q("SELECT id, split FROM examples")}


def test_hash_split_is_deterministic_and_matches_shares():
    ids = [f"ex{i}" for i in range(20_000)]
    a = [hash_split(i, "s", 0.2, 0.1) for i in ids]
    assert a == [hash_split(i, "s", 0.2, 0.1) for i in ids]
    share = {s: a.count(s) / len(a) for s in ("train", "validation", "test")}
    assert abs(share["test"] - 0.2) < 0.015 and abs(share["validation"] - 0.1) < 0.015
    assert all(0.0 <= split_uniform("s", i) < 1.0 for i in ids[:100])
    # a different seed reshuffles
    assert a != [hash_split(i, "other", 0.2, 0.1) for i in ids]


def test_same_splits_in_another_process():
    ids = [f"id-{i}" for i in range(200)]
    here = [hash_split(i, "distill", 0.2, 0.1) for i in ids]
    code = (
        "import json,sys; from distill.data.splits import hash_split; "
        "print(json.dumps([hash_split(i, 'distill', 0.2, 0.1) for i in json.loads(sys.argv[1])]))"
    )
    out = subprocess.run([sys.executable, "-c", code, json.dumps(ids)], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "123", "PATH": ""})
    assert json.loads(out.stdout) == here


def test_same_file_twice_in_two_projects_gives_same_splits(tmp_path):
    a = make_project(tmp_path / "a")
    b = make_project(tmp_path / "b")
    import_file(a, ASSETS / "reviews.csv", id="id")
    import_file(b, ASSETS / "reviews.jsonl", id="id")
    assert splits_of(a) == splits_of(b)


def test_split_aliases():
    assert [canonical_split(v) for v in ("dev", "VAL", " valid ", "validation", "train", "Test")] == [
        "validation", "validation", "validation", "validation", "train", "test"]
    assert canonical_split("holdout") is None
    with pytest.raises(DistillError) as ei:
        parse_split_value("holdout", "f.csv, line 9", "split")
    assert "f.csv, line 9" in str(ei.value) and "'split'" in str(ei.value)


def test_split_column_is_used_for_new_inputs(tmp_path):
    p = make_project(tmp_path)
    f = tmp_path / "s.csv"
    f.write_text("text,fold\na one,dev\nb two,test\nc three,train\nd four,val\n")
    rep = import_file(p, f, split="fold")
    assert rep.by_split == {"validation": 2, "test": 1, "train": 1}
    assert {r[0]: r[1] for r in p.store.q("SELECT text, split FROM examples")} == {
        "a one": "validation", "b two": "test", "c three": "train", "d four": "validation"}


def test_locked_test_split_survives_new_seeds_shares_and_split_columns(tmp_path):
    p = make_project(tmp_path)
    import_file(p, ASSETS / "reviews.csv", id="id")
    first = splits_of(p)
    locked = json.loads(p.store.get_meta("test_locked"))
    assert locked["seed"] == "distill" and locked["test"] == 0.2

    # New seed and shares, an overlapping file with 10 new rows: old ids keep their split.
    p = respec(p, seed="another-seed", test=0.5, validation=0.2)
    lines = (ASSETS / "reviews.csv").read_text().splitlines()
    extra = [f"n{i:03d},A brand new review number {i} about something else entirely,positive,web,5" for i in range(10)]
    (tmp_path / "overlap.csv").write_text("\n".join(lines[:31] + extra) + "\n")
    rep = import_file(p, tmp_path / "overlap.csv", id="id")
    assert (rep.added, rep.dup_existing) == (10, 30)
    assert any("changed since the test split was locked" in w for w in rep.warnings)
    second = splits_of(p)
    assert {k: second[k] for k in first} == first
    # (not vacuous: the new settings would have moved many of the old examples, test ones included)
    moved = [k for k in first if hash_split(k, "another-seed", 0.5, 0.2) != first[k]]
    assert len(moved) > 20 and any(first[k] == "test" for k in moved)
    # the new rows were split with the new settings
    assert all(second[f"n{i:03d}"] == hash_split(f"n{i:03d}", "another-seed", 0.5, 0.2) for i in range(10))

    # A split column claiming every old example is train moves nothing (and says so).
    body = "id,text,label,channel,rating_stars,split\n" + "\n".join(
        f"{line},train" for line in lines[1:]) + "\n"
    (tmp_path / "claims.csv").write_text(body)
    rep = import_file(p, tmp_path / "claims.csv", id="id", split="split")
    assert rep.added == 0 and rep.dup_existing == 60
    assert any("keep their stored split" in w for w in rep.warnings)
    assert {k: splits_of(p)[k] for k in first} == first

    # the lock record is the one from the first import
    assert json.loads(p.store.get_meta("test_locked")) == locked


def test_normalised_duplicate_of_stored_test_example_stays_test(tmp_path):
    p = make_project(tmp_path)
    import_file(p, ASSETS / "reviews.csv", id="id")
    test_id, test_text = p.store.q("SELECT id, text FROM examples WHERE split='test' ORDER BY id LIMIT 1")[0]
    p = respec(p, seed="zzz", test=0.0)
    f = tmp_path / "again.csv"
    f.write_text(f"text\n\"  {test_text.upper()}  \"\n")
    rep = import_file(p, f)      # no id column: matched by normalised text
    assert (rep.added, rep.dup_existing) == (0, 1)
    assert p.store.one("SELECT split FROM examples WHERE id=?", (test_id,)) == "test"
