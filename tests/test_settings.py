"""What a user sets is what runs: every declared setting reaches the object that uses it.

Generated from the declaration (``robustkd.config``'s flag groups, whose trainer settings are the
fields of :class:`robustkd.train_config.TrainConfig`): each setting of the main recipe is given a
non-default value on the command line of ``recipes/cifar_adr.py`` and the run the recipe builds
(task, model, method and attack, trainer, loaders) is compared with the run built without it.
A setting that changes nothing there fails; a new setting without a probe below fails too.
The ``--config`` file and preset layers resolve to the same settings as the flag (checked for every
setting), so they build the same run.
"""
from __future__ import annotations

import importlib.util
import typing
from dataclasses import MISSING, fields
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]


def _recipe_module(name: str = "cifar_adr"):
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", REPO / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Built(Exception):
    def __init__(self, trainer):
        self.trainer = trainer


@pytest.fixture(scope="module")
def recipe():
    return _recipe_module()


def build(recipe, argv, monkeypatch):
    """The trainer the recipe builds for ``argv`` (nothing is trained or written but the output folder)."""
    from robustkd import recipe as recipe_mod

    def stop(self):
        raise _Built(self)

    monkeypatch.setattr(recipe_mod.Trainer, "fit", stop)
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # each build is a new process's Accelerator
    with pytest.raises(_Built) as built:
        recipe.main(argv)
    return built.value.trainer


def _unwrap(model):
    from robustkd.teachers import unwrap

    return unwrap(model)


def _params(model):
    return sum(p.numel() for p in _unwrap(model).parameters())


def _attack(t):
    return t.method.attack


#: How each setting that is not a TrainConfig field shows in the built run, and the value to set
#: (with extra flags both sides need). TrainConfig fields are read from ``trainer.config`` and, for the
#: speed modes and loaders, from the objects they change (``DEEP`` below).
PROBES: dict[str, tuple[typing.Any, list[str], typing.Callable]] = {
    "data_dir": ("{alt_data}", [], lambda t: t.task.data_dir),
    "task_kwargs": ('{"image_column": "img"}', [], lambda t: getattr(t.task, "image_column", None)),
    "model": ("preact_resnet18", [], lambda t: type(_unwrap(t.model)[-1] if isinstance(_unwrap(t.model),
                                                                                       torch.nn.Sequential)
                                                    else _unwrap(t.model)).__name__),
    "model_kwargs": ('{"width": 8}', [], lambda t: _params(t.model)),
    "method": ("pgd_at", [], lambda t: t.method.name),
    "method_kwargs": ('{"tau": [3.0, 2.0]}', [], lambda t: (t.method.rectifier.tau.start, t.method.rectifier.tau.end)),
    "beta": ("3.0", ["--method", "trades"], lambda t: t.method.beta),
    "awp": ("true", [], lambda t: t.awp is not None),
    "awp_gamma": ("0.01", ["--awp"], lambda t: t.awp.gamma),
    "eps": ("4/255", [], lambda t: _attack(t).threat.eps),
    "norm": ("l2", ["--eps", "0.5"], lambda t: _attack(t).threat.norm),
    "attack_steps": ("3", [], lambda t: _attack(t).steps),
    "attack_step_size": ("1/255", [], lambda t: _attack(t).step_size),
    "attack_random_start": ("zero", [], lambda t: _attack(t).random_start),
    "attack_init_std": ("0.01", ["--attack-random-start", "normal"], lambda t: _attack(t).init_std),
    "attack_loss": ("kl", [], lambda t: _attack(t).loss_name),
    "attack_mode": ("eval", [], lambda t: t.method.attack_mode),
    "final_attacks": ("fgsm", [], lambda t: t.final_attacks),
    "curve_steps": ("3", [], lambda t: t.curve_steps),
    "no_progress": ("true", [], lambda t: t.config.progress),
}
#: Settings whose non-default value needs files this test does not make; each names the test that covers it.
EXEMPT = {
    "dataset": "another task's data (tests/test_image_data.py builds cifar100/tinyimagenet tasks)",
    "clean_teacher": "a teacher run (tests/test_mtard.py runs the MTARD recipe with both teachers)",
    "robust_teacher": "a teacher run (tests/test_mtard.py)",
    "teacher_model_dir": "RobustBench model files (tests/test_ecosystem.py)",
    "teacher_weights": "a teacher run with an EMA (tests/test_mtard.py)",
    "resume": "a checkpoint to resume (tests/test_training.py::test_resume_*)",
    "overwrite": "a previous run in the folder (tests/test_bad_input.py)",
    "log_with": "a tracker package (tests/test_training.py checks --log-with tensorboard)",
    "cpu": "a GPU: on a CPU-only machine --cpu changes nothing",
}
#: Speed modes and loader settings: the objects they change.
DEEP = {
    "channels_last": lambda t: _unwrap(t.model).conv1.weight.is_contiguous(memory_format=torch.channels_last)
    if hasattr(_unwrap(t.model), "conv1") else next(p for p in _unwrap(t.model).parameters()
                                                    if p.dim() == 4).is_contiguous(memory_format=torch.channels_last),
    "compile": lambda t: getattr(_unwrap(t.model), "_compiled_call_impl", None) is not None,
    "num_workers": lambda t: t.train_loader.base_dataloader.num_workers
    if hasattr(t.train_loader, "base_dataloader") else t.train_loader.num_workers,
    "pin_memory": lambda t: (t.train_loader.base_dataloader if hasattr(t.train_loader, "base_dataloader")
                             else t.train_loader).pin_memory,
}
#: Flags a TrainConfig field's test value needs beside it (the preset's Nesterov SGD, AWP on, ...).
NEEDS = {"optimizer": ["--nesterov", "false"], "awp_style": ["--awp"], "grad_accum": ["--method", "pgd_at"],
         "bn_no_decay": ["--model", "preact_resnet18"]}
#: Flag values for the TrainConfig fields a type cannot choose (strings, lists, bounded numbers).
VALUES = {"optimizer": "adamw", "lr_schedule": "cosine", "milestones": "1", "mixed_precision": "bf16",
          "eval_attacks": "fgsm", "output_dir": "{tmp}/other", "run_name": "named", "tags": "a,b",
          "max_train_samples": "48", "max_eval_samples": "8", "batch_size": "16", "eval_batch_size": "8",
          "epochs": "3", "lr_warmup_epochs": "1", "nesterov": "false", "drop_last": "false", "awp_style": "wu2020",
          "ema_decay": "0.9", "grad_accum": "2", "keep_checkpoints": "2", "max_nonfinite_steps": "2",
          "num_workers": "1", "eval_every": "2", "momentum": "0.5", "lr": "0.05"}


def _flag_value(name: str, default: typing.Any, hint: typing.Any) -> str:
    if name in VALUES:
        return VALUES[name]
    base = [a for a in typing.get_args(hint) if a is not type(None)]
    base = base[0] if typing.get_origin(hint) is typing.Union and len(base) == 1 else hint
    if base is bool:
        return "false" if default else "true"
    if base is int:
        return str((default or 0) + 1)
    if base is float:
        return str((default or 0.0) * 2 or 0.25)
    if typing.get_origin(base) is typing.Literal:
        return next(str(c) for c in typing.get_args(base) if c != default)
    raise AssertionError(f"no test value for the setting {name!r} ({hint}): add it to VALUES")


def _declared(recipe):
    from robustkd.config import CONTROL

    out = {}
    for dc in recipe.RECIPE.dataclasses:
        hints = typing.get_type_hints(dc)
        for f in fields(dc):
            if f.name not in CONTROL:
                out[f.name] = (f.default if f.default is not MISSING else None, hints[f.name])
    return out


def test_every_declared_setting_has_a_consumer_probe(recipe):
    from robustkd.train_config import TrainConfig

    trainer_fields = {f.name for f in fields(TrainConfig) if f.metadata.get("flag", True)}
    missing = [n for n in _declared(recipe) if n not in PROBES and n not in EXEMPT and n not in trainer_fields]
    assert not missing, f"settings without a consumer probe: {missing} (add one to PROBES)"
    derived = {f.name for f in fields(TrainConfig) if not f.metadata.get("flag", True)}
    assert derived == {"awp_gamma", "progress", "eval_threat"}, "a TrainConfig field that is no setting"


def _base(tmp_path, cifar_dir):
    return ["--data-dir", cifar_dir, "--model", "small_cnn", "--epochs", "2", "--max-train-samples", "64",
            "--batch-size", "32", "--eval-batch-size", "16", "--max-eval-samples", "16",
            "--final-attacks", "pgd20", "--output-dir", str(tmp_path / "run"), "--no-progress", "false"]


def _probe_all(name, t):
    if name in PROBES:
        return PROBES[name][2](t)
    if name in DEEP:
        return (getattr(t.config, name), DEEP[name](t))
    return getattr(t.config, name)


def test_each_setting_given_on_the_command_line_reaches_what_runs(recipe, tmp_path, cifar_dir, monkeypatch):
    import robustkd.recipe as recipe_mod

    # the final report's settings are read by final_report: expose them on the trainer for the probes
    real_build = recipe_mod.build_trainer

    def build_and_tag(cfg, *a, **k):
        t = real_build(cfg, *a, **k)
        t.final_attacks, t.curve_steps = list(cfg.settings["final_attacks"]), cfg.settings["curve_steps"]
        return t

    monkeypatch.setattr(recipe_mod, "build_trainer", build_and_tag)
    alt_data = tmp_path / "data"
    alt_data.symlink_to(cifar_dir, target_is_directory=True)
    declared = _declared(recipe)
    base = _base(tmp_path, cifar_dir)
    reference = build(recipe, base, monkeypatch)
    unchanged = []
    for name, (default, hint) in declared.items():
        if name in EXEMPT:
            continue
        value, extra = (PROBES[name][0], PROBES[name][1]) if name in PROBES else \
            (_flag_value(name, default, hint), NEEDS.get(name, []))
        value = value.replace("{alt_data}", str(alt_data)).replace("{tmp}", str(tmp_path))
        flag = "--" + name.replace("_", "-")
        before = reference if not extra else build(recipe, base + extra, monkeypatch)
        after = build(recipe, base + extra + [flag, value], monkeypatch)
        if _probe_all(name, before) == _probe_all(name, after):
            unchanged.append(f"{flag} {value}")
    assert not unchanged, f"settings that did not reach what runs: {unchanged}"


def test_config_file_and_preset_layers_resolve_each_setting_as_the_flag_does(recipe, tmp_path, cifar_dir,
                                                                             monkeypatch):
    """A setting in a --config file, or in a preset, resolves to the same settings as the flag."""
    import dataclasses

    import robustkd.presets as presets
    from robustkd.config import resolve

    base = _base(tmp_path, cifar_dir)
    real = presets.get_preset(recipe.RECIPE.default_preset)
    checked = 0
    for name, (default, hint) in _declared(recipe).items():
        if name in EXEMPT or name in ("output_dir", "data_dir"):
            continue
        value, extra = (PROBES[name][0], PROBES[name][1]) if name in PROBES else \
            (_flag_value(name, default, hint), NEEDS.get(name, []))
        value = value.replace("{alt_data}", cifar_dir).replace("{tmp}", str(tmp_path))
        flag = "--" + name.replace("_", "-")
        if flag in base:  # the command line beats a file and a preset: leave this setting to the layer tested
            i = base.index(flag)
            base_n = base[:i] + base[i + 2:]
        else:
            base_n = base
        by_flag = resolve(recipe.RECIPE, base_n + extra + [flag, value]).settings
        parsed = value if value.startswith("{") or name in ("eps", "attack_step_size", "milestones", "tags",
                                                             "eval_attacks", "final_attacks") else yaml.safe_load(value)
        cfg_file = tmp_path / f"{name}.yaml"
        cfg_file.write_text(yaml.safe_dump({name: parsed}))
        by_file = resolve(recipe.RECIPE, base_n + extra + ["--config", str(cfg_file)]).settings
        assert by_file[name] == by_flag[name], ("--config", name, by_file[name], by_flag[name])
        # the same value in the run's preset (the recipe's default preset, with this one setting changed)
        if name in real.settings:
            # a preset's model options belong to its model: the preset names the model the run keeps
            also = {"model": "small_cnn"} if name == "model_kwargs" else {"method_kwargs": {}} if name == "method" else {}
            changed = dataclasses.replace(real, settings={**real.settings, **also, name: by_flag[name]})
            monkeypatch.setattr(presets, "get_preset", lambda n, _p=changed: _p if n == real.name else real)
            by_preset = resolve(recipe.RECIPE, base_n + extra).settings
            monkeypatch.undo()
            assert by_preset[name] == by_flag[name], ("preset", name, by_preset[name], by_flag[name])
        checked += 1
    assert checked > 40


def test_same_command_and_seed_write_identical_weights(recipe, tmp_path, cifar_dir):
    """Model initialisation, data order, augmentation, attack starts and the EMA all follow --seed."""
    from safetensors.torch import load_file

    outs = []
    for run in ("a", "b"):
        argv = _base(tmp_path, cifar_dir)
        argv[argv.index("--output-dir") + 1] = str(tmp_path / run)
        argv[argv.index("--epochs") + 1] = "1"
        recipe.main(argv + ["--eval-every", "0", "--final-attacks", "fgsm", "--curve-steps", "2", "--seed", "3"])
        outs.append(tmp_path / run)
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(outs[0] / name), load_file(outs[1] / name)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}:{k} differs between two runs of the same command and seed"
    other = tmp_path / "c"
    argv = _base(tmp_path, cifar_dir)
    argv[argv.index("--output-dir") + 1] = str(other)
    argv[argv.index("--epochs") + 1] = "1"
    recipe.main(argv + ["--eval-every", "0", "--final-attacks", "fgsm", "--curve-steps", "2", "--seed", "4"])
    a, c = load_file(outs[0] / "model.safetensors"), load_file(other / "model.safetensors")
    assert any(not torch.equal(a[k], c[k]) for k in a), "another seed must give other weights"


def test_speed_flags_given_to_the_recipe_are_in_the_trainers_own_record(recipe, tmp_path, cifar_dir, monkeypatch):
    import json

    argv = _base(tmp_path, cifar_dir) + ["--channels-last", "--tf32", "--num-workers", "1", "--pin-memory",
                                         "--epochs", "1", "--eval-every", "0", "--final-attacks", "fgsm",
                                         "--curve-steps", "2"]
    recipe.main(argv)
    record = json.loads(next((tmp_path / "run" / "checkpoints").glob("*/run_config.json")).read_text())
    assert record["channels_last"] and record["tf32"] and record["pin_memory"] and record["num_workers"] == 1
