"""Speed modes and host synchronisation: every mode computes the same training step (within the
precision it asks for), augmentation on the device draws what the per-example version drew, and
no method's training step waits for the device."""
from __future__ import annotations

import collections
import sys
import traceback

import pytest
import torch
import torch.nn.functional as F
from robustkd_tasks.image import augment_images
from test_text import tiny as tiny  # noqa: F401 - fixture: a tiny BERT and SST-2-shaped data

from robustkd import create_method, create_task
from robustkd.attacks.pgd import PGD
from robustkd.distill.mtard import MTARD
from robustkd.teachers import FrozenTeacher
from robustkd.trainer import TrainConfig, Trainer

CUDA = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def _fresh_accelerator_state():
    """Accelerate keeps one precision per process: let each test choose its own."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


# -- augmentation on the device ---------------------------------------------------------------------
def _per_example_reference(x, pad=4):
    """The previous per-example loop (pad, crop at random offsets, flip), with the same draws."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    offsets = torch.randint(0, 2 * pad + 1, (n, 2))
    out = torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offsets.tolist())])
    mask = torch.rand(n) < 0.5
    return torch.where(mask.view(-1, 1, 1, 1), out.flip(3), out)


def test_batched_augmentation_draws_exactly_what_the_per_example_loop_drew():
    x = torch.rand(64, 3, 32, 32)
    torch.manual_seed(3)
    batched = augment_images(x)
    torch.manual_seed(3)
    loop = _per_example_reference(x)
    assert torch.equal(batched, loop)
    # and it does augment: some images moved, some flipped, none is all padding
    assert not torch.equal(batched, x)
    assert (batched.flatten(1).abs().sum(1) > 0).all()


def test_offsets_and_flips_cover_their_range_uniformly():
    """Each image gets its own offset in 0..8 on both axes and a fair coin for the flip."""
    n = 4000
    x = torch.zeros(n, 1, 9, 9)
    x[:, :, 4, 4] = 1.0  # a marker pixel: where it lands gives the crop offset (and the flip)
    torch.manual_seed(0)
    out = augment_images(x, pad=4, flip=False)
    pos = out.flatten(1).argmax(1)
    assert (out.flatten(1).amax(1) == 1).all()  # with pad 4 on a 9x9 image the marker always stays in view
    rows, cols = pos // 9, pos % 9
    for axis in (rows, cols):
        counts = torch.bincount(axis, minlength=9).float()
        assert counts.numel() == 9 and (counts > 0).all()
        assert (counts / n - 1 / 9).abs().max() < 0.03
    marked = torch.zeros(n, 1, 2, 2)
    marked[:, :, 0, 0] = 1.0
    flipped = augment_images(marked, pad=0, flip=True)[:, 0, 0, 1] == 1
    assert abs(flipped.float().mean().item() - 0.5) < 0.04


def test_trainer_augments_training_batches_on_their_device_not_evaluation_batches(cifar_dir, tmp_path):
    task = create_task("cifar10", data_dir=cifar_dir)
    seen = []
    original = task.augment_batch
    task.augment_batch = lambda batch: seen.append(batch["inputs"].device) or original(batch)
    cfg = TrainConfig(batch_size=8, max_train_samples=16, max_eval_samples=8, eval_attacks=[], eval_every=0,
                      output_dir=str(tmp_path), progress=False, cpu=True)
    trainer = Trainer(task, task.build_model("small_cnn", width=4), create_method("pgd_at", task, PGD(task, steps=1)),
                      cfg)
    got = []
    trainer.method.loss = lambda model, batch, prepared, progress: (got.append(batch["inputs"]) or
                                                                   (model(batch["inputs"]).sum() * 0, {"loss": torch.zeros(())}))
    loader_batch = next(iter(trainer.train_loader))
    torch.manual_seed(0)
    trainer.train_step(loader_batch)
    assert seen == [loader_batch["inputs"].device]
    assert got[0].shape == loader_batch["inputs"].shape and not torch.equal(got[0], loader_batch["inputs"])
    assert torch.equal(next(iter(trainer.eval_loader))["inputs"], next(iter(trainer.eval_loader))["inputs"])


# -- speed modes: the same step ----------------------------------------------------------------------
def _one_step(tmp_path, name, model="small_cnn", model_kwargs=None, **modes):
    task = create_task("synthetic", n_train=16, n_test=8)
    torch.manual_seed(0)
    net = task.build_model(model, **(model_kwargs or {"width": 4}))
    method = create_method("pgd_at", task, PGD(task, steps=2, random_start="zero"))
    cfg = TrainConfig(batch_size=8, max_train_samples=16, eval_attacks=[], eval_every=0, lr=0.05,
                      output_dir=str(tmp_path / name), progress=False, cpu=not CUDA, **modes)
    trainer = Trainer(task, net, method, cfg)
    batch = next(iter(trainer.train_loader))
    logs = trainer.train_step(batch)
    params = torch.cat([p.detach().float().flatten().cpu() for p in trainer.model.parameters()])
    return float(logs["loss"]), params


@pytest.mark.parametrize("modes,rtol", [
    ({"channels_last": True}, 1e-4),
    ({"num_workers": 2, "pin_memory": True}, 0.0),
    ({"tf32": True}, 1e-2 if CUDA else 0.0),
    ({"mixed_precision": "bf16"}, 3e-2),
], ids=["channels_last", "workers_pinned", "tf32", "bf16_autocast"])
def test_each_speed_mode_computes_the_same_training_step(tmp_path, modes, rtol):
    from accelerate.state import AcceleratorState

    base_loss, base_params = _one_step(tmp_path, "base")
    AcceleratorState._reset_state()
    loss, params = _one_step(tmp_path, "mode", **modes)
    assert loss == pytest.approx(base_loss, rel=rtol, abs=1e-7)
    assert torch.allclose(params, base_params, rtol=10 * rtol, atol=1e-3 if rtol else 1e-7)


def test_bf16_autocast_covers_the_attack_and_the_teachers(tmp_path):
    """With bf16 the attack's and the EMA teacher's forward passes run in bf16 too."""
    task = create_task("synthetic", n_train=8, n_test=8)
    dtypes = []
    net = task.build_model("small_cnn", width=4)
    net[-1].register_forward_hook(lambda m, i, o: dtypes.append(("student", o.dtype)))
    cfg = TrainConfig(batch_size=8, max_train_samples=8, eval_attacks=[], eval_every=0, cpu=not CUDA,
                      mixed_precision="bf16", output_dir=str(tmp_path), progress=False)
    trainer = Trainer(task, net, create_method("adr", task, PGD(task, steps=2)), cfg)
    trainer.ema.model[-1].register_forward_hook(lambda m, i, o: dtypes.append(("teacher", o.dtype)))
    dtypes.clear()
    trainer.train_step(next(iter(trainer.train_loader)))
    assert {role for role, _ in dtypes} == {"student", "teacher"}
    assert all(dtype == torch.bfloat16 for _, dtype in dtypes), dtypes  # attack, teacher and update alike


@pytest.mark.parametrize("backend", [
    "aot_eager",  # dynamo capture + AOT autograd, no code generation: ~15 s here
    pytest.param("inductor", marks=pytest.mark.slow),  # compiles C++ kernels: ~170 s on 2 CPU cores
])
def test_compile_computes_the_same_training_step(tmp_path, monkeypatch, backend):
    """--compile compiles the student that the attack and the update both call (tiny model)."""
    import torch._dynamo

    base_loss, base_params = _one_step(tmp_path, "base", model_kwargs={"width": 2})
    original = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: original(self, **{"backend": backend, **kw}))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    loss, params = _one_step(tmp_path, "compiled", model_kwargs={"width": 2}, compile=True)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the step really ran compiled code
    assert loss == pytest.approx(base_loss, rel=1e-4)
    assert torch.allclose(params, base_params, rtol=1e-4, atol=1e-6)


# -- no host synchronisation in a training step ------------------------------------------------------
_SYNCING = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "cpu", "numpy")


def _trainer(tmp_path, name, **cfg):
    task = create_task("synthetic", n_train=16, n_test=8)
    torch.manual_seed(0)
    if name == "mtard":
        teachers = dict(clean_teacher=FrozenTeacher(task.build_model("small_cnn", width=4).eval()),
                        robust_teacher=FrozenTeacher(task.build_model("small_cnn", width=4).eval()))
        method = MTARD(task, PGD(task, steps=2, random_start="normal", init_std=0.001), **teachers)
    else:
        method = create_method(name, task, PGD(task, steps=2))
    config = TrainConfig(batch_size=8, max_train_samples=16, eval_attacks=[], eval_every=0, cpu=not CUDA,
                         output_dir=str(tmp_path / name), progress=False, **cfg)
    return Trainer(task, task.build_model("small_cnn", width=4), method, config)


@pytest.mark.parametrize("name,cfg", [("pgd_at", {}), ("adr", {}), ("mtard", {}), ("adr", {"awp_gamma": 5e-3}),
                                      ("mtard", {"awp_gamma": 5e-3})], ids=["pgd_at", "adr", "mtard", "adr_awp", "mtard_awp"])
def test_a_training_step_reads_nothing_back_from_the_device(tmp_path, monkeypatch, name, cfg):
    trainer = _trainer(tmp_path, name, **cfg)
    batch = next(iter(trainer.train_loader))
    trainer.train_step(batch)  # first step: lazy state moves to the device
    calls: collections.Counter = collections.Counter()
    for attr in _SYNCING:
        original = getattr(torch.Tensor, attr)

        def spy(self, *args, _attr=attr, _original=original, **kwargs):
            frame = traceback.extract_stack(limit=2)[0]
            calls[f"Tensor.{_attr} at {frame.filename}:{frame.lineno}"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, attr, spy)
    for _ in range(2):
        trainer.train_step(batch)
    monkeypatch.undo()
    assert not calls, f"host synchronisations in a {name} training step: {dict(calls)}"
    logged = trainer.method.log_values(trainer.progress())  # the values reach the host at logging time
    if name == "mtard":
        assert logged["mtard_loss_adv"] > 0 and logged["mtard_w_adv"] + logged["mtard_w_nat"] == pytest.approx(1)


@pytest.mark.gpu  # torch.cuda.set_sync_debug_mode
@pytest.mark.parametrize("name", ["pgd_at", "adr", "mtard"])
def test_a_training_step_on_the_gpu_never_synchronises(tmp_path, name):
    trainer = _trainer(tmp_path, name, awp_gamma=5e-3 if name == "adr" else None)
    batch = {k: v.to(trainer.accelerator.device) for k, v in next(iter(trainer.train_loader)).items()}
    trainer.train_step(batch)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        trainer.train_step(batch)
        trainer.train_step(batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")


# -- evaluations cost what was asked -----------------------------------------------------------------
def test_textattack_in_the_sst2_report_runs_on_the_report_s_points_in_batched_queries(tiny, tmp_path, monkeypatch):
    """--max-eval-samples binds TextAttack too, and TextAttack's queries reach the model in batches."""
    import importlib.util
    import json
    from pathlib import Path

    from robustkd.attacks.text import TextAttackAdapter

    attacked, batch_sizes, query_sizes = [], [], []
    original = TextAttackAdapter.attack_texts

    def spy(self, model, texts, labels):
        attacked.extend(texts)
        out = original(self, model, texts, labels)
        batch_sizes.append(self._attack.goal_function.batch_size)
        return out

    monkeypatch.setattr(TextAttackAdapter, "attack_texts", spy)
    import textattack.goal_functions.goal_function as gf

    call = gf.GoalFunction._call_model_uncached
    monkeypatch.setattr(gf.GoalFunction, "_call_model_uncached",
                        lambda self, texts: query_sizes.append(len(texts)) or call(self, texts))
    spec = importlib.util.spec_from_file_location("sst2_adr", Path(__file__).resolve().parents[1] / "recipes" / "sst2_adr.py")
    recipe = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "sst2_adr", recipe)  # its dataclasses resolve their module
    spec.loader.exec_module(recipe)
    out = tmp_path / "run"
    recipe.main(["--model", tiny["model_dir"], "--data-dir", tiny["data_dir"], "--epochs", "1", "--batch-size", "8",
                 "--max-train-samples", "8", "--attack-steps", "1", "--eval-attacks", "embedding_pgd1", "--eval-every", "0",
                 "--final-attacks", "embedding_pgd2", "--max-eval-samples", "5", "--eval-batch-size", "16",
                 "--textattack-on", "student", "--output-dir", str(out), "--cpu", "--no-progress"])
    task = create_task("sst2", data_dir=tiny["data_dir"])
    task.build_model(tiny["model_dir"])
    eval_texts = list(next(iter(task.dataloader("test", 64, max_samples=5, seed=0, shuffle=False)))["text"])
    assert attacked == eval_texts  # the very points of the report's other attacks, not TextAttack's own sample
    assert batch_sizes == [16]
    assert max(query_sizes) > 1  # candidate texts go to the model together
    saved = json.loads((out / "report.json").read_text())
    assert saved["textattack"]["num_examples"] == 5 and saved["textattack"]["sample"] == "the evaluation points"


@pytest.mark.skipif(CUDA, reason="checks the refusal on a machine without a GPU")
def test_gpu_throughput_bench_refuses_clearly_without_a_gpu(cifar_dir, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "gpu_throughput.py"
    proc = subprocess.run([sys.executable, str(script), "--parts", "autoattack", "--refs", str(tmp_path),
                           "--data-dir", cifar_dir], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "needs a CUDA device" in proc.stderr and proc.stderr.count("\n") == 1 and not proc.stdout
