"""The LM router's maths on synthetic arrays (no model): thresholds meet the coverage target, the conformal
cut keeps its promise in simulation, kNN distances separate near from far, decisions follow the thresholds,
and lm_router.json round-trips."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from distill.errors import DistillError
from distill.evaluate.lm import row_scores
from distill.serve.lm_router import (
    LM_KNN_FILE, LM_ROUTER_FILE, LMRouter, LMRouterConfig, binom_sf, calibrate_lm, guarantee_index, knn_distance,
    l2_normalise, min_n_for_guarantee, order_stat_upper,
)
from distill.students.gguf_engine import GenResult

SCHEMA = {"type": "object", "properties": {"intent": {"enum": ["a", "b"]}}, "required": ["intent"],
          "additionalProperties": False}


def result(text='{"intent": "a"}', logprobs=(-0.1, -0.2), interventions=0, embedding=None) -> GenResult:
    return GenResult(text=text, tokens=list(range(len(logprobs))), prompt_tokens=5, completion_tokens=len(logprobs),
                     finish_reason="stop", token_logprobs=list(logprobs), interventions=interventions,
                     embedding=None if embedding is None else np.asarray(embedding, np.float32), seconds=0.0,
                     queue_seconds=0.0)


# ------------------------------------------------------------------------------------------------
# finite-sample bounds against closed forms


def test_binomial_tail_and_order_statistic_bound_match_closed_forms():
    s = binom_sf(3, 0.5)
    assert s == pytest.approx([1.0, 7 / 8, 4 / 8, 1 / 8, 0.0])
    # j = 1: P(min of n uniforms <= u) = 1 - (1-u)^n  ->  u = 1 - delta^(1/n)
    assert order_stat_upper(1, 20, 0.05) == pytest.approx(1 - 0.05 ** (1 / 20), abs=1e-9)
    # j = n: P(max <= u) = u^n  ->  u = (1-delta)^(1/n)
    assert order_stat_upper(20, 20, 0.05) == pytest.approx(0.95 ** (1 / 20), abs=1e-9)
    assert order_stat_upper(0, 20, 0.05) == 0.0 and order_stat_upper(21, 20, 0.05) == 1.0


def test_guarantee_index_and_minimum_n():
    # n=20, c=0.9, delta=0.05, no OOD cut: even the minimum needs 1 - 0.05^(1/20) = 0.139 > 0.1 -> nothing
    assert guarantee_index(20, 0.9, 0.05, 0.0) == 0
    n = min_n_for_guarantee(0.9, 0.05, None)
    assert n == math.ceil(math.log(0.05) / math.log(0.9))          # 29: 1 - 0.05^(1/n) <= 0.1
    assert guarantee_index(n, 0.9, 0.05, 0.0) == 1 and guarantee_index(n - 1, 0.9, 0.05, 0.0) == 0
    # an OOD cut costs part of the budget: more rows needed
    assert min_n_for_guarantee(0.9, 0.05, 0.99) > n
    # a large n: the guaranteed index sits below the plain one (1 - c) * n
    j = guarantee_index(1000, 0.9, 0.05, 0.0)
    assert 60 < j < 100 and order_stat_upper(j, 1000, 0.05) <= 0.1 < order_stat_upper(j + 1, 1000, 0.05)


# ------------------------------------------------------------------------------------------------
# calibrate_lm


def synthetic(n: int, rng: np.random.Generator, p_invalid: float = 0.03):
    conf = rng.normal(-0.5, 0.3, n)
    return conf, conf - rng.uniform(0, 1, n), rng.random(n) < p_invalid, rng.normal(0.3, 0.05, n)


def test_plain_threshold_meets_coverage_and_guaranteed_answers_more():
    rng = np.random.default_rng(0)
    mean, mn, inv, ood = synthetic(500, rng)
    cfg = calibrate_lm(mean, mn, inv, ood, coverage=0.8, delta=0.05, ood_keep=0.99)
    assert cfg.n_validation == 500 and cfg.route_invalid is True
    assert cfg.signals == ["invalid_unconstrained", "ood", "mean_logprob"]
    covered = ~inv & (ood <= cfg.ood_threshold) & (mean >= cfg.plain_conf_threshold)
    assert covered.sum() == math.ceil(0.8 * 500) == round(cfg.plain_coverage * 500)
    # the OOD cut keeps ood_keep of validation
    assert (ood <= cfg.ood_threshold).mean() >= 0.99
    # the finite-sample correction: a lower cut, more answered on validation, a stated lower bound >= target
    assert cfg.threshold_rule == "guaranteed" and cfg.conf_threshold == cfg.guaranteed_conf_threshold
    assert cfg.guaranteed_conf_threshold <= cfg.plain_conf_threshold
    assert cfg.achieved_coverage >= cfg.plain_coverage >= 0.8
    assert cfg.guaranteed_coverage >= 0.8
    # the min-token signal thresholds the other array
    cfg2 = calibrate_lm(mean, mn, inv, ood, coverage=0.8, confidence="min_logprob")
    assert cfg2.signals[-1] == "min_logprob"
    assert (~inv & (ood <= cfg2.ood_threshold) & (mn >= cfg2.plain_conf_threshold)).sum() == 400


def test_thresholds_never_read_the_labels():
    rng = np.random.default_rng(1)
    mean, mn, inv, ood = synthetic(200, rng)
    a = calibrate_lm(mean, mn, inv, ood, coverage=0.9)
    scores = {"tp": rng.integers(0, 3, 200).astype(float), "n_pred": np.full(200, 2.0), "n_ref": np.full(200, 2.0)}
    b = calibrate_lm(mean, mn, inv, ood, coverage=0.9, student_scores=scores)
    assert (a.conf_threshold, a.ood_threshold, a.plain_conf_threshold) == (b.conf_threshold, b.ood_threshold,
                                                                           b.plain_conf_threshold)


def test_conformal_guarantee_holds_in_simulation():
    """Coverage on new inputs (exact, from the known distributions) >= target in >= 1-delta of validation draws;
    the plain cut misses the target about half the time."""
    from statistics import NormalDist

    rng = np.random.default_rng(1234)
    n, c, delta, p_inv, trials = 300, 0.85, 0.1, 0.02, 400
    nd_conf, nd_ood = NormalDist(0, 1), NormalDist(0, 1)
    ok_guar = ok_plain = 0
    for _ in range(trials):
        conf = rng.normal(0, 1, n)
        inv = rng.random(n) < p_inv
        ood = rng.normal(0, 1, n)
        cfg = calibrate_lm(conf, conf, inv, ood, coverage=c, delta=delta, ood_keep=0.99)
        assert cfg.threshold_rule == "guaranteed"

        def true_cov(t: float, cfg=cfg) -> float:   # independent signals: P(valid) P(ood <= t_ood) P(conf >= t)
            return (1 - p_inv) * nd_ood.cdf(cfg.ood_threshold) * (1 - nd_conf.cdf(t))
        ok_guar += true_cov(cfg.conf_threshold) >= c
        ok_plain += true_cov(cfg.plain_conf_threshold) >= c
    assert ok_guar / trials >= 1 - delta
    assert ok_plain / trials < 0.7


def test_conformal_guarantee_is_tight_without_the_ood_cut():
    """Without an OOD cut there is no union bound: the success rate is exactly P(Binomial(n, 1-c) >= j1) (the
    Beta law of the j1-th order statistic), which is >= 1 - delta."""
    rng = np.random.default_rng(7)
    n, c, delta, trials = 200, 0.9, 0.2, 1500
    j1 = guarantee_index(n, c, delta, 0.0)
    exact = binom_sf(n, 1 - c)[j1]
    assert exact >= 1 - delta
    ok = 0
    for _ in range(trials):
        u = rng.random(n)      # the confidence on its own CDF scale: the coverage of a cut t is 1 - t
        cfg = calibrate_lm(u, u, np.zeros(n, bool), None, coverage=c, delta=delta)
        ok += (1 - cfg.conf_threshold) >= c
    assert abs(ok / trials - exact) < 3 * math.sqrt(exact * (1 - exact) / trials)


def test_tiny_validation_falls_back_to_plain_and_says_what_can_be_promised():
    rng = np.random.default_rng(2)
    mean, mn, inv, ood = synthetic(20, rng, p_invalid=0.0)
    cfg = calibrate_lm(mean, mn, inv, ood, coverage=0.9)
    assert cfg.threshold_rule == "plain" and cfg.guaranteed_conf_threshold is None
    assert cfg.guaranteed_coverage is None and cfg.conf_threshold == cfg.plain_conf_threshold
    assert cfg.n_for_guarantee > 20 and 0 < cfg.max_guaranteed_coverage < 0.9
    assert any("too few" in note for note in cfg.notes)
    assert cfg.achieved_coverage >= 0.9


def test_invalid_routing_switches_off_when_it_makes_the_target_unreachable():
    n = 100
    conf = np.linspace(-2, 0, n)
    inv = np.zeros(n, bool)
    inv[:20] = True                                         # 20% invalid: 90% coverage impossible if routed
    cfg = calibrate_lm(conf, conf, inv, None, coverage=0.9)
    assert cfg.route_invalid is False and "invalid_unconstrained" not in cfg.signals
    assert any("NOT routed" in note for note in cfg.notes)
    on = calibrate_lm(conf, conf, inv, None, coverage=0.7)
    assert on.route_invalid is True
    forced = calibrate_lm(conf, conf, inv, None, coverage=0.9, route_invalid=True)
    assert forced.plain_conf_threshold == float("-inf") and forced.plain_coverage == pytest.approx(0.8)


def test_curve_scores_covered_rows_and_the_routed_system():
    n = 10
    conf = np.arange(n, dtype=float)                        # row i has confidence i
    # the student is right (2/2 pairs) on the 5 most confident rows, wrong (0/2) on the rest
    student = {"tp": np.where(conf >= 5, 2.0, 0.0), "n_pred": np.full(n, 2.0), "n_ref": np.full(n, 2.0)}
    teacher = {"tp": np.full(n, 2.0), "n_pred": np.full(n, 2.0), "n_ref": np.full(n, 2.0)}
    cfg = calibrate_lm(conf, conf, np.zeros(n, bool), None, coverage=0.5, student_scores=student,
                       teacher_scores=teacher, has_teacher=np.ones(n, bool), levels=(0.5, 1.0))
    pts = {p["target"]: p for p in cfg.curve}
    assert pts[0.5]["coverage"] == 0.5 and pts[0.5]["student_field_f1"] == 1.0 and pts[0.5]["system_field_f1"] == 1.0
    assert pts[1.0]["coverage"] == 1.0 and pts[1.0]["student_field_f1"] == 0.5
    assert pts[1.0]["system_field_f1"] == 0.5 and pts[1.0]["teacher_share"] == 0.0
    assert cfg.metric == "field_f1"
    # without teacher answers (SNIPS validation): no system column
    cfg = calibrate_lm(conf, conf, np.zeros(n, bool), None, coverage=0.5, student_scores=student, levels=(1.0,))
    assert "system_field_f1" not in cfg.curve[0]


def test_curve_with_row_scores_of_real_answers():
    from types import SimpleNamespace

    spec = SimpleNamespace(kind="extract", json_schema=SCHEMA)
    s = row_scores("extract", spec, [{"intent": "a"}, None], [{"intent": "a"}, {"intent": "b"}])
    cfg = calibrate_lm([-0.1, -3.0], [-0.1, -3.0], [False, False], None, coverage=0.5, student_scores=s,
                       levels=(0.5, 1.0))
    assert [p["student_field_f1"] for p in cfg.curve] == [1.0, pytest.approx(2 / 3)]


def test_config_checks_its_ranges():
    with pytest.raises(DistillError, match="coverage"):
        LMRouterConfig(coverage=1.5)
    with pytest.raises(DistillError, match="confidence"):
        LMRouterConfig(confidence="entropy")        # type: ignore[arg-type]
    with pytest.raises(DistillError, match="classify"):
        LMRouterConfig(kind="classify")


# ------------------------------------------------------------------------------------------------
# kNN OOD score


def test_knn_distance_scores_in_distribution_lower_than_far_points():
    rng = np.random.default_rng(3)
    centre = rng.normal(0, 1, 16)
    train = l2_normalise(centre + rng.normal(0, 0.3, (200, 16)))
    near = centre + rng.normal(0, 0.3, (20, 16))
    far = rng.normal(0, 1, (20, 16))                        # other directions
    d_near, d_far = knn_distance(near, train, 10), knn_distance(far, train, 10)
    assert d_near.max() < d_far.min()
    # hand-computed: the k-th largest cosine
    ref = l2_normalise(np.eye(3))
    assert knn_distance(np.array([[1.0, 1.0, 0.0]]), ref, 2)[0] == pytest.approx(1 - 1 / math.sqrt(2), abs=1e-6)
    assert knn_distance(np.array([[1.0, 1.0, 0.0]]), ref, 3)[0] == pytest.approx(1.0, abs=1e-6)
    assert knn_distance(np.array([[1.0, 0.0, 0.0]]), ref, 99)[0] == pytest.approx(1.0, abs=1e-6)  # k capped at M
    with pytest.raises(DistillError, match="dims"):
        knn_distance(np.ones((1, 4)), ref, 1)


# ------------------------------------------------------------------------------------------------
# decisions and persistence


def router(tmp_path=None, **kw) -> LMRouter:
    cfg = LMRouterConfig(kind="extract", schema=SCHEMA, conf_threshold=-1.0, ood_threshold=0.5, k=1,
                         **{"ood_source": "hidden", **kw})
    return LMRouter(cfg, l2_normalise(np.eye(4)))


def test_decisions_follow_the_thresholds_in_reason_order():
    r = router()
    assert r.calibrated and r.needs_embedding
    near = [1.0, 0.1, 0.0, 0.0]
    far = [-1.0, -1.0, 0.0, 0.0]                            # distance >= 1 from every axis
    d = r.decide(result(embedding=near))
    assert (d.routed_to, d.reason) == ("student", "confident")
    assert d.signals["mean_logprob"] == pytest.approx(-0.15) and d.signals["min_logprob"] == pytest.approx(-0.2)
    assert d.signals["invalid_unconstrained"] is False and d.signals["ood"] < 0.5
    assert r.decide(result(embedding=far)).reason == "ood"
    assert r.decide(result(logprobs=(-0.1, -3.0), embedding=near)).reason == "low_confidence"   # mean -1.55
    assert r.decide(result(text="", logprobs=(), embedding=near)).reason == "invalid_unconstrained"   # no answer
    # the grammar overrode the model, or the text is not a valid answer: invalid, before any other reason
    d = r.decide(result(interventions=2, logprobs=(-5.0,), embedding=far))
    assert (d.routed_to, d.reason) == ("teacher", "invalid_unconstrained")
    assert r.decide(result(text='{"intent": "zzz"}', embedding=near)).reason == "invalid_unconstrained"
    assert r.decide(result(text='Answer: {"intent": "b"}', embedding=near)).reason == "confident"  # as parse_answer
    with pytest.raises(DistillError, match="want_embedding"):
        r.decide(result())


def test_min_logprob_router_and_invalid_not_routed():
    cfg = LMRouterConfig(kind="extract", schema=SCHEMA, ood_source="hidden", confidence="min_logprob", conf_threshold=-1.0,
                         route_invalid=False)
    r = LMRouter(cfg)
    assert not r.needs_embedding
    assert r.decide(result(logprobs=(-0.1, -1.5))).reason == "low_confidence"     # mean -0.8 would pass
    d = r.decide(result(interventions=1))
    assert d.routed_to == "student" and d.signals["invalid_unconstrained"] is True


def test_generate_kind_checks_only_that_there_is_text():
    r = LMRouter(LMRouterConfig(kind="generate"))
    assert r.decide(result(text="any prose")).reason == "confident"
    assert r.decide(result(text="  ")).reason == "invalid_unconstrained"


def test_pass_through_routes_nothing():
    r = LMRouter.pass_through()
    assert not r.calibrated and not r.needs_embedding
    for res in (result(interventions=3, logprobs=(-9.0,)), result(text="garbage", logprobs=())):
        d = r.decide(res)
        assert (d.routed_to, d.reason) == ("student", "pass_through")
    assert r.decide(result(interventions=3)).signals["invalid_unconstrained"] is True
    with pytest.raises(DistillError):
        r.save("/nonexistent")


def test_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(4)
    mean, mn, inv, ood = synthetic(300, rng)
    cfg = calibrate_lm(mean, mn, inv, ood, coverage=0.9,
                       settings=LMRouterConfig(kind="extract", schema=SCHEMA, k=3, ood_source="hidden"))
    ref = l2_normalise(rng.normal(0, 1, (50, 8)))
    path = LMRouter(cfg, ref).save(tmp_path)
    assert path == tmp_path / LM_ROUTER_FILE and (tmp_path / LM_KNN_FILE).exists()
    d = json.loads(path.read_text())
    assert d["k"] == 3 and d["schema"] == SCHEMA and d["created_at"] == 0.0
    back = LMRouter.load(tmp_path)
    assert back.config == cfg
    assert back.reference.shape == (50, 8) and np.abs(back.reference - ref).max() < 1e-3
    emb = rng.normal(0, 1, 8)
    a, b = back.decide(result(embedding=emb)).signals, LMRouter(cfg, ref).decide(result(embedding=emb)).signals
    assert a["ood"] == pytest.approx(b["ood"], abs=2e-3) and a["mean_logprob"] == b["mean_logprob"]
    # infinities (no cut) survive as null
    none = LMRouterConfig(kind="generate")
    LMRouter(none).save(tmp_path / "g")
    assert json.loads((tmp_path / "g" / LM_ROUTER_FILE).read_text())["conf_threshold"] is None
    assert LMRouter.load(tmp_path / "g").config == none


def test_load_refuses_missing_and_unknown(tmp_path):
    with pytest.raises(DistillError, match="route calibrate"):
        LMRouter.load(tmp_path)
    (tmp_path / LM_ROUTER_FILE).write_text(json.dumps({"kind": "extract", "thresholdz": 1}))
    with pytest.raises(DistillError, match="thresholdz"):
        LMRouter.load(tmp_path)
    (tmp_path / LM_ROUTER_FILE).write_text(json.dumps({"kind": "extract", "ood_threshold": 0.3}))
    with pytest.raises(DistillError, match="reference"):
        LMRouter.load(tmp_path)


def test_cli_dispatches_on_the_task_kind(tmp_path):
    """`route calibrate` checks each kind's options before loading anything (classify keeps its own path)."""
    from typer.testing import CliRunner

    from distill.cli import app
    from distill.project import Project

    runner = CliRunner()
    Project.init(tmp_path / "c", "classify").close()
    r = runner.invoke(app, ["route", "calibrate", str(tmp_path / "c"), "--confidence", "mean_logprob"])
    assert r.exit_code == 2 and "max_prob" in r.output
    r = runner.invoke(app, ["route", "calibrate", str(tmp_path / "c")])          # today's path: no model yet
    assert r.exit_code == 2 and "model" in r.output
    Project.init(tmp_path / "e", "extract").close()
    r = runner.invoke(app, ["route", "calibrate", str(tmp_path / "e"), "--ood", "energy"])
    assert r.exit_code == 2 and "kNN" in r.output
    r = runner.invoke(app, ["route", "calibrate", str(tmp_path / "e"), "--backend", "onnx"])
    assert r.exit_code == 2 and "GGUF" in r.output
    r = runner.invoke(app, ["route", "calibrate", str(tmp_path / "e")])          # no trained model, no GGUF export
    assert r.exit_code == 2 and "model" in r.output


def test_load_refuses_a_router_calibrated_on_another_gguf(tmp_path):
    (tmp_path / "student.gguf").write_bytes(b"GGUF" + b"\0" * 60)
    cfg = LMRouterConfig(kind="extract", schema=SCHEMA,
                         model={"folder": str(tmp_path), "gguf_file": "student.gguf", "bytes": 64, "mtime": 0.0})
    LMRouter(cfg).save(tmp_path)
    assert LMRouter.load(tmp_path).config == cfg
    (tmp_path / "student.gguf").write_bytes(b"GGUF" + b"\0" * 99)         # re-exported: another file
    with pytest.raises(DistillError, match="not the file beside it"):
        LMRouter.load(tmp_path)
    (tmp_path / "student.gguf").unlink()
    with pytest.raises(DistillError, match="missing"):
        LMRouter.load(tmp_path)


def test_text_ood_source_embeds_the_input_and_old_files_read_as_hidden(tmp_path):
    """ood_source 'text': the kNN reads a frozen encoder's embedding of the input text, not the engine's hidden
    state; a lm_router.json from before the field existed is read as 'hidden' (what it was calibrated on)."""
    seen = []

    def embed(texts):
        seen.extend(texts)
        return np.array([[1.0, 0.0, 0.0, 0.0] if "near" in t else [-1.0, -1.0, 0.0, 0.0] for t in texts])

    cfg = LMRouterConfig(kind="extract", schema=SCHEMA, conf_threshold=-1.0, ood_threshold=0.5, k=1)
    assert cfg.ood_source == "text"
    r = LMRouter(cfg, l2_normalise(np.eye(4)), embed=embed)
    assert r.needs_text and not r.needs_embedding
    assert r.decide(result(), "near: book a table").reason == "confident"
    assert r.decide(result(), "far: my card was declined").reason == "ood"
    assert seen == ["near: book a table", "far: my card was declined"]
    with pytest.raises(DistillError, match="input text"):
        r.decide(result())
    d = json.loads(cfg.to_json())
    d.pop("ood_source")
    assert LMRouterConfig.from_json(json.dumps(d)).ood_source == "hidden"
