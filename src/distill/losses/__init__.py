"""Distillation losses, one module per family. Each function documents shapes and its paper."""

from distill.losses.soft_targets import hard_label_ce, kd_ce_mix, soft_target_kd, temper_probs

__all__ = ["hard_label_ce", "kd_ce_mix", "soft_target_kd", "temper_probs"]
