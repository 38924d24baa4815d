"""The router's OOD signals on synthetic clusters where the right answer is known, the finite-sample coverage
promise, out-of-scope validation rows, and the statistics' round trip (issue #16)."""

import math

import numpy as np
import pytest

from distill.errors import DistillError
from distill.serve.router import (
    KnnIndex, OodStats, Router, RouterConfig, calibrate, fit_ood, ood_scores,
)

LABELS = ["a", "b", "c"]


def _layers(n: int, rng, topic_shift: float = 0.0, collapse_to: int | None = None):
    """[n, 3, 8] per-layer features of a 3-class student. Layer 1 keeps the topic (in-domain inputs sit near the
    origin, a foreign topic ``topic_shift`` away); layer 2 (the last) is collapsed onto the classes: class means
    at 5*e_c, and a foreign input lands on class ``collapse_to``'s mean like an in-domain one."""
    y = rng.integers(0, 3, n) if collapse_to is None else np.full(n, collapse_to)
    x = np.zeros((n, 3, 8))
    x[:, 0] = rng.normal(0, 1, (n, 8))                             # embedding layer: never scored by default
    x[:, 1] = rng.normal(0, 1, (n, 8))
    x[:, 1, 0] += topic_shift
    x[:, 2] = rng.normal(0, 0.5, (n, 8))
    x[np.arange(n), 2, y] += 5.0
    logits = np.zeros((n, 3))
    logits[np.arange(n), y] = 4.0
    return x, logits, [LABELS[i] for i in y]


def test_multi_layer_mahalanobis_catches_what_the_collapsed_last_layer_hides():
    rng = np.random.default_rng(0)
    train, _, y_train = _layers(600, rng)
    val, val_logits, y_val = _layers(400, rng)
    far, far_logits, _ = _layers(200, rng, topic_shift=8.0, collapse_to=1)   # foreign topic, confident "b"
    for layers, expect_caught in (([-1], False), (None, True)):
        cfg = RouterConfig(labels=LABELS, ood="mahalanobis", layers=layers, ood_keep=0.95)
        stats = fit_ood(cfg, y_train, train)
        assert stats.layers == ([-1] if layers else [1, 2])        # default: every layer after the embeddings
        fitted = calibrate(None, {"layers": val}, y_val, 0.9, val_logits=val_logits, labels=LABELS,
                           settings=cfg, stats=stats)
        routed = np.mean([d.routed_to == "teacher" for d in Router(fitted, stats).decide(far_logits, {"layers": far})])
        if expect_caught:
            assert routed >= 0.99
        else:
            assert routed <= 0.2           # the last layer alone sees a confident, typical "b"


def test_knn_distance_hand_computed_and_leave_one_out():
    s = 1 / math.sqrt(2)
    idx = KnnIndex(np.array([[1.0, 0.0], [0.0, 1.0], [s, s]]))
    q = np.array([[1.0, 0.0], [3.0, 3.0]])                        # any scale: normalised first
    assert idx.distance(q, 1) == pytest.approx([0.0, 0.0], abs=1e-6)
    assert idx.distance(q, 2) == pytest.approx([1 - s, 1 - s], abs=1e-6)
    assert idx.distance(q, 3) == pytest.approx([1.0, 1 - s], abs=1e-6)
    # the reference scored against itself: its own match (distance 0) is skipped
    assert idx.distance(np.array([[1.0, 0.0]]), 1, skip_self=True) == pytest.approx([1 - s], abs=1e-6)
    with pytest.raises(DistillError, match="dims"):
        idx.distance(np.ones((1, 3)), 1)


def test_knn_on_frozen_embeddings_routes_a_foreign_cluster():
    rng = np.random.default_rng(1)
    centres = rng.normal(0, 1, (3, 16))
    def topic(n, c):
        return centres[c] + rng.normal(0, 0.15, (n, 16))
    train = np.concatenate([topic(100, c) for c in range(3)])
    val = np.concatenate([topic(60, c) for c in range(3)])
    foreign = -centres.mean(0) * 3 + rng.normal(0, 0.15, (50, 16))
    cfg = RouterConfig(labels=LABELS, ood="knn", k=5, ood_keep=0.95)
    stats = fit_ood(cfg, ["a"] * 300, train_frozen=train)
    logits = np.tile([4.0, 0.0, 0.0], (len(val), 1))
    fitted = calibrate(None, {"frozen": val}, ["a"] * len(val), 0.9, val_logits=logits, labels=LABELS,
                       settings=cfg, stats=stats)
    d = Router(fitted, stats).decide(np.tile([9.0, 0.0, 0.0], (50, 1)), {"frozen": foreign})
    assert all(x.reason == "ood" for x in d)


def test_combined_is_the_max_of_train_standardised_scores():
    rng = np.random.default_rng(2)
    train, _, y_train = _layers(300, rng)
    frozen = rng.normal(0, 1, (300, 8))
    cfg = RouterConfig(labels=LABELS, ood="combined", k=3)
    stats = fit_ood(cfg, y_train, train, frozen)
    assert set(stats.scale) == {"mahalanobis", "knn"}
    q, q_logits, _ = _layers(20, rng)
    qf = rng.normal(0, 1, (20, 8))
    got = ood_scores(cfg, q_logits, {"layers": q, "frozen": qf}, stats)
    maha = ood_scores(RouterConfig(labels=LABELS, ood="mahalanobis"), q_logits, {"layers": q}, stats)
    knn = stats.knn().distance(qf, 3)
    (m0, m1), (k0, k1) = stats.scale["mahalanobis"], stats.scale["knn"]
    assert got == pytest.approx(np.maximum((maha - m0) / m1, (knn - k0) / k1))


def test_guaranteed_cut_keeps_its_promise_and_the_plain_one_does_not():
    """Confidence with a known law: p(a) ~ U(0, 1) over two labels, so max_prob ~ U(0.5, 1) and a cut at t
    covers exactly 2 (1 - t) of new inputs. Over many validation draws the guaranteed cut falls short of the
    target in at most ~delta of them, the plain cut in about half."""
    rng = np.random.default_rng(3)
    n, target, delta, trials = 400, 0.8, 0.1, 300
    short = {"guaranteed": 0, "plain": 0}
    for _ in range(trials):
        pa = rng.uniform(0, 1, n)
        logits = np.stack([np.log(pa), np.log1p(-pa)], 1)
        cfg = calibrate(None, None, ["a"] * n, target, val_logits=logits, labels=["a", "b"],
                        settings=RouterConfig(ood="none", delta=delta), grid=[target])
        assert cfg.threshold_rule == "guaranteed" and cfg.guaranteed_coverage >= target
        for rule, t in (("guaranteed", cfg.guaranteed_conf_threshold), ("plain", cfg.plain_conf_threshold)):
            short[rule] += 2 * (1 - t) < target
    assert short["guaranteed"] / trials <= delta + 0.05
    assert short["plain"] / trials >= 0.3


def test_out_of_scope_rows_set_no_threshold_and_measure_recall():
    rng = np.random.default_rng(4)
    val, logits, y = _layers(300, rng)
    train, _, y_train = _layers(300, rng)
    far, far_logits, _ = _layers(40, rng, topic_shift=8.0, collapse_to=0)
    cfg = RouterConfig(labels=LABELS, ood="mahalanobis")
    stats = fit_ood(cfg, y_train, train)
    alone = calibrate(None, {"layers": val}, y, 0.9, val_logits=logits, labels=LABELS, settings=cfg, stats=stats)
    assert alone.n_oos_validation == 0 and alone.oos_recall_validation is None
    assert any("no out-of-scope examples" in note for note in alone.notes)
    both = calibrate(None, {"layers": np.concatenate([val, far])}, y + [None] * 40, 0.9,
                     val_logits=np.concatenate([logits, far_logits]), labels=LABELS, settings=cfg, stats=stats,
                     oos=[False] * 300 + [True] * 40)
    assert (both.conf_threshold, both.ood_threshold, both.n_validation) == \
        (alone.conf_threshold, alone.ood_threshold, alone.n_validation)
    assert both.n_oos_validation == 40 and both.oos_recall_validation == 1.0
    assert all(pt["oos_recall"] == 1.0 for pt in both.curve)


def test_stats_round_trip_gives_the_same_decisions(tmp_path):
    rng = np.random.default_rng(5)
    train, _, y_train = _layers(200, rng)
    frozen = rng.normal(0, 1, (200, 8))
    val, logits, y = _layers(200, rng)
    val_frozen = rng.normal(0, 1, (200, 8))
    cfg = RouterConfig(labels=LABELS, ood="combined", k=3)
    stats = fit_ood(cfg, y_train, train, frozen)
    feats = {"layers": val, "frozen": val_frozen}
    fitted = calibrate(None, feats, y, 0.8, val_logits=logits, labels=LABELS, settings=cfg, stats=stats)
    Router(fitted, stats).save(tmp_path)
    back = Router.load(tmp_path)
    assert back.config == fitted and back.stats.layers == [1, 2]
    # the statistics are rounded to their stored precision when fitted: serving scores exactly as calibration did
    assert Router(fitted, stats).decide(logits, feats) == back.decide(logits, feats)
    assert np.isfinite(OodStats.load(tmp_path / "router_stats.npz").scale["knn"][1])


def test_guarantee_holds_for_both_cuts_at_once():
    """The OOD cut and the confidence cut together: logits [log p + b, log(1-p) + b] have max_prob = max(p, 1-p)
    and energy = -b, independent, so a new input passes cuts (t1, t2) with probability exactly 2 (1 - t1) * t2 for
    p ~ U(0, 1), -b ~ U(0, 1). Part of validation sets the OOD cut, the rest the joint cut: the promise holds."""
    rng = np.random.default_rng(6)
    n, target, delta, trials = 1000, 0.8, 0.1, 200
    short, over = 0, []
    for _ in range(trials):
        p, e = rng.uniform(0, 1, n), rng.uniform(0, 1, n)
        logits = np.stack([np.log(p) - e, np.log1p(-p) - e], 1)
        cfg = calibrate(None, None, ["a"] * n, target, val_logits=logits, labels=["a", "b"],
                        settings=RouterConfig(ood="energy", ood_keep=0.95, delta=delta), grid=[target])
        assert cfg.threshold_rule == "guaranteed"
        cov = 2 * (1 - max(cfg.conf_threshold, 0.5)) * min(cfg.ood_threshold, 1.0)
        short += cov < target
        over.append(cov - target)
    assert short / trials <= delta + 0.05
    # no union bound: the served cut is close to the target, not far above it
    assert float(np.median(over)) < 0.03
