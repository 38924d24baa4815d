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
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
import torch.nn.functional as F

IGNORE = -100

Reduction = Literal["mean", "sum"]


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
    left, padding the last position with -100. Same loss as ``next_token_view``, but the logits stay
    contiguous, so flattening them for cross-entropy is a view instead of a [B, T, V] copy."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE)


def reduce_tokens(per_token: torch.Tensor, mask: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    """Sum or mean of ``per_token`` [B, T] over positions where ``mask`` [B, T] is true.

    The mean of an all-masked batch is 0 (not NaN): a micro-batch with no completion tokens must not
    poison an accumulated gradient."""
    total = (per_token * mask).sum()
    if reduction == "sum":
        return total
    return total / mask.sum().clamp(min=1)


def sequence_kd_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: Reduction = "mean") -> torch.Tensor:
    """Next-token cross-entropy on completion tokens (labels != -100).

    logits [B, T, V] aligned with labels [B, T] (see ``next_token_view``). Returns a scalar: the mean (or
    sum) of -log p_student(label) over the unmasked positions."""
    mask = labels != IGNORE
    # cross_entropy with ignore_index returns 0 for ignored positions; they are also multiplied by 0 below.
    per_token = F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE, reduction="none"
    ).view(labels.shape)
    return reduce_tokens(per_token, mask, reduction)
