"""The training loop through the recipe a user runs: interruption (SIGTERM, SIGINT), mid-epoch
checkpoints and their exact resume, the first lines of a run (device, steps, time estimate), and the
divergence guard on exploding weights."""
from __future__ import annotations

import io
import json
import logging
import runpy
import signal
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "recipes" / "cifar_adr.py")


def _args(cifar_dir: str, out: Path, *extra: str) -> list[str]:
    # 64 examples in batches of 16: 4 optimizer steps per epoch, 8 in all
    return ["--data-dir", cifar_dir, "--model", "small_cnn", "--max-train-samples", "64", "--batch-size", "16",
            "--epochs", "2", "--eval-every", "0", "--final-attacks", "fgsm", "--curve-steps", "1",
            "--max-eval-samples", "8", "--attack-steps", "1", "--no-progress", "--output-dir", str(out), *extra]


def _run(argv: list[str], monkeypatch, callback=None) -> tuple[int, str]:
    """``python recipes/cifar_adr.py ARGV`` in this process (its ``__main__`` block: ``main_guard``), with
    ``callback`` added to the trainer's events. Returns the exit status and what it wrote to stderr."""
    from accelerate.state import AcceleratorState

    import robustkd.recipe as recipe_mod

    real = recipe_mod.build_trainer

    def build(*a, **k):
        trainer = real(*a, **k)
        if callback is not None:
            trainer.callbacks.callbacks.append(callback)
        return trainer

    AcceleratorState._reset_state(reset_partial_state=True)  # each run is a new process's Accelerator
    err, old_stderr = io.StringIO(), sys.stderr
    code = 0
    with monkeypatch.context() as mp:
        mp.setattr(recipe_mod, "build_trainer", build)
        mp.setattr(sys, "argv", [RECIPE, *argv])
        sys.stderr = err
        handlers = [h for h in logging.getLogger("robustkd").handlers  # an earlier run's (main_guard's): here
                    if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
        for handler in handlers:
            handler.stream = err
        try:
            runpy.run_path(RECIPE, run_name="__main__")
        except SystemExit as exc:
            code = int(exc.code or 0)
        finally:
            sys.stderr = old_stderr
            for handler in logging.getLogger("robustkd").handlers:  # main_guard's handler: back to stderr
                if isinstance(handler, logging.StreamHandler) and handler.stream is err:
                    handler.stream = old_stderr
    return code, err.getvalue()


def _signal_at(step: int, sig: int = signal.SIGTERM, times: int = 1):
    from robustkd.callbacks import TrainerCallback

    class SignalAt(TrainerCallback):
        """Sends ``sig`` to this process at the end of optimizer step ``step`` (as a cluster would)."""

        sent_at: int | None = None

        def on_step_end(self, trainer, logs):
            if trainer.state.step == step:
                SignalAt.sent_at = trainer.state.step
                for _ in range(times):
                    signal.raise_signal(sig)

    return SignalAt()


def _weights(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {name: load_file(str(out / f"{name}.safetensors")) for name in ("model", "ema")}


def _assert_same_weights(a: Path, b: Path) -> int:
    wa, wb = _weights(a), _weights(b)
    n = 0
    for name in wa:
        assert wa[name].keys() == wb[name].keys()
        for key in wa[name]:
            assert torch.equal(wa[name][key], wb[name][key]), (name, key)
            n += 1
    return n


@pytest.fixture(scope="module")
def straight(cifar_dir, tmp_path_factory):
    """An uninterrupted run's output folder and stderr (run once for the module)."""
    import robustkd.callbacks as callbacks

    out = tmp_path_factory.mktemp("straight") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(callbacks, "LONG_RUN_SECONDS", 0.0)  # any estimate "runs to days": the suggestion shows
        code, err = _run(_args(cifar_dir, out), mp)
    assert code == 0, err[-3000:]
    return out, err


def test_sigterm_mid_epoch_stops_after_the_step_and_resume_ends_bit_for_bit_as_an_uninterrupted_run(
        straight, cifar_dir, tmp_path, monkeypatch):
    reference, _ = straight
    out = tmp_path / "run"
    before = signal.getsignal(signal.SIGTERM)
    sender = _signal_at(6)  # epoch 2, its second batch of 4
    code, err = _run(_args(cifar_dir, out), monkeypatch, sender)
    assert code == 128 + signal.SIGTERM, err[-3000:]
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is the caller's again
    stopped = [line for line in err.splitlines() if "stopped on SIGTERM" in line]
    assert len(stopped) == 1 and "Traceback" not in err, err[-3000:]
    assert "after optimizer step 6 of 8 (epoch 2, batch 2/4)" in stopped[0] and "--resume" in stopped[0]
    assert "finishing the current step" in err  # the signal is acknowledged at once
    # no step lost: the checkpoint holds the step the signal arrived in
    assert (out / "checkpoints" / "latest").read_text() == f"step-{sender.sent_at}"
    assert not (out / "model.safetensors").exists() and not (out / "report.json").exists()

    code, err = _run(_args(cifar_dir, out, "--resume"), monkeypatch)
    assert code == 0, err[-3000:]
    assert "batch 2 of epoch 2" in err  # resumed mid-epoch
    assert _assert_same_weights(reference, out) > 10  # student and EMA, every tensor equal
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    ref_rows = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert [r["train_loss"] for r in rows] == [r["train_loss"] for r in ref_rows]  # the epoch's loss carried over
    assert not list((out / "checkpoints").glob("step-*"))  # superseded by the epoch's checkpoint


def test_save_every_steps_writes_mid_epoch_checkpoints_that_resume_exactly(straight, cifar_dir, tmp_path, monkeypatch):
    from robustkd.callbacks import TrainerCallback

    reference, _ = straight
    out = tmp_path / "run"

    class Crash(TrainerCallback):  # a crash (killed node) right after the second mid-epoch checkpoint
        def on_save(self, trainer, path):
            if path.name == "step-6":
                raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(_args(cifar_dir, out, "--save-every-steps", "3"), monkeypatch, Crash())
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text() == "step-6"
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ["epoch-1", "step-6"]  # step-3 pruned
    code, err = _run(_args(cifar_dir, out, "--save-every-steps", "3", "--resume"), monkeypatch)
    assert code == 0, err[-3000:]
    _assert_same_weights(reference, out)


def test_a_second_signal_exits_at_once_keeping_the_last_checkpoint(cifar_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    code, err = _run(_args(cifar_dir, out), monkeypatch, _signal_at(6, signal.SIGINT, times=2))
    assert code == 130 and "Traceback" not in err, err[-3000:]
    assert [line for line in err.splitlines() if line.startswith("error: interrupted")], err[-3000:]
    assert (out / "checkpoints" / "latest").read_text() == "epoch-1"  # no checkpoint written on the way out
    assert not (out / "checkpoints" / "step-6").exists()


def test_the_first_lines_name_device_steps_and_the_estimate_with_real_flags(straight):
    from robustkd.config import resolve

    _, err = straight
    lines = err.splitlines()
    start = [line for line in lines if "training on cpu: 2 epochs x 4 optimizer steps = 8 steps" in line]
    assert len(start) == 1 and "64 training examples" in start[0], err[-3000:]
    estimate = [line for line in lines if "estimated training time:" in line]
    assert len(estimate) == 1, err[-3000:]
    assert "per optimizer step" in estimate[0] and "This runs to days on cpu" in estimate[0]
    assert "--preset adr/short-schedule" in estimate[0] and "a GPU" in estimate[0]
    assert lines.index(start[0]) < lines.index(estimate[0])
    assert any(line.rstrip().endswith("left") and "epoch 1 |" in line for line in lines), err[-3000:]
    # every flag the suggestion names is one the recipe takes, the preset one it knows
    assert resolve(_recipe().RECIPE, ["--preset", "adr/short-schedule", "--epochs", "4"]).settings["epochs"] == 4


def _recipe():
    import importlib.util

    spec = importlib.util.spec_from_file_location("recipe_cifar_adr_interrupt", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_exploding_weights_stop_the_run_in_one_line_naming_real_flags(cifar_dir, tmp_path, monkeypatch):
    from robustkd.train_config import TrainConfig

    out = tmp_path / "run"
    argv = _args(cifar_dir, out, "--method", "standard", "--lr", "1e9", "--weight-decay", "0")
    argv[argv.index("--epochs") + 1] = "1"
    code, err = _run(argv, monkeypatch)
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert "training diverged: the weights exploded by step" in lines[0] and "--lr 1e+09" in lines[0], lines[0]
    flags = {"--" + f.name.replace("_", "-") for f in fields(TrainConfig)}
    named = {w for w in (word.strip("(),.;:") for word in lines[0].split()) if w.startswith("--")}
    assert {"--lr", "--max-grad-norm"} <= named <= flags, named - flags
    print(lines[0])
    assert not (out / "model.safetensors").exists() and not (out / "report.json").exists()
