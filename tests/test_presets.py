"""Presets against the reference configurations.

The tables below are typed from the reference files (github.com/yuyuwu5/ADR config/**.gin and the
code they bind to; the MTARD / B-MTARD CIFAR scripts), not produced by robustkd's preset code, so a
preset that drifts from its reference fails here.
"""
import json
import subprocess
import sys

import pytest

from robustkd.cli import main as cli_main
from robustkd.presets import PresetError, get_preset, list_presets

# -- ADR: one row per gin file -------------------------------------------------------------------
# file: (epochs, lr, AWP rho or None, cosine warm-up epochs or None, (tau start, tau end) or None,
#        (lambda start, lambda end) or None)        tau anneals temperature_high -> temperature_low,
#                                                   lambda interpolation_low -> interpolation_high
ADR_GIN = {
    "cifar10/preact-resnet18_pgd_awp.gin": (100, 0.4, 0.005, 2.5, None, None),
    "cifar10/preact-resnet18_pgd_awp_adr.gin": (100, 0.4, 0.005, 2.5, (2.5, 1.5), (0.7, 0.85)),
    "cifar10/resnet18_pgd_awp.gin": (200, 0.1, 0.005, None, None, None),
    "cifar10/resnet18_pgd_awp_adr.gin": (200, 0.1, 0.005, None, (2.5, 1.5), (0.7, 0.85)),
    "cifar10/resnet18_pgd_sgd.gin": (200, 0.1, None, None, None, None),
    "cifar10/resnet18_pgd_sgd_adr.gin": (200, 0.1, None, None, (2.5, 2.0), (0.7, 0.95)),
    "cifar10/resnet18_trades_awp.gin": (200, 0.1, 0.005, None, None, None),
    "cifar10/resnet18_trades_awp_adr.gin": (200, 0.1, 0.005, None, (2.5, 1.5), (0.7, 0.85)),
    "cifar10/resnet18_trades_sgd.gin": (200, 0.1, None, None, None, None),
    "cifar10/resnet18_trades_sgd_adr.gin": (200, 0.1, None, None, (2.5, 2.0), (0.7, 0.95)),
    "cifar10/wrn_pgd_awp.gin": (200, 0.1, 0.005, None, None, None),
    "cifar10/wrn_pgd_awp_adr.gin": (200, 0.1, 0.005, None, (2.5, 1.5), (0.7, 0.85)),
    "cifar10/wrn_pgd_sgd.gin": (200, 0.1, None, None, None, None),
    "cifar10/wrn_pgd_sgd_adr.gin": (200, 0.1, None, None, (2.5, 2.0), (0.7, 0.95)),
    "cifar100/preact-resnet18_pgd_awp.gin": (100, 0.4, 0.005, 2.5, None, None),
    "cifar100/preact-resnet18_pgd_awp_adr.gin": (100, 0.4, 0.005, 2.5, (3.0, 1.5), (0.5, 0.8)),
    "cifar100/resnet18_pgd_awp.gin": (200, 0.1, 0.005, None, None, None),
    "cifar100/resnet18_pgd_awp_adr.gin": (200, 0.1, 0.005, None, (2.0, 1.0), (0.7, 0.85)),
    "cifar100/resnet18_pgd_sgd.gin": (200, 0.1, None, None, None, None),
    "cifar100/resnet18_pgd_sgd_adr.gin": (200, 0.1, None, None, (1.5, 1.0), (0.7, 0.95)),
    "cifar100/resnet18_trades_awp.gin": (200, 0.1, 0.005, None, None, None),
    "cifar100/resnet18_trades_awp_adr.gin": (200, 0.1, 0.005, None, (1.5, 1.0), (0.7, 0.95)),
    "cifar100/resnet18_trades_sgd.gin": (200, 0.1, None, None, None, None),
    "cifar100/resnet18_trades_sgd_adr.gin": (200, 0.1, None, None, (1.5, 1.0), (0.7, 0.95)),
    "cifar100/wrn_pgd_awp.gin": (200, 0.1, 0.005, None, None, None),
    "cifar100/wrn_pgd_awp_adr.gin": (200, 0.1, 0.005, None, (2.0, 1.0), (0.7, 0.85)),
    "cifar100/wrn_pgd_sgd.gin": (200, 0.1, None, None, None, None),
    "cifar100/wrn_pgd_sgd_adr.gin": (200, 0.1, None, None, (1.5, 1.0), (0.7, 0.95)),
    "tiny-imagenet/resnet18_pgd_awp.gin": (80, 0.1, 0.001, None, None, None),
    "tiny-imagenet/resnet18_pgd_awp_adr.gin": (80, 0.1, 0.001, None, (2.0, 1.5), (0.3, 0.9)),
    "tiny-imagenet/resnet18_pgd_sgd.gin": (80, 0.1, None, None, None, None),
    "tiny-imagenet/resnet18_pgd_sgd_adr.gin": (80, 0.1, None, None, (2.0, 1.5), (0.5, 0.9)),
    "tiny-imagenet/resnet18_trades_awp.gin": (80, 0.1, 0.001, None, None, None),
    "tiny-imagenet/resnet18_trades_awp_adr.gin": (80, 0.1, 0.001, None, (2.0, 1.5), (0.5, 0.9)),
    "tiny-imagenet/resnet18_trades_sgd.gin": (80, 0.1, None, None, None, None),
    "tiny-imagenet/resnet18_trades_sgd_adr.gin": (80, 0.1, None, None, (2.0, 1.5), (0.5, 0.9)),
    "tiny-imagenet/wrn_pgd_awp.gin": (80, 0.1, 0.001, None, None, None),
    "tiny-imagenet/wrn_pgd_awp_adr.gin": (80, 0.1, 0.001, None, (2.0, 1.5), (0.5, 0.9)),
    "tiny-imagenet/wrn_pgd_sgd.gin": (80, 0.1, None, None, None, None),
    "tiny-imagenet/wrn_pgd_sgd_adr.gin": (80, 0.1, None, None, (2.0, 1.5), (0.5, 0.9)),
}
DATASET = {"cifar10": "cifar10", "cifar100": "cifar100", "tiny-imagenet": "tinyimagenet"}
ARCH = {"preact-resnet18": "preact_resnet18", "resnet18": "resnet18", "wrn": "wrn34_10"}
MILESTONES = {"cifar10": [100, 150], "cifar100": [100, 150], "tiny-imagenet": [40, 60]}

MTARD = {  # name: (source, entropy balance, clean-teacher architecture)
    "mtard/cifar10/resnet18": ("zhaoshiji123/MTARD mtard/mtard_resnet18_cifar10.py", "off", "wrn34_10"),
    "mtard/cifar100/resnet18": ("zhaoshiji123/MTARD mtard/mtard_resnet18_cifar100.py", "off", "wrn34_10"),
    "bmtard/cifar10/resnet18": ("zhaoshiji123/MTARD-extension resnet18_mtard_cifar10.py", "reference", "resnet56"),
}


def _adr_name(file: str) -> str:
    folder, stem = file[:-4].split("/")
    return f"adr/{DATASET[folder]}/{stem.replace('-', '_')}"


def test_every_reference_configuration_is_a_preset():
    names = {p.name for p in list_presets() if not p.source.startswith("robustkd ")}  # not our own recommendations
    assert names == {_adr_name(f) for f in ADR_GIN} | set(MTARD)
    assert len(names) == 43
    for file in ADR_GIN:
        assert get_preset(_adr_name(file)).source == f"yuyuwu5/ADR config/{file}"


@pytest.mark.parametrize("file", sorted(ADR_GIN))
def test_adr_preset_equals_its_gin_file(file):
    epochs, lr, rho, warmup, tau, lam = ADR_GIN[file]
    folder, stem = file[:-4].split("/")
    arch, base = stem.split("_")[0], stem.split("_")[1]
    s = get_preset(_adr_name(file)).settings
    trades = base == "trades"
    assert s["dataset"] == DATASET[folder] and s["model"] == ARCH[arch] and s["epochs"] == epochs
    assert s["method"] == ({"pgd": "adr", "trades": "adr_trades"}[base] if tau else
                           {"pgd": "pgd_at", "trades": "trades"}[base])
    # optimizer: SGD momentum 0.9, weight decay 5e-4; Nesterov only without AWP (AWP wraps a plain SGD)
    assert (s["optimizer"], s["lr"], s["momentum"], s["weight_decay"]) == ("sgd", lr, 0.9, 5e-4)
    assert s["nesterov"] is (rho is None)
    assert s["awp"] is (rho is not None) and s["awp_gamma"] == rho and s["awp_warmup"] == 0
    if warmup is None:
        assert (s["lr_schedule"], s["milestones"], s["lr_gamma"], s["lr_warmup_epochs"]) == \
            ("multistep", MILESTONES[folder], 0.1, 0)
    else:  # timm CosineLRScheduler(lr_min=0, warmup_lr_init=1e-6, warmup_t=2.5 epochs)
        assert (s["lr_schedule"], s["lr_warmup_epochs"], s["lr_warmup_init"], s["lr_min"]) == \
            ("cosine", warmup, 1e-6, 0.0)
    kw = s["method_kwargs"]
    assert (tuple(kw["tau"]) if tau else None) == tau and (tuple(kw["lam"]) if lam else None) == lam
    # train.py: batch 128, drop_last; EMA 0.995 kept in every run; seed 0
    assert (s["batch_size"], s["drop_last"], s["ema_decay"], s["seed"]) == (128, True, 0.995, 0)
    # PGD / TRADES attack: eps 8/255, alpha 2/255, 10 steps, the model in train mode
    assert (s["eps"], s["attack_step_size"], s["attack_steps"], s["norm"], s["attack_mode"]) == \
        ("8/255", "2/255", 10, "linf", "train")
    if trades:  # TRADES: x + 0.001 * U[0, 1), KL objective, beta 6, one concatenated forward pass
        assert (s["attack_random_start"], s["attack_init_std"], s["attack_loss"], s["beta"]) == \
            ("trades", 0.001, "kl", 6.0)
        assert kw["trades_forward" if tau else "forward"] == "concat"
    else:  # PGD: uniform start in the ball, cross-entropy (against ADR's rectified labels)
        assert (s["attack_random_start"], s["attack_loss"]) == ("uniform", "ce")
    assert s["eval_attacks"] == ["pgd:steps=10,step_size=2/255"]


def test_reference_features_robustkd_lacks_are_named_not_dropped():
    # the PreAct AWP configs train on extra DDPM data (with its batch-norm settings) and swish activations
    for name in ("adr/cifar10/preact_resnet18_pgd_awp_adr", "adr/cifar100/preact_resnet18_pgd_awp"):
        text = " ".join(get_preset(name).unsupported)
        assert "DDPM" in text
        ps = get_preset(name).settings
        assert ps["model_kwargs"] == {"activation": "swish"} and ps["bn_no_decay"] and ps["bn_momentum_schedule"]
    assert not get_preset("adr/cifar10/resnet18_pgd_sgd_adr").unsupported
    # two gin files bind misspelt parameters; the presets say what they took
    assert "tmperature_low" in get_preset("adr/tinyimagenet/resnet18_pgd_sgd_adr").notes[0]
    assert "ema_label_smooth" in get_preset("adr/cifar100/resnet18_trades_sgd").notes[0]


@pytest.mark.parametrize("name", sorted(MTARD))
def test_mtard_preset_equals_its_script(name):
    source, entropy, clean_teacher = MTARD[name]
    p = get_preset(name)
    s, kw = p.settings, p.settings["method_kwargs"]
    assert p.source == source and s["method"] == "mtard" and s["model"] == "resnet18"
    assert s["model_kwargs"] == {"normalize": False}  # the scripts' student has no normalisation layer
    assert s["dataset"] == name.split("/")[1]
    # SGD(lr=0.1, momentum=0.9, weight_decay=2e-4), no Nesterov; 300 epochs; x0.1 at 215, 260, 285
    assert (s["optimizer"], s["lr"], s["momentum"], s["nesterov"], s["weight_decay"]) == ("sgd", 0.1, 0.9, False, 2e-4)
    assert (s["epochs"], s["batch_size"], s["milestones"], s["lr_gamma"]) == (300, 128, [215, 260, 285], 0.1)
    assert s["drop_last"] is False and s["ema_decay"] is None and s["awp"] is False
    # mtard_inner_loss_ce: student.eval(), x + 0.001 * randn, CE, 10 steps of 2/255 in 8/255
    assert (s["attack_mode"], s["attack_random_start"], s["attack_init_std"], s["attack_loss"]) == \
        ("eval", "normal", 0.001, "ce")
    assert (s["eps"], s["attack_step_size"], s["attack_steps"]) == ("8/255", "2/255", 10)
    # loss balance: weight_learn_rate 0.025, exponent 1, both x0.1 per milestone; KL mean over batch and classes
    assert (kw["loss_balance"], kw["eta"], kw["beta"], kw["decay"], kw["kl_scale"]) == (True, 0.025, 1.0, 0.1,
                                                                                       "reference")
    assert kw["entropy_balance"] == entropy
    if entropy == "reference":  # temp_learn_rate 0.001, temperatures in [1, 10]
        assert (kw["temp_lr"], kw["t_min"], kw["t_max"]) == (0.001, 1.0, 10.0)
    assert p.teachers["clean"].startswith(clean_teacher) and p.teachers["robust"].startswith("wrn34_10")
    # evaluation during training: PGD-20, step 0.003
    assert s["eval_attacks"] == ["pgd:steps=20,step_size=0.003"]


def test_cifar100_mtard_names_the_kl_factor_it_cannot_reproduce():
    assert "10" in get_preset("mtard/cifar100/resnet18").unsupported[0]


def test_unknown_preset_names_the_close_ones():
    with pytest.raises(PresetError, match="did you mean adr/cifar10/resnet18_pgd_sgd_adr"):
        get_preset("adr/cifar10/resnet18_pgd_sgd_ard")


def test_robustkd_presets_lists_shows_and_refuses(capsys):
    assert cli_main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "adr/cifar100/wrn_pgd_awp_adr" in out and "yuyuwu5/ADR config/cifar100/wrn_pgd_awp_adr.gin" in out
    assert "bmtard/cifar10/resnet18" in out and "44 presets" in out
    assert cli_main(["presets", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert len(listed) == 44 and all({"name", "source", "settings"} <= set(p) for p in listed)
    assert cli_main(["presets", "adr/cifar10/resnet18_trades_sgd_adr"]) == 0
    shown = capsys.readouterr().out
    assert "config/cifar10/resnet18_trades_sgd_adr.gin" in shown and '"adr_trades"' in shown and "nesterov" in shown
    assert cli_main(["presets", "adr/tinyimagenet"]) == 0
    assert capsys.readouterr().out.count("tiny-imagenet/") == 12
    assert cli_main(["presets", "adr/cifar10/nope"]) == 2
    assert "unknown preset" in capsys.readouterr().err


def test_robustkd_presets_console_script():
    run = subprocess.run([sys.executable, "-m", "robustkd.cli", "presets", "mtard/cifar10/resnet18", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["settings"]["milestones"] == [215, 260, 285]


def test_the_short_schedule_preset_is_the_paper_run_with_the_ema_warm_up_and_a_smaller_teacher_weight():
    short, paper = get_preset("adr/short-schedule"), get_preset("adr/cifar10/resnet18_pgd_sgd_adr")
    assert short.source.startswith("robustkd studies/short_schedule.yaml")
    assert {k: v for k, v in short.settings.items() if paper.settings.get(k) != v} == {
        "ema_warmup": True, "method_kwargs": {"tau": [2.5, 2.0], "lam": [0.3, 0.5]}}
