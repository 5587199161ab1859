"""Threat models: the set of allowed perturbations, independent of modality.

One PGD serves every continuous modality because everything modality-specific about "where
may the input move" lives here: the norm (L-inf or L2), the radius (fixed, relative to the
input's norm per token, or set by a signal-to-noise ratio), the input domain to clamp to, and
which positions may not move at all (a mask, e.g. padding and special tokens).
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

Norm = Literal["linf", "l2"]


class ThreatModel:
    """An L-inf or L2 ball of radius ``radius(x)`` intersected with a box ``domain``.

    ``per_token=True`` takes norms over the last dimension only (one ball per token embedding);
    otherwise over every dimension but the batch one (one ball per example).
    """

    def __init__(self, eps: float, norm: Norm = "linf", *, domain: tuple[float, float] | None = None,
                 per_token: bool = False, relative: bool = False):
        if norm not in ("linf", "l2"):
            raise ValueError(f"unknown norm {norm!r}: use 'linf' or 'l2'")
        if eps < 0:
            raise ValueError(f"the perturbation budget eps must be >= 0, got {eps}")
        self.eps = float(eps)
        self.norm = norm
        self.domain = domain
        self.per_token = per_token
        self.relative = relative

    # -- geometry -----------------------------------------------------------------------
    def _dims(self, x: Tensor) -> tuple[int, ...]:
        return (-1,) if self.per_token else tuple(range(1, x.dim()))

    def _norm(self, v: Tensor, norm: Norm) -> Tensor:
        dims = self._dims(v)
        if norm == "linf":
            return v.abs().amax(dim=dims, keepdim=True)
        return v.flatten(1).norm(dim=1).view(-1, *([1] * (v.dim() - 1))) if not self.per_token \
            else v.norm(dim=-1, keepdim=True)

    def radius(self, x: Tensor) -> float | Tensor:
        """The ball's radius for each example (or token): a float when it is the same for all."""
        if not self.relative:
            return self.eps
        return self.eps * self._norm(x.detach(), "l2")

    def size(self, delta: Tensor) -> Tensor:
        """The perturbation's size in this threat model's norm, one value per example."""
        n = self._norm(delta, self.norm)
        return n.flatten(1).amax(dim=1) if self.per_token else n.flatten()

    # -- the three operations PGD needs -------------------------------------------------
    def init(self, x: Tensor, mode: str = "uniform", mask: Tensor | None = None,
             std: float = 0.001) -> Tensor:
        """A starting perturbation: ``uniform`` in the ball, ``normal`` (``std * N(0, 1)``, TRADES'
        original code and MTARD's), ``trades`` (``std * U[0, 1)``, the TRADES attack of ADR's
        reference, src/util/trades_attack.py:28) or ``zero``.

        The two small starts are not clamped to the input domain, as in their reference code (the
        first step's projection does it); they are kept inside the ball and the mask."""
        if mode == "zero" or self.eps == 0:
            delta = torch.zeros_like(x)
        elif mode in ("normal", "trades"):
            delta = std * (torch.randn_like(x) if mode == "normal" else torch.rand_like(x))
            return self.project(x, delta, mask, clamp_domain=False)
        elif mode == "uniform":
            r = self.radius(x)
            if self.norm == "linf":  # a float radius draws as ADR's reference PGD does (src/util/pgd_attack.py:24)
                delta = torch.empty_like(x).uniform_(-r, r) if isinstance(r, float) else (torch.rand_like(x) * 2 - 1) * r
            else:  # uniform direction, radius scaled by u^(1/d) for a uniform draw in the ball
                direction = torch.randn_like(x)
                direction = direction / self._norm(direction, "l2").clamp_min(1e-12)
                d = x.shape[-1] if self.per_token else x[0].numel()
                shape = (*x.shape[:-1], 1) if self.per_token else (x.shape[0], *([1] * (x.dim() - 1)))
                u = torch.rand(shape, device=x.device, dtype=x.dtype) ** (1.0 / d)
                delta = direction * u * r
        else:
            raise ValueError(f"unknown random start {mode!r}: use 'uniform', 'normal', 'trades' or 'zero'")
        return self.project(x, delta, mask)

    def step(self, delta: Tensor, grad: Tensor, step_size: float | Tensor) -> Tensor:
        """One steepest-ascent step in this norm (sign for L-inf, normalised gradient for L2)."""
        if self.norm == "linf":
            return delta + step_size * grad.sign()
        return delta + step_size * grad / self._norm(grad, "l2").clamp_min(1e-12)

    def project(self, x: Tensor, delta: Tensor, mask: Tensor | None = None, *, clamp_domain: bool = True) -> Tensor:
        """Back into the ball, then (``clamp_domain``) into the input domain; masked positions are zeroed."""
        r = self.radius(x)
        if self.norm == "linf":
            delta = torch.clamp(delta, -r, r) if isinstance(r, float) else torch.maximum(torch.minimum(delta, r), -r)
        else:
            n = self._norm(delta, "l2")
            delta = delta * torch.clamp(r / n.clamp_min(1e-12), max=1.0)
        if self.domain is not None and clamp_domain:
            delta = torch.clamp(x + delta, *self.domain) - x
        if mask is not None:
            delta = delta * mask.unsqueeze(-1).to(delta.dtype) if mask.dim() < delta.dim() else delta * mask
        return delta

    def default_step_size(self, x: Tensor, steps: int) -> float | Tensor:
        """Madry et al.'s rule of thumb: 2.5 * radius / steps."""
        return 2.5 * self.radius(x) / max(steps, 1)

    def with_eps(self, eps: float) -> ThreatModel:
        """The same threat model with another budget (for accuracy-vs-budget curves)."""
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        clone.eps = float(eps)
        return clone

    # -- budget axis (accuracy-vs-budget curves) ------------------------------------------
    def axis(self) -> tuple[str, float]:
        """The budget axis' label and the multiplier from ``eps`` to the plotted value (255 for L-inf
        pixels in [0, 1])."""
        if self.relative:
            return f"relative perturbation size ({self.norm}, x ||input||{' per token' if self.per_token else ''})", 1.0
        if self.norm == "linf" and self.domain == (0.0, 1.0):
            return "eps (L-inf, x 1/255)", 255.0
        return f"eps ({self.norm})", 1.0

    def axis_value(self) -> float | None:
        """This budget's value on :meth:`axis` (``None``: the axis has no point for it)."""
        return self.eps * self.axis()[1]

    def scaled(self, factor: float) -> ThreatModel:
        """The same threat model at ``factor`` times its budget (factor 0: no perturbation)."""
        return self.with_eps(self.eps * factor)

    def whole_domain(self) -> ThreatModel | None:
        """A budget that reaches (almost) any input of the domain, or ``None`` without a bounded domain."""
        if self.domain is None:
            return None
        if self.relative:
            return self.with_eps(100.0)
        width = self.domain[1] - self.domain[0]
        return self.with_eps(width if self.norm == "linf" else 1e4 * width)

    def describe(self) -> dict:
        return {"type": type(self).__name__, "norm": self.norm, "eps": self.eps, "domain": self.domain,
                "per_token": self.per_token, "relative": self.relative}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.describe().items() if k != 'type')})"


WHOLE_DOMAIN_SNR_DB = -40.0  # noise 100x louder than the signal


class SNRBall(ThreatModel):
    """Perturbations whose energy is at least ``snr_db`` below each clean signal's (an L2 ball of
    radius ``||x|| * 10^(-snr_db / 20)`` per example), clamped to ``domain`` ([-1, 1] audio)."""

    def __init__(self, snr_db: float, domain: tuple[float, float] | None = (-1.0, 1.0)):
        super().__init__(10 ** (-snr_db / 20), "l2", domain=domain, relative=True)
        self.snr_db = float(snr_db)

    def with_snr(self, snr_db: float) -> SNRBall:
        return SNRBall(snr_db, self.domain)

    def axis(self) -> tuple[str, float]:
        return "SNR (dB), lower is stronger", 1.0

    def axis_value(self) -> float | None:
        return None if self.eps == 0 else self.snr_db

    def scaled(self, factor: float) -> ThreatModel:
        """``factor`` times the noise amplitude: the SNR lowered by ``20 log10(factor)`` dB (0: no noise)."""
        if factor == 0:
            return self.with_eps(0.0)
        return self.with_snr(self.snr_db - 20 * math.log10(factor))

    def whole_domain(self) -> ThreatModel | None:
        """Noise 100x louder than the signal (-40 dB), clamped to the domain; ``None`` without a domain."""
        return None if self.domain is None else self.with_snr(WHOLE_DOMAIN_SNR_DB)

    def describe(self) -> dict:
        return {**super().describe(), "snr_db": self.snr_db}


def snr_db(x: Tensor, delta: Tensor) -> Tensor:
    """The achieved signal-to-noise ratio of ``x + delta`` in dB, one value per example (float32, computed
    in float64). A perturbation that is exactly zero gives ``+inf`` (the clean signal, unchanged) -- never a
    clamp-dependent large number; a zero signal with a non-zero perturbation gives ``-inf``."""
    signal = x.detach().flatten(1).double().pow(2).sum(1)
    noise = delta.detach().flatten(1).double().pow(2).sum(1)
    with torch.no_grad():
        out = 10 * torch.log10(signal / noise)
    return torch.where(noise == 0, torch.full_like(out, math.inf), out).float()


def eps_from_pixels(value: str | float) -> float:
    """Parse budgets written the way papers write them: ``8/255`` or ``0.031``."""
    if isinstance(value, (int, float)):
        return float(value)
    if "/" in value:
        num, den = value.split("/")
        return float(num) / float(den)
    v = float(value)
    if math.isnan(v):
        raise ValueError("eps must be a number")
    return v
