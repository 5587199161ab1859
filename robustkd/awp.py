"""Adversarial Weight Perturbation (Wu, Xia & Wang, NeurIPS 2020).

Before each update the weights move by ``v`` toward a higher training loss (one normalised
ascent step per layer, ``||v_l|| = gamma * ||w_l||``), the gradient is taken there, and ``v``
is removed again after the optimizer step -- the reference implementation's order.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from .distributed import reduce_


class AWP:
    """Weight perturbation on every weight matrix / conv kernel (tensors with more than one
    dimension), as in the reference code; ``gamma`` 5e-3, active from ``warmup_epochs`` on."""

    def __init__(self, gamma: float = 5e-3, warmup_epochs: int = 0):
        if gamma <= 0:
            raise ValueError(f"AWP gamma must be > 0, got {gamma}")
        self.gamma = gamma
        self.warmup_epochs = warmup_epochs

    def active(self, epoch: int) -> bool:
        return epoch >= self.warmup_epochs

    @staticmethod
    def _weights(model: nn.Module) -> list[nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad and p.dim() > 1]

    def compute(self, model: nn.Module, loss_fn: Callable[[nn.Module], Tensor]) -> list[Tensor]:
        """The perturbation ``v`` for each weight, from the gradient of ``loss_fn(model)``.
        Batch-norm statistics are left as they were (the reference uses a proxy copy)."""
        buffers = [b.clone() for b in model.buffers()]
        weights = self._weights(model)
        grads = torch.autograd.grad(loss_fn(model), weights, allow_unused=True)
        with torch.no_grad():
            for b, saved in zip(model.buffers(), buffers):
                b.copy_(saved)
            v = []
            for w, g in zip(weights, grads):
                if g is None:
                    v.append(torch.zeros_like(w))
                else:
                    v.append(self.gamma * w.norm() * g / (g.norm() + 1e-20))
            reduce_(v)  # the same v on every rank -> the same weights
        return v

    @torch.no_grad()
    def perturb(self, model: nn.Module, v: list[Tensor]) -> None:
        torch._foreach_add_(self._weights(model), v)

    @torch.no_grad()
    def restore(self, model: nn.Module, v: list[Tensor]) -> None:
        torch._foreach_sub_(self._weights(model), v)
