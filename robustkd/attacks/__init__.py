"""Attack plug-ins. Importing this package registers the built-in attacks."""
from . import autoattack, pgd  # noqa: F401 - registration
from . import text  # noqa: F401 - registration (text attacks; TextAttack is imported lazily)
from . import speech  # noqa: F401 - registration (waveform attacks)
from .autoattack import AutoAttack
from .base import Attack, attacks_for, create_attack, parse_attack_spec
from .pgd import PGD

__all__ = ["Attack", "AutoAttack", "PGD", "attacks_for", "create_attack", "parse_attack_spec"]
