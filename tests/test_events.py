"""Events as the extension surface of a run: a user's TrainerCallback sees the training events and the
final report's (on_build_attacks, on_report) through run_recipe, as a recipe passes it; the threat model
is resolved once and passed down; one loop evaluates a run's models."""
import json
import sys
from pathlib import Path

import pytest
from accelerate.state import AcceleratorState

from robustkd.attacks.base import Attack
from robustkd.callbacks import TrainerCallback
from robustkd.config import ConfigError, Recipe, parse, resolve
from robustkd.recipe import build_trainer, final_report, run_recipe

REPO = Path(__file__).resolve().parents[1]
RECIPE = Recipe("test", defaults={"model": "small_cnn", "method": "adr"})


def _argv(cifar_dir, out, *extra):
    return ["--data-dir", cifar_dir, "--epochs", "1", "--max-train-samples", "64", "--max-eval-samples", "8",
            "--batch-size", "32", "--eval-batch-size", "8", "--attack-steps", "1", "--final-attacks", "pgd1",
            "--eval-attacks", "pgd1", "--output-dir", str(out), "--cpu", "--no-progress", "--curve-steps", "1",
            "--model-kwargs", '{"width": 4}', *extra]


class Recorder(TrainerCallback):
    """Every event, in order; each final attack wrapped (it counts its calls); a ``calls`` section."""

    def __init__(self):
        self.events: list[str] = []
        self.wrapped: dict[str, dict[str, Counted]] = {}

    def on_init_end(self, trainer):
        self.events.append("init_end")
        trainer.run_info["recorded_by"] = "Recorder"

    def on_train_begin(self, trainer):
        self.events.append("train_begin")

    def on_step_end(self, trainer, logs):
        self.events.append("step_end")

    def on_evaluate(self, trainer, metrics):
        self.events.append("evaluate")

    def on_epoch_end(self, trainer, record):
        self.events.append("epoch_end")

    def on_save(self, trainer, path):
        self.events.append("save")

    def on_train_end(self, trainer):
        self.events.append("train_end")

    def on_build_attacks(self, trainer, which, attacks):
        self.events.append(f"build_attacks:{which}")
        self.wrapped[which] = {spec: Counted(a) for spec, a in attacks.items()}
        return self.wrapped[which]

    def on_report(self, trainer, which, model, attacks):
        self.events.append(f"report:{which}")
        assert attacks == self.wrapped[which]  # the attacks the report runs: the replaced ones
        return {"calls": lambda: {spec: a.calls for spec, a in attacks.items()}, "which": {"model": which}}


class Counted(Attack):
    """An attack that counts its calls (a measuring wrapper, as the speech recipe's MeasuredAttack)."""

    mode = None  # the wrapped attack sets the victim's mode itself

    def __init__(self, attack):
        super().__init__(attack.task)
        self.attack, self.calls = attack, 0

    def perturb(self, model, batch, targets=None):
        self.calls += 1
        return self.attack(model, batch, targets)

    def describe(self):
        return self.attack.describe()


def test_a_users_callback_sees_every_event_and_its_section_lands_in_the_reports(cifar_dir, tmp_path):
    AcceleratorState._reset_state(reset_partial_state=True)
    out = tmp_path / "run"
    recorder = Recorder()
    report = run_recipe(parse(RECIPE, _argv(cifar_dir, out)), callbacks=[recorder])
    ev = recorder.events
    assert ev[:2] == ["init_end", "train_begin"] and ev.count("step_end") == 2  # 64 examples, batch 32
    assert ev[ev.index("evaluate"):] == ["evaluate", "epoch_end", "save", "train_end", "build_attacks:ema",
                                         "report:ema", "build_attacks:student", "report:student"]
    saved = json.loads((out / "report.json").read_text())
    ema = json.loads((out / "ema" / "report.json").read_text())
    assert saved["which"] == {"model": "student"} and ema["which"] == {"model": "ema"}
    assert saved["calls"]["pgd1"] > 0 and ema["calls"]["pgd1"] > 0  # called after the attacks ran
    assert report["calls"] == saved["calls"]
    assert {"run", "threat_models", "method", "ema"} <= set(saved)  # the report's own sections stay
    # on_init_end's run_info travels with the checkpoints and the saved model
    run_config = json.loads((out / "checkpoints" / "epoch-1" / "run_config.json").read_text())
    assert run_config["recorded_by"] == "Recorder"


class Clash(TrainerCallback):
    def on_report(self, trainer, which, model, attacks):
        return {"run": {"mine": True}}


class Drops(TrainerCallback):
    def on_build_attacks(self, trainer, which, attacks):
        return {}


class NotAnObject(TrainerCallback):
    def on_report(self, trainer, which, model, attacks):
        return {"mine": 1}


class Twice(TrainerCallback):
    def on_report(self, trainer, which, model, attacks):
        return {"mine": {"n": 1}}


@pytest.mark.parametrize("callbacks, match", [
    ([Clash()], "gives the report section.*run.*which the report writes itself"),
    ([Drops()], "may replace attacks, not add or drop specs"),
    ([Twice(), Twice()], "gives the report section 'mine', which an earlier callback gave"),
    ([NotAnObject()], "report section 'mine' is a int: give a dict"),
])
def test_a_callback_that_would_change_what_the_report_runs_or_says_is_refused(cifar_dir, tmp_path, callbacks,
                                                                               match):
    AcceleratorState._reset_state(reset_partial_state=True)
    cfg = parse(RECIPE, _argv(cifar_dir, tmp_path / "run", "--method", "standard"))
    trainer = build_trainer(cfg, callbacks=callbacks)
    with pytest.raises(ValueError, match=match):
        final_report(cfg, trainer)


def test_callbacks_must_be_trainer_callbacks(cifar_dir, tmp_path):
    AcceleratorState._reset_state(reset_partial_state=True)
    cfg = parse(RECIPE, _argv(cifar_dir, tmp_path / "run", "--method", "standard"))
    with pytest.raises(TypeError, match="callbacks must be TrainerCallback instances, got function"):
        run_recipe(cfg, callbacks=[lambda *a: None])


# -- the threat model, resolved once ---------------------------------------------------------------
def _speech_recipe():
    sys.path.insert(0, str(REPO / "recipes"))
    try:
        import speech_adr
    finally:
        sys.path.remove(str(REPO / "recipes"))
    return speech_adr


def test_the_run_threat_model_is_resolved_once_from_the_settings(cifar_dir):
    cfg = resolve(RECIPE, ["--data-dir", cifar_dir, "--eps", "4/255", "--norm", "linf"])
    assert cfg.threat == {"eps": 4 / 255, "norm": "linf"}
    assert resolve(RECIPE, ["--data-dir", cifar_dir, "--eps", "0.5", "--norm", "l2"]).threat == {"eps": 0.5,
                                                                                             "norm": "l2"}
    with pytest.raises(ConfigError, match="--eps 'x' is not a number"):
        resolve(RECIPE, ["--data-dir", cifar_dir, "--eps", "x"])
    speech = _speech_recipe()
    assert resolve(speech.RECIPE, ["--train-snr-db", "20"]).threat == {"snr_db": 20.0}
    assert resolve(speech.RECIPE, ["--train-threat", "linf", "--eps", "0.004"]).threat == {"eps": 0.004,
                                                                                        "norm": "linf"}


def test_the_threat_model_reaches_the_training_attack_and_every_evaluation(shared, tmp_path, monkeypatch):
    """The speech recipe's --train-snr-db: the training attack's SNR ball and the budget of the per-epoch
    and final attacks whose specs name none, from one resolution (eps parsed once, in resolve)."""
    import robustkd.config as config_mod
    import robustkd.recipe as recipe_mod
    from robustkd.trainer import Trainer

    speech = _speech_recipe()
    AcceleratorState._reset_state(reset_partial_state=True)
    parses = []
    real = config_mod.threat_options
    monkeypatch.setattr(config_mod, "threat_options", lambda s: parses.append(1) or real(s))
    built = []
    real_build = recipe_mod.build_trainer
    monkeypatch.setattr(recipe_mod, "build_trainer", lambda *a, **k: built.append(real_build(*a, **k)) or built[-1])
    monkeypatch.setattr(Trainer, "fit", lambda self: self.state.history)
    monkeypatch.setattr(recipe_mod, "final_report", lambda cfg, trainer: {})
    speech.main(["--dataset", "fsdd", "--data-dir", str(shared / "data" / "fsdd"), "--train-snr-db", "25",
                 "--max-train-samples", "32", "--max-eval-samples", "8", "--width", "4", "--eval-attacks",
                 "pgd1", "--final-attacks", "pgd1", "--output-dir", str(tmp_path / "run"), "--no-progress"])
    trainer = built[-1]
    assert trainer.method.attack.threat.snr_db == 25.0
    assert trainer.config.eval_threat == {"snr_db": 25.0}
    assert trainer.eval_attacks["pgd1"].threat.snr_db == 25.0
    assert not parses  # the speech run's budget is --train-snr-db: no eps/norm resolution at all
    assert trainer.task.threat_model().snr_db == 25.0  # the task's own ball: snr_pgd and bare specs use it
    assert trainer.run_info["sample_rate"] == 8000 and trainer.run_info["clip_seconds"] == 1.0
    with pytest.raises(ConfigError, match="--task-kwargs snr_db: the run's SNR budget is --train-snr-db"):
        speech.main(["--dataset", "fsdd", "--data-dir", str(shared / "data" / "fsdd"), "--task-kwargs",
                     '{"snr_db": 10}', "--output-dir", str(tmp_path / "run2")])
