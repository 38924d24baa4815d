"""Classification distillation losses: soft-target KD, hard-label cross-entropy, and their mix.

Shapes use B = batch size, L = number of labels. All losses return a scalar (mean over the batch).

Why the teacher side is *probabilities*, not logits: the store keeps each teacher answer as a
distribution ``{label: p}`` (an API's top logprobs renormalised over the label set, a local model's
label scores, or an ensemble's vote share). Hinton et al. soften the teacher with ``softmax(z_t / T)``;
for probabilities ``p = softmax(z_t)`` that is exactly ``p ** (1/T)`` renormalised, so
``temper_probs`` applies the *same* temperature to both sides without needing the teacher's logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distill.losses.sequence import IGNORE


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float32 at least: bf16 has 8 bits of mantissa, so its softmax/log of small probabilities (and a
    bf16 copy of the teacher's probabilities) loses the very tail KD is about. float64 stays float64."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def temper_probs(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """Soften (T > 1) or sharpen (T < 1) a distribution: ``p ** (1/T) / sum(p ** (1/T))``.

    probs: [B, L], rows sum to 1 (zeros allowed). Returns [B, L].

    Identity used: if ``p = softmax(z)`` then ``softmax(z / T) = p ** (1/T) / Z``, so this is Hinton's
    teacher temperature applied after the fact. Computed in log space (``exp(log p / T)``) with zeros kept
    at zero, which avoids underflow for large 1/T."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if temperature == 1.0:
        return probs
    logp = torch.log(probs.clamp_min(0.0))            # log 0 = -inf, which stays 0 after softmax
    return torch.softmax(logp / temperature, dim=-1)


def soft_target_kd(student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Forward KL from the tempered teacher to the tempered student, times T².

    ``KD = T² · mean_b KL(p_T || softmax(z_s / T))`` with ``p_T = temper_probs(p_teacher, T)``.

    student_logits: [B, L] raw scores of the student. teacher_probs: [B, L] probabilities (rows sum to 1).

    Paper: Hinton, Vinyals, Dean 2015, "Distilling the Knowledge in a Neural Network", arXiv 1503.02531,
    Sec. 2. Why T²: the gradient of the softened objective scales as 1/T², so multiplying by T² keeps its
    size comparable across temperatures (and comparable to the hard-label CE in ``kd_ce_mix``).
    Why forward KL (teacher first): the student must cover every label the teacher gives mass to; the
    ``p log p`` term is a constant for the student, so this has the same gradient as soft cross-entropy but
    is 0 when the two distributions agree, which makes it readable as a metric. Terms with p = 0 count as
    0 (``xlogy``), so one-hot teachers are fine."""
    if student_logits.shape != teacher_probs.shape:
        raise ValueError(f"shapes differ: student {tuple(student_logits.shape)} vs teacher {tuple(teacher_probs.shape)}")
    # Upcast inside (bf16/fp16 -> fp32) rather than casting the teacher down to the student's dtype; the
    # result is float32 (float64 inputs stay float64).
    dtype = _compute_dtype(student_logits, teacher_probs)
    p = temper_probs(teacher_probs.to(dtype), temperature)
    log_q = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    kl = (torch.xlogy(p, p) - p * log_q).sum(dim=-1)   # [B]
    return kl.mean() * temperature**2


def hard_label_ce(student_logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy against one label index per row, with optional label smoothing.

    student_logits: [B, L]; labels: [B] int64 in [0, L). With smoothing ε the target is
    ``(1-ε)·onehot + ε/L`` (Szegedy et al. 2016, "Rethinking the Inception Architecture", arXiv 1512.00567,
    Sec. 7): it stops the student from chasing infinite margins on labels a teacher may have got wrong.

    Rows labelled -100 are ignored (as in ``F.cross_entropy``), by selecting them away first so that a NaN
    in such a row cannot reach the gradient; the mean over zero rows is 0, not NaN. Computed in float32
    at least, like ``soft_target_kd``."""
    keep = labels != IGNORE
    z = student_logits[keep].to(_compute_dtype(student_logits))
    return F.cross_entropy(z, labels[keep], label_smoothing=label_smoothing, reduction="sum") / keep.sum().clamp(min=1)


def kd_ce_mix(student_logits: torch.Tensor, teacher_probs: torch.Tensor, labels: torch.Tensor, *,
              alpha: float = 0.5, temperature: float = 2.0, label_smoothing: float = 0.0) -> torch.Tensor:
    """``alpha · soft_target_kd + (1 - alpha) · hard_label_ce`` — Hinton et al. 2015 (arXiv 1503.02531),
    Sec. 2: "a weighted average of two different objective functions". alpha = 1 is pure KD, 0 pure CE.

    student_logits: [B, L]; teacher_probs: [B, L]; labels: [B] int64 (the hard label: the teacher's
    answer, a human correction, or gold). The CE term uses T = 1; the T² factor in the KD term keeps the
    two on the same scale."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    kd = soft_target_kd(student_logits, teacher_probs, temperature)
    ce = hard_label_ce(student_logits, labels, label_smoothing)
    return alpha * kd + (1.0 - alpha) * ce
