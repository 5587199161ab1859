"""Calibration and clean/adversarial consistency: the two properties ADR is built on.

Everything here works on the per-example probabilities an :class:`~robustkd.eval.robustness.EvalResult`
already holds, so no model is run twice. Expected calibration error comes from torchmetrics; the
reliability-diagram bins use the same binning so the two always agree.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.functional.classification import multiclass_calibration_error

from .robustness import EvalResult

DEFAULT_BINS = 15


def expected_calibration_error(probs: Tensor, labels: Tensor, n_bins: int = DEFAULT_BINS) -> float:
    """Top-label ECE (L1, equal-width confidence bins), via torchmetrics."""
    if probs.numel() == 0:
        raise ValueError("expected_calibration_error needs at least one example")
    return float(multiclass_calibration_error(probs.float(), labels.long(), num_classes=probs.shape[1],
                                              n_bins=n_bins, norm="l1"))


def reliability_bins(probs: Tensor, labels: Tensor, n_bins: int = DEFAULT_BINS) -> dict[str, list]:
    """Per confidence bin: edges, example count, mean confidence and accuracy (``None`` when empty).

    Bins are ``[lo, hi)`` as in torchmetrics, so the count-weighted gap
    ``sum(count * |accuracy - confidence|) / N`` reproduces :func:`expected_calibration_error`; the one
    difference is that a confidence of exactly 1 joins the last bin here, where torchmetrics keeps it apart.
    """
    confidence, predicted = probs.float().max(1)
    correct = (predicted == labels).float()
    edges = torch.linspace(0, 1, n_bins + 1)
    index = (torch.bucketize(confidence, edges, right=True) - 1).clamp(0, n_bins - 1)
    counts, conf, acc = [], [], []
    for b in range(n_bins):
        in_bin = index == b
        n = int(in_bin.sum())
        counts.append(n)
        conf.append(float(confidence[in_bin].mean()) if n else None)
        acc.append(float(correct[in_bin].mean()) if n else None)
    return {"edges": [float(e) for e in edges], "count": counts, "confidence": conf, "accuracy": acc}


def consistency(clean_probs: Tensor, adv_probs: Tensor) -> dict[str, float]:
    """Mean KL(clean || adversarial) in nats and the fraction of examples whose prediction is unchanged."""
    p = clean_probs.float().clamp_min(1e-12)
    q = adv_probs.float().clamp_min(1e-12)
    kl = F.kl_div(q.log(), p, reduction="none", log_target=False).sum(1)
    return {"kl_clean_adv": float(kl.mean()),
            "agreement": float((clean_probs.argmax(1) == adv_probs.argmax(1)).float().mean())}


def confidence_split(probs: Tensor, labels: Tensor) -> dict[str, float | None]:
    """Average top-class confidence on correct and on wrong predictions (``None`` when there are none):
    a robust, well-calibrated model is unsure where it errs."""
    confidence, predicted = probs.float().max(1)
    right = predicted == labels
    return {"confidence_correct": float(confidence[right].mean()) if right.any() else None,
            "confidence_wrong": float(confidence[~right].mean()) if (~right).any() else None}


def worst_case_probs(result: EvalResult) -> Tensor:
    """Per example, the adversarial distribution of the attack that hurt it most: the first attack
    that fools it, else the one with the lowest true-class probability (AutoAttack's worst case)."""
    if not result.adv_probs:
        raise ValueError("no attack was evaluated, so there is no worst case")
    stacked = torch.stack(list(result.adv_probs.values()))  # (attacks, N, C)
    y = result.labels
    fooled = stacked.argmax(2) != y[None]
    true_prob = stacked.gather(2, y[None, :, None].expand(stacked.shape[0], -1, 1)).squeeze(2)
    score = true_prob - 2.0 * fooled.float()  # any fooling attack beats every non-fooling one
    pick = score.argmin(0)
    return stacked[pick, torch.arange(len(y))]


def distribution_metrics(probs: Tensor, labels: Tensor, n_bins: int = DEFAULT_BINS) -> dict[str, Any]:
    """Accuracy, ECE, reliability bins and confidence on correct vs wrong for one set of predictions."""
    return {"accuracy": float((probs.argmax(1) == labels).float().mean()),
            "ece": expected_calibration_error(probs, labels, n_bins),
            **confidence_split(probs, labels),
            "reliability": reliability_bins(probs, labels, n_bins)}


def compute_metrics(result: EvalResult, n_bins: int = DEFAULT_BINS) -> dict[str, Any]:
    """Every number of the report's ``metrics`` section: ``clean``, ``adversarial`` (per attack) and
    ``worst_case`` (over all attacks, per example), each with calibration; the adversarial ones
    also with consistency to the clean predictions."""
    out: dict[str, Any] = {"num_examples": int(result.labels.numel()),
                           "clean": distribution_metrics(result.clean_probs, result.labels, n_bins),
                           "adversarial": {}}
    for name, probs in result.adv_probs.items():
        out["adversarial"][name] = {**distribution_metrics(probs, result.labels, n_bins),
                                    **consistency(result.clean_probs, probs)}
    if result.adv_probs:
        worst = worst_case_probs(result)
        out["worst_case"] = {**distribution_metrics(worst, result.labels, n_bins),
                             **consistency(result.clean_probs, worst)}
        # the worst case's accuracy is by definition the per-example "all attacks fail" accuracy
        all_fail = torch.stack([result.robust_correct(n) for n in result.adv_probs]).all(0)
        assert abs(out["worst_case"]["accuracy"] - float(all_fail.float().mean())) < 1e-9
    return out
