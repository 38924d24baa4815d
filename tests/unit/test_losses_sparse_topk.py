"""Sparse top-k KD with an explicit 'other' bucket: hand values, the full-vocabulary identity, token mapping."""

import math

import pytest
import torch

from distill.losses.kl import forward_kl
from distill.losses.sequence import IGNORE
from distill.losses.sparse_topk import (
    pad_sparse_targets,
    sparse_targets_for_completion,
    sparse_topk_kd_loss,
    teacher_text,
)


def test_hand_value_with_other_bucket():
    # V = 3, student uniform (1/3 each). Teacher top-1: token 0 with p = 0.6 -> other = 0.4;
    # student other = 2/3.  loss = 0.6 ln(0.6 / (1/3)) + 0.4 ln(0.4 / (2/3))
    s = torch.zeros(1, 1, 3)
    ids = torch.tensor([[[0]]])
    lps = torch.tensor([[[math.log(0.6)]]])
    expected = 0.6 * math.log(0.6 * 3) + 0.4 * math.log(0.4 * 1.5)
    assert abs(sparse_topk_kd_loss(s, ids, lps, torch.tensor([[0]])).item() - expected) < 1e-6


def test_hand_value_two_of_three_with_empty_slot():
    # student logits [ln 1, ln 2, ln 1] -> (1/4, 1/2, 1/4); teacher top-2: token 1 p=0.5, token 2 p=0.3 (slot 3 empty)
    s = torch.log(torch.tensor([[[1.0, 2.0, 1.0]]]))
    ids = torch.tensor([[[1, 2, -1]]])
    lps = torch.tensor([[[math.log(0.5), math.log(0.3), 0.0]]])
    expected = 0.5 * math.log(0.5 / 0.5) + 0.3 * math.log(0.3 / 0.25) + 0.2 * math.log(0.2 / 0.25)
    assert abs(sparse_topk_kd_loss(s, ids, lps, torch.tensor([[1]])).item() - expected) < 1e-6


def test_k_equal_full_vocab_is_full_forward_kl():
    torch.manual_seed(0)
    s, t = torch.randn(2, 4, 6), torch.randn(2, 4, 6)
    labels = torch.randint(0, 6, (2, 4))
    labels[1, 0] = IGNORE
    t_lp = torch.log_softmax(t, -1)
    order = torch.argsort(t_lp, dim=-1, descending=True)          # any order works; API gives sorted
    ids, lps = order, t_lp.gather(-1, order)
    got = sparse_topk_kd_loss(s, ids, lps, labels)
    assert torch.allclose(got, forward_kl(s, t, labels), atol=1e-5)
    s.requires_grad_(True)
    sparse_topk_kd_loss(s, ids, lps, labels).backward()
    assert torch.isfinite(s.grad).all()


def test_zero_when_student_matches_the_coarsened_teacher_and_masked_positions_ignored():
    s = torch.log(torch.tensor([[[0.5, 0.2, 0.3], [0.1, 0.1, 0.8]]]))
    ids = torch.tensor([[[0], [2]]])
    lps = torch.tensor([[[math.log(0.5)], [math.log(0.8)]]])
    labels = torch.tensor([[0, IGNORE]])
    assert abs(sparse_topk_kd_loss(s, ids, lps, labels).item()) < 1e-6
    s2 = s.clone()
    s2[0, 1] = torch.tensor([5.0, -5.0, 0.0])                   # masked position changes: no effect
    assert abs(sparse_topk_kd_loss(s2, ids, lps, labels).item()) < 1e-6


def test_rounded_logprobs_summing_over_one_are_scaled_down():
    s = torch.zeros(1, 1, 2)
    ids = torch.tensor([[[0, 1]]])
    lps = torch.log(torch.tensor([[[0.55, 0.55]]]))             # sums to 1.1 -> treated as (0.5, 0.5)
    assert abs(sparse_topk_kd_loss(s, ids, lps, torch.tensor([[0]])).item()) < 1e-6


def test_mapping_api_tokens_to_student_ids_counts_what_is_dropped():
    from tiny_lm import tiny_tokenizer

    tok = tiny_tokenizer()
    lp = [
        {"token": "a", "logprob": math.log(0.7),
         "top_logprobs": [{"token": "a", "logprob": math.log(0.7)}, {"token": "bc", "logprob": math.log(0.2)}]},
        {"token": "b", "logprob": math.log(0.9),
         "top_logprobs": [{"token": "b", "logprob": math.log(0.9)}, {"token": "c", "logprob": math.log(0.05)}]},
    ]
    text = teacher_text(lp)
    assert text == "ab"
    completion = text + "<|im_end|>"
    cids = tok(completion, add_special_tokens=False)["input_ids"]
    offsets = [len(tok.decode(cids[:j])) for j in range(len(cids))]
    ids, lps, stats = sparse_targets_for_completion(lp, cids, offsets, tok)
    a, b, c = (tok.convert_tokens_to_ids(x) for x in "abc")
    assert ids[0] == [a] and abs(lps[0][0] - math.log(0.7)) < 1e-9    # "bc" is two student tokens: dropped
    assert ids[1] == [b, c]
    assert ids[2] == [cids[2]] and lps[2] == [0.0]                        # end-of-turn: hard label
    assert (stats.positions, stats.unaligned, stats.entries, stats.unmapped, stats.hard_positions) == (2, 0, 4, 1, 1)
    assert stats.unmapped_examples == ["bc"]
    # the dropped "bc" mass ends up in the teacher's other bucket: p_T(other) = 1 - 0.7 = 0.3
    t_ids, t_lps = pad_sparse_targets([(ids, lps)], seq_len=5, starts=[1])
    assert t_ids.shape == (1, 5, 2) and t_ids[0, 0].tolist() == [-1, -1] and t_ids[0, 1, 0].item() == a


def test_teacher_positions_off_student_token_boundaries_are_skipped_and_counted():
    from tiny_lm import tiny_tokenizer

    tok = tiny_tokenizer(extra_tokens=["hello"])        # the student reads "hello" as one token
    lp = [{"token": "he", "logprob": -0.1, "top_logprobs": []},
          {"token": "llo", "logprob": -0.1, "top_logprobs": []}]
    cids = tok("hello", add_special_tokens=False)["input_ids"]
    assert len(cids) == 1
    ids, lps, stats = sparse_targets_for_completion(lp, cids, [0], tok)
    assert stats.unaligned == 1 and stats.unmapped == 1          # "he" is not one student token
    assert ids == [cids] and stats.hard_positions == 1


# -- robustness: empty "other" bucket, duplicate targets, masked NaNs, bad reduction -----------------


def _kl_by_hand(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def test_k_equal_full_vocab_minimal_case_does_not_multiply_rounding_by_log_zero():
    # V = 2 = k: the student has no "other" token. The API's log-probs of (0.9, 0.1000001) sum to 1.0000001,
    # are scaled to 1, and 1 - sum then rounds to ~6e-8 (or to 0, depending on the CPU); that leftover
    # times log p_S(other) = -1e30 gave 5.96e22. True value: teacher (0.9, 0.1000001) / 1.0000001 against
    # the uniform student (1/2, 1/2).
    s = torch.zeros(1, 1, 2)
    ids = torch.tensor([[[0, 1]]])
    lps = torch.tensor([[[math.log(0.9), math.log(0.1000001)]]])
    total = 0.9 + 0.1000001
    expected = _kl_by_hand((0.9 / total, 0.1000001 / total), (0.5, 0.5))      # 0.3680640...
    got = sparse_topk_kd_loss(s, ids, lps, torch.tensor([[0]])).item()
    assert math.isclose(got, expected, rel_tol=1e-5)
    # whatever 1 - sum rounds to, the answer is the same: shift the teacher's sum to either side of 1
    for eps in (-1e-7, -1e-6, 1e-7):
        shifted = sparse_topk_kd_loss(s, ids, lps + math.log1p(eps), torch.tensor([[0]])).item()
        assert math.isclose(shifted, expected, rel_tol=1e-5)


def test_k_equal_full_vocab_with_missing_teacher_mass_renormalises_the_top_k():
    # Teacher lists every student token but with only 0.9 of its mass (the rest on strings the student
    # cannot write). The student cannot put mass on "other", so the top-k is renormalised to (2/3, 1/3)
    # and compared with the uniform student; the old code gave 0.1 * 1e30.
    s = torch.zeros(1, 1, 2, requires_grad=True)
    ids = torch.tensor([[[0, 1]]])
    lps = torch.tensor([[[math.log(0.6), math.log(0.3)]]])
    loss = sparse_topk_kd_loss(s, ids, lps, torch.tensor([[0]]))
    assert math.isclose(loss.item(), _kl_by_hand((2 / 3, 1 / 3), (0.5, 0.5)), rel_tol=1e-5)
    loss.backward()
    # d KL / d logits = p_S - p_T = (1/2 - 2/3, 1/2 - 1/3)
    assert torch.allclose(s.grad, torch.tensor([[[-1 / 6, 1 / 6]]]), atol=1e-6)


def test_duplicate_target_ids_in_the_loss_add_their_mass():
    # V = 3, uniform student. Slots 0 and 2 are both token 0 with p = 0.3 each -> one outcome with p = 0.6;
    # token 1 has p = 0.2, other = 0.2 (student other = token 2 = 1/3).
    s = torch.zeros(1, 1, 3)
    ids = torch.tensor([[[0, 1, 0]]])
    lps = torch.log(torch.tensor([[[0.3, 0.2, 0.3]]]))
    expected = _kl_by_hand((0.6, 0.2, 0.2), (1 / 3, 1 / 3, 1 / 3))
    assert math.isclose(sparse_topk_kd_loss(s, ids, lps, torch.tensor([[0]])).item(), expected, rel_tol=1e-5)


def test_duplicate_teacher_strings_keep_their_summed_mass():
    from tiny_lm import tiny_tokenizer

    tok = tiny_tokenizer()
    a, b = (tok.convert_tokens_to_ids(x) for x in "ab")
    # "a" listed twice (two teacher tokens that spell the same string): 0.4 + 0.2 = 0.6, not 0.4
    lp = [{"token": "a", "logprob": math.log(0.4),
           "top_logprobs": [{"token": "a", "logprob": math.log(0.4)}, {"token": "b", "logprob": math.log(0.3)},
                            {"token": "a", "logprob": math.log(0.2)}]}]
    cids = tok("a", add_special_tokens=False)["input_ids"]
    ids, lps, stats = sparse_targets_for_completion(lp, cids, [0], tok)
    assert ids == [[a, b]] and stats.entries == 3 and stats.unmapped == 0
    assert math.isclose(lps[0][0], math.log(0.6), rel_tol=1e-9) and math.isclose(lps[0][1], math.log(0.3), rel_tol=1e-9)
    # and the loss sees 0.6: uniform student over V, other = 0.1 on V - 2 tokens
    t_ids, t_lps = pad_sparse_targets([(ids, lps)], seq_len=1, starts=[0])
    v = len(tok)
    s = torch.zeros(1, 1, v)
    expected = _kl_by_hand((0.6, 0.3, 0.1), (1 / v, 1 / v, (v - 2) / v))
    assert math.isclose(sparse_topk_kd_loss(s, t_ids, t_lps, torch.tensor([[a]])).item(), expected, rel_tol=1e-5)


def test_two_strings_for_one_student_id_keep_their_summed_mass():
    from tiny_lm import tiny_tokenizer

    tok = tiny_tokenizer()
    x, y = (tok.convert_tokens_to_ids(c) for c in "xy")
    # A real tokenizer can map two API strings to one id (normalisation); the memo (string -> student id,
    # the cache sparse_targets_for_completion fills) stands in for that here: "X" is read as "x".
    memo = {"X": x}
    lp = [{"token": "x", "logprob": math.log(0.5),
           "top_logprobs": [{"token": "x", "logprob": math.log(0.5)}, {"token": "X", "logprob": math.log(0.25)},
                            {"token": "y", "logprob": math.log(0.125)}]}]
    ids, lps, _ = sparse_targets_for_completion(lp, [x], [0], tok, memo=memo)
    assert ids == [[x, y]]
    assert math.isclose(lps[0][0], math.log(0.75), rel_tol=1e-9) and math.isclose(lps[0][1], math.log(0.125), rel_tol=1e-9)


def test_nan_at_a_masked_position_does_not_reach_the_loss_or_the_gradient():
    torch.manual_seed(2)
    s = torch.randn(1, 3, 6)
    ids = torch.tensor([[[0, 1], [2, -1], [4, 5]]])
    lps = torch.log(torch.tensor([[[0.5, 0.2], [0.7, 1.0], [0.1, 0.3]]]))
    labels = torch.tensor([[IGNORE, 2, 4]])
    for reduction in ("mean", "sum"):
        clean = sparse_topk_kd_loss(s, ids, lps, labels, reduction=reduction)
        bad_s, bad_lps = s.clone(), lps.clone()
        bad_s[0, 0, 3] = float("nan")
        bad_lps[0, 0, 1] = float("nan")
        bad_s.requires_grad_(True)
        got = sparse_topk_kd_loss(bad_s, ids, bad_lps, labels, reduction=reduction)
        assert torch.isfinite(got) and torch.allclose(got, clean, rtol=1e-5, atol=1e-7)
        got.backward()
        assert torch.isfinite(bad_s.grad).all() and bad_s.grad[0, 0].abs().sum() == 0


def test_unknown_reduction_is_a_value_error():
    with pytest.raises(ValueError, match="'mean', 'sum'.*'avg'"):
        sparse_topk_kd_loss(torch.zeros(1, 1, 3), torch.tensor([[[0]]]), torch.tensor([[[0.0]]]),
                            torch.tensor([[0]]), reduction="avg")
