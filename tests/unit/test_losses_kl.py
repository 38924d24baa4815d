"""Forward/reverse KL and generalised JSD against hand-computed values, their limits, and vocab checks."""

import math

import pytest
import torch

from distill.errors import DistillError
from distill.losses.kl import align_vocab, check_same_tokenizer, forward_kl, generalized_jsd, reverse_kl
from distill.losses.sequence import IGNORE

# One position, two tokens: teacher logits [0, 0] -> pT = (1/2, 1/2); student [0, ln 3] -> pS = (1/4, 3/4).
T = torch.tensor([[[0.0, 0.0]]])
S = torch.tensor([[[0.0, math.log(3)]]])
L = torch.tensor([[1]])
pT, pS = (0.5, 0.5), (0.25, 0.75)


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def test_forward_and_reverse_kl_equal_hand_values():
    assert abs(forward_kl(S, T, L).item() - (0.5 * math.log(2) + 0.5 * math.log(2 / 3))) < 1e-6
    assert abs(reverse_kl(S, T, L).item() - (0.25 * math.log(0.5) + 0.75 * math.log(1.5))) < 1e-6


def test_jsd_equals_hand_value():
    beta = 0.5
    m = tuple(beta * a + (1 - beta) * b for a, b in zip(pT, pS))      # (0.375, 0.625)
    expected = beta * kl(pT, m) + (1 - beta) * kl(pS, m)
    assert abs(generalized_jsd(S, T, L, beta=beta).item() - expected) < 1e-6
    beta = 0.25
    m = tuple(beta * a + (1 - beta) * b for a, b in zip(pT, pS))
    assert abs(generalized_jsd(S, T, L, beta=beta).item() - (beta * kl(pT, m) + (1 - beta) * kl(pS, m))) < 1e-6


def test_temperature_softens_both_sides():
    # T=2: teacher logits [0, 2 ln 2] -> [0, ln 2] -> (1/3, 2/3); student [2 ln 3, 0] -> [ln 3, 0] -> (3/4, 1/4)
    t = torch.tensor([[[0.0, 2 * math.log(2)]]])
    s = torch.tensor([[[2 * math.log(3), 0.0]]])
    assert abs(forward_kl(s, t, L, temperature=2.0).item() - kl((1 / 3, 2 / 3), (0.75, 0.25))) < 1e-6


def test_jsd_endpoints_are_the_kls_and_the_interior_approaches_them():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    labels = torch.randint(0, 7, (2, 5))
    labels[0, :2] = IGNORE
    fkl, rkl = forward_kl(s, t, labels), reverse_kl(s, t, labels)
    assert torch.allclose(generalized_jsd(s, t, labels, beta=0.0), fkl)
    assert torch.allclose(generalized_jsd(s, t, labels, beta=1.0), rkl)
    # JSD_b = b*KL(pT||pS) + O(b^2): divided by b it tends to the forward KL (and symmetric for reverse)
    eps = 1e-4
    assert abs(generalized_jsd(s, t, labels, beta=eps).item() / eps - fkl.item()) < 1e-2 * fkl.item()
    assert abs(generalized_jsd(s, t, labels, beta=1 - eps).item() / eps - rkl.item()) < 1e-2 * rkl.item()


def test_identical_distributions_give_zero():
    x = torch.randn(2, 4, 9)
    labels = torch.zeros(2, 4, dtype=torch.long)
    for f in (forward_kl, reverse_kl):
        assert f(x, x.clone(), labels).abs().item() < 1e-6
    for beta in (0.0, 0.3, 0.5, 1.0):
        assert generalized_jsd(x, x.clone(), labels, beta=beta).abs().item() < 1e-6


def test_masked_positions_do_not_matter():
    torch.manual_seed(1)
    s, t = torch.randn(1, 3, 5), torch.randn(1, 3, 5)
    labels = torch.tensor([[IGNORE, 2, 3]])
    s2, t2 = s.clone(), t.clone()
    s2[0, 0] += 10 * torch.randn(5)
    t2[0, 0] -= 10 * torch.randn(5)
    for f in (forward_kl, reverse_kl, generalized_jsd):
        assert torch.allclose(f(s, t, labels), f(s2, t2, labels))


def test_gradients_flow_to_student_only_and_are_finite():
    s = torch.randn(1, 3, 6, requires_grad=True)
    t = torch.randn(1, 3, 6)
    generalized_jsd(s, t, torch.tensor([[1, 2, IGNORE]]), beta=0.5).backward()
    assert torch.isfinite(s.grad).all() and s.grad[0, :2].abs().sum() > 0
    assert s.grad[0, 2].abs().sum() == 0


def test_padded_vocab_is_sliced_to_the_common_size():
    s = torch.tensor([[[0.0, math.log(3), 7.0, 7.0]]])   # two padding columns the tokenizer never uses
    assert abs(forward_kl(s, T, L).item() - forward_kl(S, T, L).item()) < 1e-6
    a, b = align_vocab(s, T)
    assert a.shape[-1] == b.shape[-1] == 2


def test_bad_beta_and_temperature_are_user_errors():
    with pytest.raises(DistillError, match="beta"):
        generalized_jsd(S, T, L, beta=1.5)
    with pytest.raises(DistillError, match="temperature"):
        forward_kl(S, T, L, temperature=0)


def test_different_tokenizers_refused_with_a_hint():
    from tiny_lm import tiny_tokenizer

    same_a, same_b = tiny_tokenizer(), tiny_tokenizer()
    check_same_tokenizer(same_a, same_b, "kd_forward")   # no error
    with pytest.raises(DistillError, match="tokenizers differ") as e:
        check_same_tokenizer(same_a, tiny_tokenizer(extra_tokens=["hello"]), "kd_forward")
    assert "sft" in e.value.hint


def test_nan_and_inf_at_a_masked_position_do_not_reach_the_loss_or_the_gradient():
    torch.manual_seed(3)
    s, t = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    labels = torch.tensor([[IGNORE, 2, 3], [1, IGNORE, IGNORE]])
    bad_s, bad_t = s.clone(), t.clone()
    bad_s[0, 0, 1] = float("nan")
    bad_s[1, 2, 0] = float("inf")
    bad_t[1, 1, 4] = float("nan")
    for f, kw in ((forward_kl, {}), (reverse_kl, {}), (generalized_jsd, {"beta": 0.5}),
                  (generalized_jsd, {"beta": 0.0}), (generalized_jsd, {"beta": 1.0})):
        for reduction in ("mean", "sum"):
            clean = f(s, t, labels, reduction=reduction, **kw)
            x = bad_s.clone().requires_grad_(True)
            got = f(x, bad_t, labels, reduction=reduction, **kw)
            assert torch.isfinite(got) and torch.allclose(got, clean, rtol=1e-5, atol=1e-7), (f.__name__, kw)
            got.backward()
            assert torch.isfinite(x.grad).all()
            assert x.grad[0, 0].abs().sum() == 0 and x.grad[1, 1:].abs().sum() == 0


def test_unknown_reduction_is_a_value_error():
    for f in (forward_kl, reverse_kl, generalized_jsd):
        with pytest.raises(ValueError, match="'mean', 'sum'.*'avg'"):
            f(S, T, L, reduction="avg")
