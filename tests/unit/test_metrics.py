"""Metric functions against values computed by hand (and scikit-learn where it defines the metric)."""

import math

import numpy as np
import pytest
from sklearn.metrics import f1_score

from distill import metrics as M


def test_accuracy_and_agreement_by_hand():
    gold = ["a", "b", "a", "c"]
    pred = ["a", "a", None, "c"]          # one wrong, one missing answer
    assert M.accuracy(gold, pred) == 0.5  # 2 of 4; the None counts as wrong
    assert M.agreement(["x", None, "y"], ["x", None, "z"]) == pytest.approx(1 / 3)  # None never agrees
    assert math.isnan(M.accuracy([], []))
    with pytest.raises(ValueError, match="length mismatch"):
        M.accuracy(["a"], [])


def test_macro_f1_by_hand():
    # gold a a b b c ; pred a b b b a
    # a: tp1 fp1 fn1 -> 2/4 = .5 ; b: tp2 fp1 fn0 -> 4/5 = .8 ; c: tp0 fp0 fn1 -> 0
    gold = ["a", "a", "b", "b", "c"]
    pred = ["a", "b", "b", "b", "a"]
    assert M.macro_f1(gold, pred) == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert M.macro_f1(gold, pred) == pytest.approx(f1_score(gold, pred, average="macro"))


def test_macro_f1_missing_answer_is_a_false_negative_only():
    # gold a b ; pred a None: a: tp1 -> 1 ; b: fn1 -> 0 ; None is not a class.
    assert M.macro_f1(["a", "b"], ["a", None]) == pytest.approx(0.5)


def test_macro_f1_matches_sklearn_on_random_data():
    rng = np.random.default_rng(3)
    labels = ["a", "b", "c", "d"]
    for _ in range(20):
        g = list(rng.choice(labels, 50))
        p = list(rng.choice(labels, 50))
        assert M.macro_f1(g, p) == pytest.approx(f1_score(g, p, average="macro"))


def test_retention():
    assert M.retention(0.8, 0.9) == pytest.approx(0.8 / 0.9)
    assert math.isnan(M.retention(0.8, 0.0))


def test_bootstrap_ci_is_seeded_and_brackets_the_estimate():
    correct = np.array([1] * 80 + [0] * 20, dtype=float)
    stat = lambda idx: float(correct[idx].mean())  # noqa: E731
    lo, hi = M.bootstrap_ci(stat, len(correct), resamples=2000, seed=1)
    assert (lo, hi) == M.bootstrap_ci(stat, len(correct), resamples=2000, seed=1)
    assert lo < 0.8 < hi
    # Normal approximation of a binomial proportion: 0.8 ± 1.96·sqrt(.8·.2/100) = [0.7216, 0.8784]
    assert lo == pytest.approx(0.7216, abs=0.02) and hi == pytest.approx(0.8784, abs=0.02)
    # A constant sample has a zero-width interval.
    assert M.bootstrap_ci(lambda idx: 1.0, 10) == (1.0, 1.0)
    with pytest.raises(ValueError):
        M.bootstrap_ci(stat, 100, resamples=100)


def test_bootstrap_ratio_is_recomputed_per_resample():
    # student right on 8/10, teacher on 10/10: every resample's ratio is student_acc / 1.0.
    s = np.array([1] * 8 + [0] * 2, float)
    t = np.ones(10)
    lo, hi = M.bootstrap_ci(lambda i: s[i].mean() / t[i].mean(), 10, seed=0)
    lo2, hi2 = M.bootstrap_ci(lambda i: s[i].mean(), 10, seed=0)
    assert (lo, hi) == (lo2, hi2)
    # Undefined resamples (teacher 0) are skipped rather than poisoning the percentiles.
    t0 = np.array([0.0] * 9 + [1.0])
    lo, hi = M.bootstrap_ci(lambda i: math.nan if t0[i].mean() == 0 else 1.0, 10, seed=0)
    assert (lo, hi) == (1.0, 1.0)


def test_reliability_bins_and_ece_by_hand():
    # Bins are right-closed: 0.9 and 0.85 fall in (0.8, 0.9], 0.95 in (0.9, 1.0], 0.6 and 0.55 in (0.5, 0.6].
    conf = [0.95, 0.9, 0.85, 0.6, 0.55, 0.0]
    correct = [1, 1, 0, 1, 0, 0]
    bins = M.reliability_bins(conf, correct, n_bins=10)
    by = {round(b["lo"], 1): b for b in bins}
    assert by[0.9]["count"] == 1 and by[0.9]["accuracy"] == 1.0
    assert by[0.8]["count"] == 2 and by[0.8]["accuracy"] == 0.5 and by[0.8]["confidence"] == pytest.approx(0.875)
    assert by[0.5]["count"] == 2 and by[0.5]["confidence"] == pytest.approx(0.575)
    assert by[0.0]["count"] == 1  # confidence 0 lands in the first bin
    assert by[0.3]["count"] == 0 and by[0.3]["accuracy"] is None
    # ECE = 1/6|1-.95| + 2/6|.5-.875| + 2/6|.5-.575| + 1/6|0-0|
    expected = (0.05 + 2 * 0.375 + 2 * 0.075 + 0) / 6
    assert M.ece(conf, correct, n_bins=10) == pytest.approx(expected)
    assert M.ece([1.0, 1.0], [1, 1]) == 0.0
    # Values on a bin edge go to the lower bin even where x*10 is not exact in floating point (0.7*10 > 7).
    assert [b["count"] for b in M.reliability_bins([0.3, 0.7], [1, 1])][2] == 1
    assert [b["count"] for b in M.reliability_bins([0.3, 0.7], [1, 1])][6] == 1


def test_confused_pairs_counts_and_rows():
    gold = ["a", "a", "a", "b", "b", "c"]
    pred = ["b", "b", "a", "a", None, "c"]
    pairs = M.confused_pairs(gold, pred, top=10)
    assert pairs[0] == {"true": "a", "pred": "b", "count": 2, "rows": [0, 1]}
    assert {(p["true"], p["pred"], p["count"]) for p in pairs[1:]} == {("b", "a", 1), ("b", None, 1)}
    assert len(M.confused_pairs(gold, pred, top=1)) == 1


def test_per_segment_and_worst_segment_ignores_small_segments():
    segs = ["x"] * 4 + ["y"] * 4 + ["tiny"] * 2 + [None] * 4
    correct = np.array([1, 1, 1, 0] + [1, 0, 0, 1] + [0, 0] + [1, 1, 1, 1], float)
    br = M.per_segment(segs, lambda idx: float(correct[idx].mean()), min_size=3)
    by = {b["segment"]: b for b in br}
    assert set(by) == {"x", "y", "tiny", "(none)"}      # small segments are still reported
    assert by["x"]["value"] == 0.75 and by["y"]["value"] == 0.5 and by["tiny"]["value"] == 0.0
    assert by["tiny"]["gated"] is False and by["x"]["gated"] is True and by["x"]["n"] == 4
    assert by["x"]["ci"][0] <= 0.75 <= by["x"]["ci"][1]
    assert M.worst_segment(br)["segment"] == "y"        # 'tiny' (0.0) is too small to gate on
    assert M.worst_segment([b | {"gated": False} for b in br]) is None


def test_latency_percentiles_by_hand():
    lat = M.latency_percentiles([0.1, 0.2, 0.3, 0.4, 1.0])
    assert lat["n"] == 5
    assert lat["p50_s"] == pytest.approx(0.3)
    assert lat["p95_s"] == pytest.approx(0.4 + 0.8 * 0.6)   # rank 0.95*4 = 3.8 -> 0.4 + 0.8·(1.0-0.4)
    assert lat["mean_s"] == pytest.approx(0.4)
    assert M.latency_percentiles([])["p50_s"] is None
