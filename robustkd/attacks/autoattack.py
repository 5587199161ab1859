"""AutoAttack (Croce & Hein, 2020) behind one API, with two backends.

``official``: the ``autoattack`` package from its git repository (``pip install robustkd[autoattack]``).
``torchattacks``: the port in torchattacks, assembled here with the *official* standard settings
(100 iterations, 9 target classes, 5000 Square queries) -- torchattacks' own "standard" preset
runs 10 iterations and is weaker. The port may still differ from published AutoAttack numbers:
it warns, and every report records which backend ran.

Robust accuracy is the per-example worst case: each component attacks only the points that
all earlier components failed on.
"""
from __future__ import annotations

import importlib.util
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from ..registry import register_attack
from ..task import Adversarial, Batch, ContinuousTask, Task
from ..threat import ThreatModel
from .base import Attack

STANDARD = ("apgd-ce", "apgd-t", "fab-t", "square")
RAND = ("apgd-ce", "apgd-dlr")
_warned = False


def official_available() -> bool:
    """True when the official distribution is installed. torchattacks 3.3 also ships a stale
    top-level ``autoattack`` module (broken on current torch), so importability is not enough."""
    import importlib.metadata as md

    try:
        md.distribution("autoattack")
    except md.PackageNotFoundError:
        return False
    return importlib.util.find_spec("autoattack") is not None


class _UnitBoxModel(nn.Module):
    """Presents the task's model to AutoAttack in the [0, 1] box it assumes: ``z`` in [0, 1]
    maps to ``lo + (hi - lo) * z`` in the task's domain (the identity for images)."""

    def __init__(self, task: Task, model: nn.Module, lo: float, hi: float):
        super().__init__()
        self.task, self.model, self.lo, self.scale = task, model, lo, hi - lo

    def forward(self, z: Tensor) -> Tensor:
        x = z if (self.lo == 0.0 and self.scale == 1.0) else self.lo + self.scale * z
        return self.task.logits(self.model, {"inputs": x})


@register_attack("autoattack")
class AutoAttack(Attack):
    """AutoAttack: APGD-CE, APGD-T, FAB-T, Square (``standard``), ``rand``, or a custom list;
    official package when installed, else torchattacks' port with the official settings."""

    requires = (ContinuousTask,)

    def __init__(self, task: Task, threat: ThreatModel | None = None, *, eps: float | None = None,
                 norm: str | None = None, version: str = "standard", attacks: list[str] | str | None = None,
                 backend: str = "auto", seed: int = 0, steps: int = 100, n_queries: int = 5000,
                 n_target_classes: int = 9, verbose: bool = False):
        super().__init__(task)
        self.threat = threat if threat is not None else task.threat_model(eps=eps, norm=norm)
        if self.threat.relative or self.threat.domain is None:
            raise ValueError("AutoAttack needs a fixed-radius L-inf or L2 ball in a bounded domain")
        if version not in ("standard", "rand", "custom"):
            raise ValueError(f"unknown AutoAttack version {version!r}: use standard, rand or custom")
        if isinstance(attacks, str):
            attacks = attacks.split("+")
        if version == "custom" and not attacks:
            raise ValueError("version='custom' needs attacks=[...], e.g. ['apgd-ce', 'square']")
        self.version = version
        self.components = tuple(attacks) if attacks else (STANDARD if version == "standard" else RAND)
        known = {"apgd-ce", "apgd-t", "fab-t", "square", "apgd-dlr", "fab"}
        if unknown := [a for a in self.components if a not in known]:
            raise ValueError(f"unknown AutoAttack components {unknown}; known: {sorted(known)}")
        if backend == "auto":
            backend = "official" if official_available() else "torchattacks"
        if backend not in ("official", "torchattacks"):
            raise ValueError(f"unknown AutoAttack backend {backend!r}: use auto, official or torchattacks")
        if backend == "official" and not official_available():
            raise ImportError("the official AutoAttack is not installed: pip install 'robustkd[autoattack]' "
                              "(it installs from its git repository), or use backend='torchattacks'")
        self.backend, self.seed, self.verbose = backend, seed, verbose
        self.steps, self.n_queries, self.n_target_classes = steps, n_queries, n_target_classes
        if backend == "torchattacks":
            _warn_port()

    # -- running --------------------------------------------------------------------------
    def perturb(self, model: nn.Module, batch: Batch, targets: Tensor | None = None) -> Adversarial:
        y = self.task.labels(batch) if targets is None else targets
        if y.dim() != 1:
            raise ValueError("AutoAttack needs hard labels")
        x = batch["inputs"].detach()
        lo, hi = self.threat.domain
        z = (x - lo) / (hi - lo)
        eps = self.threat.eps / (hi - lo)
        # the wrapper takes the victim's mode (Attack.__call__ set it): torchattacks restores the wrapper's
        # mode after each component, and that reaches the model too.
        net = _UnitBoxModel(self.task, model, lo, hi).train(model.training)
        z_adv = self._run_official(net, z, y, eps) if self.backend == "official" else self._run_port(net, z, y, eps)
        delta = (lo + (hi - lo) * z_adv) - x
        return Adversarial(batch, self.threat.project(x, delta))

    def _run_official(self, net: nn.Module, z: Tensor, y: Tensor, eps: float) -> Tensor:
        from autoattack import AutoAttack as OfficialAutoAttack

        norm = {"linf": "Linf", "l2": "L2"}[self.threat.norm]
        adversary = OfficialAutoAttack(net, norm=norm, eps=eps, version=self.version, device=z.device,
                                       seed=self.seed, verbose=self.verbose)
        if self.version == "custom":
            adversary.attacks_to_run = list(self.components)
        return adversary.run_standard_evaluation(z, y, bs=len(z))

    def _components(self, net: nn.Module, eps: float) -> list[tuple[str, Any]]:
        import torchattacks as ta

        norm = {"linf": "Linf", "l2": "L2"}[self.threat.norm]
        n_classes = self.task.num_classes
        eot = 20 if self.version == "rand" else 1
        out = []
        for name in self.components:
            if name == "apgd-ce":
                atk = ta.APGD(net, norm=norm, eps=eps, steps=self.steps, n_restarts=1, loss="ce", seed=self.seed,
                              eot_iter=eot, rho=0.75)
            elif name == "apgd-dlr":
                atk = ta.APGD(net, norm=norm, eps=eps, steps=self.steps, n_restarts=1, loss="dlr", seed=self.seed,
                              eot_iter=eot, rho=0.75)
            elif name == "apgd-t":
                atk = ta.APGDT(net, norm=norm, eps=eps, steps=self.steps, n_restarts=1, seed=self.seed,
                               n_classes=n_classes)
                atk.n_target_classes = min(self.n_target_classes, n_classes - 1)
            elif name in ("fab-t", "fab"):
                atk = ta.FAB(net, norm=norm, eps=eps, steps=self.steps, n_restarts=1, seed=self.seed,
                             multi_targeted=(name == "fab-t"), n_classes=n_classes)
                atk.n_target_classes = min(self.n_target_classes, n_classes - 1)
            else:  # square
                atk = ta.Square(net, norm=norm, eps=eps, n_queries=self.n_queries, n_restarts=1, p_init=0.8,
                                seed=self.seed)
            out.append((name, atk))
        return out

    def _run_port(self, net: nn.Module, z: Tensor, y: Tensor, eps: float) -> Tensor:
        z_adv = z.clone()
        with torch.no_grad():
            robust = net(z).argmax(1) == y
        for _, atk in self._components(net, eps):
            idx = robust.nonzero().flatten()
            if idx.numel() == 0:
                break
            candidate = atk(z[idx], y[idx]).detach()
            candidate = torch.min(torch.max(candidate, z[idx] - eps), z[idx] + eps).clamp(0, 1) \
                if self.threat.norm == "linf" else candidate
            with torch.no_grad():
                fooled = net(candidate).argmax(1) != y[idx]
            z_adv[idx[fooled]] = candidate[fooled]
            robust[idx[fooled]] = False
        return z_adv

    def describe(self) -> dict[str, Any]:
        return {"attack": "autoattack", "backend": self.backend, "version": self.version,
                "components": list(self.components), **self.threat.describe(), "steps": self.steps,
                "n_queries": self.n_queries, "n_target_classes": self.n_target_classes, "seed": self.seed}


def _warn_port() -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn("AutoAttack: the official package is not installed, so robustkd runs torchattacks' port with "
                      "the official standard settings. Its numbers may not match published AutoAttack results "
                      "(install the official one with: pip install 'robustkd[autoattack]').", UserWarning, stacklevel=3)
