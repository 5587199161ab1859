"""AutoAttack (Croce & Hein, 2020): the official implementation, ``pyautoattack`` from PyPI.

robustkd adds no attack code of its own here: it presents the task's model to the official
``pyautoattack.AutoAttack`` in the [0, 1] box it assumes, runs ``run_standard_evaluation`` and
returns its adversarial inputs. Versions: ``standard`` (APGD-CE, APGD-T, FAB-T, Square; the
RobustBench protocol), ``plus``, ``rand`` (for randomised defences) and ``custom`` with an
``attacks=`` list. Robust accuracy is AutoAttack's per-example worst case: each component attacks
only the points that all earlier components failed on.

The official runtime checks (randomised defence, probabilities instead of logits, dynamic
behaviour, class count, Square beating the white-box attacks, zero gradients) are logged and
recorded in :meth:`AutoAttack.describe` under ``runtime_checks``, so they reach the report.

Long evaluations resume: with ``resume_dir`` every finished batch's adversarial inputs are kept, and a
rerun of the same evaluation skips those batches (``robustkd eval --robustbench`` keeps them under its
output directory). :func:`run_autoattack` passes the official state file through for whole-set runs.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn

from ..registry import register_attack
from ..task import Adversarial, Batch, ContinuousTask, Task
from ..threat import ThreatModel
from .base import Attack

Version = Literal["standard", "plus", "rand", "custom"]
VERSIONS: tuple[str, ...] = get_args(Version)
COMPONENTS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")
NORMS = {"linf": "Linf", "l2": "L2", "l1": "L1"}
OFFICIAL_LOGGER = "auto-attack"  # the logger name pyautoattack reports its runtime checks to


def official_version() -> str:
    """The installed pyautoattack version (recorded in every report)."""
    import importlib.metadata as md

    return md.version("pyautoattack")


class _UnitBoxModel(nn.Module):
    """The task's model in the [0, 1] box AutoAttack assumes: ``z`` maps to ``lo + (hi - lo) * z``
    in the task's domain (the identity for images)."""

    def __init__(self, task: Task, model: nn.Module, lo: float, hi: float):
        super().__init__()
        self.task, self.model, self.lo, self.scale = task, model, lo, hi - lo

    def forward(self, z: Tensor) -> Tensor:
        x = z if (self.lo == 0.0 and self.scale == 1.0) else self.lo + self.scale * z
        return self.task.logits(self.model, {"inputs": x})


class _CheckCollector(logging.Handler):
    """Collects the warnings pyautoattack logs while it runs (its runtime checks)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def build_official(net: nn.Module, *, eps: float, norm: str, version: str, attacks: Sequence[str] | None,
                   seed: int, device: torch.device | str, steps: int | None = None, n_restarts: int | None = None,
                   n_queries: int | None = None, n_target_classes: int | None = None):
    """A ``pyautoattack.AutoAttack`` with robustkd's names; the ``custom`` knobs set the official objects'
    attributes (the same ones the official ``_set_version`` sets)."""
    from pyautoattack import AutoAttack as Official

    adversary = Official(net, attacks=list(attacks or ()) if version == "custom" else None, device=device, eps=eps,
                         norm=NORMS[norm], seed=seed, version=version)
    if steps is not None:
        adversary.apgd.n_iter = adversary.apgd_targeted.n_iter = adversary.fab.n_iter = steps
    if n_restarts is not None:
        adversary.apgd.n_restarts = adversary.fab.n_restarts = n_restarts
    if n_queries is not None:
        adversary.square.n_queries = n_queries
    if n_target_classes is not None:
        adversary.apgd_targeted.n_target_classes = adversary.fab.n_target_classes = n_target_classes
    return adversary


def run_autoattack(adversary, x: Tensor, y: Tensor, batch_size: int,
                   state_path: str | Path | None = None) -> tuple[Tensor, Tensor, list[str]]:
    """``adversary.run_standard_evaluation`` with its runtime checks collected: returns the adversarial
    inputs, the per-example verdicts (True = robust) and the check messages. With ``state_path`` a
    killed evaluation resumes from the official state file; after a resume only the points attacked
    in this run have new adversarial inputs, so the verdicts come from AutoAttack's own predictions."""
    collector = _CheckCollector()
    logger = logging.getLogger(OFFICIAL_LOGGER)
    logger.addHandler(collector)
    try:
        x_adv, y_adv = adversary.run_standard_evaluation(
            x, y, batch_size=batch_size, state_path=Path(state_path) if state_path is not None else None)
    finally:
        logger.removeHandler(collector)
    return x_adv, (y_adv == y), collector.messages


@register_attack("autoattack")
class AutoAttack(Attack):
    """AutoAttack, the official pyautoattack: version standard (default), plus, rand, or custom with
    attacks=apgd-ce+square; steps/n_restarts/n_queries/n_target_classes change a custom run only."""

    requires = (ContinuousTask,)

    def __init__(self, task: Task, threat: ThreatModel | None = None, *, eps: float | None = None,
                 norm: str | None = None, version: Version = "standard", attacks: Sequence[str] | str | None = None,
                 seed: int = 0, steps: int | None = None, n_restarts: int | None = None,
                 n_queries: int | None = None, n_target_classes: int | None = None, verbose: bool = False,
                 resume_dir: str | Path | None = None):
        super().__init__(task)
        self.threat = threat if threat is not None else task.threat_model(eps=eps, norm=norm)
        domain = self.threat.domain
        if self.threat.relative or domain is None or self.threat.norm not in NORMS:
            raise ValueError("AutoAttack needs a fixed-radius L-inf, L2 or L1 ball in a bounded domain")
        self.domain: tuple[float, float] = domain
        if version not in VERSIONS:
            raise ValueError(f"unknown AutoAttack version {version!r}: use {', '.join(VERSIONS)}")
        if isinstance(attacks, str):
            attacks = attacks.split("+")
        if version == "custom" and not attacks:
            raise ValueError("autoattack version=custom needs attacks=..., e.g. autoattack:version=custom,"
                             "attacks=apgd-ce+square")
        knobs = {"steps": steps, "n_restarts": n_restarts, "n_queries": n_queries, "n_target_classes": n_target_classes}
        if version != "custom" and (attacks or any(v is not None for v in knobs.values())):
            given = ["attacks"] * bool(attacks) + [k for k, v in knobs.items() if v is not None]
            raise ValueError(f"autoattack version={version} runs the official settings; {', '.join(given)} "
                             "change them: add version=custom (e.g. autoattack:version=custom,attacks=apgd-ce,steps=20)")
        if attacks and (unknown := [a for a in attacks if a not in COMPONENTS]):
            raise ValueError(f"unknown AutoAttack components {unknown}; known: {', '.join(COMPONENTS)}")
        self.version, self.attacks, self.seed, self.verbose, self.knobs = version, attacks, seed, verbose, knobs
        self.resume_dir = Path(resume_dir) if resume_dir is not None else None
        self.components = tuple(self.official(nn.Identity(), "cpu").attacks_to_run)  # what the version runs
        self.runtime_checks: list[str] = []

    def official(self, net: nn.Module, device: torch.device | str):
        """The configured ``pyautoattack.AutoAttack`` for ``net`` (inputs in [0, 1])."""
        lo, hi = self.domain
        adversary = build_official(net, eps=self.threat.eps / (hi - lo), norm=self.threat.norm, version=self.version,
                                   attacks=self.attacks, seed=self.seed, device=device, **self.knobs)
        adversary.verbose = self.verbose
        return adversary

    # -- running --------------------------------------------------------------------------
    def perturb(self, model: nn.Module, batch: Batch, targets: Tensor | None = None) -> Adversarial:
        y = self.task.labels(batch) if targets is None else targets
        if y.dim() != 1:
            raise ValueError("AutoAttack needs hard labels")
        x = batch["inputs"].detach()
        lo, hi = self.domain
        saved = self._resume_file(model, x, y)
        if saved is not None and saved.exists():
            z_adv = torch.load(saved, map_location=x.device, weights_only=True)
        else:
            # the wrapper takes the victim's mode (Attack.__call__ set it)
            net = _UnitBoxModel(self.task, model, lo, hi).train(model.training)
            adversary = self.official(net, x.device)
            z_adv, _, messages = run_autoattack(adversary, (x - lo) / (hi - lo), y, batch_size=len(x))
            for msg in messages:
                if msg not in self.runtime_checks:
                    self.runtime_checks.append(msg)
                    logging.getLogger(__name__).warning("AutoAttack runtime check: %s", msg)
            if saved is not None:
                saved.parent.mkdir(parents=True, exist_ok=True)
                torch.save(z_adv.cpu(), saved.with_suffix(".tmp"))
                saved.with_suffix(".tmp").replace(saved)
        delta = (lo + (hi - lo) * z_adv) - x
        return Adversarial(batch, self.threat.project(x, delta))

    def _resume_file(self, model: nn.Module, x: Tensor, y: Tensor) -> Path | None:
        """With ``resume_dir``: the file that keeps this batch's adversarial inputs once it is done, named by
        the batch's content, the model's weights and the attack's settings, so a rerun skips finished batches. (The official
        state file restores only verdicts, not the adversarial inputs of points fooled before a restart,
        which the report's calibration and consistency metrics need.)"""
        if self.resume_dir is None:
            return None
        import hashlib

        h = hashlib.sha1()
        with torch.no_grad():
            weights = torch.stack([p.detach().double().sum() for p in model.parameters()]) if any(
                True for _ in model.parameters()) else torch.zeros(1)
        for t in (x, y, weights):
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        settings = {k: v for k, v in self.describe().items() if k != "runtime_checks"}
        h.update(repr(sorted(settings.items())).encode())
        return self.resume_dir / f"autoattack-{h.hexdigest()[:20]}.pt"

    def describe(self) -> dict[str, Any]:
        return {"attack": "autoattack", "backend": f"pyautoattack {official_version()}", "version": self.version,
                "components": list(self.components), **self.threat.describe(),
                **{k: v for k, v in self.knobs.items() if v is not None}, "seed": self.seed,
                "runtime_checks": list(self.runtime_checks)}
