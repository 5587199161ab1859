"""The field's own parts: reference architectures, the official AutoAttack, pretrained models
(the pyautoattack example, RobustBench's zoo, state dict + architecture), the Hub folder, export
to RobustBench, and multi-process evaluation."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from robustkd.cli import main as cli_main

REFERENCE_KEYS = Path(__file__).parent / "data" / "reference_state_dict_keys.json"


# -- architectures ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["resnet18", "preact_resnet18", "wrn34_10"])
def test_architectures_load_a_state_dict_in_the_reference_layout_strictly(name):
    """Key names and shapes of ADR's src/model definitions (= RobustBench's ResNet / DMPreActResNet /
    DMWideResNet): a state dict in that layout loads strictly into the bare network."""
    from tasks import image_models

    layout = json.loads(REFERENCE_KEYS.read_text())[name]
    torch.manual_seed(0)
    reference_sd = {k: torch.randn(shape) if shape else torch.tensor(3) for k, shape in layout.items()}
    bare = getattr(image_models, name)(normalize=False)
    bare.load_state_dict(reference_sd, strict=True)
    assert torch.equal(bare.state_dict()[next(iter(layout))], reference_sd[next(iter(layout))])
    # normalize=True puts the data set's standardisation in front; the network's keys stay the same
    wrapped = getattr(image_models, name)(normalize=True)
    assert isinstance(wrapped[0], image_models.Normalize)
    wrapped[1].load_state_dict(reference_sd, strict=True)


def test_task_builds_models_with_and_without_normalisation(cifar_task):
    from tasks.image_models import Normalize

    with_norm = cifar_task.build_model("preact_resnet18")
    bare = cifar_task.build_model("preact_resnet18", normalize=False)
    assert isinstance(with_norm[0], Normalize) and torch.allclose(with_norm[0].mean.flatten(),
                                                                  torch.tensor(cifar_task.stats[0]))
    assert not isinstance(bare, nn.Sequential) and "conv_2d.weight" in bare.state_dict()
    assert isinstance(cifar_task.build_model("timm:resnet10t", normalize=False), nn.Module)


@pytest.mark.skipif(__import__("importlib").util.find_spec("robustbench") is None,
                    reason="the robustbench extra is not installed")
def test_architectures_equal_robustbench_definitions_forward():
    from robustkd.robustbench import import_robustbench
    from tasks import image_models

    import_robustbench()
    from robustbench.model_zoo.architectures.dm_wide_resnet import DMPreActResNet, DMWideResNet

    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32)
    for theirs, ours in ((DMPreActResNet(10, 18), image_models.preact_resnet18()),
                         (DMWideResNet(10, 34, 10), image_models.wrn34_10())):
        ours[1].load_state_dict(theirs.state_dict(), strict=True)
        with torch.no_grad():
            assert torch.allclose(theirs.eval()(x), ours.eval()(x), atol=1e-5)


# -- the official AutoAttack --------------------------------------------------------------------
class Prototypes(nn.Module):
    """Nearest-prototype classifier for the synthetic task: accurate, differentiable, tiny."""

    def __init__(self, task):
        super().__init__()
        x = torch.stack([task.dataset("train")[i]["inputs"] for i in range(len(task.dataset("train")))]).float() / 255
        y = torch.stack([task.dataset("train")[i]["labels"] for i in range(len(task.dataset("train")))])
        protos = torch.stack([x[y == c].mean(0) for c in range(task.num_classes)]).flatten(1)
        self.weight = nn.Parameter(protos)

    def forward(self, x):
        return 20 * (x.flatten(1) @ self.weight.T - 0.5 * (self.weight ** 2).sum(1))


@pytest.fixture(scope="module")
def synthetic():
    from robustkd import create_task

    return create_task("synthetic", n_train=64, n_test=24)


CHEAP_AA = "autoattack:version=custom,attacks=apgd-ce+square,steps=10,n_queries=30,n_restarts=1,eps=0.1"


def test_autoattack_verdicts_equal_calling_pyautoattack_directly(synthetic):
    """The per-example verdicts of robustkd's evaluation are those of pyautoattack.AutoAttack run on the
    same model, points and seed."""
    from pyautoattack import AutoAttack as Official

    from robustkd.eval.robustness import evaluate_predictions
    from robustkd.attacks.base import create_attack

    model = Prototypes(synthetic).eval()
    loader = synthetic.dataloader("test", 24, shuffle=False)
    result = evaluate_predictions(synthetic, model, loader, {"aa": create_attack(CHEAP_AA, synthetic)})
    ours = result.robust_correct("aa")

    batch = next(iter(loader))
    official = Official(model, attacks=["apgd-ce", "square"], version="custom", eps=0.1, seed=0, device="cpu")
    official.apgd.n_iter = 10
    official.apgd.n_restarts = 1
    official.square.n_queries = 30
    _, y_adv = official.run_standard_evaluation(batch["inputs"], batch["labels"], batch_size=24)
    theirs = y_adv == batch["labels"]
    assert torch.equal(ours, theirs)
    assert 0 < int(theirs.sum()) < int(result.clean_correct().sum())  # a real mix: some points fall, some stand


def test_autoattack_versions_and_bad_options(synthetic):
    from robustkd.attacks.base import create_attack

    assert create_attack("autoattack:version=plus", synthetic).describe()["components"] == \
        ["apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"]
    assert create_attack("autoattack:version=rand", synthetic).describe()["components"] == ["apgd-ce", "apgd-dlr"]
    with pytest.raises(ValueError, match="version=custom"):
        create_attack("autoattack:steps=10", synthetic)
    with pytest.raises(ValueError, match="unknown AutoAttack components"):
        create_attack("autoattack:version=custom,attacks=apgd-xx", synthetic)


def test_autoattack_runtime_checks_reach_the_report(synthetic, tmp_path):
    """A model that returns probabilities trips the official check; the report records it."""
    from robustkd import run_evaluation

    model = nn.Sequential(Prototypes(synthetic), nn.Softmax(1))
    ev = run_evaluation(synthetic, model, [CHEAP_AA], max_samples=8, batch_size=8, curve_factors=(0, 1),
                        curve_steps=2, verbose=False)
    checks = ev.report["attacks"][CHEAP_AA]["runtime_checks"]
    assert any("probability distribution" in c for c in checks), checks
