"""Token-level logit distillation: forward KL, reverse KL and the generalised Jensen-Shannon divergence.

At every completion position the student's next-token distribution p_S is pulled towards the teacher's
p_T (both computed on the *same* token sequence, so teacher and student must share a tokenizer):

- forward KL(p_T || p_S) = sum_v p_T log(p_T / p_S): mode-covering; the classic word-level KD of
  Kim & Rush 2016 (arXiv 1606.07947) and Hinton et al. 2015 (arXiv 1503.02531).
- reverse KL(p_S || p_T): mode-seeking; MiniLLM (Gu et al. 2023, arXiv 2306.08543) argues it suits
  generative students that cannot cover all of a big teacher's modes.
- generalised JSD (Agarwal et al. 2024, "On-Policy Distillation of Language Models", GKD,
  arXiv 2306.13649, Eq. 1), written here in TRL's convention (``trl.GKDTrainer.generalized_jsd_loss``):

      m      = beta * p_T + (1 - beta) * p_S
      JSD_b  = beta * KL(p_T || m) + (1 - beta) * KL(p_S || m)

  beta is the teacher's weight in the mixture. JSD_b itself goes to 0 at both ends (m collapses onto
  one side), but JSD_b / beta -> KL(p_T || p_S) as beta -> 0 and JSD_b / (1 - beta) -> KL(p_S || p_T) as
  beta -> 1 (the other term is O(beta^2)). So, like TRL, beta = 0 *means* forward KL and beta = 1 *means*
  reverse KL; the tests check both the endpoints and that the interior approaches them.

Note on ``F.kl_div``: ``F.kl_div(input, target)`` computes KL(target || input) with ``input`` in log space,
the reverse of the paper's argument order. We write the sums out instead, which reads like the maths.

Temperature T divides both teachers' and students' logits before the softmax (Hinton et al. 2015). We do
*not* multiply by T^2 (TRL's GKD does not either); scale the learning rate if you use T far from 1.

Shapes: student_logits and teacher_logits [B, T, V] aligned with labels [B, T] (see
``distill.losses.sequence.next_token_view``); positions with label -100 are ignored; the result is the
per-token divergence (summed over the vocabulary) averaged over completion tokens, or summed with
``reduction="sum"``. Masked positions are selected away before the softmax (not multiplied by 0), so a
NaN/inf logit there cannot reach the loss or the gradient; see ``distill.losses.sequence``.
"""

from __future__ import annotations

import torch

from distill.errors import DistillError
from distill.losses.sequence import IGNORE, Reduction, check_reduction, reduce_selected


def _log_probs(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
               temperature: float, reduction: str):
    """Log-probs of both models at the N completion positions only: [B, T, V] x2 -> [N, V] x2."""
    check_reduction(reduction)
    if temperature <= 0:
        raise DistillError(f"temperature must be > 0, got {temperature}", hint="use 1.0 unless you have a reason")
    s, t = align_vocab(student_logits, teacher_logits)
    # Select completion rows *before* any arithmetic: a NaN logit at a masked position would otherwise
    # survive as nan * 0 = NaN in the loss and as NaN in the log_softmax backward.
    keep = labels != IGNORE
    s, t = s[keep], t[keep]
    # float32 for the softmax even when the models run in bf16: log-probs of rare tokens underflow in bf16.
    log_s = torch.log_softmax(s.float() / temperature, dim=-1)
    log_t = torch.log_softmax(t.float() / temperature, dim=-1)
    return log_s, log_t


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per position, summed over the vocabulary: [..., V] x2 -> [...].
    Both come from log_softmax of finite logits, so no entry is -inf and no 0 * inf NaN can appear."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
               temperature: float = 1.0, reduction: Reduction = "mean") -> torch.Tensor:
    """KL(p_T || p_S) per completion token. See the module docstring for shapes."""
    log_s, log_t = _log_probs(student_logits, teacher_logits, labels, temperature, reduction)
    return reduce_selected(_kl(log_t, log_s), reduction)


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
               temperature: float = 1.0, reduction: Reduction = "mean") -> torch.Tensor:
    """KL(p_S || p_T) per completion token. See the module docstring for shapes."""
    log_s, log_t = _log_probs(student_logits, teacher_logits, labels, temperature, reduction)
    return reduce_selected(_kl(log_s, log_t), reduction)


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                    beta: float = 0.5, temperature: float = 1.0, reduction: Reduction = "mean") -> torch.Tensor:
    """GKD's generalised JSD (arXiv 2306.13649, Eq. 1) in TRL's convention: beta = teacher weight in the
    mixture; beta = 0 is forward KL, beta = 1 reverse KL (their limits, see the module docstring)."""
    if not 0.0 <= beta <= 1.0:
        raise DistillError(f"beta must be in [0, 1], got {beta}", hint="0 = forward KL, 1 = reverse KL, 0.5 = JSD")
    log_s, log_t = _log_probs(student_logits, teacher_logits, labels, temperature, reduction)
    if beta == 0.0:
        return reduce_selected(_kl(log_t, log_s), reduction)
    if beta == 1.0:
        return reduce_selected(_kl(log_s, log_t), reduction)
    b = torch.tensor(beta, dtype=log_s.dtype, device=log_s.device)
    # log m computed in log space (logsumexp) so tiny probabilities do not underflow to log(0).
    log_m = torch.logsumexp(torch.stack([log_t + torch.log(b), log_s + torch.log1p(-b)]), dim=0)
    per_token = beta * _kl(log_t, log_m) + (1.0 - beta) * _kl(log_s, log_m)
    return reduce_selected(per_token, reduction)


# ------------------------------------------------------------------------------------------------
# Teacher/student vocabulary checks


def align_vocab(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut both logits to the common vocabulary size.

    With the *same* tokenizer, models often pad their embedding matrix to a multiple of 64/128 for speed,
    so the logit widths differ while ids below the tokenizer's size mean the same token. The extra columns
    are padding rows no text ever uses; dropping them renormalises both softmaxes over real tokens only.
    Different tokenizers are caught earlier by ``check_same_tokenizer`` — slicing would silently compare
    unrelated tokens."""
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise DistillError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
            "cover different positions",
            hint="compute the teacher's logits on exactly the student's input_ids",
        )
    v = min(student_logits.size(-1), teacher_logits.size(-1))
    return student_logits[..., :v], teacher_logits[..., :v]


def check_same_tokenizer(student_tokenizer, teacher_tokenizer, loss: str) -> None:
    """Raise a DistillError when a logit-level ``loss`` is asked for two different tokenizers."""
    sv, tv = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if sv == tv:
        return
    only_s = len(set(sv) - set(tv))
    only_t = len(set(tv) - set(sv))
    moved = sum(1 for k in set(sv) & set(tv) if sv[k] != tv[k])
    raise DistillError(
        f"loss '{loss}' compares teacher and student logits token by token, but their tokenizers differ "
        f"({len(sv)} vs {len(tv)} tokens; {only_s} only in the student, {only_t} only in the teacher, "
        f"{moved} shared tokens with different ids)",
        hint="use loss: sft (sequence-level KD on the teacher's text works across tokenizers), or a teacher "
             "from the student's model family",
    )
