"""The attack contract and the factory that builds attacks from short specs.

An attack is an object you call, as in torchattacks: ``adv = attack(model, batch, targets)``
returns an :class:`~robustkd.task.Adversarial` ``(batch, delta)``; ``task.logits(model, *adv)``
evaluates any model on it. ``targets`` are hard labels or soft distributions.
"""
from __future__ import annotations

import re
from abc import ABC, abstractmethod
from typing import Any

from torch import Tensor, nn

from ..registry import ATTACKS, RegistryError
from ..task import Adversarial, Batch, Task
from ..threat import eps_from_pixels


class Attack(ABC):
    """Base class: subclasses implement ``__call__``. ``modalities`` lists the task modalities the
    attack supports (``None``: any continuous task)."""

    modalities: tuple[str, ...] | None = None

    def __init__(self, task: Task):
        if self.modalities is not None and task.modality not in self.modalities:
            raise RegistryError(
                f"the attack {type(self).__name__} works on {', '.join(self.modalities)} tasks, not on "
                f"{task.name!r} ({task.modality}). Attacks for {task.modality}: "
                f"{', '.join(attacks_for(task)) or '(none)'}."
            )
        self.task = task

    @abstractmethod
    def __call__(self, model: nn.Module, batch: Batch, targets: Tensor | None = None) -> Adversarial:
        """Perturb ``batch`` against ``model``; ``targets`` default to the batch's labels."""

    def describe(self) -> dict[str, Any]:
        """The attack's parameters, for reports."""
        return {"attack": type(self).__name__}


def attacks_for(task: Task) -> list[str]:
    """Names of the registered attacks that accept this task's modality."""
    names = []
    for entry in ATTACKS.entries():
        mods = getattr(entry.obj, "modalities", None)
        if mods is None or task.modality in mods:
            names.append(entry.name)
    return names


_SHORTHAND = re.compile(r"^([a-z_]+?)(\d+)$")


def parse_attack_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"pgd20"`` -> ``("pgd", {"steps": 20})``; ``"pgd:eps=8/255,steps=50"`` -> keyword options;
    ``"textattack:deepwordbug"`` -> ``("textattack", {"recipe": "deepwordbug"})``."""
    name, _, opts = spec.strip().partition(":")
    kwargs: dict[str, Any] = {}
    if opts:
        for part in opts.split(","):
            if "=" not in part:
                kwargs["recipe"] = part  # a bare word names a sub-recipe
                continue
            key, value = part.split("=", 1)
            kwargs[key.strip()] = _parse_value(value.strip())
    if name not in ATTACKS and (m := _SHORTHAND.match(name)) and m.group(1) in ATTACKS:
        name, kwargs = m.group(1), {"steps": int(m.group(2)), **kwargs}
    return name, kwargs


def split_attack_specs(text: str) -> list[str]:
    """Split a comma-separated list of specs, keeping ``key=value`` options with their spec:
    ``"pgd20,autoattack:version=custom,attacks=apgd-ce"`` -> ``["pgd20", "autoattack:version=custom,attacks=apgd-ce"]``."""
    specs: list[str] = []
    for token in (t.strip() for t in (text or "").split(",")):
        if not token:
            continue
        if specs and "=" in token and ":" not in token.split("=", 1)[0]:
            specs[-1] += "," + token
        else:
            specs.append(token)
    return specs


def _parse_value(value: str) -> Any:
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    try:
        return int(value)
    except ValueError:
        pass
    try:
        return eps_from_pixels(value)
    except ValueError:
        return value


def create_attack(spec: str, task: Task, **overrides: Any) -> Attack:
    """Build a registered attack from a spec string (see :func:`parse_attack_spec`)."""
    name, kwargs = parse_attack_spec(spec)
    factory = ATTACKS.get(name)
    kwargs.update(overrides)
    try:
        return factory(task, **kwargs)
    except TypeError as exc:
        raise TypeError(f"bad options for attack {spec!r}: {exc}") from exc
