"""ADR's rectified soft labels (Wu, Wang & Chen, ICLR 2024)."""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from ..schedules import Schedule


def rectify(teacher_logits: Tensor, labels: Tensor, tau: float, lam: float) -> Tensor:
    """``y_tilde = lam_i * p + (1 - lam_i) * onehot(y)`` with ``p = softmax(teacher / tau)`` and
    ``lam_i = clip(lam - (max_j p_j - p_y), 0, 1)``: the more the teacher prefers a wrong class,
    the more weight goes back to the one-hot label."""
    p = F.softmax(teacher_logits.float() / tau, dim=1)
    p_true = p.gather(1, labels[:, None])
    lam_i = (lam - (p.amax(dim=1, keepdim=True) - p_true)).clamp(0.0, 1.0)
    onehot = F.one_hot(labels, p.shape[1]).to(p.dtype)
    return lam_i * p + (1 - lam_i) * onehot


@dataclass
class ADRRectifier:
    """ADR's annealed target maker: temperature 2.5 -> 2.0 and interpolation 0.7 -> 0.95 by
    cosine schedules over all training iterations (the paper's CIFAR defaults)."""

    tau: Schedule = Schedule(2.5, 2.0)
    lam: Schedule = Schedule(0.7, 0.95)

    def __call__(self, teacher_logits: Tensor, labels: Tensor, step: int, total: int) -> Tensor:
        return rectify(teacher_logits, labels, self.tau(step, total), self.lam(step, total))

    def values(self, step: int, total: int) -> dict[str, float]:
        return {"adr_tau": self.tau(step, total), "adr_lambda": self.lam(step, total)}
