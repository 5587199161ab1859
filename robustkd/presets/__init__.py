"""Reference configurations as data: one preset per training configuration of the reference code.

Every ADR config file (github.com/yuyuwu5/ADR ``config/**.gin``) and every MTARD / B-MTARD CIFAR
script is one preset, named like ``adr/cifar100/wrn_pgd_awp_adr``, ``mtard/cifar10/resnet18`` or
``bmtard/cifar10/resnet18``. A preset holds every setting its run uses, in the names of the recipe
configuration (:mod:`robustkd.config`), and names its source file (and the line of each setting)::

    from robustkd.presets import get_preset, list_presets
    p = get_preset("adr/cifar10/resnet18_pgd_sgd_adr")
    p.source, p.settings["nesterov"], p.settings["attack_mode"]

The data live in ``adr.yaml`` and ``mtard.yaml`` beside this file (``recommended.yaml``: robustkd's own
recommendations, each naming the study behind it). A method's own defaults (used when a run picks a
method without a preset of it) are declared on its class (:mod:`robustkd.distill.methods`) and read
by :func:`method_defaults`.
``robustkd presets`` lists them; ``--preset NAME`` on a recipe starts from one.
"""
from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
PRESET_FILES = ("adr.yaml", "mtard.yaml", "recommended.yaml")

#: How a preset's ``attack`` block maps onto the flat configuration fields.
ATTACK_FIELDS = {"eps": "eps", "norm": "norm", "steps": "attack_steps", "step_size": "attack_step_size",
                 "random_start": "attack_random_start", "init_std": "attack_init_std", "loss": "attack_loss",
                 "mode": "attack_mode"}
#: Keys of a preset entry that describe it rather than configure the run.
META_KEYS = ("source", "description", "lines", "notes", "unsupported", "teachers")


class PresetError(ValueError):
    """An unknown preset name (the message lists the close ones)."""


@dataclass(frozen=True)
class Preset:
    """One reference configuration: its settings (configuration field -> value) and where they come from."""

    name: str
    source: str
    description: str
    settings: dict[str, Any]
    lines: dict[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    unsupported: tuple[str, ...] = ()  # reference behaviour robustkd does not reproduce (logged, recorded)
    teachers: dict[str, str] = field(default_factory=dict)

    @property
    def family(self) -> str:
        return self.name.split("/", 1)[0]

    def key_settings(self) -> str:
        """A one-line summary for listings."""
        s = self.settings
        parts = [s["method"], s["model"], f"{s['epochs']} ep", f"bs {s['batch_size']}",
                 f"{s['optimizer']}{'+nesterov' if s.get('nesterov') else ''} lr {s['lr']}", f"wd {s['weight_decay']}"]
        if s.get("awp"):
            parts.append(f"awp {s['awp_gamma']}")
        kw = s.get("method_kwargs") or {}
        if "tau" in kw:
            parts.append(f"tau {kw['tau'][0]}->{kw['tau'][1]} lam {kw['lam'][0]}->{kw['lam'][1]}")
        if "entropy_balance" in kw:
            parts.append(f"entropy {kw['entropy_balance']}")
        parts.append(f"pgd{s['attack_steps']} {s['eps']} ({s['attack_mode']} mode)")
        return ", ".join(str(p) for p in parts)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "description": self.description,
                "settings": copy.deepcopy(self.settings), "lines": dict(self.lines), "notes": list(self.notes),
                "unsupported": list(self.unsupported), "teachers": dict(self.teachers)}


def _load_yaml(path: Path) -> dict[str, Any]:
    import yaml

    return yaml.safe_load(path.read_text()) or {}


def _flatten(name: str, entry: dict[str, Any]) -> Preset:
    settings = {k: copy.deepcopy(v) for k, v in entry.items() if k not in META_KEYS and k != "attack"}
    for key, value in (entry.get("attack") or {}).items():
        if key not in ATTACK_FIELDS:
            raise PresetError(f"preset {name!r}: unknown attack setting {key!r}")
        settings[ATTACK_FIELDS[key]] = value
    return Preset(name=name, source=entry["source"], description=entry.get("description", ""), settings=settings,
                  lines={k: str(v) for k, v in (entry.get("lines") or {}).items()},
                  notes=tuple(entry.get("notes") or ()), unsupported=tuple(entry.get("unsupported") or ()),
                  teachers={k: str(v) for k, v in (entry.get("teachers") or {}).items()})


@lru_cache(maxsize=1)
def _all() -> dict[str, Preset]:
    presets: dict[str, Preset] = {}
    for file in PRESET_FILES:
        for name, entry in _load_yaml(_HERE / file).items():
            if name in presets:
                raise PresetError(f"preset {name!r} defined twice")
            presets[name] = _flatten(name, entry)
    return presets


def list_presets(prefix: str = "") -> list[Preset]:
    """Every preset (optionally only those whose name starts with ``prefix``), sorted by name."""
    return [p for name, p in sorted(_all().items()) if name.startswith(prefix)]


def get_preset(name: str) -> Preset:
    """The preset called ``name``; an unknown name is refused with the closest names."""
    presets = _all()
    if name in presets:
        return presets[name]
    close = difflib.get_close_matches(name, list(presets), n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else "see `robustkd presets` for the list"
    raise PresetError(f"unknown preset {name!r}: {hint}")


def method_defaults(method: str) -> dict[str, Any]:
    """The registered method's own defaults, as its class declares them (:mod:`robustkd.distill.methods`):

    - ``attack``: its training attack's ``loss``, ``random_start``, ``init_std`` and ``mode`` (the
      class's ``training_attack`` and ``attack_mode``), or None for a method that trains on clean inputs;
    - ``method_kwargs``: keyword settings to pass beyond the constructor's own, always ``{}`` (the
      constructor's keyword defaults are the defaults);
    - ``teachers``: whether it takes ``--clean-teacher`` / ``--robust-teacher`` (``needs_teachers``);
    - ``ema``: whether it keeps an EMA teacher (``needs_ema``; MTARD also when its robust teacher is 'ema');
    - ``source``: where the defaults come from (``reference``).

    A registered factory that is not a :class:`~robustkd.distill.methods.Method` class takes the base
    class's declaration. An unknown name is refused with the registered ones listed.
    """
    from ..distill.methods import Method
    from ..registry import METHODS

    factory = METHODS.get(method)
    cls = factory if isinstance(factory, type) and issubclass(factory, Method) else Method
    attack = cls.training_attack
    return {"attack": None if attack is None else attack.settings(cls.attack_mode), "method_kwargs": {},
            "teachers": bool(cls.needs_teachers), "ema": bool(cls.needs_ema), "source": cls.reference}


__all__ = ["Preset", "PresetError", "get_preset", "list_presets", "method_defaults", "ATTACK_FIELDS"]
