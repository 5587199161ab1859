"""Task-agnostic distillation: targets (ADR), balancing (MTARD), losses and training methods."""
from .losses import distill_kl, soft_cross_entropy, trades_kl
from .methods import ADR, PGDAT, TRADES, Method, Progress, Standard, create_method
from .targets import ADRRectifier, rectify

__all__ = ["ADR", "ADRRectifier", "Method", "PGDAT", "Progress", "Standard", "TRADES", "create_method",
           "distill_kl", "rectify", "soft_cross_entropy", "trades_kl"]
