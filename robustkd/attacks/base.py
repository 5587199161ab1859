"""The attack contract, the capabilities attacks ask of tasks, and the one attack-spec language.

An attack is an object you call, as in torchattacks: ``adv = attack(model, batch, targets)``
returns an :class:`~robustkd.task.Adversarial` ``(batch, delta)``; ``task.logits(model, *adv)``
evaluates any model on it. ``targets`` are hard labels or soft distributions. Subclasses implement
:meth:`Attack.perturb`; ``__call__`` puts the victim in the attack's ``mode`` (``"eval"`` by default,
``"train"`` where a method attacks in train mode as ADR's reference does) and restores it afterwards,
so no caller switches modes itself.

The attack-spec language
------------------------
Every flag and API that takes attacks (``robustkd eval --attacks``, recipe ``--final-attacks``,
``TrainConfig.eval_attacks``, ``RobustConfig.eval_attacks``, :func:`run_evaluation`) reads this one
language through :func:`split_attack_specs` and :func:`create_attack`:

* one spec is ``NAME`` or ``NAME:OPTIONS``; ``OPTIONS`` are ``key=value`` pairs separated by ``,``;
  a first option without ``=`` names a sub-recipe (``textattack:deepwordbug``);
* ``NAMEN`` is short for ``NAME:steps=N`` when ``NAME`` is registered (``pgd20``, ``snr_pgd7``);
* values are typed by the attack's type hints (``typing.get_type_hints`` of its ``__init__`` or factory
  function; for options it passes on through ``**kwargs``, of its base classes' ``__init__`` or of the
  attack class a factory function returns): integers
  (``steps=50``), numbers and fractions (``eps=8/255``), booleans (``true``/``false``), strings
  (``loss=margin``), ``Literal`` choices (``version=plus``), ``+``-joined lists and tuples
  (``attacks=apgd-ce+square``); ``X | None`` is ``X``, and a union takes the first of its types the value
  parses as (in that order). A value of the wrong type (``steps=three``, ``steps=1.5``,
  ``version=best``) is refused in one line naming the spec, the option and what it must be; an option
  of a type a spec cannot write (a callable, a threat model) is refused too. An option no signature
  types (passed on to the task's threat model, e.g. ``snr_db=30``, or annotated ``Any``) is read as
  a boolean, integer, number or text, and checked where it is used;
* ``mode=train|eval`` sets the mode the victim is in while the attack runs (every attack);
* a list of specs is separated by ``;`` or ``,`` -- the two are the same everywhere -- and a
  ``key=value`` part after a spec with options continues that spec:
  ``pgd:steps=50,eps=4/255,autoattack`` == ``pgd:steps=50,eps=4/255;autoattack``.

``create_attack(spec, task, **defaults)`` applies ``defaults`` unless the spec names them: the run's
threat model (``eps=``/``norm=``, ``snr_db=``, ...) as one budget -- to an attack whose spec names no budget
of its own and that takes all of those options, by name or by passing them to the task's threat model
(``pgd``, ``fgsm``; ``pgd_l2`` and ``snr_pgd`` keep their own) -- and any other option (``steps=``,
``mode=``) one by one, to attacks that take it. A threat-model option a spec names reaches the attack's
threat model or is refused in one line naming the option and the attack (``snr_pgd:eps=0.01``: the SNR
attack's budget is ``snr_db``); it is never dropped.
"""
from __future__ import annotations

import contextlib
import inspect
import re
import types
import typing
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, MutableSequence, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from ..registry import ATTACKS, RegistryError
from ..task import Adversarial, Batch, Task
from ..threat import ThreatModel, eps_from_pixels

MODES = ("train", "eval")


# -- capabilities: what an attack needs from a task (tasks provide them structurally) ----------
@runtime_checkable
class EmbeddingInputs(Protocol):
    """Inputs are token ids that the victim embeds: attacks perturb or swap token embeddings.
    Provided by the built-in text task."""

    tokenizer: Any
    max_length: int

    def encode(self, texts: list[str], labels: Any = None) -> Batch: ...

    def embeddings(self, model: nn.Module, input_ids: Tensor) -> Tensor: ...

    def special_mask(self, input_ids: Tensor) -> Tensor: ...


@runtime_checkable
class WaveformInputs(Protocol):
    """Inputs are waveforms measured by signal-to-noise ratio: ``snr_threat(snr_db)`` is the task's SNR
    ball (``snr_db=None``: its default budget). Provided by the built-in speech tasks."""

    sample_rate: int | None

    def snr_threat(self, snr_db: float | None = None) -> ThreatModel: ...


def embedding_inputs(task: Task) -> EmbeddingInputs:
    """``task`` as the :class:`EmbeddingInputs` it provides (a task without it is refused, naming it)."""
    if not isinstance(task, EmbeddingInputs):
        raise RegistryError(f"the task {task.name!r} does not provide EmbeddingInputs (token ids the victim embeds): "
                            f"attacks for it: {', '.join(attacks_for(task)) or '(none)'}")
    return task


def waveform_inputs(task: Task) -> WaveformInputs:
    """``task`` as the :class:`WaveformInputs` it provides (a task without it is refused, naming it)."""
    if not isinstance(task, WaveformInputs):
        raise RegistryError(f"the task {task.name!r} does not provide WaveformInputs (waveforms measured by SNR): "
                            f"attacks for it: {', '.join(attacks_for(task)) or '(none)'}")
    return task


def missing_capabilities(task: Task, requires: Iterable[type]) -> list[str]:
    """Names of the capabilities in ``requires`` that ``task`` does not provide."""
    return [cap.__name__ for cap in requires if not isinstance(task, cap)]


@contextlib.contextmanager
def victim_mode(model: nn.Module, mode: str | None) -> Iterator[nn.Module]:
    """``model`` in ``mode`` ("train" | "eval"; ``None`` leaves it) for the block, then as it was --
    every submodule's own flag restored, not only the root's."""
    if mode is None:
        yield model
        return
    if mode not in MODES:
        raise ValueError(f"unknown attack mode {mode!r}: use 'train' or 'eval'")
    saved = [(m, m.training) for m in model.modules()]
    model.train(mode == "train")
    try:
        yield model
    finally:
        for m, training in saved:
            m.training = training


class AttackInputError(ValueError):
    """A batch given to an attack outside the task's input domain; the message says what is expected."""


class Attack(ABC):
    """Base class: subclasses implement :meth:`perturb` and list the capabilities (protocols from this
    module, or any class) they need from a task in ``requires``; a task without them is refused at
    construction, naming what is missing and the attacks that do fit."""

    requires: tuple[type, ...] = ()
    mode: str | None = "eval"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__call__" in cls.__dict__ and "perturb" not in cls.__dict__ and not any(
                "perturb" in b.__dict__ for b in cls.__mro__[1:-1] if b is not Attack):
            raise TypeError(f"{cls.__qualname__} overrides __call__: an Attack implements perturb(model, batch, "
                            "targets) instead, and Attack.__call__ runs it with the victim in the attack's mode "
                            "(rename the method)")

    def __init__(self, task: Task):
        check_capabilities(type(self), task)
        self.task = task

    def __call__(self, model: nn.Module, batch: Batch, targets: Tensor | None = None) -> Adversarial:
        """Perturb ``batch`` against ``model`` with the victim in the attack's ``mode``, then restore it.
        Inputs outside the task's domain (uint8 or 0-255 images) are refused: :meth:`check_inputs`."""
        self.check_inputs(batch)
        with victim_mode(model, self.mode):
            return self.perturb(model, batch, targets)

    def check_inputs(self, batch: Batch) -> None:
        """Refuse a batch whose ``inputs`` do not lie in the task's ``input_domain`` (pixels in [0, 1], waveforms
        in [-1, 1]): integer inputs (a uint8 image batch) always; values outside the domain (0-255 floats, on
        which an 8/255 budget and the clamp to [0, 1] act on the wrong scale) on every CPU batch and on the first
        batch on an accelerator (checking costs a host sync there)."""
        x = batch.get("inputs") if isinstance(batch, dict) else None
        domain = getattr(self.task, "input_domain", None)
        if not isinstance(x, Tensor) or domain is None:
            return
        lo, hi = domain
        if not x.is_floating_point():
            fix = "batch['inputs'].float() / 255" if x.dtype == torch.uint8 else "float tensors"
            raise AttackInputError(f"{type(self).__name__} got {x.dtype} inputs but attacks on {self.task.name!r} take "
                                   f"float inputs in [{lo:g}, {hi:g}]: pass {fix} (robustkd's data loaders do)")
        if getattr(self, "_inputs_checked", False):  # the first batch only: each check is a host read
            return
        self._inputs_checked = True
        if x.numel() == 0:
            return
        low, high = (float(v) for v in torch.aminmax(x.detach()))
        if low < lo - 1e-6 or high > hi + 1e-6:
            hint = ("they look like 0-255 pixel values: divide them by 255" if (lo, hi) == (0, 1) and low >= 0
                    and high <= 255 else f"scale them into [{lo:g}, {hi:g}] (models normalise inside)")
            raise AttackInputError(f"{type(self).__name__} got inputs spanning [{low:.4g}, {high:.4g}] but attacks on "
                                   f"{self.task.name!r} take inputs in [{lo:g}, {hi:g}] (budgets such as 8/255 are "
                                   f"shares of that range): {hint}")

    @abstractmethod
    def perturb(self, model: nn.Module, batch: Batch, targets: Tensor | None = None) -> Adversarial:
        """Perturb ``batch`` against ``model``; ``targets`` default to the batch's labels."""

    def set_mode(self, mode: str | None) -> Attack:
        """Run the victim in ``mode`` ("train" | "eval"; ``None``: leave the caller's mode)."""
        if mode is not None and mode not in MODES:
            raise ValueError(f"unknown attack mode {mode!r}: use 'train' or 'eval'")
        self.mode = mode
        return self

    def describe(self) -> dict[str, Any]:
        """The attack's parameters, for reports."""
        return {"attack": type(self).__name__}


def check_capabilities(factory: Any, task: Task, name: str | None = None) -> None:
    """Refuse ``task`` when it lacks a capability ``factory.requires`` lists (``name``: the registered name)."""
    missing = missing_capabilities(task, getattr(factory, "requires", ()))
    if missing:
        name = name or getattr(factory, "__name__", type(factory).__name__)
        raise RegistryError(
            f"the attack {name!r} does not work on the task {task.name!r}: it needs {', '.join(missing)}, which the "
            f"task does not provide. Attacks for {task.name!r}: {', '.join(attacks_for(task)) or '(none)'}.")


def attacks_for(task: Task) -> list[str]:
    """Names of the registered attacks whose required capabilities this task provides."""
    return [e.name for e in ATTACKS.entries() if not missing_capabilities(task, getattr(e.obj, "requires", ()))]


# -- the spec language --------------------------------------------------------------------------
class AttackSpecError(ValueError):
    """A malformed attack spec; the message names the spec, the option and the fix."""


def threat_summary(threat: ThreatModel) -> str:
    """``SNRBall(snr_db=30.0)``, ``ThreatModel(norm=linf, eps=0.002)``: what a threat model bounds, short."""
    d = threat.describe()
    keys = ("snr_db",) if d.get("snr_db") is not None else ("norm", "eps")
    return f"{d['type']}({', '.join(f'{k}={d[k]}' for k in keys)})"


class UnusedThreatOptionsError(TypeError):
    """Options given to an attack beside a threat model that is already set (``PGD(task, threat, eps=...)``,
    or ``snr_pgd:eps=0.01``, whose SNR ball comes from ``snr_db``): they would not reach the threat model, so
    they are refused instead of dropped. ``options`` are those options, ``threat`` the threat model."""

    def __init__(self, options: dict[str, Any], threat: ThreatModel):
        self.options, self.threat = dict(options), threat
        named = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        super().__init__(f"the option(s) {named} would not reach the threat model, which is already set "
                         f"({threat_summary(threat)}): pass either the threat model or the options that build it")


_SHORTHAND = re.compile(r"^([a-z_]+?)(\d+)$")
_NAME = re.compile(r"^[A-Za-z_][\w\-]*$")


def split_attack_specs(text: str | Iterable[str] | None) -> list[str]:
    """Split a list of specs at ``;`` or ``,`` (the same); a ``key=value`` part after a spec with options
    continues it: ``"pgd20;autoattack:version=custom,attacks=apgd-ce"`` ->
    ``["pgd20", "autoattack:version=custom,attacks=apgd-ce"]``. A list of strings is split item by item."""
    if text is None:
        return []
    if not isinstance(text, str):
        return [s for item in text for s in split_attack_specs(item)]
    specs: list[str] = []
    for part in (p.strip() for p in re.split(r"[;,]", text)):
        if not part:
            continue
        head = part.split("=", 1)[0]
        if "=" in part and ":" not in head:  # an option, not a new spec
            if not specs or ":" not in specs[-1]:
                after = specs[-1] if specs else None
                fix = f"{after}:{part}" if after else f"NAME:{part}"
                raise AttackSpecError(f"{part!r} in {text!r} is an option but follows no attack with options: "
                                      f"write {fix!r} (options come after ':')")
            specs[-1] += "," + part
        else:
            specs.append(part)
    return specs


def parse_attack_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"pgd20"`` -> ``("pgd", {"steps": 20})``; ``"pgd:eps=8/255,steps=50"`` -> keyword options typed by
    the attack's signature; ``"textattack:deepwordbug"`` -> ``("textattack", {"recipe": "deepwordbug"})``."""
    if not isinstance(spec, str) or not spec.strip():
        raise AttackSpecError(f"an attack spec must be a non-empty string like 'pgd20', got {spec!r}")
    name, _, opts = spec.strip().partition(":")
    name = name.strip()
    if not _NAME.match(name):
        raise AttackSpecError(f"{spec!r}: {name!r} is not an attack name; write NAME or NAME:key=value,... "
                              "(e.g. pgd20 or pgd:steps=50,eps=8/255)")
    raw: dict[str, str] = {}
    for i, part in enumerate(p.strip() for p in opts.split(",") if opts):
        if not part:
            continue
        if "=" not in part:
            if i == 0 and "recipe" not in raw:
                raw["recipe"] = part  # a bare first word names a sub-recipe
                continue
            raise AttackSpecError(f"{spec!r}: option {part!r} has no value; write key=value")
        key, value = (s.strip() for s in part.split("=", 1))
        if not key.isidentifier():
            raise AttackSpecError(f"{spec!r}: {key!r} is not an option name")
        if key in raw:
            raise AttackSpecError(f"{spec!r} gives the option {key!r} twice")
        raw[key] = value
    steps = None
    if name not in ATTACKS and (m := _SHORTHAND.match(name)) and m.group(1) in ATTACKS:
        name, steps = m.group(1), int(m.group(2))
        if "steps" in raw:
            raise AttackSpecError(f"{spec!r} gives the steps twice ({name}{steps} and steps={raw['steps']})")
    factory = ATTACKS.get(name) if name in ATTACKS else None
    kwargs: dict[str, Any] = {} if steps is None else {"steps": steps}
    for key, value in raw.items():
        kwargs[key] = _coerce(spec, factory, key, value)
    return name, kwargs


def _signature(factory: Any) -> inspect.Signature | None:
    if factory is None:
        return None
    try:
        return inspect.signature(factory.__init__ if inspect.isclass(factory) else factory)
    except (TypeError, ValueError):
        return None


# -- typing the options: from the attack's evaluated type hints -----------------------------------
_NONE_TYPE = type(None)
_SEQUENCES = (list, tuple, Sequence, MutableSequence)
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


class _Untyped:
    """An option no signature types: passed on through ``**kwargs`` (e.g. ``snr_db`` to the task's threat
    model, which checks it) or annotated ``Any``; its value is read as a boolean, integer, number or text."""


def _init_chain(factory: Any) -> list[Any]:
    """The functions whose parameters are ``factory``'s options, in the order ``**kwargs`` travel: a class's
    ``__init__`` along its MRO (a subclass's ``**kwargs`` go on to ``super().__init__``, as in
    :class:`~robustkd.attacks.speech.SNRPGD`); a function, then the attack class its return annotation names
    (its ``**kwargs`` go on to that class, as in :func:`~robustkd.attacks.pgd.fgsm`)."""
    if inspect.isclass(factory):
        return [c.__dict__["__init__"] for c in factory.__mro__ if c is not object and "__init__" in c.__dict__]
    try:
        returns = typing.get_type_hints(factory).get("return")
    except Exception:  # noqa: BLE001 - an unresolvable return annotation names no class to follow
        returns = None
    follow = _init_chain(returns) if inspect.isclass(returns) and issubclass(returns, Attack) else []
    return [factory, *follow]


def _option_hint(spec: str, factory: Any, key: str) -> Any:
    """The evaluated type hint of the option ``key`` of the attack ``factory`` (:class:`_Untyped` when no
    signature types it). An unannotated parameter is typed by its default's type."""
    for fn in _init_chain(factory):
        try:
            params = inspect.signature(fn).parameters
        except (TypeError, ValueError):
            return _Untyped
        p = params.get(key)
        if p is not None and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            if p.annotation is p.empty:
                return type(p.default) if type(p.default) in (bool, int, float, str) else _Untyped
            return _evaluated(spec, fn, key, p.annotation)
        if not any(q.kind is q.VAR_KEYWORD for q in params.values()):
            return _Untyped
    return _Untyped


def _evaluated(spec: str, fn: Any, key: str, annotation: Any) -> Any:
    if not isinstance(annotation, str):
        return annotation
    try:
        return typing.get_type_hints(fn)[key]
    except Exception:  # noqa: BLE001 - another parameter's hint may not resolve at run time: this one alone
        pass
    try:
        return eval(annotation, getattr(fn, "__globals__", {}))  # noqa: S307 - the attack's own annotation
    except Exception as exc:  # noqa: BLE001 - whatever the annotation raises, the option cannot be typed
        raise AttackSpecError(f"{spec!r}: the attack's option {key} is annotated {annotation!r}, which does not "
                              f"resolve ({type(exc).__name__}: {exc}): the attack's code must import that type "
                              "at run time for its option to be written in a spec") from None


def _members(hint: Any) -> list[Any]:
    """A union's members (``X | None`` -> ``[X]``) in the order values are tried: choices, booleans, integers,
    numbers, lists, text, paths; ``[hint]`` for anything else."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        members = [m for a in typing.get_args(hint) if a is not _NONE_TYPE for m in _members(a)]
        return sorted(members, key=_rank)
    return [hint]


def _rank(hint: Any) -> int:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return 0
    if origin in _SEQUENCES or hint in _SEQUENCES:
        return 4
    order = {bool: 1, int: 2, float: 3, str: 5, Path: 6}
    return order.get(hint, 9)


def _words(hint: Any) -> str:
    """What a value of type ``hint`` looks like in a spec, for the error message."""
    members = [m for m in _members(hint) if _rank(m) < 9]
    if not members:
        return "a " + " or ".join(getattr(m, "__name__", str(m)) for m in _members(hint))
    if len(members) > 1:
        return " or ".join(_words(m) for m in members)
    hint = members[0]
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(c) for c in typing.get_args(hint))
    if origin in _SEQUENCES or hint in _SEQUENCES:
        return "a '+'-joined list (e.g. apgd-ce+square)"
    return {bool: "true or false", int: "an integer (e.g. 10)", float: "a number or fraction (e.g. 0.5 or 8/255)",
            str: "text", Path: "a path"}[hint]


def _parse(value: str, hint: Any) -> Any:
    """``value`` as a ``hint``; :class:`ValueError` when it is not one."""
    members = [m for m in _members(hint) if _rank(m) < 9]
    if not members:
        raise TypeError(hint)  # a type a spec cannot write (a callable, a threat model)
    if len(members) > 1:
        for member in members:
            try:
                return _parse(value, member)
            except (ValueError, ZeroDivisionError):
                continue
        raise ValueError(value)
    hint = members[0]
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        for choice in args:
            if (str(choice).lower() if isinstance(choice, bool) else str(choice)) == value:
                return choice
        raise ValueError(value)
    if origin in _SEQUENCES or hint in _SEQUENCES:
        items = value.split("+")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(items) != len(args):
                raise ValueError(value)
            return tuple(_parse(v, a) for v, a in zip(items, args))
        parsed = [_parse(v, args[0]) if args else v for v in items]
        return tuple(parsed) if tuple in (origin, hint) else parsed
    if hint is bool:
        low = value.lower()
        if low in _TRUE or low in _FALSE:
            return low in _TRUE
        raise ValueError(value)
    if hint is int:
        return int(value)
    if hint is float:
        return eps_from_pixels(value)
    if hint is Path:
        return Path(value)
    return value  # str


def _coerce(spec: str, factory: Any, key: str, value: str) -> Any:
    """The spec's text ``value`` of option ``key`` as the type the attack declares for it."""
    if key == "mode":
        if value not in MODES:
            raise AttackSpecError(f"{spec!r}: option mode={value!r} must be 'train' or 'eval'")
        return value
    hint = Any if factory is None else _option_hint(spec, factory, key)
    if hint is _Untyped or hint is Any:
        return _guess(value)
    try:
        return _parse(value, hint)
    except (ValueError, ZeroDivisionError):
        raise AttackSpecError(f"{spec!r}: option {key}={value!r} must be {_words(hint)}") from None
    except TypeError:
        raise AttackSpecError(f"{spec!r}: option {key} takes {_words(hint)}, which a spec cannot write: pass it "
                              "to the attack's class from Python") from None


def _guess(value: str) -> Any:
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    try:
        return int(value)
    except ValueError:
        pass
    try:
        return eps_from_pixels(value)
    except (ValueError, ZeroDivisionError):
        return value


def _accepts(factory: Any, key: str) -> bool:
    sig = _signature(factory)
    if sig is None:
        return True
    params = sig.parameters
    return key in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _threat_keys(task: Task) -> set[str]:
    """The options of the task's threat model (``eps``, ``norm``, ``snr_db``, ...)."""
    try:
        params = inspect.signature(task.threat_model).parameters
    except (TypeError, ValueError):
        return {"eps", "norm"}
    return {k for k, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)} | {"eps", "norm"}


def _passes_threat_options(factory: Any) -> bool:
    """The factory itself (not a subclass of it) declares ``passes_threat_options``: every option that is not
    its own goes to ``task.threat_model`` (PGD, FGSM), so any of the task's threat-model options is a budget it takes."""
    return bool(getattr(factory, "__dict__", {}).get("passes_threat_options", False))


def _named_params(factory: Any) -> set[str]:
    sig = _signature(factory)
    return set() if sig is None else {k for k, p in sig.parameters.items() if p.kind is not p.VAR_KEYWORD}


def create_attack(spec: str, task: Task, **defaults: Any) -> Attack:
    """Build a registered attack from a spec (see this module's docstring) with run-wide ``defaults``.

    Threat-model defaults (``eps``, ``norm``, ... -- the options of ``task.threat_model``) are one
    budget: they apply together, only when the spec names none of them and the attack takes every one
    of them by name, or passes every option that is not its own to the task's threat model (``pgd``,
    ``fgsm``, ``fgsm_rs``: ``passes_threat_options``); ``pgd_l2`` keeps its L2 default, ``snr_pgd`` its
    SNR, ``pgd20:snr_db=30`` its SNR ball. Other defaults (``steps=``, ``loss=``, ``mode=``, ...) apply one
    by one unless the spec names them, to attacks that take them. ``None`` values count as not given.

    A threat-model option in the spec reaches the attack's threat model or is refused: an attack that builds
    its own threat model (``snr_pgd:eps=0.01``, ``linf_pgd:snr_db=30``, ``pgd_l2:norm=linf``) refuses it in
    one line naming the option, the attack and the options that set its budget (:class:`UnusedThreatOptionsError`
    from the attack, an :class:`AttackSpecError` here); an option neither the attack's nor the threat
    model's is refused as such."""
    name, kwargs = parse_attack_spec(spec)
    factory = ATTACKS.get(name)
    check_capabilities(factory, task, name)
    defaults = {k: v for k, v in defaults.items() if v is not None}
    threat_keys = _threat_keys(task)
    budget = {k: v for k, v in defaults.items() if k in threat_keys}
    if budget and not (set(kwargs) & threat_keys) and (set(budget) <= _named_params(factory)
                                                      or _passes_threat_options(factory)):
        kwargs.update(budget)
    for key, value in defaults.items():
        if key not in threat_keys and key not in kwargs and (key == "mode" or _accepts(factory, key)):
            kwargs[key] = value
    mode = kwargs.pop("mode", None) if "mode" not in _named_params(factory) else None
    try:
        attack = factory(task, **kwargs)
    except UnusedThreatOptionsError as exc:
        raise AttackSpecError(_unused_options_message(spec, name, factory, task, exc, threat_keys)) from exc
    except TypeError as exc:
        raise AttackSpecError(f"bad options for attack {spec!r}: {exc}") from exc
    if mode is not None:
        attack.set_mode(mode)
    return attack


def _unused_options_message(spec: str, name: str, factory: Any, task: Task, exc: UnusedThreatOptionsError,
                            threat_keys: set[str]) -> str:
    """One line: which options of ``spec`` the attack ``name`` would not apply, and what to write instead."""
    budget = [k for k in exc.options if k in threat_keys]
    other = [k for k in exc.options if k not in threat_keys]
    if other:
        return (f"bad options for attack {spec!r}: the attack {name!r} takes no option(s) {', '.join(other)} (they "
                f"are neither its own nor options of {task.name!r}'s threat model: "
                f"{', '.join(sorted(threat_keys))}); check the spelling")
    own = sorted(_named_params(factory) & threat_keys)
    fix = (f"set its budget with {' / '.join(own)}" if own else "it takes no budget option")
    generic = "pgd" in attacks_for(task) and "pgd" != name
    return (f"bad options for attack {spec!r}: the attack {name!r} builds its own threat model "
            f"({threat_summary(exc.threat)}) and would not apply {', '.join(budget)}: {fix}"
            + (f", or use pgd:{','.join(f'{k}={exc.options[k]}' for k in budget)}, which passes the task's "
               "threat-model options to it" if generic else ""))


def build_attacks(specs: str | Iterable[str], task: Task, **defaults: Any) -> dict[str, Attack]:
    """``{spec: attack}`` for a list of specs (a string is split with :func:`split_attack_specs`);
    a name that does not fit the task is refused with the list of those that do."""
    attacks: dict[str, Attack] = {}
    for spec in split_attack_specs(specs):
        name, _ = parse_attack_spec(spec)
        if name not in ATTACKS:
            raise RegistryError(f"the attack {name!r} (from {spec!r}) is not registered. Attacks for "
                                f"{task.name!r}: {', '.join(attacks_for(task)) or '(none)'}.")
        attacks[spec] = create_attack(spec, task, **defaults)
    return attacks
