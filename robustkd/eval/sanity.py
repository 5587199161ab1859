"""Sanity checks that run with every evaluation, so a broken evaluation cannot pass for a robust model.

Each check is reported ``pass``, ``fail`` or ``n/a`` (with the reason it does not apply). A failure
is printed loudly: it is the usual sign of gradient masking (a non-differentiable or saturating
model that PGD cannot attack, while a gradient-free attack can) or of a broken setup (a model left
in train mode, inputs outside the threat model's domain). The checks follow the field's
conventions (Carlini et al. 2019, "On evaluating adversarial robustness"; Croce & Hein 2020):

``eval_mode``        every module in eval mode, two identical forward passes give identical outputs, and
                     the evaluation left the model's parameters and buffers unchanged;
``budget_zero``      PGD with budget 0 gives the clean accuracy;
``monotone_budget``  accuracy never rises as the budget grows;
``strongest_vs_pgd`` the strongest attack (AutoAttack) is never weaker than PGD at the same budget;
``large_budget``     a budget covering the whole input domain drives accuracy to about 0 (images, audio), under
                     PGD with at least ``LARGE_BUDGET_STEPS`` steps whatever the curve's step count;
``probability_outputs`` the model returns logits, not probabilities (rows >= 0 summing to 1), since a
                     softmax on top of probabilities flattens the attacks' loss;
``input_gradient``   the loss has a non-zero gradient with respect to the input for most examples (a
                     ``detach()``, a no-grad or rounding pre-processing step, or saturated logits give none).

Every failure's detail ends with the fix to try.
"""
from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, TextIO

import torch
from torch import nn

from ..attacks.base import Attack
from ..task import Batch, Task
from .curves import BudgetSweep

Status = Literal["pass", "fail", "n/a"]
STRONG_ATTACKS = ("autoattack",)  # describe()["attack"] values held to be at least as strong as PGD
LARGE_BUDGET_MAX_ACCURACY = 0.05
#: PGD steps of the ``large_budget`` check at the least: with fewer, a budget covering the whole domain
#: takes steps so large that PGD jumps between corners and a healthy model can stay accurate.
LARGE_BUDGET_STEPS = 10


def large_budget_steps(curve_steps: int) -> int:
    """The steps of the ``large_budget`` check's PGD: the curve's when they are more, else
    :data:`LARGE_BUDGET_STEPS` (the check does not borrow a short curve's step count)."""
    return max(int(curve_steps), LARGE_BUDGET_STEPS)


@dataclass
class SanityCheck:
    """One check's outcome; ``values`` holds the numbers it looked at."""

    name: str
    status: Status
    detail: str
    values: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return self.status == "fail"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _tolerance(n: int, examples: float, floor: float) -> float:
    """Allow ``examples`` examples' worth of noise (random starts), never less than ``floor``."""
    return max(floor, examples / max(n, 1))


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every parameter and buffer, to tell afterwards whether the evaluation changed the model."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def changed_tensors(model: nn.Module, before: dict[str, torch.Tensor]) -> list[str]:
    """Names of the parameters and buffers that differ from ``before`` (e.g. batch-norm running
    statistics updated because an attack ran the model in train mode)."""
    now = model.state_dict()
    return [k for k, v in before.items() if k not in now or not torch.equal(now[k].detach().cpu(), v)]


def check_eval_mode(task: Task, model: nn.Module, batch: Batch, changed: list[str] | None = None) -> SanityCheck:
    """After ``model.eval()``: no module may still be training, and the output must be deterministic.
    Catches dropout or batch-norm left active (e.g. a submodule kept in a plain list, so ``eval()``
    never reaches it, or a ``train()`` override), which also makes attacks chase noise. ``changed``
    (from :func:`changed_tensors`) catches an evaluation that ran the model in train mode at some
    point and so altered it (batch-norm statistics)."""
    was_training = model.training
    model.eval()
    try:
        in_train = [name or "<root>" for name, m in model.named_modules() if m.training]
        with torch.no_grad():
            a = task.logits(model, batch).float()
            b = task.logits(model, batch).float()
        max_diff = float((a - b).abs().max()) if a.numel() else 0.0
        stochastic = not torch.allclose(a, b, rtol=1e-4, atol=1e-5)
    finally:
        model.train(was_training)
    values = {"modules_in_train_mode": in_train[:20], "num_modules_in_train_mode": len(in_train),
              "max_output_difference": max_diff, "model_was_training_before": was_training,
              "tensors_changed_by_evaluation": (changed or [])[:20]}
    problems = []
    if changed:
        problems.append(f"the evaluation changed {len(changed)} parameter/buffer tensor(s) of the model "
                        f"({', '.join(changed[:3])}{' ...' if len(changed) > 3 else ''}): something ran it in "
                        "train mode (batch-norm statistics updated), so the numbers mix two models")
    if in_train:
        problems.append(f"{len(in_train)} module(s) stay in train mode after model.eval(): "
                        f"{', '.join(in_train[:5])}{' ...' if len(in_train) > 5 else ''}")
    if stochastic:
        problems.append(f"two identical forward passes differ (max |difference| {max_diff:.3g}): dropout or "
                        "another random layer is active at evaluation")
    if problems:
        return SanityCheck("eval_mode", "fail", "; ".join(problems), values)
    return SanityCheck("eval_mode", "pass", "all modules in eval mode; outputs deterministic; model unchanged by "
                       "the evaluation" if changed is not None else "all modules in eval mode; outputs deterministic",
                       values)


def check_budget_zero(sweep: BudgetSweep, n: int) -> SanityCheck:
    """PGD at budget 0 must reproduce the clean accuracy: otherwise the attacked path differs from the
    clean one (inputs outside the threat model's domain get clamped, or the model is random)."""
    zero = [p for p in sweep.points if p["factor"] == 0]
    if not zero:
        return SanityCheck("budget_zero", "n/a", "the budget sweep has no budget-0 point")
    acc0, clean = zero[0]["accuracy"], sweep.clean_accuracy
    tol = _tolerance(n, 1, 0.005)
    values = {"budget_zero_accuracy": acc0, "clean_accuracy": clean, "tolerance": tol}
    if abs(acc0 - clean) > tol:
        return SanityCheck("budget_zero", "fail",
                           f"accuracy at budget 0 is {acc0:.4f} but clean accuracy is {clean:.4f}: the attacked "
                           "path changes unperturbed inputs (data outside the threat model's domain? a random "
                           "model?)", values)
    return SanityCheck("budget_zero", "pass", f"budget 0: {acc0:.4f} = clean {clean:.4f}", values)


def check_monotone(sweep: BudgetSweep, n: int) -> SanityCheck:
    """A larger ball contains the smaller one, so a working attack's accuracy cannot rise with the budget.
    A rise means the attack fails where it has more room: gradient masking, or a randomised model."""
    pts = sorted(sweep.points, key=lambda p: p["factor"])
    if sweep.large is not None:
        pts = pts + [{"factor": float("inf"), "x": None, "accuracy": sweep.large["accuracy"]}]
    if len(pts) < 2:
        return SanityCheck("monotone_budget", "n/a", "fewer than two budgets were evaluated")
    tol = _tolerance(n, 2, 0.01)
    rises = [(a["factor"], b["factor"], b["accuracy"] - a["accuracy"]) for a, b in zip(pts, pts[1:])
             if b["accuracy"] - a["accuracy"] > tol]
    values = {"accuracies": [p["accuracy"] for p in pts], "factors": [p["factor"] for p in pts],
              "tolerance": tol, "rises": [{"from_factor": a, "to_factor": b, "rise": r} for a, b, r in rises]}
    if rises:
        worst = max(rises, key=lambda t: t[2])
        return SanityCheck("monotone_budget", "fail",
                           f"accuracy rises by {worst[2]:.4f} from {worst[0]:g}x to {worst[1]:g}x the budget: the "
                           "attack does worse with more room (gradient masking or a random model)", values)
    return SanityCheck("monotone_budget", "pass", "accuracy never rises with the budget", values)


def check_large_budget(sweep: BudgetSweep, task: Task, max_accuracy: float = LARGE_BUDGET_MAX_ACCURACY) -> SanityCheck:
    """With a budget that reaches the whole input domain any non-constant model can be fooled; high
    accuracy there means PGD's gradients carry no information (gradient masking)."""
    if sweep.large is None:
        return SanityCheck("large_budget", "n/a", f"only for image and audio tasks with a bounded input domain "
                           f"({task.name!r} is {task.modality})")
    acc = sweep.large["accuracy"]
    steps = sweep.large.get("steps")
    values = {"accuracy": acc, "max_accuracy": max_accuracy, "threat": sweep.large["threat"], "steps": steps}
    if acc > max_accuracy:
        return SanityCheck("large_budget", "fail",
                           f"accuracy is still {acc:.4f} (> {max_accuracy}) under PGD-{steps} with a budget covering the "
                           "whole input domain: the gradients are masked or the attack is broken", values)
    return SanityCheck("large_budget", "pass", f"accuracy {acc:.4f} <= {max_accuracy} at the largest budget "
                       f"(PGD-{steps})", values)


def _budget_key(desc: Mapping[str, Any]) -> tuple:
    return (desc.get("norm"), round(float(desc.get("eps") or 0.0), 9), bool(desc.get("relative")),
            desc.get("snr_db"))


def check_strongest_vs_pgd(attacks: Mapping[str, Attack], robust_accuracy: Mapping[str, float], n: int,
                           sweep: BudgetSweep | None = None) -> SanityCheck:
    """AutoAttack (or any attack marked ``stronger_than_pgd``) must not leave more examples robust than
    PGD at the same budget; if it does, PGD's gradients are the ones being trusted wrongly."""
    descs = {name: atk.describe() for name, atk in attacks.items()}
    strong = [n_ for n_, d in descs.items()
              if d.get("attack") in STRONG_ATTACKS or getattr(attacks[n_], "stronger_than_pgd", False)]
    pgds = {n_: robust_accuracy[n_] for n_, d in descs.items() if d.get("attack") == "pgd"}
    if not strong:
        return SanityCheck("strongest_vs_pgd", "n/a", "no AutoAttack-class attack was evaluated "
                           "(add autoattack to the attacks)")
    tol = _tolerance(n, 1, 0.005)
    comparisons: list[dict[str, Any]] = []
    failures: list[str] = []
    for s in strong:
        refs = {p: acc for p, acc in pgds.items() if _budget_key(descs[p]) == _budget_key(descs[s])}
        if sweep is not None:
            for p in sweep.points:
                if _budget_key(p["threat"]) == _budget_key(descs[s]):
                    refs[f"curve pgd{sweep.attack.get('steps')} x{p['factor']:g}"] = p["accuracy"]
        for ref, acc in refs.items():
            gap = robust_accuracy[s] - acc
            comparisons.append({"strong": s, "pgd": ref, "strong_accuracy": robust_accuracy[s], "pgd_accuracy": acc})
            if gap > tol:
                failures.append(f"{s} leaves {robust_accuracy[s]:.4f} robust but {ref} only {acc:.4f}")
    values = {"comparisons": comparisons, "tolerance": tol}
    if not comparisons:
        return SanityCheck("strongest_vs_pgd", "n/a", "no PGD was evaluated at the strong attack's budget", values)
    if failures:
        return SanityCheck("strongest_vs_pgd", "fail", "; ".join(failures) + ": the strongest attack is weaker "
                           "than PGD (a broken attack setup, or PGD is not the attack to trust here)", values)
    much_stronger = [c for c in comparisons if c["pgd_accuracy"] - c["strong_accuracy"] > max(0.05, 2 * tol)]
    if much_stronger:
        c = max(much_stronger, key=lambda c: c["pgd_accuracy"] - c["strong_accuracy"])
        return SanityCheck("strongest_vs_pgd", "pass", f"the strongest attack is never weaker than PGD; note that "
                           f"{c['pgd']} leaves {c['pgd_accuracy']:.4f} robust where {c['strong']} leaves "
                           f"{c['strong_accuracy']:.4f}: PGD alone overstates robustness here (gradient masking, or "
                           "a flat low-confidence loss that cross-entropy PGD climbs poorly)", values)
    return SanityCheck("strongest_vs_pgd", "pass", "the strongest attack is never weaker than PGD", values)


PROBABILITY_FIX = ("Fix: evaluate the logits (remove the final softmax from the model, or wrap it to return "
                   "log-probabilities).")
GRADIENT_FIX = ("Fix: evaluate with an attack that needs no gradient of this model: BPDA (the identity, or a "
                "differentiable approximation, in the backward pass of the non-differentiable step), a transfer "
                "attack from a differentiable surrogate, or a gradient-free attack (Square); for saturated logits, "
                "a margin loss (pgd:loss=dlr / AutoAttack).")
MAX_ZERO_GRADIENT_FRACTION = 0.5


def check_probability_outputs(task: Task, model: nn.Module, batch: Batch) -> SanityCheck:
    """Flag a model whose outputs are probabilities: every row non-negative and summing to 1."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = task.logits(model, batch).float()
    finally:
        model.train(was_training)
    sums = out.sum(1)
    values = {"min_output": float(out.min()), "max_row_sum_error": float((sums - 1).abs().max())}
    if bool((out >= 0).all()) and bool(torch.allclose(sums, torch.ones_like(sums), atol=1e-3)):
        return SanityCheck("probability_outputs", "fail",
                           "the model outputs probabilities (every row is non-negative and sums to 1), not logits: "
                           "the attacks' cross-entropy applies a second softmax, whose gradients all but vanish, so "
                           f"the robust accuracy is overstated. {PROBABILITY_FIX}", values)
    return SanityCheck("probability_outputs", "pass", "the model outputs logits, not probabilities", values)


def input_gradient_status(task: Task, model: nn.Module, batch: Batch) -> tuple[str, float]:
    """``("none", 1.0)`` when the output is cut from the input's graph, else ``("ok" | "zero", fraction of
    the correctly classified examples -- the ones an attack must move -- whose cross-entropy gradient with
    respect to the attacked input is exactly zero)``. Sign-based attacks move on any non-zero gradient,
    however small, so only an exact zero masks them."""
    if getattr(model, "_robustkd_gradient_floor", False):
        return "none", 1.0  # robustness.gradient_floor was installed because the graph is cut
    was_training = model.training
    model.eval()
    try:
        base = task.perturbation_base(model, batch).detach()
        delta = torch.zeros_like(base, dtype=torch.float32 if not base.is_floating_point() else base.dtype,
                                 requires_grad=True)
        with torch.enable_grad():
            out = task.logits(model, batch, delta)
            if not out.requires_grad:
                return "none", 1.0
            labels = task.labels(batch)
            loss = torch.nn.functional.cross_entropy(out.float(), labels, reduction="sum")
            (grad,) = torch.autograd.grad(loss, delta, allow_unused=True)
    finally:
        model.train(was_training)
    if grad is None:
        return "none", 1.0
    correct = out.detach().argmax(1) == labels
    if not bool(correct.any()):
        return "ok", 0.0
    zero = (grad.flatten(1).abs().amax(1) == 0)[correct].float().mean().item()
    return ("zero" if zero > MAX_ZERO_GRADIENT_FRACTION else "ok"), zero


def check_input_gradient(task: Task, model: nn.Module, batch: Batch) -> SanityCheck:
    """Gradient attacks need a gradient: flag a model that gives none, or an exactly-zero one for most examples."""
    status, zero = input_gradient_status(task, model, batch)
    values = {"status": status, "zero_gradient_fraction": zero, "max_zero_gradient_fraction": MAX_ZERO_GRADIENT_FRACTION}
    if status == "none":
        return SanityCheck("input_gradient", "fail",
                           "the model's output does not depend differentiably on its input (a detach(), a no-grad or "
                           "non-differentiable pre-processing step such as a median filter): gradient attacks ran "
                           f"with a zero gradient and their robust accuracy means nothing. {GRADIENT_FIX}", values)
    if status == "zero":
        return SanityCheck("input_gradient", "fail",
                           f"the loss has an exactly zero input gradient for {zero:.0%} of the correctly classified "
                           "examples (quantised or "
                           "rounded inputs, a zero-gradient layer, or logits so large the softmax saturates): gradient "
                           f"attacks cannot move them. {GRADIENT_FIX}", values)
    return SanityCheck("input_gradient", "pass", f"non-zero input gradient for {1 - zero:.0%} of the correctly "
                       "classified examples", values)


def run_sanity_checks(task: Task, model: nn.Module, batch: Batch, sweep: BudgetSweep, attacks: Mapping[str, Attack],
                      robust_accuracy: Mapping[str, float], n: int, changed: list[str] | None = None,
                      large_max_accuracy: float = LARGE_BUDGET_MAX_ACCURACY) -> list[SanityCheck]:
    """All seven checks, in a fixed order."""
    return [check_eval_mode(task, model, batch, changed), check_budget_zero(sweep, n), check_monotone(sweep, n),
            check_strongest_vs_pgd(attacks, robust_accuracy, n, sweep),
            check_large_budget(sweep, task, large_max_accuracy), check_probability_outputs(task, model, batch),
            check_input_gradient(task, model, batch)]


def format_checks(checks: list[SanityCheck]) -> str:
    """One line per check; failures are impossible to miss."""
    lines = []
    for c in checks:
        mark = {"pass": "PASS", "fail": "FAIL", "n/a": "n/a "}[c.status]
        lines.append(f"  [{mark}] {c.name}: {c.detail}")
    return "\n".join(lines)


def announce(checks: list[SanityCheck], stream: TextIO | None = None) -> None:
    """Print the checks; when any failed, frame them in a banner on stderr."""
    stream = stream if stream is not None else sys.stderr
    failed = [c for c in checks if c.failed]
    if not failed:
        print("sanity checks:\n" + format_checks(checks), file=stream)
        return
    bar = "!" * 100
    print(f"\n{bar}\n!! {len(failed)} SANITY CHECK(S) FAILED -- do not trust the robust accuracy of this "
          f"evaluation.\n!! The usual causes: gradient masking, a model left in train mode, data outside the "
          f"threat model's domain.\n{bar}\n{format_checks(checks)}\n{bar}\n", file=stream)
