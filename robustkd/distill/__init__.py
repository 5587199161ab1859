"""Task-agnostic distillation: targets (ADR), balancing (MTARD), losses and training methods."""
from .balance import EntropyBalance, LossBalance
from .losses import distill_kl, soft_cross_entropy, trades_kl
from .methods import ADR, PGDAT, TRADES, Method, Progress, Standard, create_method
from .mtard import MTARD
from .targets import ADRRectifier, rectify

__all__ = ["ADR", "ADRRectifier", "EntropyBalance", "LossBalance", "MTARD", "Method", "PGDAT", "Progress", "Standard", "TRADES", "create_method",
           "distill_kl", "rectify", "soft_cross_entropy", "trades_kl"]
