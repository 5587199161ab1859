"""Attack plug-ins. Importing this package registers the built-in attacks."""
from . import autoattack, pgd  # noqa: F401 - registration
from . import text  # noqa: F401 - registration (text attacks; TextAttack is imported lazily)
from . import speech  # noqa: F401 - registration (waveform attacks)
from .autoattack import AutoAttack
from .base import (Attack, AttackSpecError, EmbeddingInputs, WaveformInputs, attacks_for, build_attacks,
                   create_attack, parse_attack_spec, split_attack_specs, victim_mode)
from .pgd import PGD

__all__ = ["Attack", "AttackSpecError", "AutoAttack", "EmbeddingInputs", "PGD", "WaveformInputs", "attacks_for",
           "build_attacks", "create_attack", "parse_attack_spec", "split_attack_specs", "victim_mode"]
