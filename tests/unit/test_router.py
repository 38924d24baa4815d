"""Router scores against hand-computed values, and calibration on synthetic validation data."""

import math

import numpy as np
import pytest

from distill.errors import DistillError
from distill.serve.router import (
    Mahalanobis, OodStats, Router, RouterConfig, calibrate, confidence, energy, fit_mahalanobis, softmax,
)

LABELS = ["a", "b", "c"]


def test_confidence_kinds_hand_computed():
    p = np.array([[0.7, 0.2, 0.1], [1 / 3, 1 / 3, 1 / 3]])
    assert confidence(p, "max_prob") == pytest.approx([0.7, 1 / 3])
    assert confidence(p, "margin") == pytest.approx([0.5, 0.0])
    h = -(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1))
    assert confidence(p, "entropy") == pytest.approx([1 - h / math.log(3), 0.0], abs=1e-9)


def test_energy_hand_computed():
    # E = -T logsumexp(f/T): two zero logits -> -log 2; T=2 on [2, 0] -> -2 log(e + 1)
    assert energy(np.array([[0.0, 0.0]]))[0] == pytest.approx(-math.log(2))
    assert energy(np.array([[2.0, 0.0]]), temperature=2.0)[0] == pytest.approx(-2 * math.log(math.e + 1))
    # same softmax, larger logits -> lower energy (more in-distribution): what probabilities cannot show
    lo, hi = np.array([[1.0, 0.0, 0.0]]), np.array([[11.0, 10.0, 10.0]])
    assert np.allclose(softmax(lo), softmax(hi))
    assert energy(hi)[0] < energy(lo)[0]


def test_mahalanobis_identity_covariance_is_squared_euclidean_to_nearest_mean():
    m = Mahalanobis(means=np.array([[0.0, 0.0], [10.0, 0.0]]), precision=np.eye(2))
    s = m.score(np.array([[1.0, 2.0], [9.0, 0.0], [5.0, 0.0]]))
    assert s == pytest.approx([5.0, 1.0, 25.0])


def test_fit_mahalanobis_recovers_means_and_flags_far_points():
    rng = np.random.default_rng(0)
    z0 = rng.normal([0, 0, 0], 1.0, size=(200, 3))
    z1 = rng.normal([6, 0, 0], 1.0, size=(200, 3))
    m = fit_mahalanobis(np.concatenate([z0, z1]), [0] * 200 + [1] * 200, 2)
    assert m.means[0] == pytest.approx([0, 0, 0], abs=0.25)
    assert m.means[1] == pytest.approx([6, 0, 0], abs=0.25)
    near, far = m.score(np.array([[0.0, 0.0, 0.0], [3.0, 20.0, 0.0]]))
    assert near < 1.0 and far > 100.0


def _synthetic(n=2000, seed=0):
    """Logits whose confidence predicts correctness, like a trained student's."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    strength = rng.uniform(0, 4, n)
    logits = rng.normal(0, 1, (n, 3))
    logits[np.arange(n), y] += strength
    return logits, [LABELS[i] for i in y]


def test_calibrate_hits_target_coverage_and_curve_is_monotone():
    logits, teacher = _synthetic()
    for target in (0.5, 0.8, 0.9):
        cfg = calibrate(None, None, teacher, target, val_logits=logits, labels=LABELS,
                        settings=RouterConfig(ood="none", guarantee=False))
        assert cfg.threshold_rule == "plain"
        assert abs(cfg.achieved_coverage - target) <= 1 / len(teacher)
        # the threshold really gives that coverage when applied through the Router
        routed = Router(cfg).decide(logits)
        assert np.mean([d.routed_to == "student" for d in routed]) == pytest.approx(cfg.achieved_coverage)
    curve = cfg.curve
    cov = [p["coverage"] for p in curve]
    sys_acc = [p["system_accuracy"] for p in curve]
    share = [p["teacher_share"] for p in curve]
    assert cov == sorted(cov) and cov[-1] == 1.0
    # against teacher labels, handing more to the student can only lose accuracy and save teacher calls
    assert all(a >= b - 1e-12 for a, b in zip(sys_acc, sys_acc[1:]))
    assert all(a >= b - 1e-12 for a, b in zip(share, share[1:]))
    # confidence is informative here, so the most confident half is more accurate than everything
    acc = {round(p["target"], 2): p["student_accuracy"] for p in curve}
    assert acc[0.5] > acc[1.0] + 0.1


def test_calibrate_hand_made_probs_exact_threshold():
    probs = np.array([[0.9, 0.05, 0.05], [0.6, 0.3, 0.1], [0.4, 0.35, 0.25], [0.2, 0.7, 0.1]])
    teacher = ["a", "b", "a", "b"]       # student right on rows 0, 2, 3
    cfg = calibrate(probs, None, teacher, 0.5, labels=LABELS, settings=RouterConfig(ood="none"),
                    grid=[0.5, 1.0])
    assert cfg.threshold_rule == "plain"                    # 4 rows promise nothing
    assert cfg.conf_threshold == pytest.approx(0.7)        # the two most confident: 0.9 and 0.7
    assert cfg.achieved_coverage == 0.5
    p50 = next(p for p in cfg.curve if p["target"] == 0.5)
    assert p50["student_accuracy"] == 1.0 and p50["system_accuracy"] == 1.0
    p100 = next(p for p in cfg.curve if p["target"] == 1.0)
    assert p100["student_accuracy"] == 0.75 and p100["system_accuracy"] == 0.75


def test_energy_cut_routes_ood_inputs_to_teacher():
    logits, teacher = _synthetic(1000, seed=1)
    cfg = calibrate(None, None, teacher, 0.9, val_logits=logits, labels=LABELS,
                    settings=RouterConfig(ood="energy", ood_keep=0.95, guarantee=False))
    # 5% of validation sits above the energy cut, so at most 95% can be covered
    assert cfg.achieved_coverage <= 0.95 + 1e-9
    assert abs(cfg.achieved_coverage - 0.9) <= 1 / len(teacher)
    # an input with low logits everywhere (no class responds) has high energy: routed as OOD
    d = Router(cfg).decide(np.array([[-5.0, -5.0, -5.0]]))[0]
    assert d.routed_to == "teacher" and d.reason == "ood"
    # a loud, confident input goes to the student
    d = Router(cfg).decide(np.array([[12.0, 0.0, 0.0]]))[0]
    assert d.routed_to == "student" and d.reason == "confident" and d.label == "a"


def test_energy_needs_logits():
    with pytest.raises(DistillError, match="logits"):
        calibrate(np.full((3, 3), 1 / 3), None, ["a", "b", "c"], 0.5, labels=LABELS,
                  settings=RouterConfig(ood="energy"))


def test_bad_coverage_is_a_distill_error():
    with pytest.raises(DistillError, match="coverage"):
        RouterConfig(coverage=1.5)


def test_save_load_round_trip_with_mahalanobis(tmp_path):
    rng = np.random.default_rng(2)
    feats = rng.normal(size=(90, 4))
    maha = OodStats(layers=[-1], maha=[fit_mahalanobis(feats, [i % 3 for i in range(90)], 3)])
    logits, teacher = _synthetic(90, seed=3)
    cfg = calibrate(None, feats, teacher, 0.8, val_logits=logits, labels=LABELS,
                    settings=RouterConfig(ood="mahalanobis", layers=[-1], confidence="margin"), stats=maha)
    Router(cfg, maha).save(tmp_path)
    back = Router.load(tmp_path)
    assert back.config == cfg
    a = Router(cfg, maha).decide(logits, feats)
    b = back.decide(logits, feats)
    assert a == b


def test_no_cut_survives_json(tmp_path):
    cfg = RouterConfig(labels=LABELS, ood="none")          # infinite thresholds
    Router(cfg).save(tmp_path)
    assert Router.load(tmp_path).config.conf_threshold == float("-inf")
    (tmp_path / "router.json").write_text('{"labels": ["a"], "bogus": 1}')
    with pytest.raises(DistillError, match="unknown keys"):
        Router.load(tmp_path)
