"""One declaration of a run's configuration: recipe flags, config files, presets and validation.

The flags of every recipe are generated from the dataclasses below (with
:class:`transformers.HfArgumentParser`); each field is a flag (``--data-dir`` and ``--data_dir``
both work). A run's settings are resolved in layers, later ones winning:

1. the declaration's defaults, then the recipe's own defaults;
2. a preset (``--preset NAME``, or the recipe's default preset: the paper's CIFAR-10 ResNet-18 run
   of its method), see :mod:`robustkd.presets`;
3. a YAML file (``--config FILE.yaml``: a mapping of field names to values, or a run's
   ``config.yaml``);
4. the flags given on the command line.

Settings that belong to the preset's method (``method_kwargs``, the attack's objective, start and
mode) and to its model (``model_kwargs``) are taken from the preset only while the run keeps that
method / model; otherwise the method's own defaults apply (declared on each method class, read by ``robustkd.presets.method_defaults``).
When ``--epochs`` changes a preset's length and ``--milestones`` is not given, the preset's LR
milestones scale with it. ``--print-config`` prints the result and exits; every run writes it to
``config.yaml`` in its output directory, with the preset and the overrides named.

    python recipes/cifar_adr.py --preset adr/cifar10/resnet18_trades_sgd_adr --print-config
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Optional, cast

CONFIG_FILE = "config.yaml"
logger = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A setting that cannot work (the message names it and the fix)."""


def _f(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


# -- the declaration ------------------------------------------------------------------------------
@dataclass
class _DataArgs:
    _argument_group_name = "data"
    dataset: str = _f("cifar10", "task name (robustkd's registered tasks: cifar10, cifar100, tinyimagenet, sst2, "
                      "fsdd, ...)")
    data_dir: Optional[str] = _f(None, "local copy of the data (needed offline); without it the task loads its hub "
                                 "data set and fails at once, with this hint, when there is no network")
    task_kwargs: Optional[str] = _f(None, 'JSON options for the task, e.g. \'{"drop_empty": true}\', '
                                    '\'{"image_column": "img"}\', \'{"downmix": true}\', \'{"encoding": "latin-1"}\'')


@dataclass
class _ModelArgs:
    _argument_group_name = "model and method"
    model: str = _f("resnet18", "model name for the task (e.g. small_cnn, resnet18, preact_resnet18, wrn34_10, "
                    "timm:<name>)")
    model_kwargs: Optional[str] = _f(None, 'JSON keyword arguments for the model factory, e.g. \'{"width": 16}\' '
                                     "for small_cnn")
    method: str = _f("adr", "training method: standard, pgd_at, trades, adr, adr_trades, mtard, ...")
    method_kwargs: Optional[str] = _f(None, "JSON keyword arguments for the method, e.g. "
                                      '\'{"tau": [2.5, 2.0], "lam": [0.7, 0.95]}\' for adr')
    beta: float = _f(6.0, "TRADES' robustness weight (trades, adr_trades)")
    awp: bool = _f(False, "add adversarial weight perturbation (Wu et al. 2020)")
    awp_gamma: float = _f(5e-3, "AWP's relative weight-perturbation size (with --awp)")
    clean_teacher: Optional[str] = _f(None, "MTARD: the naturally trained teacher: a recipe --output-dir, "
                                      "timm:<name>, a Hugging Face model directory, or what the task loads by "
                                      "name (images: autoattack-example:resnet18, robustbench:NAME, ARCH:WEIGHTS.pt)")
    robust_teacher: Optional[str] = _f(None, "MTARD: the adversarially trained teacher (same forms), or 'ema' for "
                                       "the student's EMA self-teacher (teacher-free MTARD)")
    teacher_model_dir: Optional[str] = _f(None, "where robustbench:NAME teachers live (RobustBench's layout "
                                          "DIR/<dataset>/<threat>/<NAME>.pt)")
    teacher_weights: Literal["auto", "student", "ema"] = _f("auto", "which weights of a recipe output dir to use "
                                                            "as teacher (auto: the EMA model when it kept one)")


@dataclass
class _ThreatArgs:
    _argument_group_name = "threat model and attacks"
    eps: str = _f("8/255", "perturbation budget of training and, unless an attack names its own, of the "
                  "evaluation attacks (8/255 or 0.031)")
    norm: Literal["linf", "l2"] = _f("linf", "norm of the budget")
    attack_steps: int = _f(10, "PGD steps of the training attack")
    attack_step_size: Optional[str] = _f("2/255", "PGD step size of the training attack (default: the threat "
                                         "model's)")
    attack_random_start: Optional[str] = _f(None, "training attack's start: uniform, normal, zero, ... "
                                            "(default: the method's)")
    attack_init_std: Optional[float] = _f(None, "scale of a normal / small random start (default: the method's)")
    attack_loss: Optional[str] = _f(None, "objective the training attack maximises: ce, kl (default: the method's)")
    attack_mode: Optional[Literal["train", "eval"]] = _f(None, "mode the model is in while the training attack "
                                                         "runs (default: the method's)")
    final_attacks: str = _f("pgd20,autoattack", "attacks of the final report")


@dataclass
class _RunArgs:
    _argument_group_name = "run"
    curve_steps: int = _f(10, "PGD steps per budget of the final report's accuracy-vs-budget curve")
    no_progress: bool = _f(False, "hide progress bars")


def _with_trainer_settings(base: type, group: str) -> type:
    """``base``'s flags plus the :class:`~robustkd.trainer.TrainConfig` fields declared in ``group``: the
    trainer's settings are declared once, in ``TrainConfig``, and become flags here (same name, help and
    default; ``flag_type`` where the flag parses text, e.g. ``--milestones 100,150``)."""
    import typing
    from dataclasses import make_dataclass

    from .train_config import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    specs = []
    for f in fields(TrainConfig):
        md = f.metadata
        if md.get("group") != group or not md.get("flag", True):
            continue
        default = _field_default(f)
        if isinstance(default, list):
            default = ",".join(map(str, default)) or None
        specs.append((f.name, md.get("flag_type") or hints[f.name],
                      field(default=default, metadata={"help": md["help"]})))
    return make_dataclass(base.__name__.lstrip("_"), specs, bases=(base,), namespace={"_argument_group_name": group})


def _field_default(f: Any) -> Any:
    """A dataclass field's default value (its factory's product for a mutable default)."""
    if f.default is not MISSING:
        return f.default
    return f.default_factory() if callable(f.default_factory) else None


@dataclass
class _Group:
    """A group with no flags of its own: all of its settings are the trainer's."""


# each group: its own flags above plus the trainer's settings of the group (the names the flags' parser sees)
DataArgs = _with_trainer_settings(_DataArgs, "data")
ModelArgs = _with_trainer_settings(_ModelArgs, "model and method")
ThreatArgs = _with_trainer_settings(_ThreatArgs, "threat model and attacks")
OptimArgs = _with_trainer_settings(type("OptimArgs", (_Group,), {}), "optimisation")
SpeedArgs = _with_trainer_settings(type("SpeedArgs", (_Group,), {}), "speed (docs/performance.md)")
RunArgs = _with_trainer_settings(_RunArgs, "run")


@dataclass
class ConfigArgs:
    _argument_group_name = "configuration"
    preset: Optional[str] = _f(None, "start from a reference configuration (robustkd presets lists them); flags "
                               "given here override single settings")
    config: Optional[str] = _f(None, "a YAML file of settings (field: value), e.g. a run's config.yaml")
    print_config: bool = _f(False, "print the resolved settings and exit without training")


COMMON: tuple[type, ...] = (DataArgs, ModelArgs, ThreatArgs, OptimArgs, SpeedArgs, RunArgs, ConfigArgs)
#: Defaults of every recipe that differ from the trainer's own (a recipe's run is the paper's length).
RECIPE_DEFAULTS: dict[str, Any] = {"epochs": 200}
#: Fields that say how to configure, not what to run (never recorded as settings).
CONTROL = ("preset", "config", "print_config")
#: Settings of a method (taken from a preset only while the run keeps the preset's method).
METHOD_BOUND = ("method_kwargs", "attack_random_start", "attack_init_std", "attack_loss", "attack_mode", "ema_decay",
                "ema_warmup")


@dataclass
class Recipe:
    """What a recipe declares: its description, its default preset, its own defaults and extra groups."""

    description: str
    default_preset: str | None = None
    defaults: dict[str, Any] = field(default_factory=dict)
    extra: tuple[type, ...] = ()
    #: Called with the resolved settings before they are validated, printed or used (e.g. to fold
    #: a recipe's own flags into ``method_kwargs``); may raise :class:`ConfigError`.
    finalize: Callable[[dict[str, Any]], None] | None = None
    #: The run's threat model as options of ``task.threat_model`` from the resolved settings (e.g.
    #: ``{"snr_db": 30.0}`` from a recipe's own flag), or None for the default, ``eps`` and ``norm``
    #: (:func:`threat_options`). Resolved once, into :attr:`RunConfig.threat`.
    threat: Callable[[dict[str, Any]], Mapping[str, Any] | None] | None = None

    @property
    def dataclasses(self) -> tuple[type, ...]:
        return (*COMMON, *self.extra)


def declared_fields(recipe: Recipe) -> dict[str, Any]:
    """Field name -> default over the recipe's dataclasses."""
    out: dict[str, Any] = {}
    for dc in recipe.dataclasses:
        for f in fields(dc):
            out[f.name] = _field_default(f)
    return out


def build_parser(recipe: Recipe) -> argparse.ArgumentParser:
    from transformers import HfArgumentParser

    from .console import HelpFormatter

    parser = HfArgumentParser(cast(Any, recipe.dataclasses), description=recipe.description,
                              formatter_class=HelpFormatter,  # each default shown once
                              allow_abbrev=False)  # --epoch is a typo, never taken for --epochs
    shown = {**RECIPE_DEFAULTS, **recipe.defaults}  # --help shows the values a run starts from
    if recipe.default_preset:
        from .presets import get_preset

        parser.epilog = (f"Without --preset the run starts from {recipe.default_preset} (the paper's run); the "
                         "defaults shown are its settings. `robustkd presets` lists the others.")
        shown.update(get_preset(recipe.default_preset).settings)
    known = {a.dest for a in parser._actions}
    parser.set_defaults(**{k: v for k, v in shown.items() if k in known})
    return parser


def _given(parser: argparse.ArgumentParser, argv: Sequence[str]) -> dict[str, Any]:
    """The settings given on the command line (and only those)."""
    quiet = copy.deepcopy(parser)
    quiet._defaults = {}  # set_defaults() values are display defaults, not given settings
    for action in quiet._actions:
        if action.dest != "help":
            action.default = argparse.SUPPRESS
    return vars(quiet.parse_args(list(argv)))


# -- resolution -----------------------------------------------------------------------------------
def _load_file(path: str, known: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    import yaml

    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config {path} is not valid YAML ({str(exc).splitlines()[0]})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path} must be a mapping of settings (field: value)")
    preset = data.get("preset")
    if "settings" in data:  # a run's config.yaml: the resolved settings, with provenance beside them
        data = data["settings"] or {}
    unknown = sorted(set(data) - set(known) - set(CONTROL))
    if unknown:
        raise ConfigError(f"--config {path}: unknown setting(s) {', '.join(unknown)}; known: "
                          f"{', '.join(sorted(set(known) - set(CONTROL)))}")
    return {k: v for k, v in data.items() if k not in CONTROL}, preset


def _check_types(values: dict[str, Any], recipe: Recipe, where: str) -> None:
    """Refuse a value of the wrong type in a config file (a string where a number goes, a quoted
    boolean, a float where an integer goes), naming the setting, what it takes and the fix."""
    import typing

    hints: dict[str, Any] = {}
    for dc in recipe.dataclasses:
        hints.update(typing.get_type_hints(dc))
    listy = {"milestones", "eval_attacks", "final_attacks", "tags"}
    dicty = {"model_kwargs", "method_kwargs", "task_kwargs"}
    for key, value in values.items():
        hint = hints.get(key)
        if hint is None or value is None:
            continue
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        base = args[0] if typing.get_origin(hint) is typing.Union and len(args) == 1 else hint
        if typing.get_origin(base) is Literal:
            choices = typing.get_args(base)
            if value not in choices:
                raise ConfigError(f"{where}: {key} must be one of {', '.join(map(str, choices))} (got {value!r})")
            continue
        ok = True
        if base is bool:
            ok = isinstance(value, bool)
            takes = "true or false (unquoted)"
        elif base is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
            takes = "a whole number"
        elif base is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            takes = "a number"
        elif base is str:
            ok = (isinstance(value, (str, int, float)) and not isinstance(value, bool)) or \
                (key in listy and isinstance(value, list)) or (key in dicty and isinstance(value, dict))
            takes = "a list or comma-separated text" if key in listy else \
                "a mapping or JSON text" if key in dicty else "text"
        else:
            continue
        if not ok:
            raise ConfigError(f"{where}: {key} takes {takes}, got {type(value).__name__} {value!r}: fix the value "
                              f"(e.g. {key}: {_example(base, key, listy)})")


def _example(base: Any, key: str, listy: set[str]) -> str:
    if base is bool:
        return "false"
    if base is int:
        return "10"
    if base is float:
        return "0.1"
    return "[100, 150]" if key == "milestones" else "pgd20" if key in listy else "'...'"


def _as_dict(value: Any, name: str) -> dict[str, Any]:
    if value is None or value == "":
        return {}
    if isinstance(value, dict):
        return dict(value)
    try:
        parsed = json.loads(value)
    except (TypeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"--{name.replace('_', '-')} must be a JSON object, e.g. '{{\"width\": 16}}' "
                          f"(got {value!r})") from exc
    if not isinstance(parsed, dict):
        raise ConfigError(f"--{name.replace('_', '-')} must be a JSON object (got {value!r})")
    return parsed


def _as_milestones(value: Any) -> list[int] | None:
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple)):
        items = list(value)
    else:
        items = [m for m in str(value).replace(" ", "").split(",") if m]
    try:
        return [int(m) for m in items]
    except ValueError as exc:
        raise ConfigError(f"--milestones takes comma-separated epochs, e.g. 100,150 (got {value!r})") from exc


def _as_specs(value: Any) -> list[str]:
    from .attacks.base import split_attack_specs

    return split_attack_specs(value)  # the one spec language: ';' and ',' alike, lists item by item


def _budget(value: Any, name: str) -> float:
    from .threat import eps_from_pixels

    try:
        return float(eps_from_pixels(value))
    except (TypeError, ValueError, ZeroDivisionError) as exc:
        raise ConfigError(f"--{name.replace('_', '-')} {value!r} is not a number: give e.g. 8/255 or 0.031") from exc


def validate(s: dict[str, Any]) -> None:
    """Refuse settings that cannot work, with one line naming the setting and the fix."""
    if s["epochs"] < 1:
        raise ConfigError(f"--epochs must be at least 1 (got {s['epochs']})")
    for name in ("max_train_samples", "max_eval_samples"):
        if s.get(name) is not None and s[name] <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be a positive number of examples (got {s[name]}); "
                              "leave it out to use the whole split")
    for name in ("batch_size", "eval_batch_size", "attack_steps", "grad_accum"):
        if s.get(name) is not None and s[name] < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1 (got {s[name]})")
    if s["eval_every"] < 0:
        raise ConfigError(f"--eval-every must be 0 (only at the end) or a positive number of epochs "
                          f"(got {s['eval_every']})")
    if s["lr"] <= 0:
        raise ConfigError(f"--lr must be positive (got {s['lr']})")
    eps = _budget(s["eps"], "eps")
    if eps < 0:
        raise ConfigError(f"--eps must not be negative (got {s['eps']})")
    if s["norm"] == "linf" and eps > 1:
        raise ConfigError(f"--eps {s['eps']} is larger than the whole input range [0, 1] under L-inf: did you mean "
                          f"{s['eps']}/255?")
    if s.get("attack_step_size") not in (None, ""):
        _budget(s["attack_step_size"], "attack_step_size")
    if s.get("milestones"):
        bad = [m for m in s["milestones"] if m < 1]
        if bad:
            raise ConfigError(f"--milestones are epochs >= 1 (got {bad})")


@dataclass
class RunConfig:
    """The resolved settings of a run and where they came from."""

    settings: dict[str, Any]
    preset: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)  # settings that differ from the preset's, by source
    config_file: str | None = None
    notes: list[str] = field(default_factory=list)  # what resolution did on its own (scaled milestones, ...)
    unsupported: list[str] = field(default_factory=list)  # the preset's reference behaviour robustkd lacks
    #: the run's threat model, as options of ``task.threat_model`` (``{"eps": 0.031, "norm": "linf"}``): the
    #: training attack's ball and the budget of every evaluation attack whose spec names none; None:
    #: :func:`threat_options` of the settings
    threat: dict[str, Any] | None = None

    def threat_options(self) -> dict[str, Any]:
        """The run's threat model (:attr:`threat`), resolved from the settings once."""
        if self.threat is None:
            self.threat = threat_options(self.settings)
        return dict(self.threat)

    @property
    def args(self) -> argparse.Namespace:
        """The settings as attributes (``cfg.args.epochs``)."""
        return argparse.Namespace(**self.settings, preset=self.preset, overrides=self.overrides,
                                  config=self.config_file)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"preset": self.preset}
        if self.preset:
            from .presets import get_preset

            out["source"] = get_preset(self.preset).source
        out["overrides"] = self.overrides
        if self.config_file:
            out["config_file"] = self.config_file
        if self.notes:
            out["notes"] = self.notes
        if self.unsupported:
            out["unsupported"] = self.unsupported
        out["settings"] = self.settings
        return out

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(json.loads(json.dumps(self.to_dict(), default=str)), sort_keys=False, width=120)

    def write(self, output_dir: str | Path) -> Path:
        """``config.yaml`` in ``output_dir``: readable again with ``--config``."""
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = out / CONFIG_FILE
        path.write_text(self.to_yaml())
        return path


def resolve(recipe: Recipe, argv: Sequence[str] | None = None) -> RunConfig:
    """The run's settings from the layers described in the module docstring (validated)."""
    from .presets import get_preset

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(recipe)
    parser.parse_args(argv)  # usage errors (unknown flag, bad choice) exit 2 here, argparse's way
    given = _given(parser, argv)
    known = declared_fields(recipe)
    for key in list(given):
        if key not in known:
            given.pop(key)
    base = {k: v for k, v in known.items() if k not in CONTROL}
    base.update({k: v for k, v in RECIPE_DEFAULTS.items() if k in base})
    base.update(recipe.defaults)

    file_values: dict[str, Any] = {}
    file_preset = None
    if given.get("config"):
        file_values, file_preset = _load_file(given["config"], known)
        _check_types(file_values, recipe, f"--config {given['config']}")
    preset_name = given.get("preset") or file_preset or recipe.default_preset
    preset = get_preset(preset_name) if preset_name else None

    settings = dict(base)
    layers: list[tuple[str, dict[str, Any]]] = []
    if preset is not None:
        unknown = sorted(set(preset.settings) - set(settings))
        if unknown:
            raise ConfigError(f"preset {preset.name} sets {', '.join(unknown)}, which this recipe does not declare")
        layers.append(("preset", copy.deepcopy(preset.settings)))
    layers.append(("config", file_values))
    layers.append(("command line", {k: v for k, v in given.items() if k not in CONTROL}))
    for _, values in layers:
        settings.update(values)
    user = {**file_values, **{k: v for k, v in given.items() if k not in CONTROL}}

    notes: list[str] = []
    if preset is not None:
        ps = preset.settings
        if settings["method"] != ps["method"]:  # the preset's method settings belong to its method
            for key in METHOD_BOUND:
                if key not in user:
                    settings[key] = base.get(key)
            notes.append(f"method {settings['method']} instead of the preset's {ps['method']}: its method_kwargs and "
                         "attack start / objective / mode are the method's own defaults")
        if settings["model"] != ps["model"] and "model_kwargs" not in user:
            settings["model_kwargs"] = base.get("model_kwargs")
        if ("epochs" in user and "milestones" not in user and ps.get("milestones")
                and settings["epochs"] != ps["epochs"]):
            scaled = sorted({max(1, round(m * settings["epochs"] / ps["epochs"])) for m in ps["milestones"]})
            notes.append(f"milestones {ps['milestones']} of {ps['epochs']} epochs scaled to {scaled} for "
                         f"{settings['epochs']} epochs")
            settings["milestones"] = scaled

    if settings.get("awp") and settings.get("awp_gamma") is None:  # a preset without AWP keeps gamma null
        settings["awp_gamma"] = known["awp_gamma"]
        notes.append(f"--awp on a preset without AWP: gamma {settings['awp_gamma']} (the papers'; --awp-gamma to change)")
    if preset is not None and "norm" in user and settings["norm"] != preset.settings.get("norm") and "eps" not in user:
        raise ConfigError(f"--norm {settings['norm']} changes the threat model of preset {preset.name}, whose eps "
                          f"{preset.settings.get('eps')} is a {preset.settings.get('norm')} budget: give the budget too, "
                          "e.g. --norm l2 --eps 0.5")
    settings["tags"] = [t for t in (settings.get("tags") or "").split(",") if t] \
        if not isinstance(settings.get("tags"), list) else settings["tags"]
    settings["model_kwargs"] = _as_dict(settings.get("model_kwargs"), "model_kwargs")
    settings["task_kwargs"] = _as_dict(settings.get("task_kwargs"), "task_kwargs")
    settings["method_kwargs"] = _as_dict(settings.get("method_kwargs"), "method_kwargs")
    settings["milestones"] = _as_milestones(settings.get("milestones"))
    for key in ("eval_attacks", "final_attacks"):
        settings[key] = _as_specs(settings.get(key))
    for key in ("eps", "attack_step_size"):
        if settings.get(key) is not None:
            settings[key] = str(settings[key])
    if recipe.finalize is not None:
        recipe.finalize(settings)
    validate(settings)
    from .registry import METHODS

    _check_method_kwargs(settings["method"], METHODS.get(settings["method"]), settings["method_kwargs"])
    from .presets import method_defaults

    stray = [k for k in ("clean_teacher", "robust_teacher") if k in user and user[k]]
    if stray and not method_defaults(settings["method"]).get("teachers"):
        raise ConfigError(f"--method {settings['method']} trains without teachers, so "
                          f"{' and '.join('--' + k.replace('_', '-') for k in stray)} would be ignored: drop "
                          f"{'them' if len(stray) > 1 else 'it'}, or use --method mtard")
    check_teacher_model_dir(settings)

    if preset is not None:
        overrides = {k: settings[k] for k in user if k in preset.settings and settings[k] != preset.settings[k]}
        overrides.update({k: settings[k] for k in user if k not in preset.settings and settings[k] != base.get(k)})
    else:
        overrides = {k: settings[k] for k in user if settings[k] != base.get(k)}
    unsupported = list(preset.unsupported) if preset is not None else []
    threat = recipe.threat(settings) if recipe.threat is not None else None
    return RunConfig(settings=settings, preset=preset.name if preset else None, overrides=overrides,
                     config_file=given.get("config"), notes=notes, unsupported=unsupported,
                     threat=dict(threat) if threat is not None else threat_options(settings))


def parse(recipe: Recipe, argv: Sequence[str] | None = None) -> RunConfig:
    """Resolve the settings; with ``--print-config`` print them and exit 0 (nothing is run or written)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = resolve(recipe, argv)
    parser = build_parser(recipe)
    if _given(parser, argv).get("print_config"):
        print(cfg.to_yaml(), end="")
        raise SystemExit(0)
    for line in cfg.unsupported:
        logger.warning("preset %s: the reference uses %s", cfg.preset, line)
    for line in cfg.notes:
        logger.info("%s", line)
    return cfg


# -- what a configuration builds ------------------------------------------------------------------
def train_config(s: dict[str, Any] | argparse.Namespace, eval_threat: Mapping[str, Any] | None = None) -> Any:
    """The :class:`~robustkd.trainer.TrainConfig` of the settings: every field declared as a flag is the
    setting of the same name (one declaration, no map); the derived fields are computed here:
    ``awp_gamma`` (None without ``awp``), ``progress`` (``not no_progress``) and ``eval_threat``
    (the run's threat model, :attr:`RunConfig.threat`; default: :func:`threat_options` of the settings),
    the budget of per-epoch attacks whose specs name none."""
    from dataclasses import fields as dc_fields

    from .train_config import TrainConfig

    s = vars(s) if isinstance(s, argparse.Namespace) else s
    values = {f.name: s[f.name] for f in dc_fields(TrainConfig) if f.metadata.get("flag", True) and f.name in s}
    values["eval_attacks"] = _as_specs(values.get("eval_attacks", ["pgd20"]))
    values["milestones"] = _as_milestones(values.get("milestones"))
    if isinstance(values.get("tags"), str):
        values["tags"] = [t for t in values["tags"].split(",") if t]
    values["awp_gamma"] = s.get("awp_gamma") if s.get("awp") else None
    values["progress"] = not s.get("no_progress", False)
    values["eval_threat"] = dict(eval_threat if eval_threat is not None else threat_options(s))
    return TrainConfig(**values)


def threat_options(s: Mapping[str, Any]) -> dict[str, Any]:
    """The threat model of the settings ``eps`` (parsed: ``8/255``) and ``norm``, as options of
    ``task.threat_model``: the default of :attr:`RunConfig.threat`."""
    return {"eps": _budget(s["eps"], "eps"), "norm": s["norm"]}


#: the earlier name of :func:`threat_options`
eval_attack_defaults = threat_options


def build_attacks(specs: Sequence[str], task: Any, defaults: Mapping[str, Any]) -> dict[str, Any]:
    """Evaluation attacks in the run's threat model: ``defaults`` (eps, norm) are the budget of every attack
    whose spec names none of its own and that takes both (see :func:`robustkd.attacks.base.create_attack`)."""
    from .attacks.base import build_attacks as _build

    return _build(specs, task, **defaults)


def build_method(s: Mapping[str, Any] | argparse.Namespace, task: Any, *, threat: Any = None,
                 relative_step: bool | None = None) -> Any:
    """The run's method, with its training attack, attack mode and teachers, from the settings: the
    one builder of a method and its training attack, used by the recipes, ``RobustTrainer``
    (:func:`robustkd.hf.build_robust_method`) and the conformance kit (:mod:`robustkd.testing`).

    The attack is PGD in the run's threat model (``threat``: a :class:`~robustkd.threat.ThreatModel`,
    or options of ``task.threat_model`` such as :attr:`RunConfig.threat`; default: :func:`threat_options`
    of the settings) with ``attack_steps`` and ``attack_step_size``. The step size is relative to each
    input's radius when ``relative_step`` says so, by default when the task's own training attack
    (``task.default_train_attack``, e.g. the text task's ``embedding_pgd``) takes relative steps (see
    :func:`steps_are_relative`). Its objective, start and mode are the settings' when given (a preset
    gives them) and otherwise the method's own (its class's ``training_attack`` / ``attack_mode``, via
    ``method_defaults``). Teachers named by ``clean_teacher`` / ``robust_teacher`` are loaded with
    :func:`robustkd.teachers.load_teacher`. Settings left out take their defaults:
    ``build_method({"method": "pgd_at", "attack_steps": 2}, task, threat=task.threat_model())`` is the
    method in the task's own threat model.
    """
    from .attacks.pgd import PGD
    from .presets import method_defaults
    from .registry import METHODS
    from .threat import ThreatModel, eps_from_pixels

    s = vars(s) if isinstance(s, argparse.Namespace) else s
    name = s["method"]
    factory = METHODS.get(name)
    own = method_defaults(name)
    atk_defaults = own.get("attack")
    attack = None
    mode = None
    if atk_defaults is not None:
        if not isinstance(threat, ThreatModel):
            threat = task.threat_model(**(threat_options(s) if threat is None else dict(threat)))
        step = s.get("attack_step_size")
        step = float(eps_from_pixels(step)) if step not in (None, "") else None
        relative = step is not None and (steps_are_relative(task) if relative_step is None else relative_step)
        start = s.get("attack_random_start") or atk_defaults.get("random_start", "uniform")
        init_std = s.get("attack_init_std")
        if init_std is None:
            init_std = atk_defaults.get("init_std", 0.001)
        loss = s.get("attack_loss") or atk_defaults.get("loss", "ce")
        attack = PGD(task, threat, steps=s.get("attack_steps", 10), step_size=None if relative else step,
                     rel_step_size=step if relative else None, random_start=start, init_std=init_std, loss=loss)
        mode = s.get("attack_mode") or atk_defaults.get("mode")
    kwargs = {**own.get("method_kwargs", {}), **(s.get("method_kwargs") or {})}
    if name in ("trades", "adr_trades") and s.get("beta") is not None:
        kwargs.setdefault("beta", s["beta"])
    _check_method_kwargs(name, factory, {**kwargs, **({"attack_mode": mode} if mode else {})})
    if mode is not None:
        kwargs["attack_mode"] = mode
    if own.get("teachers"):
        kwargs.update(load_teachers(s, task))
    return factory(task, attack, **kwargs)


def steps_are_relative(task: Any) -> bool:
    """Whether a training-attack step size on ``task`` is relative to each input's radius: as the task's
    own training attack (``task.default_train_attack``) takes it, e.g. ``embedding_pgd``'s steps relative
    to each token embedding's radius; absolute for ``pgd`` (pixels, waveform amplitude)."""
    from .attacks.base import create_attack

    return getattr(create_attack(task.default_train_attack, task), "rel_step_size", None) is not None


def _check_method_kwargs(name: str, factory: Any, kwargs: dict[str, Any]) -> None:
    """Refuse a method setting the method does not take, before any work, with the setting named."""
    import inspect

    from .distill import methods

    target = methods.ADR if name in ("adr", "adr_trades") else factory
    params = inspect.signature(target).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(set(kwargs) - set(params) - {"clean_teacher", "robust_teacher"})
    if unknown:
        raise ConfigError(f"the method {name!r} takes no setting {', '.join(unknown)} (method_kwargs); it takes "
                          f"{', '.join(k for k in params if k not in ('self', 'task', 'attack'))}")


def load_teachers(s: Mapping[str, Any], task: Any) -> dict[str, Any]:
    """MTARD's teachers from ``clean_teacher`` / ``robust_teacher`` (``'ema'``: the student's EMA)."""
    from .teachers import load_teacher

    if not s.get("clean_teacher") or not s.get("robust_teacher"):
        raise ConfigError(f"--method {s['method']} needs --clean-teacher and --robust-teacher (a recipe "
                          "--output-dir, timm:<name>, a Hugging Face model directory; the robust one may be 'ema')")
    which = s.get("teacher_weights", "auto")
    check_teacher_model_dir(s)

    def options(spec: str) -> dict[str, Any]:  # --teacher-model-dir is RobustBench's: only robustbench: teachers get it
        return {"model_dir": s["teacher_model_dir"]} if s.get("teacher_model_dir") and _is_robustbench(spec) else {}

    clean = load_teacher(s["clean_teacher"], task, which=which, name="clean", **options(s["clean_teacher"]))
    robust = "ema" if s["robust_teacher"] == "ema" else load_teacher(s["robust_teacher"], task, which=which,
                                                                       name="robust", **options(s["robust_teacher"]))
    return {"clean_teacher": clean, "robust_teacher": robust}


def _is_robustbench(spec: Any) -> bool:
    return isinstance(spec, str) and spec.startswith("robustbench:")


def check_teacher_model_dir(s: Mapping[str, Any]) -> None:
    """``--teacher-model-dir`` is where ``robustbench:NAME`` teachers' files are: refused when no teacher is one
    (no teacher would read it)."""
    if s.get("teacher_model_dir") and not any(_is_robustbench(s.get(k)) for k in ("clean_teacher", "robust_teacher")):
        given = ", ".join(f"--{k.replace('_', '-')} {s[k]}" for k in ("clean_teacher", "robust_teacher") if s.get(k))
        raise ConfigError(f"--teacher-model-dir is where robustbench:NAME teachers' files are, but no teacher is one "
                          f"({given or 'no teachers given'}), so nothing would read it: drop it, or name a RobustBench "
                          "teacher (e.g. --robust-teacher robustbench:Ding2020MMA)")


__all__ = ["ConfigError", "Recipe", "RunConfig", "build_attacks", "build_method", "build_parser", "parse", "resolve",
           "steps_are_relative", "threat_options", "train_config", "validate", "CONFIG_FILE"]
