"""The canary's verdicts (``distill.serve.rollout.Rollout``) on planted evidence: no verdict before enough of it,
rollback on teacher disagreement or latency, promotion only when asked for and within bounds."""

import pytest

from distill.errors import DistillError
from distill.serve.rollout import Rollout, RolloutConfig


def rollout(**kw) -> Rollout:
    return Rollout(RolloutConfig(candidate="c", **kw), "c", "p")


def feed(r: Rollout, n: int, cand_wrong: int, prom_wrong: int) -> None:
    """``n`` teacher-checked texts: the candidate wrong on the first ``cand_wrong``, the promoted on ``prom_wrong``."""
    for i in range(n):
        r.compared("x" if i < cand_wrong else "t", "y" if i < prom_wrong else "t", "t")


def test_no_verdict_before_min_compared_however_bad():
    r = rollout(min_compared=100)
    feed(r, 99, cand_wrong=99, prom_wrong=0)
    assert r.verdict() is None
    feed(r, 1, cand_wrong=1, prom_wrong=0)
    kind, why = r.verdict()
    assert kind == "rollback" and "100.0%" in why and "0.0%" in why


def test_rollback_is_on_the_increase_over_the_promoted_model_not_the_level():
    r = rollout(min_compared=100, max_disagreement_increase=0.05)
    feed(r, 100, cand_wrong=30, prom_wrong=27)          # both disagree often (a hard stream): +0.03 is fine
    assert r.verdict() is None
    r = rollout(min_compared=100, max_disagreement_increase=0.05)
    feed(r, 100, cand_wrong=33, prom_wrong=27)          # +0.06: rolled back
    assert r.verdict()[0] == "rollback"


def test_texts_without_a_teacher_answer_count_for_agreement_only():
    r = rollout(min_compared=10)
    for _ in range(50):
        r.compared("a", "b", None)
    assert r.stats.compared == 50 and r.stats.agreed == 0 and r.stats.teacher_checked == 0
    assert r.verdict() is None


def test_rollback_on_p95_latency_after_enough_samples_of_each():
    r = rollout(min_latency_samples=50, max_p95_ratio=1.5)
    for _ in range(50):
        r.latency("promoted", 0.010)
    for _ in range(49):
        r.latency("candidate", 0.016)
    assert r.verdict() is None                          # 49 candidate samples: not yet
    r.latency("candidate", 0.016)
    kind, why = r.verdict()
    assert kind == "rollback" and "p95" in why          # 16 ms > 1.5 x 10 ms
    r = rollout(min_latency_samples=50, max_p95_ratio=1.5)
    for _ in range(60):
        r.latency("promoted", 0.010)
        r.latency("candidate", 0.014)
    assert r.verdict() is None                          # 1.4x is within bounds


def test_promotion_only_when_asked_for_and_after_the_evidence():
    r = rollout(min_compared=50)
    feed(r, 500, cand_wrong=0, prom_wrong=0)
    assert r.verdict() is None                          # no --promote-after: the candidate waits for an operator
    r = rollout(min_compared=50, promote_after=100)
    feed(r, 99, cand_wrong=0, prom_wrong=0)
    assert r.verdict() is None
    feed(r, 1, cand_wrong=0, prom_wrong=0)
    assert r.verdict()[0] == "promote"


def test_a_judged_rollout_samples_nothing_and_gives_no_verdict():
    r = rollout(share=1.0, min_compared=1)
    assert r.sample()
    r.state = "rolled_back"
    assert not r.sample() and r.verdict() is None


def test_sampling_is_seeded_and_near_the_share():
    a, b = rollout(share=0.1, seed=3), rollout(share=0.1, seed=3)
    xs = [a.sample() for _ in range(5000)]
    assert xs == [b.sample() for _ in range(5000)]
    assert 400 < sum(xs) < 600                          # 0.1 of 5000 = 500, binomial sd ~21


@pytest.mark.parametrize("kw", [{"share": 0.0}, {"share": 1.5}, {"mode": "blue"}, {"teacher_check_rate": 2.0},
                                {"min_compared": 0}, {"promote_after": 10, "min_compared": 200}])
def test_nonsense_settings_are_refused(kw):
    with pytest.raises(DistillError):
        RolloutConfig(candidate="c", **kw).check()
