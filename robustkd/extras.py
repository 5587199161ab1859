"""Optional dependencies, grouped by modality into the extras of ``pyproject.toml``.

Image-only installs carry neither torchaudio nor TextAttack. Code that needs an extra imports it
through :func:`require`, so a missing (or broken) extra is one line naming the ``pip install`` to
run, raised before any work, never an import traceback::

    sf = require("soundfile", "speech", "reading WAV files")
"""
from __future__ import annotations

import importlib
from types import ModuleType

#: The extra that provides each optional top-level module.
EXTRA_OF = {"torchaudio": "speech", "soundfile": "speech", "textattack": "text", "robustbench": "robustbench",
            "peft": "peft", "tensorboard": "tensorboard", "wandb": "wandb"}


class MissingExtraError(ValueError):
    """An optional dependency is not installed (or does not load); the message names the install command."""


def install_hint(extra: str) -> str:
    return f'pip install -e ".[{extra}]" (in the robustkd checkout)'


def require(module: str, extra: str | None = None, purpose: str | None = None) -> ModuleType:
    """Import ``module`` (e.g. ``"torchaudio.functional"``) or raise :class:`MissingExtraError`."""
    top = module.split(".")[0]
    extra = extra or EXTRA_OF.get(top, top)
    what = f"{purpose} needs {top}" if purpose else f"{top} is needed"
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        missing = getattr(exc, "name", None) or top
        raise MissingExtraError(f"{what}, which is not installed ({missing} missing): install the {extra!r} extra: "
                                f"{install_hint(extra)}") from exc
    except OSError as exc:  # e.g. a torchaudio build for another torch: its shared library does not load
        import torch

        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise MissingExtraError(f"{what}, but the installed {top} does not load with torch {torch.__version__} "
                                f"({first}): reinstall the {extra!r} extra so pip picks the matching build: "
                                f"{install_hint(extra)} --upgrade") from exc


__all__ = ["EXTRA_OF", "MissingExtraError", "install_hint", "require"]
