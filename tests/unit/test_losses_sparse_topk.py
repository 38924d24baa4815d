"""Sparse top-k KD with an explicit 'other' bucket: hand values, the full-vocabulary identity, token mapping."""

import math

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
