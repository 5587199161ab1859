"""The trainer and the image recipe end to end: outputs, exact resume, 2 processes, bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from robustkd import TrainConfig, Trainer, create_method, create_task
from robustkd.attacks.pgd import PGD
from robustkd.checkpoint import load_model
from robustkd.trainer import ConfigMismatchError

REPO = Path(__file__).resolve().parents[1]


def _recipe(args: list[str], monkeypatch) -> None:
    sys.path.insert(0, str(REPO / "recipes"))
    try:
        import cifar_adr
    finally:
        sys.path.pop(0)
    monkeypatch.setattr(sys, "argv", ["cifar_adr.py", *args])
    cifar_adr.main()


def test_one_epoch_recipe_on_the_shared_cifar_subset_writes_the_report(cifar_dir, tmp_path, monkeypatch):
    out = tmp_path / "adr"
    _recipe(["--data-dir", cifar_dir, "--model", "small_cnn", "--epochs", "1", "--max-train-samples", "128",
             "--max-eval-samples", "32", "--batch-size", "64", "--attack-steps", "3", "--eval-attacks", "pgd:steps=3",
             "--final-attacks", "pgd20,autoattack:version=custom,attacks=apgd-ce,steps=5", "--output-dir", str(out),
             "--no-progress", "--curve-steps", "2"], monkeypatch)
    report = json.loads((out / "report.json").read_text())
    ema_report = json.loads((out / "ema" / "report.json").read_text())
    # the same versioned report as `robustkd eval`, for the model and its EMA copy
    assert report["schema_version"] == ema_report["schema_version"] == 1
    assert report["model"]["method"] == "adr" and report["model"]["name"] == "small_cnn"
    assert (report["model"]["which"], ema_report["model"]["which"]) == ("student", "ema")
    assert report["run"]["preset"] == "adr/cifar10/resnet18_pgd_sgd_adr" and report["run"]["overrides"]["model"] == "small_cnn"
    specs = {"pgd20", "autoattack:version=custom,attacks=apgd-ce,steps=5"}
    for block in (report, ema_report):
        clean = block["metrics"]["clean"]["accuracy"]
        assert 0.0 <= clean <= 1.0 and set(block["metrics"]["adversarial"]) == specs
        assert all(0.0 <= d["accuracy"] <= clean + 1e-9 for d in block["metrics"]["adversarial"].values())
        assert "ece" in block["metrics"]["clean"] and block["sanity"]["checks"]  # calibration, sanity checks
    assert report["ema"]["robust_accuracy"]["pgd20"] == ema_report["metrics"]["adversarial"]["pgd20"]["accuracy"]
    assert report["attacks"]["autoattack:version=custom,attacks=apgd-ce,steps=5"]["backend"].startswith("pyautoattack ")
    # trained and evaluated in the same threat model, and the report says so
    assert report["threat_models"]["train"]["eps"] == pytest.approx(8 / 255) == report["attacks"]["pgd20"]["eps"]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["epoch"] == 1
    for name in ("training_curve.png", "schedule.png", "model.safetensors", "ema.safetensors", "robustkd.json",
                 "config.yaml", "report.html"):
        assert (out / name).stat().st_size > 0, name
    # the output directory is accepted wherever a checkpoint or teacher is asked for
    task = create_task("cifar10", data_dir=cifar_dir)
    ema = load_model(out, task)
    student = load_model(out, task, which="student")
    ref = load_file(str(out / "ema.safetensors"))
    assert torch.equal(ema.state_dict()["1.classifier.3.weight"], ref["1.classifier.3.weight"])
    assert not torch.equal(ema.state_dict()["1.classifier.3.weight"], student.state_dict()["1.classifier.3.weight"])


def _trainer(task, out: Path, epochs: int = 2, resume: bool = False, awp: bool = True, **overrides) -> Trainer:
    torch.manual_seed(0)
    model = task.build_model("small_cnn", width=8)
    method = create_method("adr", task, PGD(task, steps=2, step_size=2 / 255))
    cfg = TrainConfig(epochs=epochs, batch_size=16, eval_batch_size=32, max_train_samples=48, max_eval_samples=32,
                      eval_attacks=["pgd:steps=2"], output_dir=str(out), resume=resume, progress=False,
                      awp_gamma=5e-3 if awp else None, milestones=[1], **overrides)
    return Trainer(task, model, method, cfg, run_info={"model": "small_cnn", "model_kwargs": {"width": 8}})


class _Crash(Exception):
    pass


def test_interrupted_then_resumed_training_ends_with_the_same_parameters(cifar_task, tmp_path, monkeypatch):
    straight = _trainer(cifar_task, tmp_path / "straight")
    straight.fit()

    crashing = _trainer(cifar_task, tmp_path / "resumed")
    original_save = Trainer.save_checkpoint

    def save_then_crash(self):
        path = original_save(self)
        raise _Crash(f"simulated crash after {path}")

    monkeypatch.setattr(Trainer, "save_checkpoint", save_then_crash)
    with pytest.raises(_Crash):
        crashing.fit()
    monkeypatch.setattr(Trainer, "save_checkpoint", original_save)
    assert (tmp_path / "resumed" / "checkpoints" / "latest").read_text() == "epoch-1"

    resumed = _trainer(cifar_task, tmp_path / "resumed", resume=True)
    history = resumed.fit()
    assert [h["epoch"] for h in history] == [1, 2]
    for a, b in zip(straight.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(straight.ema.model.state_dict().values(), resumed.ema.model.state_dict().values()):
        assert torch.equal(a, b)
    assert straight.optimizer.param_groups[0]["lr"] == resumed.optimizer.param_groups[0]["lr"]


def test_resume_refuses_a_checkpoint_from_another_configuration(cifar_task, tmp_path):
    _trainer(cifar_task, tmp_path / "run", epochs=1, awp=False).fit()
    with pytest.raises(ConfigMismatchError, match="batch_size: checkpoint 16 vs now 8"):
        t = _trainer(cifar_task, tmp_path / "run", epochs=2, resume=True, awp=False)
        t.config.batch_size = 8
        t.fit()


def test_the_settings_keep_their_trainer_import_path():
    import robustkd
    from robustkd import train_config, trainer

    assert trainer.TrainConfig is train_config.TrainConfig is robustkd.TrainConfig
    assert trainer.setting is train_config.setting


def test_pruning_keeps_this_runs_newest_checkpoints_and_leaves_another_runs(tmp_path):
    from robustkd.rundir import prune_checkpoints

    root = tmp_path / "checkpoints"
    for name, run_id in [("epoch-1", "me"), ("epoch-2", "me"), ("step-5", "me"), ("epoch-3", "me"),
                         ("epoch-9", "other"), ("step-7", "other")]:
        (root / name).mkdir(parents=True)
        (root / name / "run_config.json").write_text(json.dumps({"run_id": run_id}))
    prune_checkpoints(root, root / "epoch-3", "me", keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["epoch-2", "epoch-3", "epoch-9", "step-7"]
    (root / "step-8").mkdir()
    (root / "step-8" / "run_config.json").write_text(json.dumps({"run_id": "me"}))
    prune_checkpoints(root, root / "step-8", "me", keep=2)  # a mid-epoch one prunes no epoch checkpoint
    assert sorted(p.name for p in root.iterdir()) == ["epoch-2", "epoch-3", "epoch-9", "step-7", "step-8"]


@pytest.mark.timeout(400)
@pytest.mark.distributed
def test_two_process_run_keeps_student_and_ema_identical_on_both_ranks(cifar_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ROBUSTKD_TEST_CIFAR": cifar_dir}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           str(REPO / "tests" / "scripts" / "ddp_train.py"), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=380)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["steps"] == r1["steps"] > 0
    for key in ("student", "ema"):
        assert r0[key].keys() == r1[key].keys()
        for name in r0[key]:
            assert torch.equal(r0[key][name], r1[key][name]), (key, name)
    assert not torch.equal(r0["student"]["1.classifier.3.weight"], r0["initial"]["1.classifier.3.weight"])


# -- bad input, caught before any training work ----------------------------------------------
def test_missing_data_dir_names_the_flag(tmp_path):
    from robustkd.task import DataNotFoundError

    task = create_task("cifar10", data_dir=str(tmp_path / "nope"))
    with pytest.raises(DataNotFoundError, match="--data-dir"):
        task.dataset("train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataNotFoundError, match="no \\*.parquet files"):
        create_task("cifar10", data_dir=str(tmp_path / "empty")).dataset("train")


def test_recipe_without_network_fails_at_once_naming_data_dir(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "recipes" / "cifar_adr.py"), "--output-dir", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--data-dir" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_images_outside_unit_range_and_bad_labels_are_refused(cifar_task):
    batch = next(iter(cifar_task.dataloader("test", 8, max_samples=8)))
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\].*normalise inside"):
        cifar_task.validate_batch({**batch, "inputs": batch["inputs"] * 2 - 1})
    with pytest.raises(ValueError, match="label 12 is outside the task's 10 classes"):
        cifar_task.validate_batch({**batch, "labels": torch.full_like(batch["labels"], 12)})
    with pytest.raises(ValueError, match=r"shape \(N, 3, 32, 32\)"):
        cifar_task.validate_batch({**batch, "inputs": batch["inputs"][:, :, :16]})


def test_a_model_with_another_class_count_is_refused(cifar_task, tmp_path):
    cifar100 = create_task("cifar100", data_dir="unused")
    wrong = cifar100.build_model("small_cnn")
    batch = next(iter(cifar_task.dataloader("test", 4, max_samples=4)))
    with pytest.raises(ValueError, match="has 10 classes"):
        cifar_task.check_model(wrong.eval(), batch)
    from robustkd.checkpoint import save_model_dir

    save_model_dir(tmp_path, wrong, None, {"model": "small_cnn", "task": "cifar100", "num_classes": 100})
    with pytest.raises(ValueError, match="has 100 classes .* but the task 'cifar10' has 10"):
        load_model(tmp_path, cifar_task)


def test_awp_with_gradient_accumulation_is_refused(cifar_task, tmp_path):
    with pytest.raises(ValueError, match="AWP .* gradient accumulation"):
        _trainer(cifar_task, tmp_path, grad_accum=2)


def test_adr_batch_norm_settings_reach_the_optimizer_and_the_step(cifar_dir, tmp_path, monkeypatch):
    """--bn-no-decay (no weight decay on the batch-norm parameters) and --bn-momentum-schedule (1.0 at the
    first step, 0.01 after), ADR's settings for its extra-data runs, through the recipe; --bn-no-decay is
    refused on a model it would not change."""
    from accelerate.state import AcceleratorState

    from robustkd import recipe as recipe_mod
    from robustkd.teachers import unwrap

    built = []
    real = recipe_mod.build_trainer
    monkeypatch.setattr(recipe_mod, "build_trainer", lambda *a, **k: built.append(real(*a, **k)) or built[-1])
    monkeypatch.setattr(Trainer, "fit", lambda self: (_ for _ in ()).throw(_Crash("built")))
    base = ["--data-dir", cifar_dir, "--max-train-samples", "16", "--batch-size", "8", "--method", "standard",
            "--output-dir", str(tmp_path / "run"), "--no-progress", "--final-attacks", "fgsm"]
    AcceleratorState._reset_state(reset_partial_state=True)
    with pytest.raises(_Crash):
        _recipe([*base, "--model", "preact_resnet18", "--bn-no-decay", "true", "--bn-momentum-schedule", "true"],
                monkeypatch)
    trainer = built[-1]
    names = {id(p): n for n, p in unwrap(trainer.model).named_parameters()}
    decay, no_decay = trainer.optimizer.param_groups
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    assert no_decay["params"] and all("batchnorm" in names[id(p)] for p in no_decay["params"])
    assert not any("batchnorm" in names[id(p)] for p in decay["params"])
    bns = [m for m in unwrap(trainer.model).modules() if isinstance(m, torch.nn.BatchNorm2d)]
    batch = next(iter(trainer.train_loader))
    for expected in (1.0, 0.01):
        trainer.train_step(batch)
        assert {m.momentum for m in bns} == {expected}
    AcceleratorState._reset_state(reset_partial_state=True)
    with pytest.raises(ValueError, match="--bn-no-decay: this model has no parameter named 'batchnorm'"):
        _recipe([*base, "--model", "small_cnn", "--bn-no-decay", "true", "--output-dir", str(tmp_path / "other")],
                monkeypatch)
