"""Evaluation: clean and robust accuracy (per attack and worst case), reports and plots."""
from .robustness import EvalResult, evaluate, evaluate_predictions
from .suite import Evaluation, run_evaluation

__all__ = ["EvalResult", "Evaluation", "evaluate", "evaluate_predictions", "run_evaluation"]
