"""Distilling step-by-step: L = L_label + lambda * L_rationale, against hand values."""

import math

import torch

from distill.losses.rationale import step_by_step_loss, task_input
from distill.losses.sequence import IGNORE


def test_task_prefixes():
    assert task_input("hi", "label") == "[label] hi"
    assert task_input("hi", "rationale") == "[rationale] hi"


def test_loss_is_label_plus_lambda_rationale():
    # label task: one token, p = (1/4, 3/4), label 1 -> -ln 0.75
    lab_logits = torch.tensor([[[0.0, math.log(3)], [1.0, 2.0]]])
    lab_labels = torch.tensor([[1, IGNORE]])
    # rationale task: two tokens, uniform -> ln 2 each
    rat_logits = torch.zeros(1, 2, 2)
    rat_labels = torch.tensor([[0, 1]])
    for lam in (0.0, 0.5, 1.0):
        got = step_by_step_loss(lab_logits, lab_labels, rat_logits, rat_labels, lambda_rationale=lam).item()
        assert abs(got - (-math.log(0.75) + lam * math.log(2))) < 1e-6
    # no rationale in this micro-batch: label loss only
    assert abs(step_by_step_loss(lab_logits, lab_labels, None, None).item() + math.log(0.75)) < 1e-6


def test_global_token_counts_make_micro_batches_add_up():
    torch.manual_seed(0)
    lg, rl = torch.randn(4, 3, 5), torch.randn(4, 3, 5)
    lb, rb = torch.randint(0, 5, (4, 3)), torch.randint(0, 5, (4, 3))
    lb[1, 0] = IGNORE
    rb[2, :2] = IGNORE
    full = step_by_step_loss(lg, lb, rl, rb, 0.7)
    nl, nr = int((lb != IGNORE).sum()), int((rb != IGNORE).sum())
    parts = sum(step_by_step_loss(lg[i:i + 1], lb[i:i + 1], rl[i:i + 1], rb[i:i + 1], 0.7,
                                  label_tokens=nl, rationale_tokens=nr) for i in range(4))
    assert torch.allclose(full, parts, atol=1e-6)


def test_nan_at_masked_positions_of_either_task_does_not_reach_the_loss_or_the_gradient():
    lab_logits = torch.tensor([[[0.0, math.log(3)], [1.0, 2.0]]])
    lab_labels = torch.tensor([[1, IGNORE]])
    rat_logits = torch.zeros(1, 3, 2)
    rat_labels = torch.tensor([[0, 1, IGNORE]])
    bad_lab, bad_rat = lab_logits.clone(), rat_logits.clone()
    bad_lab[0, 1, 1] = float("nan")
    bad_rat[0, 2, 0] = float("nan")
    bad_lab.requires_grad_(True)
    bad_rat.requires_grad_(True)
    got = step_by_step_loss(bad_lab, lab_labels, bad_rat, rat_labels, lambda_rationale=0.5)
    assert torch.isfinite(got)
    assert math.isclose(got.item(), -math.log(0.75) + 0.5 * math.log(2), rel_tol=1e-6)
    got.backward()
    assert torch.isfinite(bad_lab.grad).all() and torch.isfinite(bad_rat.grad).all()
    assert bad_lab.grad[0, 1].abs().sum() == 0 and bad_rat.grad[0, 2].abs().sum() == 0
