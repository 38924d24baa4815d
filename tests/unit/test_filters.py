"""Filters: hand-computed measures, and each example dropped for the right (first) reason."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
import yaml

from distill.data.importer import import_file
from distill.dataset import rows
from distill.filters import (check_high_entropy, check_low_agreement, check_low_confidence, check_low_margin,
                             entropy_nats, margin, run_filters, top_probability)
from distill.project import SPEC_FILE, Project
from distill.task import FilterSpec

ASSETS = Path(__file__).parent.parent / "assets"


def make_project(tmp_path: Path, filters: dict | None = None) -> Project:
    root = tmp_path / "proj"
    root.mkdir(parents=True)
    shutil.copy(ASSETS / "recording.jsonl", root)
    raw = yaml.safe_load((ASSETS / "classify_spec.yaml").read_text())
    raw["filters"] = filters or {}
    (root / SPEC_FILE).write_text(yaml.safe_dump(raw))
    return Project.open(root)


def put_label(p: Project, ex_id: str, answer=None, *, status="ok", probs=None, confidence=None,
              agreement=None, reason=None, teacher="rec") -> None:
    """What the labeller would write (it is another engineer's module; the table is the contract)."""
    with p.store.tx() as c:
        c.execute(
            "INSERT OR REPLACE INTO labels(example_id, teacher, status, answer, probs, confidence, agreement, reason,"
            " created_at) VALUES(?,?,?,?,?,?,?,?,0)",
            (ex_id, teacher, status, None if answer is None else json.dumps(answer),
             None if probs is None else json.dumps(probs), confidence, agreement, reason),
        )


# -- pure measures against hand-computed values --------------------------------------------------------


def test_entropy_by_hand():
    assert entropy_nats({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}) == pytest.approx(math.log(3))
    assert entropy_nats({"a": 1.0, "b": 0.0}) == 0.0
    # -(0.5 ln 0.5 + 2 * 0.25 ln 0.25) = 0.34657 + 0.69315 = 1.03972
    assert entropy_nats({"a": 0.5, "b": 0.25, "c": 0.25}) == pytest.approx(1.039721, abs=1e-6)
    # unnormalised input is renormalised: {2, 2} is uniform over two labels
    assert entropy_nats({"a": 2.0, "b": 2.0}) == pytest.approx(math.log(2))


def test_margin_and_top_probability_by_hand():
    assert margin({"a": 0.6, "b": 0.3, "c": 0.1}) == pytest.approx(0.3)
    assert margin({"a": 0.2, "b": 0.5, "c": 0.3}) == pytest.approx(0.2)
    assert margin({"a": 1.0}) == 1.0
    assert top_probability(0.7, {"a": 0.9}) == 0.7        # a stated confidence wins
    assert top_probability(None, {"a": 0.2, "b": 0.8}) == 0.8
    assert top_probability(None, None) is None


def test_each_check_against_its_threshold():
    fs = FilterSpec(min_confidence=0.6, min_margin=0.3, max_entropy=0.8, min_agreement=0.5)
    assert check_low_confidence(0.59, None, fs) == "confidence 0.590 < 0.6"
    assert check_low_confidence(0.6, None, fs) is None
    assert check_low_confidence(None, None, fs) is None              # unknown: not evidence of a bad label
    assert check_low_margin({"a": 0.62, "b": 0.38}, fs) == "margin 0.240 < 0.3"
    assert check_low_margin(None, fs) is None
    # H(0.7, 0.15, 0.15) = 0.24967 + 2 * 0.28457 = 0.81881 > 0.8
    assert check_high_entropy({"a": 0.7, "b": 0.15, "c": 0.15}, fs) == "entropy 0.819 nats > 0.8"
    assert check_high_entropy({"a": 0.8, "b": 0.1, "c": 0.1}, fs) is None   # H = 0.639
    assert check_low_agreement(0.4, fs) == "agreement 0.400 < 0.5"
    assert check_low_agreement(None, fs) is None
    off = FilterSpec()
    assert all(c is None for c in (check_low_confidence(0.01, None, off), check_low_margin({"a": 0.5, "b": 0.5}, off),
                                   check_high_entropy({"a": 0.5, "b": 0.5}, off), check_low_agreement(0.0, off)))


# -- the run -----------------------------------------------------------------------------------------


ROWS = [  # id, text, gold, split
    ("t1", "The printer jams on every second page", "", "test"),
    ("a_nolabel", "Nobody labelled this one yet", "", "train"),
    ("b_failed", "The teacher answered something odd", "", "train"),
    ("c_contam", "The printer, jams on every second page", "", "train"),
    ("d_gold", "Gold says positive here", "positive", "train"),
    ("e_lowconf", "The teacher was unsure about this", "", "train"),
    ("f_margin", "Two labels were close for this one", "", "train"),
    ("g_entropy", "The distribution was rather flat", "", "train"),
    ("h_agree", "Samples disagreed with each other", "", "train"),
    ("i_keep", "Great, product", "positive", "train"),
    ("j_dup", "great product", "", "train"),
    ("k_corr", "A human fixed this label", "", "train"),
    ("l_val", "Validation example that is fine", "", "validation"),
    ("m_both", "Low confidence and low margin at once", "", "train"),
]


def build(tmp_path: Path) -> Project:
    p = make_project(tmp_path, {"min_confidence": 0.6, "min_margin": 0.3, "max_entropy": 0.8, "min_agreement": 0.5})
    with open(tmp_path / "f.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "text", "label", "split"])
        w.writerows(ROWS)
    import_file(p, tmp_path / "f.csv", id="id", label="label", split="split")
    put_label(p, "t1", "negative", confidence=0.1)          # test: never filtered
    put_label(p, "b_failed", status="failed", reason="label_not_in_set")
    put_label(p, "c_contam", "negative", confidence=0.99)
    put_label(p, "d_gold", "negative", confidence=0.99)
    put_label(p, "e_lowconf", "neutral", confidence=0.4)
    put_label(p, "f_margin", "positive", probs={"positive": 0.62, "negative": 0.38, "neutral": 0.0})
    put_label(p, "g_entropy", "positive", probs={"positive": 0.7, "negative": 0.15, "neutral": 0.15})
    put_label(p, "h_agree", "negative", confidence=0.95, agreement=0.4)
    put_label(p, "i_keep", "positive", confidence=0.9, agreement=1.0)
    put_label(p, "j_dup", "positive", confidence=0.9)
    put_label(p, "k_corr", status="failed", reason="bad_json")
    put_label(p, "l_val", "neutral", confidence=0.8)
    put_label(p, "m_both", "neutral", probs={"positive": 0.3, "negative": 0.2, "neutral": 0.5})
    with p.store.tx() as c:
        c.execute("INSERT INTO corrections(example_id, answer, source, created_at) VALUES('k_corr', '\"neutral\"', 'test', 0)")
    return p


EXPECTED = {
    "a_nolabel": "no_label", "b_failed": "teacher_failed:label_not_in_set", "c_contam": "contaminated",
    "d_gold": "disagrees_with_gold", "e_lowconf": "low_confidence", "f_margin": "low_margin",
    "g_entropy": "high_entropy", "h_agree": "low_agreement", "i_keep": None, "j_dup": "duplicate",
    "k_corr": "corrected", "l_val": None, "m_both": "low_confidence",
}


def test_each_example_dropped_for_its_first_reason(tmp_path):
    p = build(tmp_path)
    rep = run_filters(p)
    decisions = {r["example_id"]: (r["kept"], r["reason"])
                 for r in p.store.q("SELECT * FROM filter_decisions WHERE run_id=?", (rep.run_id,))}
    assert set(decisions) == set(EXPECTED)                    # one row per train/val example; test has none
    assert {k: v[1] for k, v in decisions.items()} == EXPECTED
    assert {k for k, v in decisions.items() if v[0]} == {"i_keep", "k_corr", "l_val"}
    assert rep.kept == 3
    assert rep.dropped_by_reason == {
        "contaminated": 1, "disagrees_with_gold": 1, "duplicate": 1, "high_entropy": 1, "low_agreement": 1,
        "low_confidence": 2, "low_margin": 1, "no_label": 1, "teacher_failed:label_not_in_set": 1}
    assert rep.by_split == {"train": {"kept": 2, "dropped": 10}, "validation": {"kept": 1, "dropped": 0}}
    run = p.store.q("SELECT * FROM filter_runs WHERE id=?", (rep.run_id,))[0]
    assert (run["teacher"], run["kept"], run["dropped"]) == ("rec", 3, 10)
    assert json.loads(run["config"])["filters"]["min_margin"] == 0.3
    # the details say why
    detail = p.store.one("SELECT detail FROM filter_decisions WHERE example_id='g_entropy'")
    assert detail == "entropy 0.819 nats > 0.8"
    # training reads exactly the kept rows, the correction's answer included
    got = {r.id: (r.answer, r.source) for r in rows(p, "rec", ("train", "validation"))}
    assert got == {"i_keep": ("positive", "teacher"), "k_corr": ("neutral", "correction"), "l_val": ("neutral", "teacher")}


def test_rerun_makes_a_new_run_with_the_same_decisions(tmp_path):
    p = build(tmp_path)
    a, b = run_filters(p), run_filters(p, teacher="rec")
    assert b.run_id == a.run_id + 1
    q = "SELECT example_id, kept, reason, detail FROM filter_decisions WHERE run_id=? ORDER BY example_id"
    assert [tuple(r) for r in p.store.q(q, (a.run_id,))] == [tuple(r) for r in p.store.q(q, (b.run_id,))]
    assert (a.kept, a.dropped_by_reason, a.by_split) == (b.kept, b.dropped_by_reason, b.by_split)


def test_switches_off(tmp_path):
    p = build(tmp_path)
    raw = yaml.safe_load((p.root / SPEC_FILE).read_text())
    raw["filters"] = {"drop_disagree_with_gold": False, "drop_duplicates": False}
    (p.root / SPEC_FILE).write_text(yaml.safe_dump(raw))
    p = Project.open(p.root)
    rep = run_filters(p)
    assert rep.dropped_by_reason == {"contaminated": 1, "no_label": 1, "teacher_failed:label_not_in_set": 1}
    assert rep.kept == 10
