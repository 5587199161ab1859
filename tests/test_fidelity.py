"""The settings that make robustkd's runs the reference code's runs (docs/fidelity.md), each against
values computed by hand from the formulas, never from the reference code."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustkd import create_task
from robustkd.awp import AWP
from robustkd.distill.methods import ADR, TRADES, Prepared, Progress
from robustkd.distill.mtard import MTARD
from robustkd.task import Adversarial
from robustkd.trainer import TrainConfig, Trainer, lr_factor


@pytest.fixture(scope="module")
def tiny_task():
    return create_task("synthetic", n_train=10, n_test=4, image_size=8)


def bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(3 * 8 * 8, 10))


def make_trainer(task, tmp_path, **cfg) -> Trainer:
    cfg = {"epochs": 1, "batch_size": 4, "eval_batch_size": 4, "eval_attacks": [], "cpu": True, "progress": False,
           "output_dir": str(tmp_path), **cfg}
    return Trainer(task, bn_model(), ADR(task), TrainConfig(**cfg))


# -- optimizer, schedule, batches ----------------------------------------------------------------
def test_nesterov_sgd_steps_as_computed_by_hand(tiny_task, tmp_path):
    trainer = make_trainer(tiny_task, tmp_path, lr=0.5, momentum=0.9, weight_decay=0.1, nesterov=True)
    w = nn.Parameter(torch.tensor([1.0]))
    holder = nn.Module()
    holder.w = w
    opt = trainer._make_optimizer(holder)
    for _ in range(2):
        opt.zero_grad()
        (2.0 * w).sum().backward()  # gradient 2
        opt.step()
        if _ == 0:
            # g' = 2 + 0.1 * 1 = 2.1; buf = 2.1; update = g' + 0.9 * buf = 3.99
            assert w.item() == pytest.approx(1 - 0.5 * 3.99, abs=1e-6)
    # g' = 2 + 0.1 * (-0.995) = 1.9005; buf = 0.9 * 2.1 + 1.9005 = 3.7905; update = 1.9005 + 0.9 * 3.7905
    assert w.item() == pytest.approx(-0.995 - 0.5 * (1.9005 + 0.9 * 3.7905), abs=1e-6)
    with pytest.raises(ValueError, match="nesterov applies to the SGD optimizer only"):
        make_trainer(tiny_task, tmp_path / "b", optimizer="adamw", nesterov=True)


def test_warmup_cosine_lr_at_a_few_iterations(tiny_task, tmp_path):
    # 10 examples, batch 4, drop_last: 2 steps per epoch; 10 epochs = 20 steps; warm-up 2.5 epochs = 5 steps
    trainer = make_trainer(tiny_task, tmp_path, epochs=10, drop_last=True, lr=0.4, lr_schedule="cosine",
                           lr_warmup_epochs=2.5, lr_warmup_init=1e-6, lr_min=0.0)
    assert trainer.total_steps == 20
    seen = []
    for _ in range(22):
        seen.append(trainer.optimizer.param_groups[0]["lr"])
        trainer.optimizer.step()
        trainer.scheduler.step()
    # step k runs at f(max(k - 1, 0)): f(t) = 1e-6 + t * (0.4 - 1e-6) / 5 for t < 5, then 0.2 * (1 + cos(pi t / 20))
    expected = {0: 1e-6, 1: 1e-6, 2: 1e-6 + (0.4 - 1e-6) / 5, 5: 1e-6 + 4 * (0.4 - 1e-6) / 5,
                6: 0.2 * (1 + math.cos(math.pi * 5 / 20)), 11: 0.2, 21: 0.0}
    for k, lr in expected.items():
        assert seen[k] == pytest.approx(lr, abs=1e-9), k
    assert lr_factor(3, "multistep", lr=0.1, total=10, milestones=[3, 6]) == pytest.approx(0.1)
    assert lr_factor(2, "multistep", lr=0.1, total=10, milestones=[3, 6]) == 1.0


@pytest.mark.parametrize("drop_last, batches", [(True, 2), (False, 3)])
def test_drop_last_batch_counts(tiny_task, tmp_path, drop_last, batches):
    trainer = make_trainer(tiny_task, tmp_path, drop_last=drop_last)
    sizes = [len(b["labels"]) for b in trainer.train_loader]
    assert len(sizes) == batches == trainer.steps_per_epoch
    assert sizes == ([4, 4] if drop_last else [4, 4, 2])


# -- TRADES ----------------------------------------------------------------------------------
@pytest.mark.parametrize("forward", ["concat", "separate"])
def test_trades_forward_batch_norm_statistics(tiny_task, forward):
    model = bn_model().train()
    batch = next(iter(tiny_task.dataloader("train", 4, shuffle=False)))
    x, y = batch["inputs"], batch["labels"]
    delta = torch.full_like(x, 0.01)
    method = TRADES(tiny_task, forward=forward)
    method.loss(model, batch, Prepared(y, Adversarial(batch, delta)), Progress())
    bn = model[0]
    both = torch.cat([x, x + delta]).transpose(0, 1).flatten(1)  # channel-major
    if forward == "concat":  # one update from 0 / 1 with momentum 0.1 over all 8 examples
        mean, var = 0.1 * both.mean(1), 0.9 + 0.1 * both.var(1, unbiased=True)
    else:  # clean first, then adversarial
        clean, adv = x.transpose(0, 1).flatten(1), (x + delta).transpose(0, 1).flatten(1)
        mean = 0.9 * (0.1 * clean.mean(1)) + 0.1 * adv.mean(1)
        var = 0.9 * (0.9 + 0.1 * clean.var(1, unbiased=True)) + 0.1 * adv.var(1, unbiased=True)
    assert torch.allclose(bn.running_mean, mean, atol=1e-6)
    assert torch.allclose(bn.running_var, var, atol=1e-6)


def test_trades_defaults_follow_adr_reference(tiny_task):
    method = TRADES(tiny_task)
    assert (method.attack_mode, method.forward, method.attack.random_start, method.attack.init_std) == \
        ("train", "concat", "trades", 0.001)
    assert TRADES(tiny_task, attack_mode="eval").attack_mode == "eval"
    adr = ADR(tiny_task, base="trades")
    assert adr.attack_mode == "train" and adr.trades.forward == "concat"
    with pytest.raises(ValueError, match="attack_mode"):
        TRADES(tiny_task, attack_mode="test")


def test_trades_start_is_uniform_in_0_to_0_001_and_not_clamped():
    torch.manual_seed(0)
    x = torch.ones(20000)  # at the top of the [0, 1] domain
    from robustkd.threat import ThreatModel

    delta = ThreatModel(8 / 255, "linf", domain=(0.0, 1.0)).init(x, "trades", std=0.001)
    assert delta.min() >= 0 and delta.max() < 0.001
    assert delta.mean().item() == pytest.approx(0.0005, abs=2e-5)  # U[0, 0.001): mean 0.0005
    assert delta.std().item() == pytest.approx(0.001 / math.sqrt(12), rel=0.05)
    assert (x + delta).max() > 1.0  # like the reference, the start is not clamped to the domain


def test_adr_schedules_from_constructor(tiny_task):
    adr = ADR(tiny_task, tau=(1.5, 1.0), lam=(0.5, 0.9))
    assert adr.rectifier.tau(0, 100) == 1.5 and adr.rectifier.tau(100, 100) == 1.0
    assert adr.rectifier.lam(50, 100) == pytest.approx(0.7)
    with pytest.raises(ValueError, match="interpolation"):
        ADR(tiny_task, lam=(0.5, 1.5))


def test_mtard_kl_scale_defaults_to_the_reference(tiny_task):
    teacher = bn_model().eval()
    assert MTARD(tiny_task, clean_teacher=teacher, robust_teacher=teacher).kl_scale == "reference"


# -- AWP -------------------------------------------------------------------------------------
def test_awp_perturbs_every_parameter_and_keeps_clean_pass_bn_statistics():
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).train()
    torch.manual_seed(0)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    original = [p.detach().clone() for p in model.parameters()]
    awp = AWP(gamma=0.01)
    v = awp.compute(model, lambda m: F.cross_entropy(m(x), y))
    assert len(v) == len(original) == 6  # weights, biases and BN affine parameters
    for dv, w0 in zip(v, original):
        assert dv.norm().item() == pytest.approx(0.01 * w0.norm().item(), rel=1e-5)
    # the unperturbed pass updated the statistics: running_mean = 0.1 * batch mean of the BN input
    h = model[0](x).detach()
    assert torch.allclose(model[1].running_mean, 0.1 * h.mean(0), atol=1e-6)
    after_clean = [b.clone() for b in model[1].buffers()]
    awp.perturb(model, v)
    F.cross_entropy(model(x), y).backward()  # the perturbed pass
    awp.restore(model, v)
    for p, o in zip(model.parameters(), original):
        assert torch.equal(p, o)  # restored to the bit
    assert torch.equal(model[1].running_mean, after_clean[0]) and torch.equal(model[1].running_var, after_clean[1])


def test_awp_wu2020_style_moves_only_weight_matrices():
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).train()
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    awp = AWP(gamma=0.01, style="wu2020")
    v = awp.compute(model, lambda m: F.cross_entropy(m(x), y))
    assert [t.dim() for t in v] == [2, 2]
    assert torch.equal(model[1].running_mean, torch.zeros(6))  # this style leaves the clean pass's stats out
    with pytest.raises(ValueError, match="AWP style"):
        AWP(style="sam")


# -- the perturbed point (robustkd.task.Task.point_batch, PGD keep_point) ------------------------------
def _hand_pgd_point(model, x, y, start, eps, alpha, steps, projection):
    """PGD on the perturbed point as the formulas say: p <- clamp(P(p + alpha sign(grad)), 0, 1)."""
    p = start.clone()
    for _ in range(steps):
        p.requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(p), y), p)
        q = p.detach() + alpha * g.sign()
        p = torch.min(torch.max(q, x - eps), x + eps) if projection == "bounds" else x + torch.clamp(q - x, -eps, eps)
        p = torch.clamp(p, 0.0, 1.0).detach()
    return p


@pytest.mark.parametrize("start, keep, projection", [("trades", "auto", "bounds"), ("normal", "auto", "bounds"),
                                                     ("uniform", "offset", "offset")])
def test_pgd_keeps_the_perturbed_point_as_the_reference_attacks(tiny_task, start, keep, projection):
    from robustkd.attacks.pgd import PGD

    model = bn_model().eval()
    batch = next(iter(tiny_task.dataloader("test", 4, shuffle=False)))
    x, y = batch["inputs"], batch["labels"]
    eps, alpha = 8 / 255, 2 / 255
    attack = PGD(tiny_task, eps=eps, steps=5, step_size=alpha, random_start=start, keep_point=keep)
    assert attack.keep_point == projection and attack.describe()["keep_point"] == projection
    torch.manual_seed(3)
    adv = attack(model, batch)
    torch.manual_seed(3)
    if start == "uniform":
        first = torch.clamp(x + torch.empty_like(x).uniform_(-eps, eps), 0, 1)
    else:
        first = x + 0.001 * (torch.rand_like(x) if start == "trades" else torch.randn_like(x))
    expected = _hand_pgd_point(model, x, y, first, eps, alpha, 5, projection)
    assert adv.delta is None and torch.equal(adv.batch["inputs"], expected)  # the model sees that very point
    assert torch.equal(adv.batch["labels"], y)
    assert torch.equal(tiny_task.logits(model, *adv), model(expected))


def test_pgd_keep_point_off_and_refusals(tiny_task):
    from robustkd.attacks.pgd import PGD
    from robustkd.task import Task

    model = bn_model().eval()
    batch = next(iter(tiny_task.dataloader("test", 4, shuffle=False)))
    adv = PGD(tiny_task, eps=8 / 255, steps=2, random_start="trades", keep_point="off")(model, batch)
    assert adv.delta is not None and adv.batch is batch
    assert PGD(tiny_task, eps=8 / 255, random_start="uniform").keep_point == "off"  # auto: ADR's PGD keeps offsets
    assert PGD(tiny_task, eps=0.5, norm="l2", random_start="normal").keep_point == "off"  # auto: no L2 point
    with pytest.raises(ValueError, match="fixed radius only"):
        PGD(tiny_task, eps=0.5, norm="l2", keep_point="bounds")
    with pytest.raises(ValueError, match="unknown keep_point"):
        PGD(tiny_task, keep_point="yes")

    class Embedded(type(tiny_task)):  # a task whose attack space is not an input it holds
        point_batch = Task.point_batch

    emb = object.__new__(Embedded)
    emb.__dict__.update(tiny_task.__dict__)
    assert PGD(emb, eps=8 / 255, random_start="trades").keep_point == "off"
    with pytest.raises(ValueError, match="no point_batch"):
        PGD(emb, eps=8 / 255, keep_point="bounds")


# -- the models as the reference computes them ----------------------------------------------------
@pytest.mark.parametrize("name, window", [("resnet18", 4), ("preact_resnet18", 4)])
def test_image_models_average_a_fixed_window_on_cifar_sized_inputs(name, window):
    from robustkd_tasks import image_models

    torch.manual_seed(0)
    model = getattr(image_models, name)(normalize=False).eval()
    x = torch.rand(2, 3, 32, 32)
    head = model.linear if name == "resnet18" else model.logits
    feats, last = {}, {}
    target = model.layer4 if name == "resnet18" else model.batchnorm
    hooks = [head.register_forward_hook(lambda m, inp, out: feats.setdefault("in", inp[0])),
             target.register_forward_hook(lambda m, inp, out: last.setdefault("out", out))]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    # the pooled vector the head sees is a 4x4 average of the last map, bit for bit (not a global mean)
    fmap = last["out"] if name == "resnet18" else F.relu(last["out"])
    assert torch.equal(feats["in"], F.avg_pool2d(fmap, window).flatten(1))
    big = getattr(image_models, name)(num_classes=200, normalize=False, pooling="auto").eval()
    with torch.no_grad():
        assert big(torch.rand(1, 3, 64, 64)).shape == (1, 200)  # TinyImageNet: adaptive, as the reference
    with pytest.raises(ValueError, match="pooling='global'"):
        getattr(image_models, name)(normalize=False, pooling="window")(torch.rand(1, 3, 64, 64))
    with pytest.raises(ValueError, match="unknown pooling"):
        getattr(image_models, name)(pooling="mean")


def test_swish_activation_value_and_gradient():
    from robustkd_tasks import image_models

    x = torch.linspace(-6, 6, 101, dtype=torch.float64, requires_grad=True)
    y = image_models._activation("swish")(x)
    (g,) = torch.autograd.grad(y.sum(), x)
    s = torch.sigmoid(x.detach())
    assert torch.allclose(y, x * torch.sigmoid(x))
    assert torch.allclose(g, s + x.detach() * s * (1 - s))  # d/dx x s(x) = s + x s (1 - s)
    model = image_models.preact_resnet18(activation="swish")
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="unknown activation"):
        image_models.resnet18(activation="gelu")


# -- ADR's batch-norm settings for runs with extra data ------------------------------------------
def test_param_groups_leave_batch_norm_undecayed():
    from robustkd_tasks.image_models import preact_resnet18

    from robustkd.fidelity import param_groups

    model = preact_resnet18(normalize=False)
    one = param_groups(model, 5e-4)
    assert len(one) == 1 and len(one[0]["params"]) == len(list(model.parameters()))
    decay, no_decay = param_groups(model, 5e-4, no_decay_bn=True)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    assert all("batchnorm" in names[id(p)] for p in no_decay["params"])
    assert not any("batchnorm" in names[id(p)] for p in decay["params"])
    assert len(no_decay["params"]) == 2 * sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    opt = torch.optim.SGD(param_groups(model, 0.1, no_decay_bn=True), lr=1.0)
    bn = model.batchnorm.weight
    before = bn.detach().clone()
    bn.grad = torch.zeros_like(bn)
    opt.step()
    assert torch.equal(bn, before)  # a zero gradient and no decay: the BN weight does not move


def test_bn_momentum_schedule_is_one_then_one_hundredth():
    from robustkd.fidelity import BNMomentumSchedule

    model = bn_model()
    schedule = BNMomentumSchedule()
    seen = []
    for step in range(3):
        schedule(model, step)
        seen.append(model[0].momentum)
    assert seen == [1.0, 0.01, 0.01]
    model[0].momentum = 0.5  # set once, at steps 0 and 1 only (as the reference)
    schedule(model, 5)
    assert model[0].momentum == 0.5
    x = torch.randn(16, 3, 8, 8) * 3 + 2
    model[0].reset_running_stats()
    BNMomentumSchedule()(model, 0)
    model.train()(x)  # momentum 1: the running mean is the batch's
    assert torch.allclose(model[0].running_mean, x.mean((0, 2, 3)), atol=1e-5)


# -- robustkd fidelity: what runs without the reference repositories --------------------------------
def test_fidelity_command_refuses_bad_input(tmp_path, capsys):
    from robustkd.cli import main

    assert main(["fidelity", "--cases", "nope", "--adr", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown case nope" in err
    assert main(["fidelity", "--cases", "adr_pgd", "--adr", str(tmp_path)]) == 2
    assert "no src/advTrainer.py there" in capsys.readouterr().err
    assert main(["fidelity", "--cases", "bmtard", "--mtard", str(tmp_path)]) == 2
    assert "no mtard/mtard_loss.py there" in capsys.readouterr().err
    assert main(["fidelity", "--cases", "adr_pgd"]) == 2
    assert "needs --adr PATH" in capsys.readouterr().err


def test_fidelity_robustkd_side_and_table(cifar_dir, tmp_path):
    """The robustkd side of a case (a preset built as a recipe builds it, real images, one step), the
    state comparison and the printed tables."""
    import copy

    from robustkd.fidelity import (
        CASES,
        Options,
        _batches,
        _robustkd_trainer,
        _settings,
        compare_states,
        format_table,
        summarize,
    )

    case = CASES["adr_trades"]
    opts = Options(None, None, None, cifar_dir, steps=1, batch_size=2)
    s = _settings(case, opts, str(tmp_path / "run"))
    assert (s["method"], s["model"], s["max_train_samples"], s["task_kwargs"]) == \
        ("adr_trades", "resnet18", 2, {"augment": False})
    task, trainer = _robustkd_trainer(case, s)
    assert trainer.method.attack.keep_point == "bounds"  # the TRADES attack keeps the perturbed point
    batches = _batches(task, opts)
    before = copy.deepcopy(trainer.model)
    torch.manual_seed(0)
    trainer.train_step(batches[0])
    diff = compare_states(trainer.model, before[1])
    assert diff["params"][0] > 0 and diff["buffers"][0] > 0  # the step moved weights and BN statistics
    same = compare_states(trainer.model, copy.deepcopy(trainer.model)[1])
    assert same == {"params": (0.0, "-"), "buffers": (0.0, "-")}
    rows = [{"case": "adr_trades", "step": 1, "attack": 0.0, **diff, "ema": (0.0, "-")}]
    table = format_table(rows)
    assert table.splitlines()[0].startswith("| case | step | adversarial input | parameters | where | buffers |")
    assert f"| adr_trades | 1 | 0 | {diff['params'][0]:.1e} | `{diff['params'][1]}` |" in table
    summary = summarize(rows, [{"name": case.name, "preset": case.preset, "note": case.note}])
    assert "| adr_trades | `adr/cifar10/resnet18_trades_sgd_adr` | 1 |" in summary
    assert "step 1: the update, from identical adversarial inputs" in summary


def test_fidelity_records_the_adversarial_input_robustkd_trains_on(cifar_dir, tmp_path):
    """The attack recorder sees the point the model is fed (inputs + delta for ADR's PGD, the kept point
    for TRADES), so a difference is traced to the attack or to the update."""
    from robustkd.fidelity import CASES, AttackRecorder, Options, _batches, _robustkd_trainer, _settings

    for name in ("adr_pgd", "adr_trades"):
        case = CASES[name]
        opts = Options(None, None, None, cifar_dir, steps=1, batch_size=2)
        task, trainer = _robustkd_trainer(case, _settings(case, opts, str(tmp_path / name)))
        batch = _batches(task, opts)[0]
        recorder = AttackRecorder()
        recorder.observe_robustkd(trainer.method)
        seen: list[torch.Tensor] = []

        def hook(_module, args, seen=seen):
            seen.append(args[0].detach().clone())

        trainer.model.register_forward_pre_hook(hook)
        torch.manual_seed(0)
        trainer.train_step(batch)
        x = batch["inputs"]
        assert recorder.ours is not None and recorder.ours.shape == x.shape
        assert 0 < float((recorder.ours - x).abs().max()) <= 8 / 255 + 1e-6  # within the budget, moved
        # the model was fed exactly that point (TRADES: the second half of one pass over clean + adversarial)
        assert any(torch.equal(s[-x.shape[0]:], recorder.ours) for s in seen)
        recorder.ref = recorder.ours.clone()
        recorder.ref[0, 0, 0, 0] += 0.5
        assert recorder.difference() == pytest.approx(0.5)
        assert recorder.ours is None and recorder.difference() is None  # each step is compared once


def test_fidelity_trace_names_where_a_case_first_differs():
    from robustkd.fidelity import trace

    same = {"params": (0.0, "-"), "buffers": (0.0, "-")}
    assert trace([{"step": 1, "attack": 0.0, **same}, {"step": 2, "attack": 0.0, **same}]) == "none"
    upd = {"step": 2, "attack": 0.0, "params": (1e-8, "conv1.weight"), "buffers": (0.0, "-")}
    assert trace([{"step": 1, "attack": 0.0, **same}, upd]) == \
        "step 2: the update, from identical adversarial inputs (largest in `conv1.weight`)"
    att = {"step": 1, "attack": 2e-3, "params": (1e-8, "conv1.weight"), "buffers": (0.0, "-")}
    assert trace([att, upd]) == "step 1: the adversarial input (attack, 2.0e-03)"
    ema = {"step": 1, "attack": None, **same, "ema": (3e-9, "fc.weight")}
    assert trace([ema]).startswith("step 1: the update")


def _report(steps=2):
    rows = [{"case": "adr_pgd", "step": k + 1, "attack": 0.0, "params": (0.0, "-"), "buffers": (0.0, "-"),
             "ema": (0.0, "-")} for k in range(steps)]
    return {"command": "robustkd fidelity --adr ../ref/ADR --cases adr_pgd", "robustkd_version": "0", "torch": "2",
            "device": "CPU", "threads": 1, "batch_size": 16, "steps": steps, "seed": 0,
            "references": {"ADR": "0123456789abcdef", "MTARD": None, "MTARD-extension": None},
            "cases": [{"name": "adr_pgd", "preset": "adr/cifar10/resnet18_pgd_sgd_adr", "family": "adr", "note": ""}],
            "rows": rows, "notes": ["gin: not installed"]}


def test_fidelity_regenerates_the_doc_from_its_json(tmp_path, capsys):
    """`robustkd fidelity --from-json RUN.json --update-doc PAGE.md` renders a kept run into the page's
    generated block and leaves the rest of the page as it was."""
    import json

    from robustkd.cli import main
    from robustkd.fidelity import DOC_BEGIN, DOC_END

    run = tmp_path / "run.json"
    run.write_text(json.dumps(_report()))
    doc = tmp_path / "fidelity.md"
    doc.write_text(f"# Page\n\nintro\n\n{DOC_BEGIN}\nold figures\n{DOC_END}\n\nafter\n")
    assert main(["fidelity", "--from-json", str(run), "--update-doc", str(doc)]) == 0
    printed = capsys.readouterr().out
    text = doc.read_text()
    assert text.startswith("# Page\n\nintro\n\n" + DOC_BEGIN) and text.endswith(DOC_END + "\n\nafter\n")
    assert "old figures" not in text and printed.strip() in text
    assert "$ robustkd fidelity --adr ../ref/ADR --cases adr_pgd" in text
    assert "reference commits: ADR 0123456789ab" in text and "batch 16, 2 steps, seed 0" in text
    assert "| adr_pgd | `adr/cifar10/resnet18_pgd_sgd_adr` | 2 | 0 | none |" in text
    assert "| adr_pgd | 2 | 0 | 0 | `-` | 0 | `-` | 0 |" in text
    assert "- gin: not installed" in text
    # two runs render one after the other
    run2 = tmp_path / "run2.json"
    run2.write_text(json.dumps({**_report(1), "command": "robustkd fidelity --cases adr_pgd --steps 1",
                                "robustkd_commit": "fedcba9876543210-modified"}))
    assert main(["fidelity", "--from-json", str(run), str(run2)]) == 0
    out = capsys.readouterr().out
    assert out.index("--cases adr_pgd\n") < out.index("--steps 1")
    assert "robustkd 0 (commit fedcba987654-modified)" in out  # figures from uncommitted code say so


def test_fidelity_report_names_robustkd_s_commit():
    from robustkd.fidelity import Options, build_report

    report = build_report([], [], Options(None, None, None, "data"), [], None)
    if report["robustkd_commit"] is not None:  # running from a git checkout, as CI does
        assert len(report["robustkd_commit"].split("-")[0]) == 40


def test_fidelity_doc_and_json_faults_are_one_line_and_change_nothing(tmp_path, capsys):
    import json

    from robustkd.cli import main

    doc = tmp_path / "page.md"
    doc.write_text("# no generated block\n")
    run = tmp_path / "run.json"
    run.write_text(json.dumps(_report()))
    assert main(["fidelity", "--from-json", str(run), "--update-doc", str(doc)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no generated block" in err
    assert doc.read_text() == "# no generated block\n"
    assert main(["fidelity", "--from-json", str(run), "--update-doc", str(tmp_path / "none.md")]) == 2
    assert "no document at" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{\"rows\": []}")
    assert main(["fidelity", "--from-json", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not a `robustkd fidelity --json` file" in err
    assert main(["fidelity", "--from-json", str(tmp_path / "missing.json")]) == 2
    assert "not a readable JSON file" in capsys.readouterr().err
    assert main(["fidelity", "--cases", "adr_pgd", "--adr", str(tmp_path), "--json",
                 str(tmp_path / "nodir" / "x.json")]) == 2


def test_training_loop_body_reads_a_script(tmp_path):
    from robustkd.fidelity import read_gin, training_loop_body

    script = tmp_path / "train.py"
    script.write_text("import os\nweight = {'a': 0.5}\nunrelated = 3\ndef helper(a):\n    return a + 1\n"
                      "for epoch in range(3):\n    for step, (x, y) in enumerate(trainloader):\n"
                      "        weight['a'] = helper(weight['a'])\n")
    settings, body = training_loop_body(script)
    ns: dict = {}
    exec(compile(__import__("ast").Module(body=settings, type_ignores=[]), "s", "exec"), ns)
    exec(compile(__import__("ast").Module(body=body, type_ignores=[]), "s", "exec"), ns)
    assert ns["weight"] == {"a": 1.5} and "unrelated" not in ns
    (tmp_path / "bad.py").write_text("x = 1\n")
    with pytest.raises(ValueError, match="no loop over the training batches"):
        training_loop_body(tmp_path / "bad.py")
    gin = tmp_path / "c.gin"
    gin.write_text("# c\nmain.epoch = 200\nAdvTrainer.adv_attacker = @PGD()\nbuild_steplr_scheduler.lr_step_milestone = [100, 150]\n"
                   "build_optimizer.optimizer_type = 'sgd'\n")
    assert read_gin(gin) == {"main.epoch": 200, "AdvTrainer.adv_attacker": "PGD",
                             "build_steplr_scheduler.lr_step_milestone": [100, 150],
                             "build_optimizer.optimizer_type": "sgd"}


def test_docs_fidelity_figures_are_what_the_kept_runs_render():
    """docs/fidelity.md's generated block is exactly what `robustkd fidelity --from-json` renders from the
    runs kept in docs/results/fidelity (the command the page gives), and those runs show no difference."""
    import json
    from pathlib import Path

    from robustkd.fidelity import DOC_BEGIN, DOC_END, render

    root = Path(__file__).resolve().parent.parent
    runs = [root / "docs" / "results" / "fidelity" / name for name in ("resnet.json", "wrn.json")]
    doc = (root / "docs" / "fidelity.md").read_text()
    assert "--from-json docs/results/fidelity/resnet.json docs/results/fidelity/wrn.json" in doc
    block = doc[doc.index(DOC_BEGIN) + len(DOC_BEGIN):doc.index(DOC_END)]
    reports = [json.loads(p.read_text()) for p in runs]
    assert block == "\n" + "\n\n".join(render(r) for r in reports) + "\n"
    cases = {c["name"] for r in reports for c in r["cases"]}
    assert {"pgd_at", "adr_pgd", "adr_trades", "adr_awp", "adr_preact", "adr_wrn", "adr_cifar100",
            "adr_tinyimagenet", "mtard", "bmtard"} <= cases
    for r in reports:
        assert r["steps"] == 10 and r["batch_size"] == 16
        assert len(r["rows"]) == 10 * len(r["cases"])
    # the page's prose says every case equals the reference bit for bit: the kept runs must show it
    worst = max(max(row["attack"] or 0.0, row["params"][0], row["buffers"][0], (row.get("ema") or (0.0, ""))[0])
                for r in reports for row in r["rows"])
    assert worst == 0.0, "docs/fidelity.md's 'What they show' no longer matches the kept runs: rewrite it"
