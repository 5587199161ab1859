"""The one configuration declaration: recipe flags, --preset, --config, --print-config, validation,
overrides recorded, mixed precision left to Accelerate, and what a configuration builds."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from robustkd.config import ConfigError, Recipe, build_attacks, build_method, resolve, train_config
from robustkd.registry import TASKS

REPO = Path(__file__).resolve().parents[1]
ADR = REPO / "recipes" / "cifar_adr.py"
MTARD = REPO / "recipes" / "cifar_mtard.py"
ADR_RECIPE = Recipe("test", default_preset="adr/cifar10/resnet18_pgd_sgd_adr")
ENV = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _run(script: Path, *argv: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True, env=ENV, cwd=cwd,
                          timeout=300)


def test_print_config_shows_the_resolved_preset_and_runs_nothing(tmp_path):
    run = _run(ADR, "--preset", "adr/cifar10/resnet18_trades_sgd_adr", "--print-config", "--output-dir",
               str(tmp_path / "out"), cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    shown = yaml.safe_load(run.stdout)
    assert shown["preset"] == "adr/cifar10/resnet18_trades_sgd_adr"
    assert shown["source"] == "yuyuwu5/ADR config/cifar10/resnet18_trades_sgd_adr.gin"
    s = shown["settings"]
    assert s["method"] == "adr_trades" and s["method_kwargs"]["tau"] == [2.5, 2.0] and s["beta"] == 6.0
    assert s["nesterov"] is True and s["drop_last"] is True and s["attack_mode"] == "train"
    assert s["milestones"] == [100, 150] and s["mixed_precision"] is None
    assert shown["overrides"] == {"output_dir": str(tmp_path / "out")}
    assert not (tmp_path / "out").exists()  # nothing trained, nothing written


def _recipe(path: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_recipe_defaults_are_the_papers_cifar10_resnet18_runs():
    adr = resolve(_recipe(ADR).RECIPE, [])
    assert adr.preset == "adr/cifar10/resnet18_pgd_sgd_adr" and adr.overrides == {}
    assert adr.settings["method_kwargs"] == {"tau": [2.5, 2.0], "lam": [0.7, 0.95]}
    mtard_recipe = _recipe(MTARD).RECIPE
    mtard = resolve(mtard_recipe, [])
    assert mtard.preset == "mtard/cifar10/resnet18" and mtard.settings["weight_decay"] == 2e-4
    # the MTARD recipe's own flags land in the method's settings and count as overrides
    bm = resolve(mtard_recipe, ["--preset", "bmtard/cifar10/resnet18", "--entropy-balance", "exact"])
    assert bm.settings["method_kwargs"]["entropy_balance"] == "exact" and bm.overrides["entropy_balance"] == "exact"


def test_a_flag_overrides_one_field_and_the_run_records_both():
    cfg = resolve(ADR_RECIPE, ["--preset", "adr/cifar100/wrn_pgd_awp_adr", "--lr", "0.05", "--epochs", "20"])
    assert cfg.preset == "adr/cifar100/wrn_pgd_awp_adr"
    assert cfg.overrides == {"lr": 0.05, "epochs": 20}
    s = cfg.settings
    assert s["lr"] == 0.05 and s["model"] == "wrn34_10" and s["awp_gamma"] == 0.005
    assert s["milestones"] == [10, 15]  # the preset's 100/150 of 200 epochs, scaled to 20
    assert any("scaled" in n for n in cfg.notes)
    # the preset's method settings belong to its method: another method takes its own defaults
    other = resolve(ADR_RECIPE, ["--method", "trades"])
    assert other.settings["method_kwargs"] == {} and other.settings["attack_mode"] is None
    assert other.overrides == {"method": "trades"}
    # the README smoke run: another model drops the preset's model options
    smoke = resolve(Recipe("t", default_preset="mtard/cifar10/resnet18"), ["--model", "small_cnn", "--epochs", "1"])
    assert smoke.settings["model_kwargs"] == {} and smoke.settings["milestones"] == [1]


def test_config_file_then_flags(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"preset": "adr/cifar10/resnet18_pgd_awp_adr", "lr": 0.2, "model": "small_cnn",
                                    "model_kwargs": {"width": 8}, "milestones": [3, 4], "epochs": 5}))
    cfg = resolve(ADR_RECIPE, ["--config", str(path), "--lr", "0.3"])
    s = cfg.settings
    assert cfg.preset == "adr/cifar10/resnet18_pgd_awp_adr" and cfg.config_file == str(path)
    assert s["lr"] == 0.3 and s["model"] == "small_cnn" and s["model_kwargs"] == {"width": 8}
    assert s["milestones"] == [3, 4] and s["awp"] is True and s["nesterov"] is False
    assert cfg.overrides == {"lr": 0.3, "model": "small_cnn", "model_kwargs": {"width": 8}, "milestones": [3, 4],
                             "epochs": 5}
    # a run's config.yaml reads back to the same settings
    cfg.write(tmp_path / "run")
    again = resolve(ADR_RECIPE, ["--config", str(tmp_path / "run" / "config.yaml")])
    assert again.settings == s and again.preset == cfg.preset
    path.write_text("lr: 0.1\nlearning_rate: 0.2\n")
    with pytest.raises(ConfigError, match="unknown setting.*learning_rate"):
        resolve(ADR_RECIPE, ["--config", str(path)])


def test_bad_settings_are_refused_in_one_line_before_any_work(tmp_path):
    out = tmp_path / "out"
    run = _run(ADR, "--data-dir", str(tmp_path), "--eps", "8", "--output-dir", str(out), cwd=tmp_path)
    assert run.returncode == 2 and run.stderr.strip().splitlines() == [
        "error: --eps 8 is larger than the whole input range [0, 1] under L-inf: did you mean 8/255?"]
    assert not out.exists()


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--max-train-samples", "0"], "--max-train-samples must be a positive number"),
    (["--max-eval-samples", "-5"], "--max-eval-samples must be a positive number"),
    (["--preset", "adr/cifar10/resnet18_pgd"], "unknown preset"),
    (["--model-kwargs", "{width: 8"], "--model-kwargs must be a JSON object"),
    (["--config", "nope.yaml"], "--config nope.yaml: no such file"),
    (["--method", "pgd_at", "--method-kwargs", '{"tau": [2, 1]}'], "takes no setting tau"),
    (["--method", "adrr"], "unknown method 'adrr'"),
])
def test_bad_settings_through_the_recipe_entry_point(tmp_path, capsys, argv, message):
    from robustkd.recipe import main_guard

    recipe = _recipe(ADR)
    out = tmp_path / "out"
    argv = [*argv, "--output-dir", str(out), "--data-dir", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_:
        main_guard(lambda: recipe.main(argv))
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not out.exists()


def test_mixed_precision_is_left_to_accelerate(monkeypatch, tmp_path):
    cfg = resolve(ADR_RECIPE, ["--model", "small_cnn"])
    assert cfg.settings["mixed_precision"] is None and train_config(cfg.settings).mixed_precision is None
    # `accelerate launch --mixed_precision bf16` sets this variable; a None setting lets Accelerate read it
    from accelerate.state import AcceleratorState

    from robustkd.distill.methods import create_method
    from robustkd.trainer import TrainConfig, Trainer

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    task = TASKS.get("synthetic")()
    # one process is one run: drop the Accelerate state an earlier test of this process left behind
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        trainer = Trainer(task, task.build_model("small_cnn", width=4), create_method("standard", task),
                          TrainConfig(max_train_samples=8, max_eval_samples=8, batch_size=4, cpu=True,
                                      output_dir=str(tmp_path / "mp"), progress=False))
        assert trainer.accelerator.mixed_precision == "bf16"
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert resolve(ADR_RECIPE, ["--mixed-precision", "no"]).settings["mixed_precision"] == "no"


def test_methods_own_their_training_attack():
    task = TASKS.get("synthetic")()
    base = resolve(ADR_RECIPE, ["--model", "small_cnn"]).settings
    adr = build_method(base, task)
    assert adr.attack_mode == "train" and adr.attack.random_start == "uniform" and adr.attack.loss_name == "ce"
    assert (adr.rectifier.tau.start, adr.rectifier.tau.end, adr.rectifier.lam.end) == (2.5, 2.0, 0.95)
    trades = build_method(resolve(ADR_RECIPE, ["--method", "trades"]).settings, task)
    # TRADES as ADR's reference runs it: KL objective from x + 0.001 * U[0, 1), the model in train mode,
    # one forward pass over clean and adversarial inputs
    assert (trades.attack.loss_name, trades.attack.random_start, trades.attack.init_std) == ("kl", "trades", 0.001)
    assert trades.attack_mode == "train" and trades.forward == "concat"
    # TRADES' own code, by name: eval mode, normal start, separate passes
    original = build_method(resolve(ADR_RECIPE, ["--method", "trades", "--attack-mode", "eval", "--attack-random-start",
                                                 "normal", "--method-kwargs", '{"forward": "separate"}']).settings, task)
    assert (original.attack_mode, original.attack.random_start, original.forward) == ("eval", "normal", "separate")
    assert build_method(resolve(ADR_RECIPE, ["--method", "standard"]).settings, task).attack is None
    with pytest.raises(ConfigError, match="--clean-teacher and --robust-teacher"):
        build_method(resolve(ADR_RECIPE, ["--method", "mtard"]).settings, task)
    with pytest.raises(ConfigError, match="takes no setting nosuch"):
        build_method(resolve(ADR_RECIPE, ["--method", "pgd_at", "--method-kwargs", '{"nosuch": 1}']).settings, task)


def test_evaluation_attacks_default_to_the_training_threat_model():
    task = TASKS.get("cifar10")(data_dir="unused")
    attacks = build_attacks(["pgd20", "pgd:eps=4/255", "autoattack", "fgsm"], task, {"eps": 0.5, "norm": "l2"})
    assert (attacks["pgd20"].threat.norm, attacks["pgd20"].threat.eps) == ("l2", 0.5)
    assert attacks["fgsm"].threat.norm == "l2"
    assert attacks["autoattack"].describe()["norm"] == "l2"
    own = attacks["pgd:eps=4/255"].threat  # an attack that names its budget keeps it
    assert own.eps == pytest.approx(4 / 255) and own.norm == "linf"


@pytest.mark.parametrize("name", ["standard", "pgd_at", "trades", "adr", "adr_trades", "mtard"])
def test_a_run_with_no_method_options_runs_the_methods_own_defaults(name, tmp_path):
    """What a recipe builds for --method NAME with nothing else set is what the Python constructor
    builds with no options: the same attack (objective, start, mode), settings and EMA."""
    from robustkd.checkpoint import save_model_dir
    from robustkd.distill.methods import create_method
    from robustkd.teachers import load_teacher

    task = TASKS.get("synthetic")()
    settings = {"method": name, "eps": "8/255", "norm": "linf"}
    teachers = {}
    if name == "mtard":
        save_model_dir(tmp_path / "clean", task.build_model("small_cnn", width=4), None,
                       {"task": task.name, "num_classes": task.num_classes, "model": "small_cnn",
                        "model_kwargs": {"width": 4}})
        settings.update(clean_teacher=str(tmp_path / "clean"), robust_teacher="ema")
        teachers = {"clean_teacher": load_teacher(tmp_path / "clean", task, name="clean"), "robust_teacher": "ema"}
    built = build_method(settings, task, threat=task.threat_model())
    plain = create_method(name, task, **teachers)
    assert type(built) is type(plain) and built.describe() == plain.describe()
    assert built.needs_ema == plain.needs_ema == (name in ("adr", "adr_trades", "mtard"))
    if plain.attack is None:
        assert built.attack is None
    else:
        assert built.attack.init_std == plain.attack.init_std and built.attack_mode == plain.attack_mode
    # and the table the recipes, RobustTrainer and the docs read says the same
    from robustkd.presets import method_defaults

    own = method_defaults(name)
    assert own["teachers"] == (name == "mtard") and own["source"]
    assert (own["attack"] is None) == (plain.attack is None)
    if plain.attack is not None:
        assert own["attack"]["mode"] == plain.attack_mode and own["attack"]["loss"] == plain.attack.loss_name


def test_a_run_is_evaluated_in_the_threat_model_it_trains_in(tmp_path):
    from robustkd.distill.methods import create_method
    from robustkd.trainer import Trainer

    s = resolve(ADR_RECIPE, ["--model", "small_cnn", "--norm", "l2", "--eps", "0.5", "--eval-attacks",
                             "pgd20,pgd:eps=4/255,pgd_l2", "--max-train-samples", "8", "--max-eval-samples", "8",
                             "--batch-size", "4", "--cpu", "--output-dir", str(tmp_path / "run")]).settings
    config = train_config(s)
    assert config.eval_threat == {"eps": 0.5, "norm": "l2"}
    task = TASKS.get("synthetic")()
    trainer = Trainer(task, task.build_model("small_cnn", width=4), create_method("standard", task), config)
    per_epoch = trainer.eval_attacks
    assert (per_epoch["pgd20"].threat.norm, per_epoch["pgd20"].threat.eps) == ("l2", 0.5)
    assert per_epoch["pgd:eps=4/255"].threat.eps == pytest.approx(4 / 255)
    assert build_method(s, task).attack.threat.norm == "l2"  # the training attack
