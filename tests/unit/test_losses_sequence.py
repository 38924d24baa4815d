"""Sequence-level KD (SFT on teacher outputs): hand-computed values and completion-only masking."""

import math

import pytest
import torch

from distill.losses.sequence import IGNORE, build_completion_labels, next_token_view, sequence_kd_loss


def test_build_completion_labels_masks_the_prompt():
    ids, labels = build_completion_labels([5, 6, 7], [8, 9])
    assert ids == [5, 6, 7, 8, 9]
    assert labels == [IGNORE, IGNORE, IGNORE, 8, 9]


def test_cross_entropy_equals_hand_value():
    # position 0: logits [0, ln 3] -> p = (1/4, 3/4), label 1 -> -ln(3/4)
    # position 1: logits [0, 0]    -> p = (1/2, 1/2), label 0 -> ln 2
    logits = torch.tensor([[[0.0, math.log(3)], [0.0, 0.0]]])
    labels = torch.tensor([[1, 0]])
    expected = (-math.log(0.75) + math.log(2)) / 2
    assert abs(sequence_kd_loss(logits, labels).item() - expected) < 1e-6
    assert abs(sequence_kd_loss(logits, labels, reduction="sum").item() - 2 * expected) < 1e-6


def test_masked_positions_contribute_nothing():
    logits = torch.tensor([[[0.0, math.log(3)], [5.0, -5.0]]])
    labels = torch.tensor([[1, IGNORE]])
    base = sequence_kd_loss(logits, labels).item()
    assert abs(base - (-math.log(0.75))) < 1e-6
    changed = logits.clone()
    changed[0, 1] = torch.tensor([-9.0, 9.0])        # change the masked position's logits
    assert sequence_kd_loss(changed, labels).item() == base


def test_all_masked_batch_is_zero_not_nan():
    logits = torch.randn(2, 3, 5)
    labels = torch.full((2, 3), IGNORE)
    assert sequence_kd_loss(logits, labels).item() == 0.0


def test_next_token_view_shifts_by_one():
    logits = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    labels = torch.tensor([[IGNORE, IGNORE, 1, 2], [IGNORE, 0, 1, 2]])
    lg, lb = next_token_view(logits, labels)
    assert lg.shape == (2, 3, 3) and lb.shape == (2, 3)
    assert torch.equal(lg[:, 0], logits[:, 0]) and torch.equal(lb[:, 0], labels[:, 1])


def test_shifting_labels_equals_shifting_logits():
    from distill.losses.sequence import next_token_view, sequence_kd_loss, shifted_labels

    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11)
    labels = torch.randint(0, 11, (3, 7))
    labels[:, :3] = -100
    labels[1, 5:] = -100
    a = sequence_kd_loss(*next_token_view(logits, labels), reduction="sum")
    b = sequence_kd_loss(logits, shifted_labels(labels), reduction="sum")
    assert torch.allclose(a, b) and shifted_labels(labels)[:, -1].eq(-100).all()


def test_nan_at_a_masked_position_does_not_reach_the_loss_or_the_gradient():
    logits = torch.tensor([[[0.0, math.log(3)], [5.0, -5.0], [0.0, 0.0]]])
    labels = torch.tensor([[1, IGNORE, 0]])
    expected = (-math.log(0.75) + math.log(2)) / 2
    bad = logits.clone()
    bad[0, 1, 0] = float("nan")
    bad.requires_grad_(True)
    got = sequence_kd_loss(bad, labels)
    assert torch.isfinite(got) and math.isclose(got.item(), expected, rel_tol=1e-6)
    assert math.isclose(got.item(), sequence_kd_loss(logits, labels).item(), rel_tol=1e-6)
    got.backward()
    assert torch.isfinite(bad.grad).all() and bad.grad[0, 1].abs().sum() == 0


def test_reduce_tokens_selects_rather_than_multiplies():
    from distill.losses.sequence import reduce_tokens

    per_token = torch.tensor([[1.0, float("nan"), 2.0], [float("inf"), 4.0, float("-inf")]])
    mask = torch.tensor([[True, False, True], [False, True, False]])
    assert math.isclose(reduce_tokens(per_token, mask, "sum").item(), 7.0, rel_tol=1e-6)
    assert math.isclose(reduce_tokens(per_token, mask, "mean").item(), 7.0 / 3, rel_tol=1e-6)


def test_unknown_reduction_is_a_value_error():
    from distill.losses.sequence import reduce_tokens

    logits, labels = torch.zeros(1, 2, 3), torch.tensor([[0, 1]])
    with pytest.raises(ValueError, match="'mean', 'sum'.*'avg'"):
        sequence_kd_loss(logits, labels, reduction="avg")
    with pytest.raises(ValueError, match="'mean', 'sum'.*'none'"):
        reduce_tokens(torch.zeros(1, 2), labels >= 0, "none")
