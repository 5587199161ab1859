"""Attack plug-ins. Importing this package registers the built-in attacks."""
from . import (  # noqa: F401 - registration
                   autoattack,
                   pgd,
                   speech,  # noqa: F401 - registration (waveform attacks)
                   text,  # noqa: F401 - registration (text attacks; TextAttack is imported lazily)
)
from .autoattack import AutoAttack
from .base import (
                   Attack,
                   AttackSpecError,
                   EmbeddingInputs,
                   WaveformInputs,
                   attacks_for,
                   build_attacks,
                   create_attack,
                   parse_attack_spec,
                   split_attack_specs,
                   victim_mode,
)
from .pgd import PGD

__all__ = ["Attack", "AttackSpecError", "AutoAttack", "EmbeddingInputs", "PGD", "WaveformInputs", "attacks_for",
           "build_attacks", "create_attack", "parse_attack_spec", "split_attack_specs", "victim_mode"]
