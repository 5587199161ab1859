"""Evaluation suite: metrics by hand, each sanity check against a deliberately broken setup, the
report schema, and `robustkd eval` / `robustkd compare` on CIFAR, text and speech."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from robustkd import create_task
from robustkd.attacks.base import Attack
from robustkd.checkpoint import save_model_dir
from robustkd.cli import main as cli_main
from robustkd.eval import run_evaluation
from robustkd.eval.curves import budget_grid
from robustkd.eval.metrics import (
    compute_metrics,
    consistency,
    expected_calibration_error,
    reliability_bins,
    worst_case_probs,
)
from robustkd.eval.report import ReportSchemaError, compare, format_comparison, read_report, validate_report
from robustkd.eval.robustness import EvalResult
from robustkd.eval.sanity import check_eval_mode
from robustkd.eval.suite import split_attack_specs
from robustkd.registry import RegistryError
from robustkd.task import Adversarial, ContinuousTask
from robustkd.threat import SNRBall, ThreatModel


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small models run fastest single-threaded on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- a toy image task whose models can be written down by hand ----------------------------------
class _Items(Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        return {"inputs": self.x[i], "labels": self.y[i]}


class Quadrants(ContinuousTask):
    """4 classes of 3x8x8 images in [0, 1]: the bright quadrant is the class. L-inf eps 0.4: a correct
    attack needs eps > 0.3 to move one quadrant's mean past another's."""

    name, modality, num_classes, input_domain = "quadrants", "image", 4, (0.0, 1.0)

    def __init__(self, n: int = 48, scale: float = 1.0, eps: float = 0.4):
        g = torch.Generator().manual_seed(0)
        y = torch.arange(n) % 4
        x = 0.2 + 0.1 * (torch.rand(n, 3, 8, 8, generator=g) - 0.5)
        for i, c in enumerate(y.tolist()):
            r, col = divmod(c, 2)
            x[i, :, 4 * r:4 * r + 4, 4 * col:4 * col + 4] += 0.6
        self.data, self.eps = _Items(x * scale, y), eps

    def dataset(self, split: str) -> Dataset:
        if split != "test":
            raise KeyError(f"no {split!r} split")
        return self.data

    def build_model(self, name: str, **kwargs) -> nn.Module:
        return QuadrantNet()

    def threat_model(self, eps=None, norm=None, **kwargs) -> ThreatModel:
        return ThreatModel(self.eps if eps is None else eps, norm or "linf", domain=self.input_domain)


def quadrant_logits(x: torch.Tensor, scale: torch.Tensor | float = 10.0) -> torch.Tensor:
    """10 x the mean brightness of each quadrant (class order: top-left, top-right, bottom-left, bottom-right)."""
    return scale * F.avg_pool2d(x.mean(1, keepdim=True), 4).flatten(1)


class Hand(nn.Module):
    """Base of the hand-written models: one parameter (attacks read the device from a parameter)."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(10.0))


class QuadrantNet(Hand):
    """A healthy, differentiable model: every sanity check must pass on it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quadrant_logits(x, self.scale)


class QuantisedNet(Hand):
    """Input quantisation with torch.round: the input gradient is exactly zero (gradient masking)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quadrant_logits(torch.round(x * 255) / 255, self.scale)


class DetectorNet(Hand):
    """A 'detect and denoise' defence: inputs with high total variation (large perturbations) go through a
    non-differentiable path. Small budgets hit the fragile path, large ones are masked: accuracy rises."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tv = (x[..., 1:] - x[..., :-1]).abs().mean((1, 2, 3)).detach()
        masked = quadrant_logits(torch.round(x * 255) / 255, self.scale)
        return torch.where((tv > 0.33)[:, None], masked, quadrant_logits(x, self.scale))


class HiddenDropoutNet(Hand):
    """Dropout kept in a plain list, so model.eval() never reaches it: left in train mode."""

    def __init__(self):
        super().__init__()
        self.parts = [nn.Dropout(0.5)]  # not registered: a classic bug

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quadrant_logits(self.parts[0](x), self.scale)


class StuckInTrainNet(Hand):
    """A module whose train() override ignores eval()."""

    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.0)

    def train(self, mode: bool = True):
        return super().train(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quadrant_logits(self.drop(x), self.scale)


class BNQuadrantNet(Hand):
    """QuadrantNet behind a batch norm (the identity with its initial statistics)."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3, eps=1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quadrant_logits(self.bn(x), self.scale)


class TrainModeAttack(Attack):
    """A broken attack plug-in: it runs the model in train mode (and returns no perturbation)."""

    def perturb(self, model, batch, targets=None) -> Adversarial:
        model.train()
        model(batch["inputs"] * 0.5)
        return Adversarial(batch, torch.zeros_like(batch["inputs"]))

    def describe(self) -> dict:
        return {"attack": "train_mode_attack"}


HEALTHY_AA = "autoattack:version=custom,attacks=apgd-ce+square,steps=20,n_queries=300"
SQUARE = "autoattack:version=custom,attacks=square,n_queries=1000"
FACTORS = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0)


def _status(ev) -> dict[str, str]:
    return {c.name: c.status for c in ev.checks}


def _evaluate(model, attacks=("pgd10",), task=None, **kw):
    return run_evaluation(task or Quadrants(), model, list(attacks), curve_factors=FACTORS, verbose=False,
                          batch_size=48, **kw)


# -- metrics by hand ------------------------------------------------------------------------------
def test_ece_matches_a_hand_computation():
    # confidences 0.85, 0.85 (one right, one wrong), 0.65, 0.65 (both right); 10 bins
    probs = torch.tensor([[0.85, 0.15], [0.85, 0.15], [0.35, 0.65], [0.65, 0.35]])
    labels = torch.tensor([0, 1, 1, 0])
    hand = 0.5 * abs(0.5 - 0.85) + 0.5 * abs(1.0 - 0.65)  # = 0.35
    assert expected_calibration_error(probs, labels, n_bins=10) == pytest.approx(hand, abs=1e-6)
    bins = reliability_bins(probs, labels, n_bins=10)
    assert bins["count"][8] == 2 and bins["count"][6] == 2 and sum(bins["count"]) == 4
    assert bins["accuracy"][8] == pytest.approx(0.5) and bins["confidence"][6] == pytest.approx(0.65)
    assert bins["accuracy"][0] is None
    gap = sum(n * abs(a - c) for n, a, c in zip(bins["count"], bins["accuracy"], bins["confidence"]) if n) / 4
    assert gap == pytest.approx(hand, abs=1e-6)


def test_consistency_confidence_and_worst_case_by_hand():
    clean = torch.tensor([[0.5, 0.5], [0.9, 0.1]])
    adv = torch.tensor([[0.5, 0.5], [0.2, 0.8]])
    kl_second = 0.9 * math.log(0.9 / 0.2) + 0.1 * math.log(0.1 / 0.8)
    c = consistency(clean, adv)
    assert c["kl_clean_adv"] == pytest.approx(kl_second / 2, rel=1e-5)
    assert c["agreement"] == pytest.approx(0.5)
    labels = torch.tensor([0, 0, 1])
    result = EvalResult(labels, torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7]]),
                        {"a": torch.tensor([[0.7, 0.3], [0.4, 0.6], [0.45, 0.55]]),
                         "b": torch.tensor([[0.6, 0.4], [0.55, 0.45], [0.6, 0.4]])})
    worst = worst_case_probs(result)
    assert torch.equal(worst, torch.tensor([[0.6, 0.4], [0.4, 0.6], [0.6, 0.4]]))
    m = compute_metrics(result, n_bins=10)
    assert m["worst_case"]["accuracy"] == pytest.approx(1 / 3)
    assert m["clean"]["confidence_wrong"] is None and m["clean"]["confidence_correct"] == pytest.approx(0.8)
    assert m["adversarial"]["a"]["confidence_wrong"] == pytest.approx(0.6)


def test_budget_grid_scales_eps_and_snr():
    grid = budget_grid(ThreatModel(8 / 255, "linf", domain=(0.0, 1.0)), (0, 1, 2))
    assert [p.threat.eps for p in grid] == pytest.approx([0, 8 / 255, 16 / 255])
    assert [p.x for p in grid] == pytest.approx([0, 8, 16])
    snr = budget_grid(SNRBall(30.0), (0, 1, 2))
    assert snr[0].threat.eps == 0 and snr[0].x is None
    assert [p.x for p in snr[1:]] == pytest.approx([30.0, 30.0 - 20 * math.log10(2)])


# -- sanity checks: healthy passes, each broken setup is caught -----------------------------------
def test_healthy_model_passes_every_check():
    ev = _evaluate(QuadrantNet(), ("pgd10", HEALTHY_AA))
    assert _status(ev) == {"eval_mode": "pass", "budget_zero": "pass", "monotone_budget": "pass",
                           "strongest_vs_pgd": "pass", "large_budget": "pass", "probability_outputs": "pass",
                           "input_gradient": "pass"}, [c.detail for c in ev.checks]
    assert ev.passed
    m = ev.report["metrics"]
    assert m["clean"]["accuracy"] == 1.0 and m["worst_case"]["accuracy"] == 0.0
    assert m["adversarial"]["pgd10"]["agreement"] == 0.0
    accs = [p["accuracy"] for p in ev.report["curve"]["points"]]
    assert accs == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]


def test_gradient_masking_by_input_quantisation_is_caught(capsys):
    ev = run_evaluation(Quadrants(), QuantisedNet(), ["pgd10", SQUARE], curve_factors=FACTORS, batch_size=48)
    status = _status(ev)
    assert status["large_budget"] == "fail"  # PGD sees a zero gradient and stays at its random start
    assert status["budget_zero"] == "pass" and status["eval_mode"] == "pass"
    strongest = next(c for c in ev.checks if c.name == "strongest_vs_pgd")
    assert "overstates robustness" in strongest.detail  # gradient-free Square finds what PGD cannot
    assert not ev.passed
    err = capsys.readouterr().err
    assert "SANITY CHECK(S) FAILED" in err and "[FAIL] large_budget" in err
    m = ev.report["metrics"]["adversarial"]
    assert m["pgd10"]["accuracy"] == 1.0 and m[SQUARE]["accuracy"] < 0.5


def test_strongest_attack_weaker_than_pgd_is_caught():
    # a crippled AutoAttack (gradient-free Square with 5 queries) against a model PGD breaks easily
    ev = _evaluate(QuadrantNet(), ("pgd10", "autoattack:version=custom,attacks=square,n_queries=5"))
    check = next(c for c in ev.checks if c.name == "strongest_vs_pgd")
    assert check.status == "fail" and "weaker than PGD" in check.detail
    assert {c["pgd"] for c in check.values["comparisons"]} == {"pgd10", "curve pgd10 x1"}


def test_accuracy_rising_with_the_budget_is_caught():
    ev = _evaluate(DetectorNet())
    assert _status(ev)["monotone_budget"] == "fail", [c.detail for c in ev.checks]
    rises = next(c for c in ev.checks if c.name == "monotone_budget").values["rises"]
    assert rises and rises[0]["from_factor"] == 1.0


def test_budget_zero_catches_data_outside_the_threat_domain():
    class Unscaled(Hand):  # the data pipeline forgot /255; the model divides itself
        def forward(self, x):
            return quadrant_logits(x / 255, self.scale)

    # the attacks now refuse such data before any work, naming the fix (the budget_zero check stays as the
    # net for attacks that do not check their inputs)
    from robustkd.attacks.base import AttackInputError

    with pytest.raises(AttackInputError, match="divide them by 255"):
        _evaluate(Unscaled(), task=Quadrants(scale=255.0))


def test_model_left_in_train_mode_is_caught():
    task = Quadrants()
    batch = next(iter(task.dataloader("test", 48)))
    hidden = check_eval_mode(task, HiddenDropoutNet(), batch)
    assert hidden.status == "fail" and "differ" in hidden.detail
    stuck = check_eval_mode(task, StuckInTrainNet(), batch)
    assert stuck.status == "fail" and "drop" in stuck.values["modules_in_train_mode"]
    assert check_eval_mode(task, QuadrantNet(), batch).status == "pass"
    torch.manual_seed(0)
    ev = _evaluate(HiddenDropoutNet())
    assert _status(ev)["eval_mode"] == "fail"


def test_an_evaluation_that_changes_the_model_is_caught():
    task = Quadrants()
    ev = run_evaluation(task, BNQuadrantNet(), {"train_mode_attack": TrainModeAttack(task)}, curve_factors=(0, 1),
                        verbose=False, batch_size=48)
    check = ev.checks[0]
    assert check.name == "eval_mode" and check.status == "fail"
    assert "bn.running_mean" in check.values["tensors_changed_by_evaluation"]


# -- report schema and comparison -----------------------------------------------------------------
def test_report_round_trips_and_the_schema_is_enforced(tmp_path):
    ev = _evaluate(QuadrantNet(), ("pgd5", "fgsm"), output_dir=tmp_path / "a", model_meta={"name": "quadrant"})
    files = ev.files
    for key in ("report", "html", "reliability", "budget_curve"):
        assert files[key].exists() and files[key].stat().st_size > 1000
    loaded = read_report(tmp_path / "a")
    assert loaded == json.loads(json.dumps(ev.report))
    assert loaded["attacks"]["pgd5"]["steps"] == 5 and loaded["attacks"]["fgsm"]["eps"] == pytest.approx(0.4)
    assert loaded["model"]["name"] == "quadrant" and loaded["seed"] == 0 and loaded["robustkd_version"]
    html = files["html"].read_text()
    assert html.count("data:image/png;base64") == 2 and "all sanity checks passed" in html

    broken = json.loads(json.dumps(loaded))
    del broken["metrics"]["clean"]["ece"]
    with pytest.raises(ReportSchemaError, match=r"report\.metrics\.clean\.ece is missing"):
        validate_report(broken)
    broken = json.loads(json.dumps(loaded))
    broken["seed"] = "zero"
    with pytest.raises(ReportSchemaError, match=r"report\.seed must be int"):
        validate_report(broken)
    broken = json.loads(json.dumps(loaded))
    broken["sanity"]["checks"][0]["status"] = "fail"
    with pytest.raises(ReportSchemaError, match="disagrees"):
        validate_report(broken)
    (tmp_path / "bad.json").write_text(json.dumps({**loaded, "schema_version": 99}))
    with pytest.raises(ReportSchemaError, match="schema_version"):
        read_report(tmp_path / "bad.json")

    other = _evaluate(QuantisedNet(), ("pgd5",), output_dir=tmp_path / "b", seed=1)
    settings, metrics = compare(loaded, read_report(tmp_path / "b"))
    rows = {r.metric: r for r in metrics}
    assert rows["pgd5 accuracy"].diff == pytest.approx(other.report["metrics"]["adversarial"]["pgd5"]["accuracy"])
    assert rows["fgsm accuracy"].b is None and rows["sanity checks failed"].diff >= 1
    text = format_comparison(settings, metrics)
    assert "settings that differ" in text and "seed" in text and "pgd5 accuracy" in text


def test_split_attack_specs():
    assert split_attack_specs("pgd20,autoattack") == ["pgd20", "autoattack"]
    assert split_attack_specs("pgd:steps=50,eps=4/255,autoattack") == ["pgd:steps=50,eps=4/255", "autoattack"]
    assert split_attack_specs("embedding_pgd,textattack:deepwordbug") == ["embedding_pgd", "textattack:deepwordbug"]
    from robustkd.eval.suite import build_attacks

    assert list(build_attacks("pgd5,fgsm:eps=0.1", Quadrants())) == ["pgd5", "fgsm:eps=0.1"]


# -- bad input ------------------------------------------------------------------------------------
def test_bad_attack_names_and_missing_splits_are_clear():
    task = Quadrants()
    with pytest.raises(RegistryError, match=r"'embedding_pgd' does not work on the task 'quadrants': it needs EmbeddingInputs.*autoattack.*pgd"):
        run_evaluation(task, QuadrantNet(), ["embedding_pgd"], verbose=False)
    with pytest.raises(RegistryError, match=r"'nosuch'.*is not registered.*Attacks for 'quadrants'"):
        run_evaluation(task, QuadrantNet(), ["nosuch"], verbose=False)
    from robustkd.task import DataNotFoundError

    with pytest.raises(DataNotFoundError, match="no 'train' split"):
        run_evaluation(task, QuadrantNet(), ["pgd5"], split="train", verbose=False)


# -- the command line on real data ----------------------------------------------------------------
@pytest.fixture(scope="module")
def cifar_run(cifar_dir, tmp_path_factory) -> Path:
    """small_cnn trained by the image recipe for one epoch on 256 CIFAR-10 images."""
    from robustkd.config import Recipe, parse
    from robustkd.recipe import run_recipe

    out = tmp_path_factory.mktemp("cifar_run")
    args = parse(Recipe("test", defaults={"model": "small_cnn", "method": "pgd_at"}),
        ["--data-dir", cifar_dir, "--epochs", "1", "--max-train-samples", "256", "--max-eval-samples", "32",
         "--batch-size", "64", "--attack-steps", "3", "--final-attacks", "pgd3", "--eval-attacks", "pgd3",
         "--output-dir", str(out), "--cpu", "--no-progress", "--curve-steps", "2"])
    run_recipe(args)
    return out


def test_robustkd_eval_on_cifar_and_compare(cifar_run, cifar_dir, tmp_path, capsys):
    common = ["--checkpoint", str(cifar_run), "--max-eval-samples", "32", "--cpu", "--no-progress",
              "--curve-steps", "5", "--curve-factors", "0,0.5,1,2,4"]
    rc = cli_main(["eval", "--task", "cifar10", "--data-dir", cifar_dir, "--attacks",
                   "pgd10,autoattack:version=custom,attacks=apgd-ce,steps=20", "--output-dir", str(tmp_path / "a"),
                   *common])
    out = capsys.readouterr()
    report = read_report(tmp_path / "a")
    assert rc == (0 if report["sanity"]["passed"] else 3), out.err
    status = {c["name"]: c["status"] for c in report["sanity"]["checks"]}
    assert status["eval_mode"] == "pass" and status["budget_zero"] == "pass" and status["strongest_vs_pgd"] != "n/a"
    assert report["task"]["name"] == "cifar10" and report["task"]["num_examples"] == 32
    assert report["model"]["name"] == "small_cnn" and report["model"]["which"] == "student"
    assert report["attacks"]["pgd10"]["eps"] == pytest.approx(8 / 255)
    assert report["training"]["robust_overfitting"]["pgd3"]["best_epoch"] == 1
    assert set(report["plots"]) == {"reliability", "budget_curve", "training", "training_curve"}
    assert (tmp_path / "a" / "training_curve.png").exists() and "clean" in out.out

    assert cli_main(["eval", "--attacks", "fgsm", "--output-dir", str(tmp_path / "b"), "--seed", "1", *common]) in (0, 3)
    assert "recorded in" in capsys.readouterr().err  # task and data taken from the checkpoint, said aloud
    assert cli_main(["compare", str(tmp_path / "a"), str(tmp_path / "b" / "report.json")]) == 0
    table = capsys.readouterr().out
    assert "clean accuracy" in table and "pgd10 accuracy" in table and "fgsm accuracy" in table and "seed" in table
    assert cli_main(["compare", str(cifar_run), str(tmp_path / "a")]) == 0  # a run directory and an eval of it
    table = capsys.readouterr().out
    assert "settings that differ" in table and "pgd3 accuracy" in table and "pgd10 accuracy" in table


def test_robustkd_eval_bad_input(cifar_run, cifar_dir, tmp_path, capsys):
    base = ["eval", "--checkpoint", str(cifar_run), "--output-dir", str(tmp_path / "x"), "--max-eval-samples", "8",
            "--cpu", "--no-progress"]
    assert cli_main([*base, "--attacks", "token_substitution"]) == 2
    err = capsys.readouterr().err
    assert "does not work on the task 'cifar10'" in err and "EmbeddingInputs" in err and "autoattack" in err
    # a spec's option of the wrong type: one line naming the spec, the option and its type, before any work
    for spec, message in (("pgd:steps=1.5", "option steps='1.5' must be an integer"),
                          ("pgd10,autoattack:version=best", "option version='best' must be one of 'standard', 'plus'")):
        assert cli_main([*base, "--attacks", spec]) == 2
        err = capsys.readouterr().err  # (after the line saying the task and data come from the checkpoint)
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and message in errors[0] and err.strip().endswith(errors[0]), err
    assert not (tmp_path / "x" / "report.json").exists()
    assert cli_main([*base, "--attacks", "pgd5", "--split", "nosuchsplit"]) == 2
    assert "no 'nosuchsplit' split" in capsys.readouterr().err
    assert cli_main([*base, "--task", "cifar100", "--attacks", "pgd5"]) == 2
    assert "has 10 classes" in capsys.readouterr().err
    wrong = tmp_path / "wrong_model"  # weights of a wider small_cnn than the metadata says
    task = create_task("cifar10", data_dir=cifar_dir)
    save_model_dir(wrong, task.build_model("small_cnn", width=8), None,
                   {"task": "cifar10", "model": "small_cnn", "num_classes": 10, "data_dir": cifar_dir})
    assert cli_main(["eval", "--checkpoint", str(wrong), "--output-dir", str(tmp_path / "y"), "--attacks", "pgd5",
                     "--max-eval-samples", "8", "--cpu"]) == 2
    assert "do not fit the model 'small_cnn'" in capsys.readouterr().err
    assert cli_main(["eval", "--checkpoint", str(tmp_path / "nothing"), "--output-dir", str(tmp_path / "z")]) == 2
    assert cli_main(["compare", str(tmp_path / "none_a"), str(tmp_path / "none_b")]) == 2


# -- text and speech ------------------------------------------------------------------------------
def test_robustkd_eval_on_speech(shared, tmp_path, capsys):
    """An FSDD model (untrained mel_cnn) in a recipe-style output directory, evaluated by the CLI under
    an SNR ball: the curve's axis is SNR in dB."""
    data_dir = str(shared / "data" / "fsdd")
    task = create_task("fsdd", data_dir=data_dir)
    torch.manual_seed(0)
    run = tmp_path / "run"
    save_model_dir(run, task.build_model("mel_cnn", width=8), None,
                   {"task": "fsdd", "model": "mel_cnn", "model_kwargs": {"width": 8}, "num_classes": 10,
                    "data_dir": data_dir})
    rc = cli_main(["eval", "--checkpoint", str(run), "--attacks", "pgd5:snr_db=30,fgsm:snr_db=30",
                   "--max-eval-samples", "16", "--output-dir", str(tmp_path / "ev"), "--curve-steps", "3",
                   "--curve-factors", "0,1,4", "--cpu", "--no-progress"])
    report = read_report(tmp_path / "ev")
    assert rc == (0 if report["sanity"]["passed"] else 3), capsys.readouterr().err
    assert report["task"]["modality"] == "audio" and report["curve"]["axis"].startswith("SNR")
    assert [p["x"] for p in report["curve"]["points"]] == pytest.approx([None, 30.0, 30.0 - 20 * math.log10(4)])
    assert report["curve"]["large_budget"]["threat"]["snr_db"] == -40.0
    assert report["attacks"]["pgd5:snr_db=30"]["snr_db"] == 30.0
    status = {c["name"]: c["status"] for c in report["sanity"]["checks"]}
    assert status["eval_mode"] == "pass" and status["budget_zero"] == "pass" and status["strongest_vs_pgd"] == "n/a"
    assert (tmp_path / "ev" / "report.html").exists()


def test_robustkd_eval_on_text(tmp_path, capsys):
    """A tiny BERT on SST-2-shaped parquet data: embedding PGD and token substitution; the curve is over
    the relative per-token perturbation size and the large-budget check does not apply to text."""
    import pandas as pd
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    words = "the a movie film good bad great awful fun boring plot acting is was not very".split()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, num_labels=2)
    torch.manual_seed(0)
    model_dir = tmp_path / "bert"
    BertForSequenceClassification(cfg).save_pretrained(model_dir)
    BertTokenizerFast(str(tmp_path / "vocab.txt")).save_pretrained(model_dir)
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"idx": i, "sentence": f"the movie was {'good great fun' if i % 2 else 'bad awful boring'} plot",
             "label": i % 2} for i in range(16)]
    pd.DataFrame(rows).to_parquet(data / "validation-00000-of-00001.parquet")
    task = create_task("sst2", data_dir=str(data))
    run = tmp_path / "run"
    save_model_dir(run, task.build_model(str(model_dir)), None,
                   {"task": "sst2", "model": str(model_dir), "num_classes": 2, "data_dir": str(data)})
    rc = cli_main(["eval", "--checkpoint", str(run), "--attacks", "embedding_pgd5,token_substitution",
                   "--output-dir", str(tmp_path / "ev"), "--curve-steps", "3", "--curve-factors", "0,1,4",
                   "--batch-size", "8", "--cpu", "--no-progress"])
    report = read_report(tmp_path / "ev")
    assert rc == (0 if report["sanity"]["passed"] else 3), capsys.readouterr().err
    assert report["task"]["modality"] == "text" and report["task"]["num_examples"] == 16
    assert report["curve"]["axis"].startswith("relative perturbation size")
    assert set(report["metrics"]["adversarial"]) == {"embedding_pgd5", "token_substitution"}
    status = {c["name"]: c["status"] for c in report["sanity"]["checks"]}
    assert status["large_budget"] == "n/a" and status["eval_mode"] == "pass" and status["budget_zero"] == "pass"
    assert cli_main(["eval", "--checkpoint", str(run), "--attacks", "autoattack", "--output-dir",
                     str(tmp_path / "x")]) == 2
    assert "'autoattack' does not work on the task 'sst2'" in capsys.readouterr().err


def test_python_api_entry_points():
    import robustkd

    summary = robustkd.evaluate(Quadrants(), QuadrantNet(), attacks=["pgd5"])  # no loader: the test split
    assert summary["clean_accuracy"] == 1.0 and summary["robust_accuracy"]["pgd5"] == 0.0
    ev = robustkd.run_evaluation(Quadrants(), QuadrantNet(), "pgd5,fgsm", curve_factors=(0, 1), verbose=False)
    assert ev.passed and set(ev.report["attacks"]) == {"pgd5", "fgsm"} and ev.files == {}


# -- sections, rendering, compare of run directories ----------------------------------------------
def test_recipe_sections_are_validated_rendered_and_compared(tmp_path):
    from robustkd.attacks.base import create_attack
    from robustkd.eval.report import build_report, write_report

    ev = _evaluate(QuadrantNet(), ("pgd5",), output_dir=tmp_path / "a", model_meta={"name": "quadrant"})
    task = Quadrants()
    parts = dict(task=task, model=ev.report["model"], attacks={"pgd5": create_attack("pgd5", task)},
                 metrics=ev.report["metrics"], sweep=ev.sweep, checks=ev.checks, seed=0, split="test",
                 seconds=1.0, device="cpu", version="test")
    sections = {"mtard_balance": {"clean_weight": 0.25, "teachers": ["clean", "robust"]},
                "run": {"method": "mtard", "lr": 0.1}}
    report = build_report(**parts, sections=sections)
    assert report["mtard_balance"]["clean_weight"] == 0.25 and report["run"]["method"] == "mtard"
    files = write_report(report, tmp_path / "b")
    page = files["html"].read_text()
    assert "<summary>mtard_balance (2 fields)</summary>" in page and "clean_weight" in page and "0.2500" in page
    assert read_report(tmp_path / "b")["mtard_balance"] == sections["mtard_balance"]

    with pytest.raises(ReportSchemaError, match=r"would replace the report's own fields"):
        build_report(**parts, sections={"metrics": {"x": 1}})
    broken = json.loads(json.dumps(report))
    broken["run"] = "not an object"
    with pytest.raises(ReportSchemaError, match=r"report\.run .*must be an object"):
        validate_report(broken)

    settings, metrics = compare(read_report(tmp_path / "a"), read_report(tmp_path / "b"))
    rows = {r.metric: r for r in metrics}
    assert rows["mtard_balance.clean_weight"].a is None and rows["mtard_balance.clean_weight"].b == 0.25
    assert {r.metric: r for r in settings}["run.method"].b == "mtard"


def test_html_escapes_what_it_shows(tmp_path):
    ev = _evaluate(QuadrantNet(), ("pgd5",), output_dir=tmp_path / "a", model_meta={"name": "<script>x</script>"})
    page = (tmp_path / "a" / "report.html").read_text()
    assert "<script>x</script>" not in page and "&lt;script&gt;x&lt;/script&gt;" in page
    assert page.count("data:image/png;base64") == 2 and ev.passed


def test_importing_the_report_modules_leaves_the_matplotlib_backend_alone():
    import subprocess
    import sys

    code = ("import matplotlib; matplotlib.use('pdf'); import robustkd.eval.report, robustkd.eval.plots, robustkd.sweep; "
            "import matplotlib.pyplot as plt; fig = plt.figure(); "
            "from robustkd.eval.plots import band_figure; band_figure({'a': {'epoch': [1], 'mean': [0.5], 'std': [None]}}, 'y'); "
            "assert matplotlib.get_backend() == 'pdf', matplotlib.get_backend(); assert plt.get_fignums() == [1]")
    env = {k: v for k, v in __import__("os").environ.items() if k != "MPLBACKEND"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_compare_refuses_old_reports_and_unfinished_runs_clearly(tmp_path, capsys):
    ev = _evaluate(QuadrantNet(), ("pgd5",), output_dir=tmp_path / "eval")
    old = tmp_path / "old_run"
    old.mkdir()
    (old / "report.json").write_text(json.dumps({"robustkd_version": "0.1.0", "task": "cifar10", "method": "adr",
                                                 "clean_accuracy": 0.5, "robust_accuracy": {"pgd20": 0.3}}))
    assert cli_main(["compare", str(tmp_path / "eval"), str(old)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "unversioned report" in err and f"robustkd eval --checkpoint {old}" in err
    unfinished = tmp_path / "unfinished"
    (unfinished / "checkpoints").mkdir(parents=True)
    assert cli_main(["compare", str(unfinished), str(tmp_path / "eval")]) == 2
    err = capsys.readouterr().err
    assert "run directory without report.json" in err and "robustkd eval --checkpoint" in err
    assert ev.passed


# -- a training run's report, unfinished runs, like-with-like comparisons (issue 25) ----------------
@pytest.fixture(scope="module")
def adr_run(cifar_dir, tmp_path_factory) -> Path:
    """small_cnn trained by ADR (an EMA copy) for two epochs on 128 CIFAR-10 images."""
    from robustkd.config import Recipe, parse
    from robustkd.recipe import run_recipe

    out = tmp_path_factory.mktemp("adr_run")
    run_recipe(parse(Recipe("test", defaults={"model": "small_cnn", "method": "adr"}),
                     ["--data-dir", cifar_dir, "--epochs", "2", "--max-train-samples", "128", "--max-eval-samples",
                      "16", "--batch-size", "64", "--attack-steps", "1", "--final-attacks", "pgd2", "--eval-attacks",
                      "pgd2", "--output-dir", str(out), "--cpu", "--no-progress", "--curve-steps", "1",
                      "--model-kwargs", '{"width": 8}']))
    return out


def test_a_training_runs_page_reads_as_a_run_report(adr_run):
    report = read_report(adr_run)
    assert {"training", "training_curve", "schedule"} <= set(report["plots"])
    page = (adr_run / "report.html").read_text()
    assert page.index("Training run:") < page.index("student and EMA") < page.index("<h2>Training</h2>") \
        < page.index("Evaluation of the small_cnn (student)") < page.index("<h2>Settings</h2>")
    ema = read_report(adr_run / "ema")
    head = page[page.index("<table class=\"headline\">"):page.index("</table>")]
    assert "<th class=\"this\">student</th><th>EMA</th>" in head
    assert f"{report['metrics']['clean']['accuracy']:.4f}" in head and f"{ema['metrics']['clean']['accuracy']:.4f}" in head
    for name in ("training.png", "schedule.png", "training_curve.png", "reliability.png", "budget_curve.png"):
        assert f"<figcaption>{name}</figcaption>" in page
    assert "<summary>run (" in page  # the raw settings are folded at the bottom
    ema_page = (adr_run / "ema" / "report.html").read_text()
    assert "<th>student</th><th class=\"this\">EMA</th>" in ema_page and "Evaluation of the small_cnn (EMA)" in ema_page


def test_an_unfinished_run_is_evaluated_from_its_last_checkpoint(adr_run, tmp_path, capsys):
    import shutil

    args = ["--attacks", "pgd2", "--max-eval-samples", "16", "--curve-factors", "0,1", "--curve-steps", "1",
            "--cpu", "--no-progress"]
    assert cli_main(["eval", "--checkpoint", str(adr_run), "--output-dir", str(tmp_path / "final"), *args]) in (0, 3)
    assert "evaluating the run's EMA copy" in capsys.readouterr().err
    stopped = tmp_path / "stopped"  # a run stopped after its last epoch's checkpoint: no final weights
    shutil.copytree(adr_run / "checkpoints", stopped / "checkpoints")
    shutil.copy(adr_run / "metrics.jsonl", stopped / "metrics.jsonl")
    assert cli_main(["eval", "--checkpoint", str(stopped), "--output-dir", str(tmp_path / "a"), *args]) in (0, 3)
    err = capsys.readouterr().err
    assert "has no final weights" in err and "epoch 2 of 2" in err and "EMA copy" in err
    a, final = read_report(tmp_path / "a"), read_report(tmp_path / "final")
    assert a["model"]["which"] == "ema" and a["model"]["checkpoint"].endswith("checkpoints/epoch-2")
    assert a["metrics"]["clean"]["accuracy"] == final["metrics"]["clean"]["accuracy"]  # the same weights
    assert a["metrics"]["adversarial"]["pgd2"]["accuracy"] == final["metrics"]["adversarial"]["pgd2"]["accuracy"]
    assert a["training"]["epochs"] == 2  # the history saved with the checkpoint
    assert cli_main(["eval", "--checkpoint", str(stopped / "checkpoints" / "epoch-2"), "--which", "student",
                     "--output-dir", str(tmp_path / "b"), *args]) in (0, 3)
    assert read_report(tmp_path / "b")["model"]["which"] == "student"
    assert cli_main(["eval", "--checkpoint", str(stopped), "--model-dir", "x", "--output-dir", str(tmp_path / "c"),
                     *args]) == 2
    assert "--model-dir goes with --model" in capsys.readouterr().err


def test_compare_a_run_with_its_evaluation_compares_like_with_like(adr_run, tmp_path, capsys):
    assert cli_main(["eval", "--checkpoint", str(adr_run), "--output-dir", str(tmp_path / "e"), "--attacks", "pgd2",
                     "--max-eval-samples", "16", "--curve-factors", "0,1", "--curve-steps", "1", "--cpu",
                     "--no-progress"]) in (0, 3)
    capsys.readouterr()
    assert cli_main(["compare", str(adr_run), str(tmp_path / "e")]) == 0
    out = capsys.readouterr().out
    assert f"A = {adr_run}: small_cnn (EMA copy)" in out and "B = " in out and "compared like with like" in out
    head = out.split("metric ")[0]
    assert "only A records" in head and len(head.splitlines()) < 15  # not ~60 lines of settings
    table = out.split("metric ", 1)[1]
    assert "clean accuracy" in table and "run.settings" not in table  # settings are not metrics
    row = next(line for line in table.splitlines() if line.startswith("pgd2 accuracy"))
    assert row.split()[-1] in ("+0.0000", "-0.0000")  # the run's EMA report vs the eval of the EMA: same numbers


def test_progress_bars_name_the_attack_and_the_model(cifar_task, capsys):
    from robustkd.eval.robustness import attack_label, evaluate

    assert attack_label("pgd20") == "PGD-20" and attack_label("autoattack:version=custom") == "AutoAttack"
    model = cifar_task.build_model("small_cnn", width=8)
    loader = cifar_task.dataloader("test", 8, shuffle=False, max_samples=16)
    evaluate(cifar_task, model, loader, ["pgd2"], progress=True, label="EMA")
    err = capsys.readouterr().err
    assert "PGD-2 \u00b7 EMA" in err and "clean \u00b7 EMA" in err


def test_budget_options_reach_the_threat_model_or_are_refused(shared, tmp_path, capsys):
    """A threat-model option in a spec reaches the attack's threat model, or is refused in one line naming
    the option and the attack (it is never dropped): the SNR attacks' budget is snr_db, the amplitude
    attacks' eps, pgd_l2's norm is L2; pgd and fgsm pass any of the task's options to its threat model."""
    from robustkd.attacks.base import AttackSpecError, UnusedThreatOptionsError, create_attack, parse_attack_spec
    from robustkd.attacks.pgd import PGD

    data_dir = str(shared / "data" / "fsdd")
    fsdd = create_task("fsdd", data_dir=data_dir)
    assert create_attack("pgd:snr_db=20", fsdd).threat.snr_db == 20
    assert create_attack("fgsm:snr_db=20", fsdd).threat.snr_db == 20
    assert create_attack("snr_pgd:snr_db=20", fsdd).threat.snr_db == 20
    assert create_attack("linf_pgd:eps=0.003", fsdd).threat.eps == 0.003
    for spec, option, own in (("snr_pgd:eps=0.01", "eps", "snr_db"), ("snr_pgd3:norm=linf", "norm", "snr_db"),
                              ("snr_fgsm:eps=0.01", "eps", "snr_db"), ("linf_pgd:snr_db=30", "snr_db", "eps"),
                              ("linf_pgd:norm=l2", "norm", "eps"), ("linf_fgsm:snr_db=30", "snr_db", "eps"),
                              ("pgd_l2:norm=linf", "norm", "eps")):
        with pytest.raises(AttackSpecError) as info:
            create_attack(spec, fsdd)
        message = str(info.value)
        name = parse_attack_spec(spec)[0]
        assert len(message.splitlines()) == 1 and repr(spec) in message, message
        assert f"the attack {name!r} builds its own threat model" in message
        assert f"would not apply {option}: set its budget with {own}" in message and "or use pgd:" in message
    with pytest.raises(AttackSpecError, match=r"'snr_pgd' takes no option\(s\) stepz .*check the spelling"):
        create_attack("snr_pgd:stepz=3", fsdd)
    # a threat model given beside the options that would build one: refused, not dropped
    with pytest.raises(UnusedThreatOptionsError, match=r"eps=0\.1 would not reach the threat model"):
        PGD(fsdd, fsdd.threat_model(snr_db=30), eps=0.1)
    # run-wide budget defaults: pgd takes the task's snr_db; the attacks with a threat model of their own keep it
    assert create_attack("pgd", fsdd, snr_db=20).threat.snr_db == 20
    assert create_attack("fgsm_rs", fsdd, snr_db=20).threat.snr_db == 20
    assert create_attack("snr_pgd", fsdd, eps=0.01).threat.snr_db == fsdd.threat_model().snr_db
    assert create_attack("linf_pgd", fsdd, snr_db=20).threat.eps == create_attack("linf_pgd", fsdd).threat.eps

    # through `robustkd eval --attacks`: exit status 2, one line, before anything is written
    torch.manual_seed(0)
    run = tmp_path / "run"
    save_model_dir(run, fsdd.build_model("mel_cnn", width=8), None,
                   {"task": "fsdd", "model": "mel_cnn", "model_kwargs": {"width": 8}, "num_classes": 10,
                    "data_dir": data_dir})
    capsys.readouterr()
    rc = cli_main(["eval", "--checkpoint", str(run), "--attacks", "pgd5:snr_db=30,snr_pgd5:eps=0.01",
                   "--max-eval-samples", "4", "--output-dir", str(tmp_path / "ev"), "--cpu", "--no-progress"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(errors) == 1 and err.endswith(errors[0] + "\n"), err
    assert "'snr_pgd5:eps=0.01'" in errors[0] and "'snr_pgd' builds its own threat model" in errors[0]
    assert "would not apply eps" in errors[0]
    assert not (tmp_path / "ev").exists()
