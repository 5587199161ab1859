"""Adversarial Weight Perturbation (Wu, Xia & Wang, NeurIPS 2020), as ADR's reference runs it.

Per optimizer step: the loss at the current weights ``w`` gives a gradient ``g``; every
parameter moves by ``v = g * gamma * ||w|| / (||g|| + 1e-20)`` (one normalised ascent step per
tensor), the loss is taken again at ``w + v`` and its gradient drives the optimizer step.

Two styles (``TrainConfig.awp_style``):

``adr`` (default) -- ADR's reference (``src/util/awp.py``, ``src/advTrainer.py``): *every*
parameter is perturbed (biases and batch-norm affine parameters too); the unperturbed pass
updates the batch-norm running statistics and the perturbed pass leaves them as they were
(the reference sets the BN momentum to 0 for it); the weights are restored to ``w`` *before* the
optimizer step, so weight decay and momentum see ``w``.

``wu2020`` -- robustkd's earlier behaviour, closer to Wu et al.'s original code: only tensors
with more than one dimension (weight matrices, conv kernels) move; the unperturbed pass leaves
the BN statistics alone and the perturbed pass updates them; ``v`` is subtracted *after* the
optimizer step.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .distributed import reduce_

AWP_STYLES = ("adr", "wu2020")

#: The reference's guard against a zero gradient norm (src/util/awp.py:3).
EPS = 1e-20


class AWP:
    """Weight perturbation of size ``gamma`` relative to each tensor's norm (5e-3 in the papers;
    1e-3 in ADR's TinyImageNet configs), active from epoch ``warmup_epochs`` on (the reference:
    from the first step)."""

    def __init__(self, gamma: float = 5e-3, warmup_epochs: int = 0, style: str = "adr"):
        if gamma <= 0:
            raise ValueError(f"AWP gamma must be > 0, got {gamma}")
        if style not in AWP_STYLES:
            raise ValueError(f"unknown AWP style {style!r}: use 'adr' (the reference) or 'wu2020'")
        self.gamma = gamma
        self.warmup_epochs = warmup_epochs
        self.style = style
        self._saved_params: list[Tensor] | None = None
        self._saved_buffers: list[Tensor] | None = None

    @property
    def restores_before_step(self) -> bool:
        """Whether the trainer restores the weights between backward and the optimizer step."""
        return self.style == "adr"

    def active(self, epoch: int) -> bool:
        return epoch >= self.warmup_epochs

    def _params(self, model: nn.Module) -> list[Tensor]:
        params: list[Tensor] = [p for p in model.parameters() if p.requires_grad]
        return params if self.style == "adr" else [p for p in params if p.dim() > 1]

    @staticmethod
    def _float_buffers(model: nn.Module) -> list[Tensor]:
        return [b for b in model.buffers() if b.is_floating_point()]

    def compute(self, model: nn.Module, loss_fn: Callable[[nn.Module], Tensor]) -> list[Tensor]:
        """The perturbation ``v`` for each parameter, from the gradient of ``loss_fn(model)``.
        ``adr``: this pass updates the batch-norm statistics; ``wu2020``: they are restored."""
        saved = [b.clone() for b in model.buffers()] if self.style == "wu2020" else None
        params = self._params(model)
        grads = torch.autograd.grad(loss_fn(model), params, allow_unused=True)
        with torch.no_grad():
            if saved is not None:
                for b, s in zip(model.buffers(), saved):
                    b.copy_(s)
            v = []
            for w, g in zip(params, grads):
                if g is None:  # the reference skips parameters without a gradient
                    v.append(torch.zeros_like(w))
                else:
                    v.append(g * (self.gamma * w.norm() / (g.norm() + EPS)))
            reduce_(v)  # the same v on every rank -> the same weights
        return v

    @torch.no_grad()
    def perturb(self, model: nn.Module, v: list[Tensor]) -> None:
        """``w <- w + v``; ``adr`` keeps copies of ``w`` and of the float buffers for :meth:`restore`."""
        params = self._params(model)
        if self.style == "adr":
            self._saved_params = [p.detach().clone() for p in params]
            self._saved_buffers = [b.clone() for b in self._float_buffers(model)]
        torch._foreach_add_(params, v)

    @torch.no_grad()
    def restore(self, model: nn.Module, v: list[Tensor]) -> None:
        """Back to ``w``: ``adr`` copies the saved weights and the float buffers (BN statistics as
        the unperturbed pass left them); ``wu2020`` subtracts ``v``."""
        params = self._params(model)
        if self.style == "adr":
            if self._saved_params is None or self._saved_buffers is None:
                raise RuntimeError("AWP.restore called without AWP.perturb")
            torch._foreach_copy_(params, self._saved_params)
            for b, s in zip(self._float_buffers(model), self._saved_buffers):
                b.copy_(s)
            self._saved_params = self._saved_buffers = None
        else:
            torch._foreach_sub_(params, v)
