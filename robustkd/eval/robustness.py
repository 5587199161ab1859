"""Clean and robust accuracy over a loader, for any task, model and set of attacks.

Robust accuracy under several attacks is the per-example worst case (an example counts as
robust only if every attack fails on it), as AutoAttack reports it.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..attacks.base import Attack, build_attacks, victim_mode
from ..distributed import num_processes, process_index
from ..task import Task

_NO_GRAD_ERRORS = ("does not require grad", "appears to not have been used in the graph")


def is_no_input_gradient_error(exc: BaseException) -> bool:
    """True for autograd's errors when a model's output does not depend differentiably on its input."""
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _NO_GRAD_ERRORS)


def gradient_floor(model: nn.Module) -> Any:
    """Make a model whose output is cut from its input's graph (``detach()``, a no-grad median filter)
    return a *zero* input gradient instead of crashing gradient attacks: a forward hook adds
    ``0 * sum(input)`` to the output (values unchanged). The attacks then find nothing, which the
    ``input_gradient`` sanity check reports as a failure. Returns the hook handle (its ``remove()``
    takes the hook off again); None when the model already has one."""
    if getattr(model, "_robustkd_gradient_floor", False):
        return None

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        grads = [t for t in (*args, *kwargs.values()) if torch.is_tensor(t) and t.requires_grad]
        if not grads:
            return output
        zero = (grads[0].float() * 0).sum()
        for t in grads[1:]:
            zero = zero + (t.float() * 0).sum()
        if torch.is_tensor(output):
            return output + zero.to(output.dtype)
        if hasattr(output, "logits"):
            output.logits = output.logits + zero.to(output.logits.dtype)
            return output
        if isinstance(output, tuple) and output and torch.is_tensor(output[0]):
            return (output[0] + zero.to(output[0].dtype), *output[1:])
        return output

    handle = model.register_forward_hook(hook, with_kwargs=True)
    # a plain attribute (nn.Module.__setattr__ would store a bool the same way; its annotation takes tensors/modules)
    object.__setattr__(model, "_robustkd_gradient_floor", True)
    remove = handle.remove

    def _remove() -> None:
        remove()
        object.__setattr__(model, "_robustkd_gradient_floor", False)

    handle.remove = _remove  # type: ignore[method-assign]
    return handle


@dataclass
class EvalResult:
    """Per-example outcomes; ``summary()`` gives accuracies as fractions in [0, 1]."""

    labels: Tensor
    clean_probs: Tensor
    adv_probs: dict[str, Tensor] = field(default_factory=dict)

    def clean_correct(self) -> Tensor:
        return self.clean_probs.argmax(1) == self.labels

    def robust_correct(self, name: str) -> Tensor:
        return self.adv_probs[name].argmax(1) == self.labels

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"num_examples": int(self.labels.numel()),
                               "clean_accuracy": self.clean_correct().float().mean().item()}
        if self.adv_probs:
            out["robust_accuracy"] = {n: self.robust_correct(n).float().mean().item() for n in self.adv_probs}
            if len(self.adv_probs) > 1:
                worst = torch.stack([self.robust_correct(n) for n in self.adv_probs]).all(0)
                out["worst_case_accuracy"] = worst.float().mean().item()
        return out


def attack_label(spec: str, attack: Any = None) -> str:
    """A short name for progress bars: ``pgd20`` -> ``PGD-20``, ``autoattack:...`` -> ``AutoAttack``."""
    import re

    head = spec.split(":", 1)[0].lower()
    if m := re.fullmatch(r"pgd(\d+)", head):
        return f"PGD-{m.group(1)}"
    if head == "pgd":
        steps = getattr(attack, "steps", None)
        return f"PGD-{steps}" if steps else "PGD"
    if head.startswith("budget_x"):
        return f"PGD at {head[8:]}x budget"
    names = {"autoattack": "AutoAttack", "fgsm": "FGSM", "large": "PGD at the whole-domain budget"}
    return names.get(head, spec if len(spec) <= 24 else spec[:21] + "...")


def evaluate_predictions(task: Task, model: nn.Module, loader, attacks: Mapping[str, Attack],
                         accelerator: Any = None, progress: bool = False, *, seed: int | None = None,
                         split_processes: bool = False, label: str | None = None) -> EvalResult:
    """Run the model clean and under each attack; per-example probabilities in loader order.

    ``accelerator``: the loader is already sharded by Accelerate; outputs are gathered with
    ``gather_for_metrics`` (the trainer's evaluation). ``split_processes``: the loader is the whole
    set on every process; process ``r`` of ``n`` takes batches ``r, r + n, ...`` and the per-example
    results are gathered on every process in loader order. ``seed``: the random state is set to
    ``seed + batch index`` before each batch's attacks, so a batch's random starts do not depend on
    which process runs it or on the batches before it: results are identical to one process.
       ``label`` names the model on the progress bar (``PGD-20 · EMA``); the bar counts one step per attack
    per batch, so a slow attack (AutoAttack) shows its name while it runs.
    """
    from tqdm.auto import tqdm

    if split_processes and accelerator is not None:
        raise ValueError("split_processes splits an unsharded loader; an accelerator-prepared loader is sharded already")
    n_proc, rank = (num_processes(), process_index()) if split_processes else (1, 0)
    show = progress and (accelerator is None or accelerator.is_local_main_process) and rank == 0
    floors: list[Any] = []  # set when the model turns out to give no input gradient
    suffix = f" \u00b7 {label}" if label else ""
    try:
        total = len(loader)
    except TypeError:
        total = None
    bar = tqdm(total=None if total is None else -(-total // n_proc) * (1 + len(attacks)), leave=False,
               disable=not show, desc=f"clean{suffix}", unit="step")

    def step(name: str | None) -> None:  # before each attack: its name; after the batch's last, the next batch
        bar.update(1)
        if name is not None:
            bar.set_description_str(f"{attack_label(name, attacks[name])}{suffix}", refresh=True)
        else:
            bar.set_description_str(f"clean{suffix}", refresh=False)

    try:
        with victim_mode(model, "eval"):  # each attack sets (and restores) its own mode on top
            rows = [_evaluate_batch(task, model, i, batch, attacks, accelerator, seed, floors,
                                    on_step=step if show else None)
                    for i, batch in enumerate(loader) if i % n_proc == rank]
    finally:
        bar.close()
        for handle in floors:
            handle.remove()
    if n_proc > 1:
        from accelerate.utils import gather_object

        rows = sorted(gather_object(rows), key=lambda r: r[0])
    if not rows:
        raise ValueError("the evaluation loader gave no batches")
    return EvalResult(torch.cat([r[1] for r in rows]), torch.cat([r[2] for r in rows]),
                      {k: torch.cat([r[3][k] for r in rows]) for k in attacks})


def _evaluate_batch(task: Task, model: nn.Module, index: int, batch: Any, attacks: Mapping[str, Attack],
                    accelerator: Any, seed: int | None, floors: list[Any] | None = None,
                    on_step: Any = None) -> tuple[int, Tensor, Tensor, dict[str, Tensor]]:
    """One batch: labels, clean and per-attack probabilities (gathered across an accelerator's processes).
    A model with no input gradient gets :func:`gradient_floor` (its handle appended to ``floors``) instead
    of crashing the attack."""
    if index == 0:
        task.validate_batch(batch)  # inputs outside the task's domain (0-255 images) are refused, not attacked
    if seed is not None:
        torch.manual_seed(seed + index)
    y = task.labels(batch)
    with torch.no_grad():
        clean = task.logits(model, batch).float().softmax(1)
    advs: dict[str, Tensor] = {}
    names = list(attacks)
    if on_step is not None:
        on_step(names[0] if names else None)  # the clean pass is done
    for k, (name, attack) in enumerate(attacks.items()):
        if on_step is not None and k:
            on_step(name)
        try:
            result = attack(model, batch, y)
        except RuntimeError as exc:  # no input gradient: attack with a zero gradient; sanity checks flag it
            handle = gradient_floor(model) if is_no_input_gradient_error(exc) else None
            if handle is None:
                raise
            if floors is not None:
                floors.append(handle)
            result = attack(model, batch, y)
        with torch.no_grad():
            advs[name] = task.logits(model, *result).float().softmax(1)
    if on_step is not None and names:
        on_step(None)  # the last attack is done
    if accelerator is not None:
        y, clean = accelerator.gather_for_metrics(y), accelerator.gather_for_metrics(clean)
        advs = {k: accelerator.gather_for_metrics(v) for k, v in advs.items()}
    return index, y.cpu(), clean.cpu(), {k: v.cpu() for k, v in advs.items()}


def resolve_attacks(specs: list[str] | tuple[str, ...], task: Task, **defaults: Any) -> dict[str, Attack]:
    """Build every attack a run will use *before* it trains, so that a typo, a malformed option or a
    missing offline resource fails at once in one line rather than after all training.
    ``textattack:<recipe>`` specs are checked (known recipe, its offline resources present) but not built;
    the others are returned, built (with ``defaults`` such as ``eps=``, ``norm=``), by spec."""
    from ..registry import RegistryError

    specs = [s.strip() for s in specs if s and s.strip()]
    text_specs = [s for s in specs if s.split(":", 1)[0].lower() == "textattack"]
    built: dict[str, Attack] = {}
    for spec in (s for s in specs if s not in text_specs):
        try:
            built.update(build_attacks([spec], task, **defaults))
        except RegistryError:
            raise
        except (TypeError, ValueError, KeyError) as exc:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(msg if spec in msg else f"bad attack spec {spec!r}: {msg}") from exc
    for spec in text_specs:
        from ..attacks.text import missing_resources
        from ..extras import require

        require("textattack", "text", f"the attack {spec!r}")  # before any work
        recipe = spec.split(":", 1)[1] if ":" in spec else ""
        missing = missing_resources(recipe)  # an unknown recipe raises ValueError naming the known ones
        if missing:
            needs = "; ".join(f"{r.name} ({r.how})" for r in missing)
            raise ValueError(f"the TextAttack recipe {recipe!r} needs what this machine lacks: {needs}. Pick a recipe "
                             "that works offline (deepwordbug, pruthi, input-reduction) or 'none'")
    return built


def evaluate(task: Task, model: nn.Module, loader=None, attacks: dict[str, Attack] | list[str] | None = None,
             accelerator: Any = None, progress: bool = False, label: str | None = None) -> dict[str, Any]:
    """Clean accuracy, robust accuracy per attack and their worst case, as fractions in [0, 1].
    Without ``loader``: the task's whole test split. The full suite with calibration, sanity checks
    and a report is :func:`robustkd.eval.run_evaluation`."""
    if loader is None:
        loader = task.dataloader("test", 128, shuffle=False)
    if attacks is None:
        attacks = list(task.default_eval_attacks)
    if not isinstance(attacks, dict):
        attacks = build_attacks(attacks, task)
    return evaluate_predictions(task, model, loader, attacks, accelerator, progress, label=label).summary()
