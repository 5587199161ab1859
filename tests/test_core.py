"""The algorithms' formulas against hand-computed values, and the attacks' sanity rules."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustkd import EMATeacher, create_attack, create_method
from robustkd.attacks.base import parse_attack_spec, split_attack_specs
from robustkd.attacks.pgd import PGD
from robustkd.awp import AWP
from robustkd.distill.losses import distill_kl, trades_kl
from robustkd.distill.targets import ADRRectifier, rectify
from robustkd.registry import ATTACKS, METHODS, Registry, RegistryError
from robustkd.schedules import Schedule, cosine
from robustkd.threat import SNRBall, ThreatModel, snr_db


# -- ADR ------------------------------------------------------------------------------------
def test_rectify_matches_hand_computation_for_a_confident_correct_teacher():
    # teacher logits [2, 1, 0] at tau 1: p = softmax = [0.665241, 0.244728, 0.090031]; label 0 is the argmax,
    # so lam_i = lam - 0 = 0.8 and y_tilde = 0.8 p + 0.2 onehot(0).
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    y = torch.tensor([0])
    out = rectify(logits, y, tau=1.0, lam=0.8)
    p = torch.tensor([0.6652410, 0.2447285, 0.0900306])
    expected = 0.8 * p + 0.2 * torch.tensor([1.0, 0.0, 0.0])
    assert torch.allclose(out[0], expected, atol=1e-6)
    assert math.isclose(out.sum().item(), 1.0, rel_tol=1e-6)


def test_rectify_gives_weight_back_to_the_label_when_the_teacher_is_wrong():
    # same teacher, label 2: max p - p_y = 0.665241 - 0.090031 = 0.575210 -> lam_i = 0.8 - 0.575210 = 0.224790
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    out = rectify(logits, torch.tensor([2]), tau=1.0, lam=0.8)
    p = torch.tensor([0.6652410, 0.2447285, 0.0900306])
    lam_i = 0.8 - (0.6652410 - 0.0900306)
    expected = lam_i * p + (1 - lam_i) * torch.tensor([0.0, 0.0, 1.0])
    assert torch.allclose(out[0], expected, atol=1e-6)


def test_rectify_clips_the_factor_at_zero_for_a_very_wrong_teacher():
    # teacher logits [10, 0, 0] at tau 2: p = [0.986614, 0.006693, 0.006693]; label 1 -> lam - 0.979921 < 0 -> 0
    out = rectify(torch.tensor([[10.0, 0.0, 0.0]]), torch.tensor([1]), tau=2.0, lam=0.7)
    assert torch.allclose(out[0], torch.tensor([0.0, 1.0, 0.0]), atol=1e-7)


def test_rectify_applies_the_temperature_to_the_teacher():
    logits = torch.tensor([[3.0, 0.0]])
    out = rectify(logits, torch.tensor([0]), tau=3.0, lam=1.0)
    assert torch.allclose(out[0], F.softmax(logits[0] / 3.0, dim=0), atol=1e-7)


def test_adr_schedules_hit_the_papers_end_points():
    r = ADRRectifier()
    assert r.values(0, 1000) == {"adr_tau": 2.5, "adr_lambda": 0.7}
    end = r.values(1000, 1000)
    assert end["adr_tau"] == pytest.approx(2.0) and end["adr_lambda"] == pytest.approx(0.95)
    mid = r.values(500, 1000)
    assert mid["adr_tau"] == pytest.approx(2.25) and mid["adr_lambda"] == pytest.approx(0.825)
    assert cosine(1.0, 0.0, 250, 1000) == pytest.approx((1 + math.cos(math.pi / 4)) / 2)
    with pytest.raises(ValueError, match="unknown schedule"):
        Schedule(1, 0, "zigzag")


# -- losses ---------------------------------------------------------------------------------
def test_trades_kl_is_batch_mean_kl_of_clean_to_adversarial():
    clean, adv = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    p, q = F.softmax(clean, 1), F.softmax(adv, 1)
    expected = (p * (p.log() - q.log())).sum(1).mean()
    assert trades_kl(adv, clean).item() == pytest.approx(expected.item(), rel=1e-6)


def test_distill_kl_reference_scale_is_mean_over_batch_and_classes():
    student = torch.tensor([[1.0, 0.0, -1.0]])
    teacher = torch.tensor([[0.7, 0.2, 0.1]])
    log_ps = F.log_softmax(student, 1)
    # the reference's kl_loss (mtard_resnet18_cifar10.py:51-53), summed in its order: bit for bit
    ref = (-log_ps * teacher + torch.log(teacher + 1e-5) * teacher).mean()
    textbook = (teacher * (teacher.log() - log_ps)).sum()
    assert distill_kl(student, teacher, "reference").item() == ref.item()
    assert ref.item() == pytest.approx((teacher * (torch.log(teacher + 1e-5) - log_ps)).mean().item(), rel=1e-5)
    assert distill_kl(student, teacher, "batchmean").item() == pytest.approx(textbook.item(), rel=1e-5)


# -- EMA ------------------------------------------------------------------------------------
def test_ema_update_follows_the_formula_for_weights_and_buffers():
    student = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = EMATeacher(student, decay=0.9)
    copying = EMATeacher(student, decay=0.9, buffers="copy")
    before = [t.detach().clone() for t in ema.model.state_dict().values()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    student.train()(torch.randn(8, 3))  # moves the BN running statistics
    ema.update(student)
    copying.update(student)
    for (name, e), b, s in zip(ema.model.state_dict().items(), before, student.state_dict().values()):
        if e.is_floating_point():  # weights and running statistics alike, as timm's ModelEmaV2
            assert torch.allclose(e, 0.9 * b + 0.1 * s, atol=1e-7), name
    assert torch.equal(copying.model[1].running_mean, student[1].running_mean)
    assert not ema.model.training and not any(p.requires_grad for p in ema.model.parameters())


def test_ema_warmup_ramps_the_decay_like_timm():
    ema = EMATeacher(nn.Linear(2, 2), decay=0.995, warmup=True)
    decays = []
    for _ in range(3):
        decays.append(ema.current_decay())
        ema.update(nn.Linear(2, 2))
    assert decays == pytest.approx([1 / 10, 2 / 11, 3 / 12])
    ema.num_updates = 10_000
    assert ema.current_decay() == 0.995
    assert EMATeacher(nn.Linear(2, 2), decay=0.995).current_decay() == 0.995


# -- AWP ------------------------------------------------------------------------------------
def test_awp_perturbs_each_weight_by_gamma_times_its_norm_and_restores_it():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    original = [p.detach().clone() for p in model.parameters()]
    awp = AWP(gamma=0.01, style="wu2020")  # the weight-matrices-only style; the reference style: test_fidelity.py
    v = awp.compute(model, lambda m: F.cross_entropy(m(x), y))
    loss_before = F.cross_entropy(model(x), y).item()
    awp.perturb(model, v)
    weights = [p for p in model.parameters() if p.dim() > 1]
    for _w, dv, w0 in zip(weights, v, [o for o in original if o.dim() > 1]):
        assert dv.norm().item() == pytest.approx(0.01 * w0.norm().item(), rel=1e-4)
    assert F.cross_entropy(model(x), y).item() > loss_before  # ascent direction
    awp.restore(model, v)
    for p, o in zip(model.parameters(), original):
        assert torch.allclose(p, o, atol=1e-7)


# -- threat models and PGD ------------------------------------------------------------------
def test_threat_models_project_into_ball_and_domain():
    x = torch.rand(4, 3, 8, 8)
    big = torch.randn_like(x)
    for threat in (ThreatModel(8 / 255, "linf", domain=(0, 1)), ThreatModel(0.5, "l2", domain=(0, 1))):
        d = threat.project(x, big)
        assert (threat.size(d) <= threat.eps + 1e-6).all()
        assert ((x + d) >= 0).all() and ((x + d) <= 1).all()
    audio = torch.rand(4, 800) * 2 - 1
    snr = SNRBall(20.0)
    d = snr.project(audio, torch.randn_like(audio))
    assert (snr_db(audio, d) >= 20.0 - 1e-3).all()
    per_token = ThreatModel(0.1, "l2", per_token=True, relative=True)
    emb = torch.randn(2, 5, 16)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    d = per_token.project(emb, torch.randn_like(emb), mask)
    assert (d.norm(dim=-1) <= 0.1 * emb.norm(dim=-1) + 1e-6).all()
    assert torch.all(d[0, 3:] == 0)


def _trained_small_cnn(task, steps=30):
    torch.manual_seed(0)
    model = task.build_model("small_cnn")
    loader = task.dataloader("train", 64, max_samples=64 * steps, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for batch in loader:
        loss = F.cross_entropy(model(batch["inputs"]), batch["labels"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def trained(cifar_task):
    return _trained_small_cnn(cifar_task)


@pytest.fixture(scope="module")
def eval_batch(cifar_task):
    return next(iter(cifar_task.dataloader("test", 64, max_samples=64, seed=1)))


def test_pgd_stays_in_the_ball_and_domain_and_beats_random_noise(cifar_task, trained, eval_batch):
    torch.manual_seed(0)
    x, y = eval_batch["inputs"], eval_batch["labels"]
    eps = 4 / 255
    for spec, _norm, eps_ in (("pgd:steps=10", "linf", eps), ("pgd_l2:steps=10", "l2", 0.25)):
        attack = create_attack(spec, cifar_task, eps=eps_)
        adv = attack(trained, eval_batch)
        assert (attack.threat.size(adv.delta) <= eps_ + 1e-6).all()
        assert ((x + adv.delta) >= 0).all() and ((x + adv.delta) <= 1).all()
        noise = attack.threat.init(x, "uniform")
        with torch.no_grad():
            loss_adv = F.cross_entropy(trained(x + adv.delta), y)
            loss_noise = F.cross_entropy(trained(x + noise), y)
        assert loss_adv > loss_noise + 0.1, (spec, loss_adv, loss_noise)


def test_pgd_accuracy_falls_with_budget_and_eps_zero_is_clean(cifar_task, trained, eval_batch):
    y = eval_batch["labels"]
    with torch.no_grad():
        clean = (trained(eval_batch["inputs"]).argmax(1) == y).float().mean().item()
    accs = []
    for eps in (0.0, 2 / 255, 8 / 255, 64 / 255):
        adv = PGD(cifar_task, eps=eps, steps=10)(trained, eval_batch)
        with torch.no_grad():
            accs.append((cifar_task.logits(trained, *adv).argmax(1) == y).float().mean().item())
    assert accs[0] == clean
    assert accs == sorted(accs, reverse=True)
    assert accs[-1] <= 0.05


def test_pgd_restarts_never_weaker_than_one_start(cifar_task, trained, eval_batch):
    y = eval_batch["labels"]
    torch.manual_seed(3)
    one = PGD(cifar_task, eps=2 / 255, steps=5)(trained, eval_batch)
    torch.manual_seed(3)
    three = PGD(cifar_task, eps=2 / 255, steps=5, restarts=3)(trained, eval_batch)
    with torch.no_grad():
        acc1 = (cifar_task.logits(trained, *one).argmax(1) == y).float().mean()
        acc3 = (cifar_task.logits(trained, *three).argmax(1) == y).float().mean()
    assert acc3 <= acc1


def test_pgd_accepts_soft_targets_and_the_kl_objective(cifar_task, trained, eval_batch):
    soft = F.softmax(torch.randn(64, 10), 1)
    adv = PGD(cifar_task, steps=2)(trained, eval_batch, soft)
    assert adv.delta.shape == eval_batch["inputs"].shape
    with torch.no_grad():
        ref = F.softmax(trained(eval_batch["inputs"]), 1)
    adv = PGD(cifar_task, steps=3, loss="kl", random_start="normal")(trained, eval_batch, ref)
    with torch.no_grad():
        kl = F.kl_div(F.log_softmax(cifar_task.logits(trained, *adv), 1), ref, reduction="batchmean")
    assert kl > 1e-3


def test_fgsm_takes_one_full_step(cifar_task, trained, eval_batch):
    adv = create_attack("fgsm", cifar_task, eps=4 / 255)(trained, eval_batch)
    x = eval_batch["inputs"]
    interior = (x > 4 / 255) & (x < 1 - 4 / 255)
    assert torch.allclose(adv.delta[interior].abs(), torch.full_like(adv.delta[interior], 4 / 255), atol=1e-6)


def test_autoattack_is_the_official_one_and_never_above_pgd(cifar_task, trained, eval_batch):
    y = eval_batch["labels"]
    eps = 2 / 255
    described = create_attack("autoattack", cifar_task, eps=eps).describe()
    assert described["backend"].startswith("pyautoattack ") and described["version"] == "standard"
    assert described["components"] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    # the same four components, fewer iterations, so the comparison stays fast on 2 cores
    aa = create_attack("autoattack", cifar_task, eps=eps, version="custom", attacks="apgd-ce+apgd-t+fab-t+square",
                       steps=20, n_target_classes=3, n_queries=200)
    pgd = PGD(cifar_task, eps=eps, steps=20)
    torch.manual_seed(0)
    adv_pgd, adv_aa = pgd(trained, eval_batch), aa(trained, eval_batch)
    with torch.no_grad():
        clean = trained(eval_batch["inputs"]).argmax(1) == y
        robust_pgd = cifar_task.logits(trained, *adv_pgd).argmax(1) == y
        robust_aa = cifar_task.logits(trained, *adv_aa).argmax(1) == y
    assert robust_aa.float().mean() <= robust_pgd.float().mean()
    assert clean.float().mean() > robust_aa.float().mean()  # it attacks at all
    assert (aa.threat.size(adv_aa.delta) <= eps + 1e-6).all()


# -- registry and names ---------------------------------------------------------------------
def test_unknown_names_list_the_known_ones(cifar_task):
    with pytest.raises(RegistryError, match=r"unknown attack 'pgdx'.*pgd"):
        create_attack("pgdx", cifar_task)
    with pytest.raises(RegistryError, match=r"unknown method 'adrr'.*adr, adr_trades"):
        create_method("adrr", cifar_task)
    with pytest.raises(RegistryError, match=r"unknown model 'resnet9000'.*resnet18"):
        cifar_task.build_model("resnet9000")


def test_attack_specs_parse_shorthand_and_options():
    assert parse_attack_spec("pgd20") == ("pgd", {"steps": 20})
    name, kw = parse_attack_spec("pgd:eps=8/255,steps=50,loss=margin")
    assert name == "pgd" and kw == {"eps": pytest.approx(8 / 255), "steps": 50, "loss": "margin"}
    assert parse_attack_spec("textattack:deepwordbug") == ("textattack", {"recipe": "deepwordbug"})
    assert split_attack_specs("pgd20, autoattack:version=custom,attacks=apgd-ce,fgsm") == [
        "pgd20", "autoattack:version=custom,attacks=apgd-ce", "fgsm"]


def test_one_spec_language_for_every_list_of_attacks(cifar_task):
    from robustkd.attacks.base import AttackSpecError

    # ';' and ',' separate the same way; key=value after a spec with options continues it
    for text in ("pgd20;autoattack:version=custom,attacks=apgd-ce+square;fgsm",
                 "pgd20,autoattack:version=custom,attacks=apgd-ce+square,fgsm",
                 "pgd20; autoattack:version=custom;attacks=apgd-ce+square, fgsm"):
        assert split_attack_specs(text) == ["pgd20", "autoattack:version=custom,attacks=apgd-ce+square", "fgsm"]
    assert parse_attack_spec("autoattack:version=custom,attacks=apgd-ce+square")[1]["attacks"] == ["apgd-ce", "square"]
    # an option after a spec without options is refused with the fix, not read as an attack named "steps=5"
    with pytest.raises(AttackSpecError, match=r"'pgd20:steps=5'"):
        split_attack_specs("pgd20,steps=5")
    # values are typed by the attack's signature; a wrong type names the option and the type
    with pytest.raises(AttackSpecError, match=r"steps='three' must be an integer"):
        parse_attack_spec("pgd:steps=three")
    with pytest.raises(AttackSpecError, match=r"eps='big' must be a number or fraction"):
        parse_attack_spec("pgd:eps=big")
    with pytest.raises(AttackSpecError, match="twice"):
        parse_attack_spec("pgd20:steps=5")
    # run-wide defaults apply unless the spec names the option, and only to attacks that take it
    a = create_attack("pgd", cifar_task, eps=0.5, norm="l2", steps=3)
    assert a.threat.eps == 0.5 and a.threat.norm == "l2" and a.steps == 3
    b = create_attack("pgd:eps=4/255", cifar_task, eps=0.5, norm="l2")  # a budget of its own: all of it kept
    assert b.threat.eps == pytest.approx(4 / 255) and b.threat.norm == "linf"
    assert create_attack("pgd_l2", cifar_task, eps=8 / 255, norm="linf").threat.eps == 0.5  # takes no norm: its own
    assert create_attack("pgd7", cifar_task, steps=3).steps == 7
    # the mode option: the attack runs the victim in it and restores the caller's mode
    assert create_attack("pgd2", cifar_task).mode == "eval"
    assert create_attack("pgd2:mode=train", cifar_task).mode == "train"
    with pytest.raises(AttackSpecError, match="'train' or 'eval'"):
        create_attack("pgd2:mode=training", cifar_task)


def test_spec_options_are_typed_by_the_attacks_type_hints(cifar_task):
    """Each option's type comes from the attack's evaluated type hints (Literal choices, ints, optional floats,
    lists, options passed on to a base class or to the class a factory returns): a wrong value is one line naming
    the spec, the option and what it must be, before any attack is built."""
    from robustkd.attacks.base import AttackSpecError

    def refused(spec: str) -> str:
        with pytest.raises(AttackSpecError) as info:
            create_attack(spec, cifar_task)
        message = str(info.value)
        assert message.startswith(repr(spec)) and len(message.splitlines()) == 1
        return message

    # a Literal option: AutoAttack's version
    assert parse_attack_spec("autoattack:version=plus")[1] == {"version": "plus"}
    assert "option version='best' must be one of 'standard', 'plus', 'rand', 'custom'" in refused(
        "autoattack:version=best")
    # an int option refuses a fraction, also where a factory or a subclass passes it on through **kwargs
    for spec in ("pgd:steps=1.5", "pgd_l2:steps=1.5", "fgsm_rs:restarts=2.5"):
        assert "must be an integer" in refused(spec)
    assert parse_attack_spec("snr_pgd:steps=7")[1] == {"steps": 7}  # SNRPGD(**kwargs) -> PGD(steps: int)
    with pytest.raises(AttackSpecError, match=r"option steps='x' must be an integer"):
        parse_attack_spec("snr_pgd:steps=x")
    # an optional float (float | None) takes a fraction as papers write it, through the factory's own hint
    assert create_attack("pgd:eps=8/255", cifar_task).threat.eps == pytest.approx(8 / 255)
    assert create_attack("fgsm:eps=4/255,rel_step_size=1/2", cifar_task).rel_step_size == pytest.approx(0.5)
    assert "eps='8/0' must be a number or fraction" in refused("pgd:eps=8/0")
    # lists, booleans and a union of a list and a string
    name, kw = parse_attack_spec("autoattack:version=custom,attacks=apgd-ce+square,verbose=true,steps=5")
    assert kw == {"version": "custom", "attacks": ["apgd-ce", "square"], "verbose": True, "steps": 5}
    assert "verbose='maybe' must be true or false" in refused("autoattack:verbose=maybe")
    # an option a spec cannot write (a threat model object) is refused, not passed on as a string
    assert "option threat takes a ThreatModel, which a spec cannot write" in refused("pgd:threat=linf")
    # options no signature types (the threat model's own, through **threat_kwargs) are read as numbers
    assert parse_attack_spec("pgd20:snr_db=30") == ("pgd", {"steps": 20, "snr_db": 30})


def test_attack_call_sets_and_restores_the_victims_mode(cifar_task):
    seen = []

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10), torch.nn.Dropout(0.5))

        def forward(self, x):
            seen.append((self.training, self.net[2].training))
            return self.net(x)

    model = Probe().train()
    model.net[2].eval()  # a submodule's own mode must come back too
    batch = {"inputs": torch.rand(2, 3, 32, 32), "labels": torch.tensor([0, 1])}
    for mode, expected in (("eval", (False, False)), ("train", (True, True))):
        seen.clear()
        create_attack(f"pgd2:mode={mode}", cifar_task)(model, batch)
        assert seen and all(s == expected for s in seen)
        assert model.training and not model.net[2].training


def test_registry_rejects_two_sources_for_one_name():
    reg = Registry("widget")

    @reg.register("w")
    def first():
        """first widget"""

    def second():
        """second widget"""

    with pytest.raises(RegistryError, match="two plug-ins register the widget name 'w'"):
        reg.add("w", second, source="other-package")
    assert reg.entry("w").description == "first widget"
    assert "adr" in METHODS and "pgd" in ATTACKS


def test_fgsm_variants_pass_threat_options_to_the_task(cifar_task):
    assert create_attack("fgsm:norm=l2", cifar_task, eps=0.5).threat.norm == "l2"
    assert create_attack("fgsm_rs", cifar_task, eps=2 / 255).threat.eps == pytest.approx(2 / 255)
    with pytest.raises(ValueError, match="bad options for attack"):
        create_attack("fgsm:snr_db=30", cifar_task)  # images have no SNR budget: an error, not a silent default
