"""Classification KD losses against values worked out by hand (plain `math`, never the function under
test) and against the identities that define them."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distill.losses import hard_label_ce, kd_ce_mix, soft_target_kd, temper_probs

LN3 = math.log(3.0)


def t(rows):
    return torch.tensor(rows, dtype=torch.float64)


# -- temper_probs ---------------------------------------------------------------------------------


def test_temper_probs_hand_values():
    # sqrt(0.8) = 2 * sqrt(0.2), so T=2 turns [0.8, 0.2] into [2/3, 1/3]
    assert torch.allclose(temper_probs(t([[0.8, 0.2]]), 2.0), t([[2 / 3, 1 / 3]]))
    # T=0.5 squares: [0.64, 0.04] / 0.68 = [16/17, 1/17]
    assert torch.allclose(temper_probs(t([[0.8, 0.2]]), 0.5), t([[16 / 17, 1 / 17]]))
    # zeros stay zero, T=1 is the identity
    assert torch.allclose(temper_probs(t([[0.0, 0.25, 0.75]]), 3.0)[0, 0], t(0.0))
    assert torch.equal(temper_probs(t([[0.3, 0.7]]), 1.0), t([[0.3, 0.7]]))


def test_temper_probs_equals_softmax_of_scaled_logits():
    # the documented identity: softmax(z / T) == temper(softmax(z), T)
    z = t([[1.5, -0.3, 0.2], [0.0, 2.0, -1.0]])
    for T in (0.5, 2.0, 4.0):
        assert torch.allclose(temper_probs(torch.softmax(z, -1), T), torch.softmax(z / T, -1))


def test_temper_probs_rejects_bad_temperature():
    with pytest.raises(ValueError, match="temperature"):
        temper_probs(t([[0.5, 0.5]]), 0.0)


# -- soft_target_kd -----------------------------------------------------------------------------


def test_kd_hand_value_t1():
    # student softmax([0, ln3]) = [1/4, 3/4]; teacher [1/2, 1/2]
    # KL = 0.5 ln(0.5/0.25) + 0.5 ln(0.5/0.75) = 0.5 ln(4/3)
    got = soft_target_kd(t([[0.0, LN3]]), t([[0.5, 0.5]]), temperature=1.0)
    assert got.item() == pytest.approx(0.5 * math.log(4 / 3), abs=1e-12)


def test_kd_hand_value_t2_includes_t_squared():
    # z/2 = [0, ln3 / 2] -> q = [1/(1+√3), √3/(1+√3)]; uniform teacher stays uniform at any T
    s3 = math.sqrt(3.0)
    q = [1 / (1 + s3), s3 / (1 + s3)]
    kl = 0.5 * math.log(0.5 / q[0]) + 0.5 * math.log(0.5 / q[1])
    got = soft_target_kd(t([[0.0, LN3]]), t([[0.5, 0.5]]), temperature=2.0)
    assert got.item() == pytest.approx(4.0 * kl, abs=1e-12)


def test_kd_is_zero_when_tempered_teacher_matches_tempered_student():
    # teacher [0.8, 0.2] at T=2 is [2/3, 1/3]; student z = [2 ln2, 0] gives softmax(z/2) = [2/3, 1/3]
    got = soft_target_kd(t([[2 * math.log(2.0), 0.0]]), t([[0.8, 0.2]]), temperature=2.0)
    assert got.item() == pytest.approx(0.0, abs=1e-12)


def test_kd_of_identical_distributions_is_zero():
    z = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for T in (1.0, 2.0, 5.0):
        # softmax(z) tempered by T is softmax(z/T), which is exactly the student's side
        assert soft_target_kd(z, torch.softmax(z, -1), T).item() == pytest.approx(0.0, abs=1e-12)


def test_kd_with_one_hot_teacher_at_t1_equals_ce():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(6, 3, dtype=torch.float64, generator=g)
    y = torch.tensor([0, 2, 1, 1, 0, 2])
    onehot = torch.nn.functional.one_hot(y, 3).to(torch.float64)
    assert torch.allclose(soft_target_kd(z, onehot, 1.0), hard_label_ce(z, y))


def test_kd_batch_mean_and_gradient_hand_values():
    # Row 1 as test_kd_hand_value_t1, row 2 has KL 0 -> mean is half of row 1.
    z = t([[0.0, LN3], [0.0, 0.0]]).requires_grad_()
    p = t([[0.5, 0.5], [0.5, 0.5]])
    loss = soft_target_kd(z, p, temperature=1.0)
    assert loss.item() == pytest.approx(0.25 * math.log(4 / 3), abs=1e-12)
    loss.backward()
    # d/dz of KL(p || softmax(z)) is (q - p); the batch mean divides by 2.
    assert torch.allclose(z.grad, t([[(0.25 - 0.5) / 2, (0.75 - 0.5) / 2], [0.0, 0.0]]))


def test_kd_gradient_scale_is_t_times_difference():
    # With the T² factor, d/dz [T² KL(p_T || softmax(z/T))] = T (q_T - p_T): gradients stay O(1) as T grows.
    z = t([[0.0, LN3]]).requires_grad_()
    soft_target_kd(z, t([[0.5, 0.5]]), temperature=2.0).backward()
    s3 = math.sqrt(3.0)
    q = [1 / (1 + s3), s3 / (1 + s3)]
    assert torch.allclose(z.grad, t([[2 * (q[0] - 0.5), 2 * (q[1] - 0.5)]]))


def test_kd_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shapes differ"):
        soft_target_kd(torch.zeros(2, 3), torch.full((2, 4), 0.25), 1.0)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.floats(-8, 8), min_size=3, max_size=3),
    st.lists(st.floats(0.01, 1.0), min_size=3, max_size=3),
    st.floats(0.5, 5.0),
)
def test_kd_is_never_negative(logits, weights, T):
    p = t([weights]) / sum(weights)
    assert soft_target_kd(t([logits]), p, T).item() >= -1e-12


# -- hard-label CE and the mix --------------------------------------------------------------------


def test_ce_hand_values():
    z = t([[0.0, LN3]])                               # softmax = [1/4, 3/4]
    assert hard_label_ce(z, torch.tensor([1])).item() == pytest.approx(-math.log(0.75), abs=1e-12)
    assert hard_label_ce(z, torch.tensor([0])).item() == pytest.approx(-math.log(0.25), abs=1e-12)
    # smoothing 0.1 over 2 labels: target [0.05, 0.95]
    want = -(0.05 * math.log(0.25) + 0.95 * math.log(0.75))
    assert hard_label_ce(z, torch.tensor([1]), label_smoothing=0.1).item() == pytest.approx(want, abs=1e-12)


def test_mix_hand_value():
    z = t([[0.0, LN3]])
    kd = 0.5 * math.log(4 / 3)                        # teacher [0.5, 0.5], T = 1
    ce = -math.log(0.75)                              # hard label 1
    got = kd_ce_mix(z, t([[0.5, 0.5]]), torch.tensor([1]), alpha=0.25, temperature=1.0)
    assert got.item() == pytest.approx(0.25 * kd + 0.75 * ce, abs=1e-12)


def test_mix_endpoints_are_pure_kd_and_pure_ce():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(4, 3, dtype=torch.float64, generator=g)
    p = torch.softmax(torch.randn(4, 3, dtype=torch.float64, generator=g), -1)
    y = torch.tensor([0, 1, 2, 0])
    assert torch.allclose(kd_ce_mix(z, p, y, alpha=1.0, temperature=3.0), soft_target_kd(z, p, 3.0))
    assert torch.allclose(kd_ce_mix(z, p, y, alpha=0.0, temperature=3.0, label_smoothing=0.1),
                          hard_label_ce(z, y, 0.1))
    with pytest.raises(ValueError, match="alpha"):
        kd_ce_mix(z, p, y, alpha=1.5)


# -- robustness: half-precision inputs, ignored rows ------------------------------------------------


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_kd_upcasts_half_precision_inputs_to_float32(half):
    g = torch.Generator().manual_seed(3)
    z = (3 * torch.randn(4, 6, generator=g)).to(half)
    p = torch.softmax(torch.randn(4, 6, generator=g), -1).to(half)
    y = torch.tensor([0, 5, 2, 3])
    for T in (1.0, 2.0):
        got = soft_target_kd(z, p, T)
        assert got.dtype == torch.float32
        # the same (already rounded) inputs, computed in float64
        want = soft_target_kd(z.double(), p.double(), T)
        assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-7)
        mix = kd_ce_mix(z, p, y, alpha=0.3, temperature=T, label_smoothing=0.1)
        assert mix.dtype == torch.float32
        assert torch.allclose(mix.double(), kd_ce_mix(z.double(), p.double(), y, alpha=0.3, temperature=T,
                                                      label_smoothing=0.1), rtol=1e-5, atol=1e-7)
    assert hard_label_ce(z, y).dtype == torch.float32


def test_ce_ignored_rows_are_selected_away_even_when_nan():
    z = t([[0.0, LN3], [float("nan"), 0.0], [0.0, 0.0]]).requires_grad_()
    y = torch.tensor([1, -100, 0])
    want = (-math.log(0.75) + math.log(2)) / 2
    got = hard_label_ce(z, y)
    assert math.isclose(got.item(), want, rel_tol=1e-9)
    got.backward()
    assert torch.isfinite(z.grad).all() and z.grad[1].abs().sum() == 0
    # smoothing 0.1 over 2 labels: targets [0.05, 0.95] and [0.95, 0.05] on the kept rows
    want_s = -(0.05 * math.log(0.25) + 0.95 * math.log(0.75) + math.log(0.5)) / 2
    assert math.isclose(hard_label_ce(z, y, label_smoothing=0.1).item(), want_s, rel_tol=1e-9)
    # no row left: 0, not NaN (mean over nothing)
    assert hard_label_ce(z, torch.full((3,), -100)).item() == 0.0
