"""Sequence-level knowledge distillation: supervised fine-tuning on the teacher's outputs.

Kim & Rush 2016, "Sequence-Level Knowledge Distillation", arXiv 1606.07947. The teacher's (beam/greedy)
output replaces the gold sequence and the student is trained with ordinary next-token cross-entropy on
it. It needs nothing from the teacher but text, so it works across different tokenizers and with any API
teacher; it is the fallback whenever a logit-level loss is impossible.

Completion-only masking: the prompt is the *input*, not something the student should learn to write, so
prompt tokens get the label -100 and contribute nothing (the same choice as TRL's
``completion_only_loss``). The loss is the mean over completion tokens, not over sequences: a batch of
long answers then weighs each token the same as a batch of short ones.

Shapes and conventions used by every loss in ``distill.losses.{sequence,kl,sparse_topk,rationale}``:

==============  ==========  ==========================================================================
name            shape       meaning
==============  ==========  ==========================================================================
input_ids       [B, T]      prompt + completion (+ right padding)
labels          [B, T]      input_ids with -100 on prompt and padding (Hugging Face convention)
logits          [B, T, V]   model(input_ids).logits; logits[:, t] predicts input_ids[:, t + 1]
==============  ==========  ==========================================================================

The loss functions take *aligned* tensors (``logits[:, t]`` is scored against ``labels[:, t]``);
``next_token_view`` does the one-position shift once, so no loss has to remember to.
``reduction="sum"`` returns the summed token loss so a training loop can divide by the number of
completion tokens of the whole accumulated batch (gradient-accumulation invariance).

Masked positions are *selected away* (boolean indexing before any arithmetic), never multiplied by 0:
``nan * 0`` is NaN, and a padded or prompt position can legitimately hold a NaN or inf logit (e.g. an
attention row with nothing to attend to). Selecting first keeps both the loss and the gradient finite,
gives masked positions exactly zero gradient, and only computes the softmax over completion rows.
"""

from __future__ import annotations

from typing import Literal, Sequence, get_args

import torch
import torch.nn.functional as F

IGNORE = -100

Reduction = Literal["mean", "sum"]
REDUCTIONS: tuple[str, ...] = get_args(Reduction)


def check_reduction(reduction: str) -> None:
    """Raise ValueError for anything but the documented reductions. Checked up front: a typo such as
    "avg" must not silently fall through to one of the branches."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(map(repr, REDUCTIONS))}, got {reduction!r}")


def build_completion_labels(prompt_ids: Sequence[int], completion_ids: Sequence[int]) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for one example: the prompt tokens are masked with -100, the completion is kept.

    >>> build_completion_labels([5, 6], [7, 8])
    ([5, 6, 7, 8], [-100, -100, 7, 8])
    """
    prompt_ids, completion_ids = list(prompt_ids), list(completion_ids)
    return prompt_ids + completion_ids, [IGNORE] * len(prompt_ids) + completion_ids


def next_token_view(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Shift once so that position t of the logits is scored against the token at t + 1.

    logits [B, T, V], labels [B, T] -> logits [B, T-1, V], labels [B, T-1]."""
    return logits[:, :-1, :], labels[:, 1:]


def shifted_labels(labels: torch.Tensor) -> torch.Tensor:
    """The other way to line up next-token targets: keep the logits [B, T, V] whole and shift the labels
    left, padding the last position with -100. Same loss as ``next_token_view``; the logits are not
    sliced, so nothing but the selected completion rows is ever copied."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE)


def reduce_tokens(per_token: torch.Tensor, mask: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    """Sum or mean of ``per_token`` [B, T] over positions where ``mask`` [B, T] is true.

    Masked entries are selected away (``torch.where``), not multiplied by 0, so a NaN there cannot leak
    into the result. The mean of an all-masked batch is 0 (not NaN): a micro-batch with no completion
    tokens must not poison an accumulated gradient."""
    check_reduction(reduction)
    total = torch.where(mask, per_token, torch.zeros_like(per_token)).sum()
    if reduction == "sum":
        return total
    return total / mask.sum().clamp(min=1)


def reduce_selected(per_token: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    """Sum or mean of ``per_token`` [N], the losses of the N already-selected completion positions.
    The mean of N = 0 positions is 0, for the same reason as in ``reduce_tokens``."""
    check_reduction(reduction)
    total = per_token.sum()
    if reduction == "sum":
        return total
    return total / max(per_token.numel(), 1)


def sequence_kd_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: Reduction = "mean") -> torch.Tensor:
    """Next-token cross-entropy on completion tokens (labels != -100).

    logits [B, T, V] aligned with labels [B, T] (see ``next_token_view``). Returns a scalar: the mean (or
    sum) of -log p_student(label) over the unmasked positions."""
    check_reduction(reduction)
    keep = labels != IGNORE
    # Select the completion rows first (see the module docstring), then upcast only those: float32 for
    # the softmax even when the model runs in bf16.
    per_token = F.cross_entropy(logits[keep].float(), labels[keep], reduction="none")   # [N]
    return reduce_selected(per_token, reduction)
