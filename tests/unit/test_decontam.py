"""Decontamination: planted near-duplicates of test inputs are found, listed and kept out of training."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

from distill.data.decontam import (decontaminate, find_contamination, jaccard, list_contamination, shingles,
                                   strong_norm)
from distill.data.importer import import_file
from distill.dataset import rows
from distill.project import Project
from distill.store import loads
from distill.task import DecontamSpec

ASSETS = Path(__file__).parent.parent / "assets"

# A long test input, so one small edit keeps the 3-gram Jaccard above 0.8.
TEST_TEXT = ("I bought the deluxe espresso machine in March and for the first few weeks it made excellent coffee "
             "every single morning, but then the steam wand started leaking water all over the counter and the "
             "pressure gauge stopped moving entirely, so now I use it only as a very expensive kettle.")
# small edits: a typo fixed, one word changed near the end, punctuation changed
NEAR_DUP = TEST_TEXT.replace("deluxe", "Deluxe").replace("expensive kettle", "expensive water kettle")
PUNCT_DUP = "Screws were missing, so the shelf could not be assembled!"   # asset r029 minus/plus punctuation
UNRELATED = "The tent leaked during the first light rain and the pegs bent."


def make_project(tmp_path: Path) -> Project:
    root = tmp_path / "proj"
    root.mkdir(parents=True)
    shutil.copy(ASSETS / "recording.jsonl", root)
    return Project.init(root, "classify", (ASSETS / "classify_spec.yaml").read_text())


def write_rows(path: Path, rows_: list[tuple[str, str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "split"])
        w.writerows(rows_)
    return path


def test_strong_norm_shingles_and_jaccard_by_hand():
    assert strong_norm("Screws were missing, so — the shelf!") == "screws were missing so the shelf"
    assert shingles("a b c d", 3) == {"a b c", "b c d"}
    assert shingles("Hi there", 3) == {"hi", "there"}            # fewer words than n: unigrams
    assert shingles("!!!", 3) == set()
    # {a b c, b c d} vs {a b c, b c e}: 1 shared of 3 distinct
    assert jaccard(shingles("a b c d", 3), shingles("a b c e", 3)) == 1 / 3
    assert jaccard(set(), set()) == 0.0


def test_find_contamination_pure():
    spec = DecontamSpec(ngram=3, threshold=0.8, num_perm=128)
    exact_j = jaccard(shingles(NEAR_DUP, 3), shingles(TEST_TEXT, 3))
    assert exact_j >= 0.8                                        # the planted edit is within the threshold
    hits = find_contamination([("t1", TEST_TEXT), ("t2", "Screws were missing so the shelf could not be assembled")],
                              [("a", NEAR_DUP), ("b", PUNCT_DUP), ("c", UNRELATED)], spec)
    by_id = {h.example_id: h for h in hits}
    assert set(by_id) == {"a", "b"}
    assert by_id["a"].test_id == "t1" and by_id["a"].method == "minhash"
    assert by_id["a"].score == round(exact_j, 6)                # the exact Jaccard, not the MinHash estimate
    assert (by_id["b"].test_id, by_id["b"].method, by_id["b"].score) == ("t2", "normalised", 1.0)


def test_planted_near_duplicate_is_removed_from_training_and_listed(tmp_path):
    p = make_project(tmp_path)
    rep = import_file(p, write_rows(tmp_path / "base.csv", [(TEST_TEXT, "test"), ("Something unrelated here", "train")]),
                      split="split")
    assert rep.contaminated_removed == 0
    rep = import_file(p, write_rows(tmp_path / "more.csv", [(NEAR_DUP, "train"), (UNRELATED, "train")]), split="split")
    assert rep.added == 2 and rep.contaminated_removed == 1

    listed = list_contamination(p)
    assert len(listed) == 1
    assert listed[0]["train_text"] == NEAR_DUP and listed[0]["test_text"] == TEST_TEXT
    assert listed[0]["method"] == "minhash" and 0.8 <= listed[0]["score"] < 1.0

    # label everything: contaminated rows still never reach training
    for (ex_id,) in p.store.q("SELECT id FROM examples"):
        with p.store.tx() as c:
            c.execute("INSERT INTO labels(example_id, teacher, status, answer, created_at) VALUES(?,?,?,?,0)",
                      (ex_id, "rec", "ok", '"negative"'))
    train_texts = {r.text for r in rows(p, "rec", ("train", "validation"))}
    assert NEAR_DUP not in train_texts and UNRELATED in train_texts


def test_new_test_input_catches_old_training_input(tmp_path):
    """Incremental in both directions: a test input imported later flags an earlier train input."""
    p = make_project(tmp_path)
    import_file(p, write_rows(tmp_path / "a.csv", [(NEAR_DUP, "train"), (UNRELATED, "train")]), split="split")
    assert p.store.one("SELECT COUNT(*) FROM contamination") == 0
    rep = import_file(p, write_rows(tmp_path / "b.csv", [(TEST_TEXT, "test")]), split="split")
    assert rep.contaminated_removed == 1
    assert [r["train_text"] for r in list_contamination(p)] == [NEAR_DUP]


def test_rerun_is_idempotent_and_rebuild_gives_same_rows(tmp_path):
    p = make_project(tmp_path)
    import_file(p, ASSETS / "reviews.csv", id="id")
    test_rows = p.store.q("SELECT id, text FROM examples WHERE split='test' ORDER BY id LIMIT 2")
    planted = [(t.rstrip(".") + "!!", "train") for _i, t in test_rows]   # punctuation-only edits
    # these differ from the stored norm only at the end, so the importer already treats them as the same input
    rep = import_file(p, write_rows(tmp_path / "p.csv", planted), split="split")
    assert rep.dup_existing == 2 and rep.added == 0
    # inner punctuation makes a different stored input that decontamination still catches
    planted = [(t.replace(" ", ", ", 1), "train") for _i, t in test_rows]
    rep = import_file(p, write_rows(tmp_path / "q.csv", planted), split="split")
    assert rep.added == 2 and rep.contaminated_removed == 2
    before = p.store.q("SELECT * FROM contamination ORDER BY example_id")
    assert decontaminate(p) == 0
    assert decontaminate(p, rebuild=True) == 2
    after = p.store.q("SELECT * FROM contamination ORDER BY example_id")
    assert [tuple(r) for r in before] == [tuple(r) for r in after]
    assert {r["test_id"] for r in list_contamination(p)} == {i for i, _t in test_rows}


def test_asset_data_has_no_false_positives(tmp_path):
    p = make_project(tmp_path)
    rep = import_file(p, ASSETS / "reviews.csv", id="id")
    assert rep.contaminated_removed == 0 and loads(p.store.get_meta("test_locked"))["seed"] == "distill"


def test_changed_settings_sign_every_input_again(tmp_path):
    """Signatures are only comparable when made the same way: new ``decontamination:`` settings re-sign every
    stored input (and check every pair again), while unchanged settings leave the stored signatures alone."""
    p = make_project(tmp_path)
    import_file(p, write_rows(tmp_path / "a.csv", [(NEAR_DUP, "train"), (UNRELATED, "train"), (TEST_TEXT, "test")]),
                split="split")
    sigs = p.store.q("SELECT n, example_id, sig FROM decontam_sigs ORDER BY n")
    assert len(sigs) == 3 and decontaminate(p) == 0
    assert p.store.q("SELECT n, example_id, sig FROM decontam_sigs ORDER BY n") == sigs
    yaml = p.root / "distill.yaml"
    yaml.write_text(yaml.read_text() + "decontamination:\n  ngram: 2\n")
    p2 = Project.open(p.root)
    assert decontaminate(p2, rebuild=True) == 1          # found again under the new settings
    again = {r[1]: r[2] for r in p2.store.q("SELECT n, example_id, sig FROM decontam_sigs")}
    assert set(again) == {r[1] for r in sigs} and all(again[r[1]] != r[2] for r in sigs)
    assert '"ngram": 2' in p2.store.get_meta("decontam_sigs")
