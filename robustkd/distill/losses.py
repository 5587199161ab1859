"""Losses shared by the training methods."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy against hard labels (int) or target distributions (float, rows sum to 1)."""
    return F.cross_entropy(logits, targets)


def trades_kl(adv_logits: Tensor, clean_logits: Tensor) -> Tensor:
    """TRADES' robustness term as its reference code computes it: batch-mean
    KL(softmax(clean) || softmax(adv)), gradients through both."""
    return F.kl_div(F.log_softmax(adv_logits, dim=1), F.log_softmax(clean_logits, dim=1), reduction="batchmean",
                    log_target=True)  # log-probability target, as ADR's reference (src/advTrainer.py:210,322)


def distill_kl(student_logits: Tensor, teacher_probs: Tensor,
               scale: Literal["batchmean", "reference"] = "batchmean") -> Tensor:
    """KL(teacher || student) with the student at temperature 1.

    ``batchmean``: the textbook batch-mean KL. ``reference``: MTARD's reference code, the mean over
    batch *and classes* of ``p_t * (log(p_t + 1e-5) - log p_s)`` (batch-mean KL / num_classes,
    up to the 1e-5), kept so results compare with the paper.
    """
    log_ps = F.log_softmax(student_logits, dim=1)
    if scale == "reference":  # summed as the reference rounds it: -log p_s * p_t + log(p_t + 1e-5) * p_t
        return (-log_ps * teacher_probs + torch.log(teacher_probs + 1e-5) * teacher_probs).mean()
    if scale == "batchmean":
        return F.kl_div(log_ps, teacher_probs, reduction="batchmean")
    raise ValueError(f"unknown KL scale {scale!r}: use 'batchmean' or 'reference'")
