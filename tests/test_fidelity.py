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
    for k in range(22):
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
