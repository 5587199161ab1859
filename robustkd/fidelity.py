"""``robustkd fidelity``: robustkd's training step beside the reference code's, from identical state.

Given local clones of the reference repositories (never fetched, copied or shipped by robustkd),
each case builds robustkd's side exactly as a recipe builds it from a preset (settings, task, the
preset's own model, method, :class:`~robustkd.trainer.Trainer`) and the reference side from the
reference's own files (ADR: the preset's gin file, ``AdvTrainer._train_one_epoch``, its attackers,
optimizer and scheduler builders and its model; MTARD / B-MTARD: the training script's own top-level
settings and the body of its training loop, run as written), loads the same weights into both, and
runs ``--steps`` training steps on the same real images with the CPU generator reseeded identically
before each step. After every step it prints the largest absolute difference over the parameters,
over the floating-point buffers (batch-norm statistics) and, for ADR, over the EMA teacher, with the
tensor where it is largest.

The reference code runs on the CPU as written, with three things only around it, each printed:
``gin`` and ``torchattacks`` are replaced by empty modules when they are not installed (every
argument is passed explicitly; ``torchattacks`` serves evaluation only), and ``.cuda()`` is the
identity while the reference runs on a machine without a GPU.

:func:`param_groups` and :class:`BNMomentumSchedule` are ADR's batch-norm settings for runs with
extra data (``src/util/optimizer_scheduler.py:8-18``, ``src/advTrainer.py:214-217``), for the
trainer to apply where a preset declares them.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import importlib
import importlib.util
import io
import itertools
import math
import os
import shlex
import sys
import tempfile
import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn


# -- ADR's batch-norm settings (runs with extra data) ----------------------------------------------
def is_bn_parameter(name: str) -> bool:
    """A batch-norm parameter as ADR's ``group_weight`` tells it: ``batchnorm`` in its name (the names of
    the DeepMind-layout models, PreAct-ResNet and WRN, the ones ADR trains with extra data)."""
    return "batchnorm" in name


def param_groups(model: nn.Module, weight_decay: float, *, no_decay_bn: bool = False) -> list[dict[str, Any]]:
    """The optimizer's parameter groups: one group with ``weight_decay``, or (``no_decay_bn``) ADR's two,
    every parameter but the batch-norm ones with ``weight_decay``, then the batch-norm ones without
    (``src/util/optimizer_scheduler.py:8-18``; within each group the model's order, as there)."""
    if not no_decay_bn:
        return [{"params": list(model.parameters()), "weight_decay": weight_decay}]
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        (no_decay if is_bn_parameter(name) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@dataclass
class BNMomentumSchedule:
    """Batch-norm momentum by optimizer step: ``first`` at step 0, ``then`` from step 1 on (ADR with
    extra data: 1.0, then 0.01, ``src/advTrainer.py:214-217``); ``None`` leaves a momentum as it is.
    Call it with the model and the step index before the step's forward passes."""

    first: float | None = 1.0
    then: float | None = 0.01

    def momentum(self, step: int) -> float | None:
        return self.first if step == 0 else self.then

    def __call__(self, model: nn.Module, step: int) -> None:
        value = self.momentum(step)
        if value is None or step > 1:  # set once at step 0 and once at step 1, as the reference does
            return
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = value


# -- the cases -----------------------------------------------------------------------------------
@dataclass
class Case:
    name: str
    preset: str
    family: str  # "adr" | "mtard" | "bmtard"
    note: str = ""
    model_kwargs: dict[str, Any] = field(default_factory=dict)


CASES: dict[str, Case] = {c.name: c for c in [
    Case("pgd_at", "adr/cifar10/resnet18_pgd_sgd", "adr"),
    Case("adr_pgd", "adr/cifar10/resnet18_pgd_sgd_adr", "adr"),
    Case("adr_trades", "adr/cifar10/resnet18_trades_sgd_adr", "adr"),
    Case("adr_awp", "adr/cifar10/resnet18_pgd_awp_adr", "adr"),
    Case("adr_trades_awp", "adr/cifar10/resnet18_trades_awp_adr", "adr"),
    Case("adr_preact", "adr/cifar10/preact_resnet18_pgd_awp_adr", "adr"),
    Case("adr_wrn", "adr/cifar10/wrn_pgd_sgd_adr", "adr"),
    Case("adr_cifar100", "adr/cifar100/resnet18_pgd_sgd_adr", "adr", "CIFAR-10 images, CIFAR-100 model and normalisation"),
    Case("adr_tinyimagenet", "adr/tinyimagenet/resnet18_pgd_awp_adr", "adr",
         "CIFAR-10 images resized to 64x64, TinyImageNet model and normalisation"),
    Case("mtard", "mtard/cifar10/resnet18", "mtard"),
    Case("bmtard", "bmtard/cifar10/resnet18", "bmtard"),
]}
DEFAULT_CASES = ("pgd_at", "adr_pgd", "adr_trades", "adr_awp", "adr_preact", "adr_wrn", "adr_cifar100",
                 "adr_tinyimagenet", "mtard", "bmtard")
REFERENCE_DATASET = {"cifar10": "cifar10", "cifar100": "cifar100", "tinyimagenet": "tiny-imagenet"}


# -- comparing states ----------------------------------------------------------------------------
def _robustkd_step(trainer: Any, batch: dict, seed: int) -> None:
    """robustkd's training step on ``batch`` from ``seed``, then the same seed again for the reference's step."""
    torch.manual_seed(seed)
    trainer.model.train()
    trainer.train_step(batch)
    torch.manual_seed(seed)


class AttackRecorder:
    """The adversarial inputs of the last training step on each side, to tell an attack's difference from
    an update's: robustkd's attack is observed through its ``perturb`` (the point the model is fed,
    ``inputs + delta``), the reference's through its attacker or the robust teacher's input."""

    def __init__(self) -> None:
        self.ours: Tensor | None = None
        self.ref: Tensor | None = None

    def observe_robustkd(self, method: Any) -> None:
        attack = getattr(method, "attack", None)
        if attack is None:
            return
        perturb = attack.perturb

        def recorded(*args: Any, **kwargs: Any) -> Any:
            adv = perturb(*args, **kwargs)
            x = adv.batch["inputs"]
            self.ours = (x if adv.delta is None else x + adv.delta).detach().clone()
            return adv

        attack.perturb = recorded  # an instance attribute: the attack class is untouched

    def observe_reference_attacker(self, attacker: Any) -> None:
        """ADR's ``PGD`` / ``TRADES``: their ``attack(model, images, labels)`` returns the adversarial images."""
        attack = attacker.attack

        def recorded(*args: Any, **kwargs: Any) -> Any:
            out = attack(*args, **kwargs)
            self.ref = out.detach().clone()
            return out

        attacker.attack = recorded

    def observe_reference_input(self, module: nn.Module) -> None:
        """MTARD: the robust teacher is queried on the adversarial images (``mtard_loss.py:55-56``)."""
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            self.ref = args[0].detach().clone()

        module.register_forward_pre_hook(hook)

    def difference(self) -> float | None:
        if self.ours is None or self.ref is None:
            return None
        if self.ours.shape != self.ref.shape:
            raise ValueError(f"adversarial batches of different shapes: {tuple(self.ours.shape)} and "
                             f"{tuple(self.ref.shape)}")
        d = float((self.ours.double() - self.ref.double()).abs().max())
        self.ours = self.ref = None
        return d


def bare(model: nn.Module) -> nn.Module:
    """The network without robustkd's normalisation layer (its state dict has the reference's keys)."""
    from .teachers import unwrap

    model = unwrap(model)
    # the image plug-in's normalisation layer: a first module holding the mean and std buffers
    if isinstance(model, nn.Sequential) and len(model) == 2 and {"mean", "std"} <= dict(model[0].named_buffers()).keys():
        return model[1]
    return model


def max_difference(a: dict[str, Tensor], b: dict[str, Tensor], keys: Sequence[str]) -> tuple[float, str]:
    """The largest absolute difference over ``keys`` and the tensor where it is."""
    worst, where = 0.0, "-"
    for k in keys:
        d = float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0
        if d > worst:
            worst, where = d, k
    return worst, where


def compare_states(ours: nn.Module, ref: nn.Module) -> dict[str, tuple[float, str]]:
    """``{"params": (max |diff|, tensor), "buffers": (...)}`` between two models of the same layout."""
    sa, sb = bare(ours).state_dict(), ref.state_dict()
    missing = sorted(set(sa) ^ set(sb))
    if missing:
        raise ValueError(f"the two models' state dicts differ in keys ({', '.join(missing[:4])}...): the case "
                         "compares models of different layouts")
    names = {n for n, _ in bare(ours).named_parameters()}
    params = [k for k in sa if k in names]
    buffers = [k for k in sa if k not in names and sa[k].is_floating_point()]
    return {"params": max_difference(sa, sb, params), "buffers": max_difference(sa, sb, buffers)}


# -- the reference code, run as written --------------------------------------------------------
@contextlib.contextmanager
def reference_imports(path: Path, notes: list[str]) -> Iterator[None]:
    """``path`` first on ``sys.path`` for the block; empty ``gin`` / ``torchattacks`` modules when they are
    not installed (noted). Reference modules imported in the block are forgotten after it."""
    before = set(sys.modules)
    added = []
    for name in ("gin", "torchattacks"):
        if importlib.util.find_spec(name) is None:
            stub = types.ModuleType(name)
            if name == "gin":
                stub.configurable = lambda obj=None, **_: obj if obj is not None else (lambda o: o)  # type: ignore
            sys.modules[name] = stub
            added.append(name)
            note = f"{name}: not installed, an empty module stands in (the comparison passes every argument)"
            if note not in notes:
                notes.append(note)
    sys.path.insert(0, str(path))
    try:
        yield
    finally:
        sys.path.remove(str(path))
        for name in set(sys.modules) - before:
            mod = sys.modules.get(name)
            places = [getattr(mod, "__file__", None) or "", *list(getattr(mod, "__path__", None) or [])]
            if name in added or any(str(p).startswith(str(path)) for p in places):
                del sys.modules[name]  # namespace packages (ADR's util/, model/) included


@contextlib.contextmanager
def cuda_as_identity(notes: list[str]) -> Iterator[None]:
    """``.cuda()`` returns its tensor / module unchanged for the block (the reference scripts call it)."""
    if torch.cuda.is_available():
        yield
        return
    note = ".cuda(): the identity while the reference runs (no GPU on this machine)"
    if note not in notes:
        notes.append(note)
    saved = torch.Tensor.cuda, nn.Module.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
    nn.Module.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.cuda, nn.Module.cuda = saved  # type: ignore[method-assign]


def read_gin(path: Path) -> dict[str, Any]:
    """``{"scope.name": value}`` of a gin file's bindings (literals; ``@NAME()`` kept as the string NAME)."""
    out: dict[str, Any] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "=" not in line:
            continue
        key, value = (s.strip() for s in line.split("=", 1))
        if value.startswith("@"):
            out[key] = value[1:].rstrip("()")
        else:
            out[key] = ast.literal_eval(value)
    return out


def load_package(name: str, directory: Path) -> types.ModuleType:
    """Import the package in ``directory`` under ``name`` (two repositories both have ``cifar10_models``)."""
    spec = importlib.util.spec_from_file_location(name, directory / "__init__.py",
                                                  submodule_search_locations=[str(directory)])
    if spec is None or spec.loader is None:
        raise ValueError(f"{directory} is not a Python package")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def training_loop_body(script: Path) -> tuple[list[ast.stmt], list[ast.stmt]]:
    """The reference script's top-level definitions and settings, and the body of its loop over the
    training batches (``for step, (...) in enumerate(trainloader)``)."""
    tree = ast.parse(script.read_text(), filename=str(script))
    settings: list[ast.stmt] = []
    loop = None
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            settings.append(node)
        elif isinstance(node, ast.ImportFrom) and node.module == "mtard_loss":
            settings.append(node)
        elif isinstance(node, ast.Assign) and all(isinstance(t, ast.Name) for t in node.targets):
            names = {t.id for t in node.targets if isinstance(t, ast.Name)}
            if names & {"weight", "init_loss_nat", "init_loss_adv", "weight_learn_rate", "temp_learn_rate",
                        "temp_adv", "temp_nat", "temp_max", "temp_min", "epsilon", "bert", "optimizer"}:
                settings.append(node)
        elif isinstance(node, ast.For) and loop is None:
            for inner in ast.walk(node):
                if (isinstance(inner, ast.For) and isinstance(inner.iter, ast.Call)
                        and getattr(inner.iter.func, "id", None) == "enumerate"
                        and any(getattr(a, "id", None) == "trainloader" for a in inner.iter.args)):
                    loop = inner
                    break
    if loop is None:
        raise ValueError(f"{script}: no loop over the training batches (for step, ... in enumerate(trainloader))")
    return settings, loop.body


# -- one case --------------------------------------------------------------------------------------
@dataclass
class Options:
    adr: Path | None
    mtard: Path | None
    mtard_extension: Path | None
    data_dir: str
    steps: int = 10
    batch_size: int = 16
    seed: int = 0


def _settings(case: Case, opts: Options, output_dir: str) -> dict[str, Any]:
    """The preset's settings as a recipe resolves them, for a run of ``steps`` batches without augmentation."""
    import json

    from .config import Recipe, resolve
    from .presets import get_preset

    preset = get_preset(case.preset)
    task_kwargs: dict[str, Any] = {"augment": False}
    if preset.settings["dataset"] != "cifar10":  # CIFAR-10's images stand in: its label column
        task_kwargs["label_column"] = "label"
    if preset.settings["dataset"] == "tinyimagenet":  # ... resized to the data set's 64x64
        task_kwargs["resize"] = True
    argv = ["--preset", case.preset, "--data-dir", opts.data_dir, "--output-dir", output_dir, "--cpu",
            "--max-train-samples", str(opts.steps * opts.batch_size), "--batch-size", str(opts.batch_size),
            "--eval-attacks", "", "--no-progress", "--task-kwargs", json.dumps(task_kwargs)]
    recipe = Recipe("fidelity", default_preset=case.preset, defaults={"output_dir": output_dir})
    return resolve(recipe, argv).settings


def _batches(task, opts: Options) -> list[dict[str, Tensor]]:
    loader = task.dataloader("test", opts.batch_size, shuffle=False)
    return list(itertools.islice(iter(loader), opts.steps))


def _robustkd_trainer(case: Case, s: dict[str, Any], teachers: dict[str, Any] | None = None):
    """robustkd's side as :func:`robustkd.recipe.run_recipe` builds it (MTARD: with in-memory teachers)."""
    from unittest import mock

    from . import config
    from .recipe import build_task
    from .trainer import Trainer

    task = build_task(s)
    torch.manual_seed(s["seed"])
    model = task.build_model(s["model"], **{**s["model_kwargs"], **case.model_kwargs})
    if teachers is None:
        method = config.build_method(s, task)
    else:
        with mock.patch.object(config, "load_teachers", lambda *_: teachers):
            method = config.build_method(s, task)
    return task, Trainer(task, model, method, config.train_config(s))


def run_adr_case(case: Case, opts: Options, notes: list[str]) -> list[dict[str, Any]]:
    from .presets import get_preset

    if opts.adr is None:
        raise ValueError(f"the case {case.name} needs --adr PATH (a local clone of yuyuwu5/ADR)")
    gin_rel = get_preset(case.preset).source.split(" ", 1)[1]
    g = read_gin(opts.adr / gin_rel)
    with tempfile.TemporaryDirectory(prefix="robustkd-fidelity-") as tmp:
        s = _settings(case, opts, tmp)
        task, trainer = _robustkd_trainer(case, s)
        batches = _batches(task, opts)
        with reference_imports(opts.adr / "src", notes):
            from adr import ADR as RefADR  # type: ignore[import-not-found]
            from advTrainer import AdvTrainer  # type: ignore[import-not-found]
            from model.create_model import create_model  # type: ignore[import-not-found]
            from timm.utils import ModelEmaV2
            from util import optimizer_scheduler as opt_sched  # type: ignore[import-not-found]
            from util.pgd_attack import PGD as RefPGD  # type: ignore[import-not-found]
            from util.trades_attack import TRADES as RefTRADES  # type: ignore[import-not-found]

            ref = create_model(g["create_model.model_name"], REFERENCE_DATASET.get(g["main.dataset"], g["main.dataset"]),
                               g.get("create_model.activation_name", "relu"))
            ref.load_state_dict(bare(trainer.model).state_dict())
            steps_per_epoch, epochs = trainer.steps_per_epoch, g["main.epoch"]
            extra = "main.aux_dataset_path" in g  # the config trains with extra data: its batch-norm settings
            aux_loader = None
            if extra:
                note = ("extra-data configs (PreAct): the reference runs with an extra-data loader of zero images, "
                        "so that its batch-norm settings apply and the batches stay the same")
                if note not in notes:
                    notes.append(note)
                x0 = batches[0]["inputs"]
                aux_loader = [(x0.new_zeros((0, *x0.shape[1:])), batches[0]["labels"].new_zeros((0,)))]
            if g["build_optimizer.optimizer_type"] == "sgd":
                optimizer = opt_sched.build_sgd_optimizer(ref, extra, g["build_sgd_optimizer.lr"],
                                                          g["build_sgd_optimizer.momentum"],
                                                          g["build_sgd_optimizer.weight_decay"])
            else:
                optimizer = opt_sched.build_awp_optimizer(ref, extra, g["build_awp_optimizer.lr"],
                                                          g["build_awp_optimizer.momentum"],
                                                          g["build_awp_optimizer.weight_decay"],
                                                          g["build_awp_optimizer.rho"])
            if g["build_scheduler.scheduler_type"] == "steplr":
                scheduler = opt_sched.build_steplr_scheduler(optimizer, steps_per_epoch,
                                                             g["build_steplr_scheduler.lr_step_milestone"],
                                                             g["build_steplr_scheduler.lr_gamma"])
            else:
                scheduler = opt_sched.build_cosine_scheduler(optimizer, epochs, steps_per_epoch,
                                                             g["build_cosine_scheduler.lr_min"],
                                                             g["build_cosine_scheduler.warmup_lr_init"],
                                                             g["build_cosine_scheduler.warmup_t"])
            attacker_name = g["AdvTrainer.adv_attacker"]
            attacker_cls = {"PGD": RefPGD, "TRADES": RefTRADES}[attacker_name]
            attacker = attacker_cls(eps=g[f"{attacker_name}.eps"], alpha=g[f"{attacker_name}.alpha"],
                                    steps=g[f"{attacker_name}.steps"])
            num_classes = task.num_classes
            ref_trainer = AdvTrainer("cpu", {"n_class": num_classes}, g["AdvTrainer.adv_train_mode"],
                                     g["AdvTrainer.model_ema_decay"], g["AdvTrainer.temperature_low"],
                                     g["AdvTrainer.temperature_high"], g["AdvTrainer.interpolation_low"],
                                     g["AdvTrainer.interpolation_high"], adv_attacker=attacker,
                                     adv_beta=g.get("AdvTrainer.adv_beta", 6.0), aux_loader=aux_loader)
            ref_trainer.model_ema = ModelEmaV2(ref, decay=g["AdvTrainer.model_ema_decay"])
            th = g["AdvTrainer.temperature_high"]
            ref_trainer.adr = RefADR(num_classes, epochs, steps_per_epoch, g["AdvTrainer.temperature_low"], th,
                                     g["AdvTrainer.interpolation_low"], g["AdvTrainer.interpolation_high"]) \
                if th > 0 else None
            recorder = AttackRecorder()
            recorder.observe_robustkd(trainer.method)
            recorder.observe_reference_attacker(attacker)
            rows = []
            for k, batch in enumerate(batches):
                _robustkd_step(trainer, batch, opts.seed + k)
                with _quiet():
                    ref_trainer._train_one_epoch([(batch["inputs"], batch["labels"])], ref, optimizer, scheduler, k)
                row = {"case": case.name, "step": k + 1, "attack": recorder.difference(),
                       **compare_states(trainer.model, ref)}
                if trainer.ema is not None:
                    row["ema"] = compare_states(trainer.ema.model, ref_trainer.model_ema.module)["params"]
                rows.append(row)
            return rows


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The reference's progress bars and prints go nowhere."""
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        yield


def run_mtard_case(case: Case, opts: Options, notes: list[str]) -> list[dict[str, Any]]:
    from .registry import MODELS, TASKS

    TASKS.get("cifar10")  # loads the image plug-in, which registers its models
    resnet18 = MODELS.get("resnet18")
    from .teachers import FrozenTeacher as Teacher

    if opts.mtard is None:
        raise ValueError(f"the case {case.name} needs --mtard PATH (a local clone of zhaoshiji123/MTARD)")
    if case.family == "bmtard" and opts.mtard_extension is None:
        raise ValueError(f"the case {case.name} needs --mtard-extension PATH (a local clone of "
                         "zhaoshiji123/MTARD-extension)")
    if case.family == "mtard":
        script, models_dir = opts.mtard / "mtard" / "mtard_resnet18_cifar10.py", opts.mtard / "mtard" / "cifar10_models"
    else:
        script = opts.mtard_extension / "resnet18_mtard_cifar10.py"  # type: ignore[operator]
        models_dir = opts.mtard_extension / "cifar10_models"  # type: ignore[operator]
    torch.manual_seed(1000)
    clean_net, robust_net = resnet18(normalize=False).eval(), resnet18(normalize=False).eval()
    note = "MTARD teachers: two randomly initialised ResNet-18s, the same modules on both sides"
    if note not in notes:
        notes.append(note)
    with tempfile.TemporaryDirectory(prefix="robustkd-fidelity-") as tmp:
        s = _settings(case, opts, tmp)
        teachers = {"clean_teacher": Teacher(copy.deepcopy(clean_net), name="clean"),
                    "robust_teacher": Teacher(copy.deepcopy(robust_net), name="robust")}
        task, trainer = _robustkd_trainer(case, s, teachers)
        batches = _batches(task, opts)
        settings, body = training_loop_body(script)
        with reference_imports(opts.mtard / "mtard", notes), cuda_as_identity(notes):
            models = load_package(f"_robustkd_ref_models_{case.family}", models_dir)
            try:
                student = models.resnet18()
                student.load_state_dict(bare(trainer.model).state_dict())
                ns: dict[str, Any] = {"student": student, "teacher": copy.deepcopy(robust_net),
                                      "teacher_nat": copy.deepcopy(clean_net), "f": io.StringIO(), "torch": torch}
                exec(compile(ast.Module(body=settings, type_ignores=[]), str(script), "exec"), ns)
                code = compile(ast.Module(body=body, type_ignores=[]), str(script), "exec")
                recorder = AttackRecorder()
                recorder.observe_robustkd(trainer.method)
                recorder.observe_reference_input(ns["teacher"])
                rows = []
                for k, batch in enumerate(batches):
                    _robustkd_step(trainer, batch, opts.seed + k)
                    ns.update(step=k, train_batch_data=batch["inputs"].clone(),
                              train_batch_labels=batch["labels"].clone(), index=None)
                    with _quiet():
                        exec(code, ns)
                    rows.append({"case": case.name, "step": k + 1, "attack": recorder.difference(),
                                 **compare_states(trainer.model, student)})
                return rows
            finally:
                for name in [n for n in sys.modules if n.startswith(f"_robustkd_ref_models_{case.family}")]:
                    del sys.modules[name]


def run_case(case: Case, opts: Options, notes: list[str]) -> list[dict[str, Any]]:
    return (run_adr_case if case.family == "adr" else run_mtard_case)(case, opts, notes)


# -- output -----------------------------------------------------------------------------------------
DOC_BEGIN = "<!-- robustkd fidelity: begin (generated by `robustkd fidelity --from-json ... --update-doc`) -->"
DOC_END = "<!-- robustkd fidelity: end -->"


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    return "0" if x == 0 else f"{x:.1e}"


def _worst(row: dict[str, Any]) -> float:
    return max(row["params"][0], row["buffers"][0], (row.get("ema") or (0.0, ""))[0])


def trace(rows: Sequence[dict[str, Any]]) -> str:
    """Where a case first differs: the step, and whether the adversarial inputs already differ there (the
    attack) or only the state after the update (loss, gradients, optimizer step, batch-norm statistics)."""
    for r in rows:
        attack = r.get("attack")
        if attack:
            return f"step {r['step']}: the adversarial input (attack, {_fmt(attack)})"
        if _worst(r) > 0:
            where = r["params"][1] if r["params"][0] >= r["buffers"][0] else r["buffers"][1]
            return (f"step {r['step']}: the update, from identical adversarial inputs (largest in `{where}`)"
                    if attack == 0 else f"step {r['step']}: the update (largest in `{where}`)")
    return "none"


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A markdown table: case, step, largest adversarial-input / parameter / buffer / EMA difference and where."""
    lines = ["| case | step | adversarial input | parameters | where | buffers | where | EMA teacher |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        (p, pw), (b, bw) = r["params"], r["buffers"]
        ema = _fmt(r["ema"][0]) if r.get("ema") else "-"
        lines.append(f"| {r['case']} | {r['step']} | {_fmt(r.get('attack'))} | {_fmt(p)} | `{pw}` | {_fmt(b)} | "
                     f"`{bw}` | {ema} |")
    return "\n".join(lines)


def summarize(rows: Sequence[dict[str, Any]], cases: Sequence[dict[str, Any]]) -> str:
    """One line per case: the largest difference over all its steps (parameters, buffers, EMA) and where
    it first appears."""
    lines = ["| case | preset | steps | largest difference over all steps | first difference |",
             "|---|---|---|---|---|"]
    for case in cases:
        mine = [r for r in rows if r["case"] == case["name"]]
        worst = max((max(_worst(r), r.get("attack") or 0.0) for r in mine), default=math.nan)
        extra = f" ({case['note']})" if case.get("note") else ""
        lines.append(f"| {case['name']} | `{case['preset']}`{extra} | {len(mine)} | {_fmt(worst)} | {trace(mine)} |")
    return "\n".join(lines)


def _reference_commit(path: Path | None) -> str | None:
    """The commit of a reference clone (``git rev-parse HEAD``), or None where it is not a git checkout."""
    import subprocess

    if path is None:
        return None
    try:
        out = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _checkout_commit(path: Path) -> str | None:
    """robustkd's own commit where it runs from a git checkout, with ``-modified`` when tracked files under
    ``robustkd/`` or ``tasks/`` differ from it (the figures then come from uncommitted code)."""
    import subprocess

    commit = _reference_commit(path)
    if commit is None:
        return None
    try:
        out = subprocess.run(["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no", "--",
                              "robustkd", "tasks"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return commit
    return commit + ("-modified" if out.stdout.strip() else "")


def robustkd_commit() -> str | None:
    """The commit of the checkout robustkd runs from (None for an installed copy)."""
    checkout = Path(__file__).resolve().parent.parent
    return _checkout_commit(checkout) if (checkout / ".git").exists() else None


def build_report(rows: Sequence[dict[str, Any]], cases: Sequence[Case], opts: Options, notes: Sequence[str],
                 command: str | None, commit: str | None = None) -> dict[str, Any]:
    """The run as JSON: what ran (command, versions, robustkd's commit as the run started, the reference
    commits) and every row."""
    from . import __version__

    return {"command": command, "robustkd_version": __version__,
            "robustkd_commit": commit if commit is not None else robustkd_commit(),
            "torch": torch.__version__,
            "device": "CPU", "threads": torch.get_num_threads(), "batch_size": opts.batch_size, "steps": opts.steps,
            "seed": opts.seed,
            "references": {"ADR": _reference_commit(opts.adr), "MTARD": _reference_commit(opts.mtard),
                           "MTARD-extension": _reference_commit(opts.mtard_extension)},
            "cases": [{"name": c.name, "preset": c.preset, "family": c.family, "note": c.note} for c in cases],
            "rows": [dict(r) for r in rows], "notes": list(notes)}


def render(report: dict[str, Any]) -> str:
    """The markdown a run prints (and ``--update-doc`` writes): the command, what ran, the summary per case,
    the table per step and what stands around the reference code."""
    refs = ", ".join(f"{k} {v[:12]}" for k, v in report["references"].items() if v)
    out = []
    if report.get("command"):
        out += ["```", f"$ {report['command']}", "```", ""]
    rk = report.get("robustkd_commit")
    commit = f" (commit {rk[:12]}{'-modified' if rk.endswith('-modified') else ''})" if rk else ""
    out += [f"robustkd {report['robustkd_version']}{commit}, torch {report['torch']}, {report['device']} "
            f"({report['threads']} threads), batch {report['batch_size']}, {report['steps']} steps, "
            f"seed {report['seed']}" + (f"; reference commits: {refs}" if refs else ""),
            "", summarize(report["rows"], report["cases"]), "", format_table(report["rows"])]
    if report["notes"]:
        out += ["", "Around the reference code:", ""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(out)


def update_doc(path: Path, text: str) -> None:
    """Replace the generated block of ``path`` (between :data:`DOC_BEGIN` and :data:`DOC_END`) with ``text``."""
    from .checkpoint import replace_marked_block

    replace_marked_block(path, DOC_BEGIN, DOC_END, text, _DOC_WHAT)


def _check_doc(path: Path) -> None:
    from .checkpoint import marked_block

    marked_block(path, DOC_BEGIN, DOC_END, _DOC_WHAT)


_DOC_WHAT = "the figures `robustkd fidelity` generates (no generated block yet: add the two lines where they go)"


def add_fidelity_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fidelity", help="run robustkd's training step beside the reference code's (local clones) "
                       "and print the largest differences per case and step",
                       description="Each case builds robustkd's run from a preset as a recipe does and the "
                                   "reference's from its own files, loads the same weights into both, and runs "
                                   "--steps training steps on the same real images with identical seeds; it prints "
                                   "the largest adversarial-input / parameter / buffer / EMA difference after every "
                                   "step and where a case first differs. --json keeps the run; --from-json "
                                   "--update-doc docs/fidelity.md regenerates the page's figures from it. See "
                                   "docs/fidelity.md.")
    p.add_argument("--adr", type=Path, help="a local clone of github.com/yuyuwu5/ADR")
    p.add_argument("--mtard", type=Path, help="a local clone of github.com/zhaoshiji123/MTARD")
    p.add_argument("--mtard-extension", type=Path, help="a local clone of github.com/zhaoshiji123/MTARD-extension")
    p.add_argument("--data-dir", default=None, help="CIFAR-10 (the images every case uses; default: "
                   "$ROBUSTKD_SHARED/data/cifar10/plain_text)")
    p.add_argument("--cases", default=",".join(DEFAULT_CASES),
                   help=f"comma-separated, from: {', '.join(CASES)}")
    p.add_argument("--steps", type=int, default=10, help="training steps per case")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", type=Path, default=None, help="also write the run (command, versions, reference "
                   "commits, every row) to this JSON file")
    p.add_argument("--from-json", type=Path, nargs="+", default=None, metavar="JSON",
                   help="run nothing: render runs written by --json, one after the other")
    p.add_argument("--update-doc", type=Path, default=None, help="write the rendered figures into this markdown "
                   f"file, between the lines {DOC_BEGIN!r} and {DOC_END!r}")
    p.set_defaults(func=cmd_fidelity)


def _check_args(args: argparse.Namespace) -> tuple[list[Case], Options]:
    names = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown or not names:
        raise ValueError(f"unknown case {', '.join(unknown) or '(none given)'} in --cases: choose from {', '.join(CASES)}")
    if args.steps < 1 or args.batch_size < 1:
        raise ValueError("--steps and --batch-size must be at least 1")
    cases = [CASES[n] for n in names]
    for flag, path, marker in (("--adr", args.adr, "src/advTrainer.py"), ("--mtard", args.mtard, "mtard/mtard_loss.py"),
                               ("--mtard-extension", args.mtard_extension, "resnet18_mtard_cifar10.py")):
        if path is not None and not (path / marker).is_file():
            raise ValueError(f"{flag} {path}: no {marker} there; pass the root of a local clone of the repository")
    needs = {"adr": "--adr", "mtard": "--mtard", "bmtard": "--mtard-extension"}
    for case in cases:
        flag = needs[case.family]
        if getattr(args, flag[2:].replace("-", "_")) is None or (case.family == "bmtard" and args.mtard is None):
            missing = flag if getattr(args, flag[2:].replace("-", "_")) is None else "--mtard"
            raise ValueError(f"the case {case.name} needs {missing} PATH (a local clone of the reference); "
                             f"or leave the case out of --cases")
    data = args.data_dir or str(Path(os.environ.get("ROBUSTKD_SHARED", "../shared")) / "data" / "cifar10" / "plain_text")
    if not Path(data).is_dir():
        raise ValueError(f"--data-dir {data}: no such directory; pass the CIFAR-10 data directory")
    if args.json is not None and not args.json.parent.is_dir():
        raise ValueError(f"--json {args.json}: no directory {args.json.parent}; create it or pass another path")
    return cases, Options(args.adr, args.mtard, args.mtard_extension, data, args.steps, args.batch_size, args.seed)


def _load_report(path: Path) -> dict[str, Any]:
    import json

    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"--from-json {path}: not a readable JSON file ({exc}); pass a file written by "
                         "`robustkd fidelity --json`") from None
    keys = {"rows", "cases", "notes", "references", "torch", "batch_size", "steps", "seed"}
    if not isinstance(report, dict) or not keys <= report.keys():
        raise ValueError(f"--from-json {path}: not a `robustkd fidelity --json` file (it lacks "
                         f"{', '.join(sorted(keys - set(report) if isinstance(report, dict) else keys))})")
    return report


def cmd_fidelity(args: argparse.Namespace) -> int:
    import json

    if args.update_doc is not None:
        _check_doc(args.update_doc)
    if args.from_json is not None:
        reports = [_load_report(path) for path in args.from_json]
    else:
        cases, opts = _check_args(args)
        if args.threads:
            torch.set_num_threads(args.threads)
        command = shlex.join(["robustkd", "fidelity", *sys.argv[2:]]) if sys.argv[1:2] == ["fidelity"] else None
        commit = robustkd_commit()  # as the run starts: the code that runs
        notes: list[str] = []
        rows: list[dict[str, Any]] = []
        for case in cases:
            print(f"running {case.name} ({case.preset}) ...", file=sys.stderr, flush=True)
            rows.extend(run_case(case, opts, notes))
        report = build_report(rows, cases, opts, notes, command, commit)
        if args.json is not None:
            args.json.write_text(json.dumps(report, indent=1) + "\n")
        reports = [report]
    text = "\n\n".join(render(r) for r in reports)
    print(text)
    if args.update_doc is not None:
        update_doc(args.update_doc, text)
        print(f"updated {args.update_doc}", file=sys.stderr)
    return 0


__all__ = ["AttackRecorder", "BNMomentumSchedule", "CASES", "add_fidelity_parser", "build_report", "cmd_fidelity",
           "compare_states", "param_groups", "read_gin", "render", "trace", "training_loop_body", "update_doc"]
