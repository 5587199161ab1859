"""Attack checks: the contracts an attack plug-in must honour (the result's form, labels, threat model,
no side effects, it beats random noise, soft targets, reproducibility, frozen victims)."""
from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..task import Adversarial, Batch, Task
from ..threat import ThreatModel
from .kit import (
    Check,
    ConformanceReport,
    _ball_fraction,
    _batch_clone,
    _check_logits,
    _describe,
    _device_of,
    _fail,
    _in_ball,
    _mode_kept,
    _same_batch,
    _to,
)


# -- attacks ---------------------------------------------------------------------------------
def _attack_check_fns(get_attack: Callable[[], Any], task: Task, model: nn.Module, batch: Batch,
                      seed: int) -> list[tuple[str, Callable[[], str]]]:
    labels = task.labels(batch)

    def threat_of(attack: Any) -> ThreatModel:
        threat = getattr(attack, "threat", None)
        return threat if isinstance(threat, ThreatModel) else task.threat_model()

    def run(attack: Any, targets: Tensor | None = None, victim: nn.Module | None = None) -> Adversarial:
        torch.manual_seed(seed)
        out = attack(victim if victim is not None else model, batch, labels if targets is None else targets)
        if not isinstance(out, tuple) or len(out) != 2:
            _fail(f"the attack returned {type(out).__name__}; it must return Adversarial(batch, delta)")
        adv_batch, delta = out
        if not isinstance(adv_batch, dict):
            _fail(f"the attack's batch is {type(adv_batch).__name__}, not a dict")
        return Adversarial(adv_batch, delta)

    def construct() -> str:
        attack = get_attack()
        if not callable(attack):
            _fail(f"the factory built {type(attack).__name__}, which is not callable")
        describe = getattr(attack, "describe", None)
        if describe is None:
            _fail("the attack has no describe() (reports record every attack's parameters)")
        desc = describe()
        if not isinstance(desc, dict):
            _fail(f"describe() returned {type(desc).__name__}, not a dict")
        json.dumps(desc)
        return f"{_describe(attack)}: {json.dumps(desc)[:160]}"

    def returns_adversarial() -> str:
        adv = run(get_attack())
        n = task.batch_size(batch)
        if adv.delta is None:
            if adv.batch is batch:
                _fail("the attack returned the input batch itself and no delta: return a new batch")
            task.validate_batch(adv.batch)
            if task.batch_size(adv.batch) != n:
                _fail(f"the adversarial batch holds {task.batch_size(adv.batch)} examples, the clean one {n}")
            _check_logits(task, task.logits(model, adv.batch), n, "task.logits(model, adversarial batch)")
            return "a new, valid batch (discrete attack)"
        x = task.perturbation_base(model, batch)
        if not isinstance(adv.delta, Tensor) or adv.delta.shape != x.shape:
            _fail(f"delta has shape {tuple(getattr(adv.delta, 'shape', ()))}; it must match the attack space "
                  f"task.perturbation_base(model, batch) of shape {tuple(x.shape)}")
        if adv.delta.requires_grad:
            _fail("the returned delta still requires grad: detach it (it would keep the attack's graph alive)")
        _check_logits(task, task.logits(model, *adv), n, "task.logits(model, *adversarial)")
        return f"Adversarial(batch, delta) with delta {tuple(adv.delta.shape)}"

    def labels_unchanged() -> str:
        adv = run(get_attack())
        if not torch.equal(task.labels(adv.batch), labels):
            _fail("the adversarial batch has other labels than the clean one: an attack may change inputs only")
        return "labels kept"

    def in_threat_model() -> str:
        attack = get_attack()
        adv = run(attack)
        if adv.delta is None:
            return "discrete attack: no delta to measure"
        threat = threat_of(attack)
        x = task.perturbation_base(model, adv.batch).detach()
        if (err := _in_ball(threat, x, adv.delta, task.perturbation_mask(adv.batch))) is not None:
            _fail(err)
        if task.input_domain is not None:
            lo, hi = task.input_domain
            z = x + adv.delta
            if float(z.min()) < lo - 1e-5 or float(z.max()) > hi + 1e-5:
                _fail(f"x + delta spans [{float(z.min()):.4g}, {float(z.max()):.4g}], outside the task's input "
                      f"domain [{lo:g}, {hi:g}]")
        return (f"uses {_ball_fraction(threat, x, adv.delta):.3f} of the {threat.norm} ball (eps={threat.eps:g}"
                f"{', relative' if threat.relative else ''}), inside domain {threat.domain}")

    def no_side_effects() -> str:
        attack = get_attack()
        clean = _batch_clone(batch)
        params = [p.detach().clone() for p in model.parameters()]
        grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
        buffers = [b.detach().clone() for b in model.buffers()]
        for training in (True, False):
            model.train(training)
            run(attack)
            if model.training != training:
                _fail(f"the attack left the model in {'train' if model.training else 'eval'} mode; restore the "
                      f"mode it was given")
        model.eval()
        if (key := _same_batch(batch, clean)) is not None:
            _fail(f"the attack modified the input batch in place ({key!r}); return a new batch or a delta")
        if not all(torch.equal(a, p) for a, p in zip(params, model.parameters())):
            _fail("the attack changed the model's parameters")
        for g0, p in zip(grads, model.parameters()):
            g = p.grad
            if (g0 is None) != (g is None) or (g0 is not None and g is not None and not torch.equal(g0, g)):
                _fail("the attack left gradients in the model's parameters (use torch.autograd.grad on delta, "
                      "or zero them): they would leak into the training step")
        del buffers  # batch-norm statistics may move in train mode, as they do in PGD-AT
        return "batch, parameters, gradients and train/eval mode untouched"

    def beats_random_noise() -> str:
        attack = get_attack()
        adv = run(attack)
        with torch.no_grad():
            clean_loss = F.cross_entropy(task.logits(model, batch), labels, reduction="none")
            adv_loss = F.cross_entropy(task.logits(model, *adv), labels, reduction="none")
        if adv.delta is None:  # discrete: no ball to sample from, compare with the clean input
            moved = (adv_loss - clean_loss).abs() > 0
            reference, what = clean_loss, "the clean input"
        else:
            # A few steps on a non-linear model may end below the clean loss (a random start can lower
            # it); what any ascent must beat is random noise of the same budget. A sign error does not.
            moved = adv.delta.flatten(1).abs().amax(1) > 0
            threat, x = threat_of(attack), task.perturbation_base(model, batch).detach()
            mask = task.perturbation_mask(batch)
            torch.manual_seed(seed + 1)
            with torch.no_grad():
                reference = torch.stack([F.cross_entropy(task.logits(model, batch, threat.init(x, "uniform", mask)),
                                                         labels, reduction="none") for _ in range(4)]).mean(0)
            what = "4 random points of its ball"
        n = int(moved.sum())
        if n == 0:
            return "moved no example (the model is fooled everywhere already, or the attack gave up): nothing to compare"
        rose = int((adv_loss[moved] >= reference[moved] - 1e-6).sum())
        summary = (f"loss above {what} on {rose} of the {n} examples moved; mean cross-entropy clean "
                   f"{clean_loss.mean().item():.4f}, reference {reference.mean().item():.4f}, attack "
                   f"{adv_loss.mean().item():.4f}")
        if rose < n / 2:
            _fail(f"{summary}: the attack is not maximising the loss (wrong sign, or the wrong targets)")
        return summary

    def soft_targets() -> str:
        attack = get_attack()
        soft = torch.full((len(labels), task.num_classes), 0.1 / max(task.num_classes - 1, 1), device=labels.device)
        soft.scatter_(1, labels[:, None], 0.9)
        try:
            adv = run(attack, targets=soft)
        except (ValueError, TypeError) as exc:
            return f"refuses soft targets clearly ({type(exc).__name__}: {str(exc)[:80]}); not usable as ADR's training attack"
        if adv.delta is not None:
            x = task.perturbation_base(model, adv.batch).detach()
            if (err := _in_ball(threat_of(attack), x, adv.delta, task.perturbation_mask(adv.batch))) is not None:
                _fail(f"with soft targets: {err}")
        return "accepts soft target distributions (usable by ADR)"

    def reproducible() -> str:
        attack = get_attack()
        a, b = run(attack), run(attack)
        if (a.delta is None) != (b.delta is None):
            _fail("two runs under the same seed return different kinds of result")
        if a.delta is not None and b.delta is not None and not torch.allclose(a.delta, b.delta, atol=1e-6):
            _fail(f"two runs after torch.manual_seed({seed}) differ by {float((a.delta - b.delta).abs().max()):.3g}: "
                  f"draw randomness from torch's RNG (or a seed the attack is given)")
        if a.delta is None and _same_batch(a.batch, b.batch) is not None:
            _fail(f"two runs after torch.manual_seed({seed}) return different batches")
        return f"same result under torch.manual_seed({seed})"

    def frozen_victim() -> str:
        from ..teachers import FrozenTeacher

        teacher = FrozenTeacher(copy.deepcopy(model))
        adv = run(get_attack(), victim=teacher.model)
        if adv.delta is not None:
            x = task.perturbation_base(teacher.model, adv.batch).detach()
            if (err := _in_ball(threat_of(get_attack()), x, adv.delta, task.perturbation_mask(adv.batch))) is not None:
                _fail(f"against a frozen teacher: {err}")
        if teacher.model.training:
            _fail("the attack switched a frozen (eval-mode) teacher into train mode")
        return "attacks a frozen teacher (no parameter gradients) as well as a student"

    return [("construct", construct), ("returns_adversarial", returns_adversarial),
            ("labels_unchanged", labels_unchanged), ("in_threat_model", in_threat_model),
            ("no_side_effects", no_side_effects), ("beats_random_noise", beats_random_noise),
            ("soft_targets", soft_targets), ("reproducible", reproducible), ("frozen_victim", frozen_victim)]


def attack_checks(attack: Any, task: Task, model: nn.Module, *, batch: Batch | None = None, batch_size: int = 8,
                  seed: int = 0) -> list[Check]:
    """The attack checks one by one (for ``pytest.mark.parametrize``); see :func:`check_attack`."""
    from ..attacks.base import create_attack

    if isinstance(attack, str):
        spec = attack
        factory: Callable[[], Any] = lambda: create_attack(spec, task)  # noqa: E731
        label = f"attack {spec!r}"
    elif isinstance(attack, type) or (callable(attack) and not hasattr(attack, "describe")
                                      and not isinstance(attack, nn.Module)):
        factory = lambda: attack(task)  # noqa: E731 - a class or factory function taking the task
        label = f"attack {getattr(attack, '__qualname__', repr(attack))}"
    else:
        factory = lambda: attack  # noqa: E731 - an instance
        label = f"attack {_describe(attack)}"
    if batch is None:
        loader = task.dataloader("test", batch_size, shuffle=False, seed=seed)
        batch = next(iter(loader))
    batch = _to(batch, _device_of(model))
    model.eval()
    subject = f"{label} on task {getattr(task, 'name', '?')!r}"
    return [Check(name, fn, subject) for name, fn in _attack_check_fns(factory, task, model, batch, seed)]


def check_attack(attack: Any, task: Task, model: nn.Module, *, batch: Batch | None = None, batch_size: int = 8,
                 seed: int = 0, raise_on_failure: bool = True) -> ConformanceReport:
    """Run every attack check and report each; raise :class:`ConformanceError` if any fails.

    ``attack``: an attack instance, a class or factory called as ``factory(task)``, or a registered spec
    string (``"pgd:steps=5"``). Checks: it returns ``Adversarial(batch, delta)``, keeps labels, stays in
    the threat model and input domain, has no side effects, raises the loss more than random noise of its budget, handles soft targets (or
    refuses them clearly), is reproducible under a seed, and attacks a frozen teacher.
    """
    with _mode_kept(model):
        checks = attack_checks(attack, task, model, batch=batch, batch_size=batch_size, seed=seed)
        report = ConformanceReport(checks[0].subject, [c.run() for c in checks])
    return report.raise_for_failures() if raise_on_failure else report
