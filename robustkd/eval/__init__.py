"""Evaluation: clean and robust accuracy (per attack and worst case), reports and plots."""
from .robustness import EvalResult, evaluate, evaluate_predictions

__all__ = ["EvalResult", "evaluate", "evaluate_predictions"]
