"""Metrics of the generative-student evaluation, checked against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from distill.evaluate.lm import (
    _gate,
    _parse_outputs,
    field_pairs,
    micro_prf,
    normalise_text,
    pair_counts,
    per_field,
    row_scores,
    statistics,
    token_f1,
)
from distill.task import ProjectSpec, QualityBar

SCHEMA = {"type": "object", "properties": {"intent": {"type": "string"},
                                           "slots": {"type": "object", "additionalProperties": {"type": "string"}}},
          "required": ["intent", "slots"], "additionalProperties": False}


@pytest.fixture
def spec() -> ProjectSpec:
    return ProjectSpec(name="t", kind="extract", schema=SCHEMA)


# Three hand-made rows. Pairs (path, value):
#   row 1  pred {intent=A, slots.city=Paris, slots.date=today}  ref {intent=A, slots.city=paris, slots.time=now}
#          -> TP 1 (intent; 'Paris' != 'paris'), 3 predicted, 3 reference
#   row 2  no valid answer                                       ref {intent=B, slots.x=y}  -> TP 0, 0, 2
#   row 3  pred == ref == {intent=C, slots={}}                                              -> TP 1, 1, 1
PREDS = [{"intent": "A", "slots": {"city": "Paris", "date": "today"}}, None, {"intent": "C", "slots": {}}]
REFS = [{"intent": "A", "slots": {"city": "paris", "time": "now"}}, {"intent": "B", "slots": {"x": "y"}},
        {"intent": "C", "slots": {}}]


def test_field_pairs_flatten_nested_keys_lists_as_multisets_and_skip_nulls():
    pairs = field_pairs({"a": {"b": 1, "c": None}, "l": ["x", "x", "y"], "s": "v"})
    assert pairs == {("a.b", "1"): 1, ("l[]", '"x"'): 2, ("l[]", '"y"'): 1, ("s", '"v"'): 1}
    assert field_pairs(None) == {}
    assert field_pairs({"n": 1}) != field_pairs({"n": 1.0})      # canonical JSON: as strict as exact match
    assert field_pairs({"n": 5}) != field_pairs({"n": "5"})


def test_pair_counts_per_row(spec):
    assert pair_counts(PREDS[0], REFS[0]) == (1, 3, 3)
    assert pair_counts(PREDS[1], REFS[1]) == (0, 0, 2)
    assert pair_counts(PREDS[2], REFS[2]) == (1, 1, 1)
    # multiset: pred a,a,b vs ref a,b,b -> a matches once, b once
    assert pair_counts({"l": ["a", "a", "b"]}, {"l": ["a", "b", "b"]}) == (2, 3, 3)


def test_micro_field_f1_and_exact_match_by_hand(spec):
    s = row_scores("extract", spec, PREDS, REFS)
    st = statistics("extract", s, "gold")
    idx = np.arange(3)
    # summed: TP 2, predicted 4, reference 6 -> P 2/4, R 2/6, F1 2*2/(4+6)
    assert st["field_precision"](idx) == pytest.approx(0.5)
    assert st["field_recall"](idx) == pytest.approx(1 / 3)
    assert st["field_f1"](idx) == pytest.approx(0.4)
    assert st["accuracy"](idx) == pytest.approx(1 / 3)           # only row 3 is exactly right
    assert statistics("extract", s, "teacher").keys() >= {"agreement", "field_f1"}
    # micro != mean of per-row F1s (1/3, 0, 1 -> 4/9): rows with more fields weigh more
    assert st["field_f1"](idx) != pytest.approx(4 / 9)
    # a resample that repeats row 3 twice and row 2 once: TP 2, pred 2, ref 4 -> F1 4/6
    assert st["field_f1"](np.array([2, 2, 1])) == pytest.approx(4 / 6)


def test_micro_prf_undefined_denominators_are_nan():
    r = micro_prf(0, 0, 0)
    assert all(math.isnan(v) for v in r.values())
    r = micro_prf(0, 0, 2)
    assert math.isnan(r["precision"]) and r["recall"] == 0 and r["f1"] == 0


def test_per_field_breakdown_by_hand():
    rows = {d["field"]: d for d in per_field(PREDS, REFS)}
    # intent: right in rows 1 and 3, missing in row 2 -> TP 2, predicted 2, support 3
    assert rows["intent"]["precision"] == 1.0
    assert rows["intent"]["recall"] == pytest.approx(2 / 3)
    assert rows["intent"]["f1"] == pytest.approx(0.8)
    assert rows["intent"]["support"] == 3
    assert rows["slots.city"]["f1"] == 0.0 and rows["slots.city"]["support"] == 1
    assert rows["slots.date"]["support"] == 0 and rows["slots.date"]["precision"] == 0.0
    assert math.isnan(rows["slots.date"]["recall"])
    assert set(rows) == {"intent", "slots.city", "slots.date", "slots.time", "slots.x"}
    assert [d["field"] for d in per_field(PREDS, REFS)][0] == "intent"   # largest support first


def test_generate_metrics_by_hand():
    assert normalise_text("The  Cat, sat!") == "cat sat"
    # 'the cat sat' -> [cat, sat]; 'cat sat down' -> [cat, sat, down]: P 1, R 2/3, F1 0.8
    assert token_f1("the cat sat", "cat sat down") == pytest.approx(0.8)
    assert token_f1(None, "x") == 0.0
    assert token_f1("", "the") == 1.0          # both normalise to nothing
    spec = ProjectSpec(name="g", kind="generate")
    s = row_scores("generate", spec, ["Paris.", " paris", None], ["Paris", "paris", "Rome"])
    assert s["exact"].tolist() == [0.0, 1.0, 0.0]       # exact after strip only
    assert s["norm"].tolist() == [1.0, 1.0, 0.0]        # punctuation and case normalised away
    st = statistics("generate", s, "gold")
    assert st["normalised_match"](np.arange(3)) == pytest.approx(2 / 3)
    assert st["token_f1"](np.arange(3)) == pytest.approx(2 / 3)


def test_outputs_are_parsed_like_teacher_replies(spec):
    out = _parse_outputs(spec, ['{"intent": "A", "slots": {}}', "```json\n{\"intent\": \"B\", \"slots\": {}}\n```",
                                '{"intent": 3, "slots": {}}', "no json here", ""])
    assert out["answers"][:2] == [{"intent": "A", "slots": {}}, {"intent": "B", "slots": {}}]
    assert out["answers"][2:] == [None, None, None]
    assert out["reasons"][2:] == ["schema_violation", "bad_json", "empty"]
    assert out["validity"]["json_valid"].tolist() == [1, 1, 1, 0, 0]
    assert out["validity"]["schema_valid"].tolist() == [1, 1, 0, 0, 0]


def _student(value: float, segs: list[tuple[str, float, bool]]) -> dict:
    m = {"value": value, "ci": [value - 0.1, min(1.0, value + 0.05)], "n": 40}
    return {"vs_gold": {"accuracy": m, "field_f1": m}, "vs_teacher": {"agreement": m, "field_f1": m},
            "segments": [{"segment": s, "field_f1_vs_gold": {"segment": s, "n": 20, "value": v, "ci": [v - .1, v],
                                                              "gated": g}} for s, v, g in segs]}


def test_gate_reads_the_configured_metric_and_names_failures():
    q = QualityBar(metric="field_f1", against="gold", overall=0.8, worst_segment=0.7)
    ok = _gate(q, "extract", _student(0.9, [("A", 0.85, True), ("B", 0.2, False)]))
    assert ok["passed"] and ok["metric"] == "field_f1" and ok["worst_segment"]["segment"] == "A"
    assert any("not gated" in w for w in ok["warnings"])
    bad = _gate(q, "extract", _student(0.9, [("A", 0.6, True)]))
    assert not bad["passed"] and "worst segment 'A'" in bad["failures"][0]
    assert not _gate(q, "generate", _student(0.9, []))["passed"]              # field_f1 needs extract
    assert not _gate(QualityBar(metric="macro_f1"), "extract", _student(0.9, []))["passed"]
    em = _gate(QualityBar(metric="exact_match", against="teacher", overall=0.5, worst_segment=0.1), "extract",
               _student(0.9, []))
    assert em["metric"] == "agreement" and em["passed"]
