"""Distilling step-by-step: learn the teacher's answer and, as a second task, its rationale.

Hsieh et al. 2023, "Distilling Step-by-Step! Outperforming Larger Language Models with Less Training Data
and Smaller Model Sizes", arXiv 2305.02301. The teacher writes a short rationale with each answer. The
student is trained on two tasks that share all weights and differ only by a prefix on the input:

    "[label] <input>"      -> the answer       (loss L_label)
    "[rationale] <input>"  -> the rationale    (loss L_rationale)

    L = L_label + lambda * L_rationale                         (paper, Eq. 3; they use lambda = 1)

The rationale is a training signal only: at inference the student is asked with the "[label]" prefix and
answers directly, so serving costs no extra tokens. Making it a separate task (rather than "rationale
then answer" in one output) is the paper's point: the label output does not depend on generating a
rationale first.

Both terms are the completion-only next-token cross-entropy of ``distill.losses.sequence`` averaged over
their own completion tokens. Shapes: each task has logits [B_task, T, V] aligned with labels [B_task, T]
(-100 = ignored). For gradient accumulation pass ``label_tokens``/``rationale_tokens``: the number of
completion tokens of each task in the *whole* accumulated batch, so that summing the micro-batch losses
gives exactly the full-batch loss.
"""

from __future__ import annotations

from typing import Literal

import torch

from distill.losses.sequence import IGNORE, sequence_kd_loss

Task = Literal["label", "rationale"]
PREFIXES: dict[str, str] = {"label": "[label] ", "rationale": "[rationale] "}


def task_input(text: str, task: Task) -> str:
    """The input with the task prefix; serve with ``task_input(text, "label")``."""
    return PREFIXES[task] + text


def step_by_step_loss(label_logits: torch.Tensor, label_labels: torch.Tensor,
                      rationale_logits: torch.Tensor | None, rationale_labels: torch.Tensor | None,
                      lambda_rationale: float = 1.0, label_tokens: int | None = None,
                      rationale_tokens: int | None = None) -> torch.Tensor:
    """L_label + lambda * L_rationale. Either task may be empty in a micro-batch (rationale missing for an
    example, or all rows of one task landing in another micro-batch): an empty task contributes 0."""
    n_label = label_tokens if label_tokens is not None else int((label_labels != IGNORE).sum())
    loss = sequence_kd_loss(label_logits, label_labels, reduction="sum") / max(n_label, 1)
    if rationale_logits is not None and rationale_labels is not None and lambda_rationale:
        n_rat = rationale_tokens if rationale_tokens is not None else int((rationale_labels != IGNORE).sum())
        l_rat = sequence_kd_loss(rationale_logits, rationale_labels, reduction="sum") / max(n_rat, 1)
        loss = loss + lambda_rationale * l_rat
    return loss
