"""The field's own parts: reference architectures, the official AutoAttack, pretrained models
(the pyautoattack example, RobustBench's zoo, state dict + architecture), the Hub folder, export
to RobustBench, and multi-process evaluation."""
from __future__ import annotations

import json
import os
import shutil
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
    from robustkd_tasks import image_models

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
    from robustkd_tasks.image_models import Normalize

    with_norm = cifar_task.build_model("preact_resnet18")
    bare = cifar_task.build_model("preact_resnet18", normalize=False)
    assert isinstance(with_norm[0], Normalize) and torch.allclose(with_norm[0].mean.flatten(),
                                                                  torch.tensor(cifar_task.stats[0]))
    assert not isinstance(bare, nn.Sequential) and "conv_2d.weight" in bare.state_dict()
    assert isinstance(cifar_task.build_model("timm:resnet10t", normalize=False), nn.Module)


@pytest.mark.skipif(__import__("importlib").util.find_spec("robustbench") is None,
                    reason="the robustbench extra is not installed")
def test_architectures_equal_robustbench_definitions_forward():
    from robustkd_tasks import image_models

    from robustkd.robustbench import import_robustbench

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


CHEAP_AA = "autoattack:version=custom,attacks=apgd-ce+square,steps=10,n_queries=30,n_restarts=1,eps=0.4"


def test_autoattack_verdicts_equal_calling_pyautoattack_directly(synthetic):
    """The per-example verdicts of robustkd's evaluation are those of pyautoattack.AutoAttack run on the
    same model, points and seed."""
    from pyautoattack import AutoAttack as Official

    from robustkd.attacks.base import create_attack
    from robustkd.eval.robustness import evaluate_predictions

    model = Prototypes(synthetic).eval()
    loader = synthetic.dataloader("test", 24, shuffle=False)
    result = evaluate_predictions(synthetic, model, loader, {"aa": create_attack(CHEAP_AA, synthetic)})
    ours = result.robust_correct("aa")

    batch = next(iter(loader))
    official = Official(model, attacks=["apgd-ce", "square"], version="custom", eps=0.4, seed=0, device="cpu")
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


# -- pretrained models --------------------------------------------------------------------------
def test_autoattack_example_resnet18_is_a_real_cifar10_model(cifar_task):
    model = cifar_task.load_pretrained("autoattack-example:resnet18")
    batch = cifar_task.collate_fn("test")([cifar_task.dataset("test")[i] for i in range(64)])
    with torch.no_grad():
        acc = (model(batch["inputs"]).argmax(1) == batch["labels"]).float().mean().item()
    assert acc > 0.85  # the pyautoattack example model: 93.8 % on the shared subset
    assert not model.training and not isinstance(model, nn.Sequential)  # [0, 1] inputs, no normalisation


def test_state_dict_plus_architecture_and_its_errors(cifar_task, tmp_path):
    from robustkd_tasks.image_models import preact_resnet18

    torch.manual_seed(1)
    net = preact_resnet18(normalize=False)
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, tmp_path / "w.pt")
    loaded = cifar_task.load_pretrained(f"preact_resnet18:{tmp_path / 'w.pt'}", normalize=False)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), net.eval()(x))
    with pytest.raises(ValueError, match="do not fit the architecture 'resnet18'"):
        cifar_task.load_pretrained(f"resnet18:{tmp_path / 'w.pt'}")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cifar_task.load_pretrained(f"resnet18:{tmp_path / 'nope.pt'}")
    assert cifar_task.load_pretrained("not-a-model-spec") is None


ZOO_MODEL = "Ding2020MMA"  # the smallest CIFAR-10 Linf zoo entry (WRN-28-4, 5.8 M parameters)


@pytest.mark.skipif(__import__("importlib").util.find_spec("robustbench") is None,
                    reason="the robustbench extra is not installed")
def test_robustbench_model_loads_from_model_dir_through_the_cli(cifar_dir, tmp_path, capsys):
    """A checkpoint of a zoo architecture in RobustBench's layout, loaded the way a user does."""
    from robustkd.robustbench import checkpoint_path, zoo_entry

    torch.manual_seed(0)
    net = zoo_entry(ZOO_MODEL, "cifar10", "Linf")["model"]()
    path = checkpoint_path(tmp_path / "models", "cifar10", "Linf", ZOO_MODEL)
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, path)
    rc = cli_main(["eval", "--model", f"robustbench:{ZOO_MODEL}", "--model-dir", str(tmp_path / "models"),
                   "--task", "cifar10", "--data-dir", cifar_dir, "--max-eval-samples", "4", "--batch-size", "4",
                   "--attacks", "pgd:steps=1", "--curve-factors", "0,1", "--curve-steps", "1", "--output-dir",
                   str(tmp_path / "ev"), "--no-progress"])
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert rc in (0, 3) and report["model"]["name"] == f"robustbench:{ZOO_MODEL}"
    assert report["model"]["num_parameters"] == sum(p.numel() for p in net.parameters())
    # the same weights: the evaluated model's clean predictions are those of `net`
    from robustkd import create_task

    task = create_task("cifar10", data_dir=cifar_dir)
    loaded = task.load_pretrained(f"robustbench:{ZOO_MODEL}", model_dir=str(tmp_path / "models"))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded(x), net.eval()(x))


@pytest.mark.skipif(__import__("importlib").util.find_spec("robustbench") is None,
                    reason="the robustbench extra is not installed")
def test_robustbench_offline_names_the_missing_file(cifar_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc = cli_main(["eval", "--model", f"robustbench:{ZOO_MODEL}", "--model-dir", str(tmp_path / "m"), "--task",
                   "cifar10", "--data-dir", cifar_dir, "--output-dir", str(tmp_path / "ev")])
    err = capsys.readouterr().err
    assert rc == 2 and str(tmp_path / "m" / "cifar10" / "Linf" / f"{ZOO_MODEL}.pt") in err
    assert not (tmp_path / "ev").exists() and not (tmp_path / "m").exists()
    rc = cli_main(["eval", "--model", "robustbench:Ding2020MMX", "--task", "cifar10", "--data-dir", cifar_dir,
                   "--output-dir", str(tmp_path / "ev")])
    assert rc == 2 and "did you mean Ding2020MMA" in capsys.readouterr().err


# -- export to RobustBench, the Hub -------------------------------------------------------------
def _tiny_run(tmp_path, cifar_task):
    from robustkd.checkpoint import save_model_dir

    torch.manual_seed(0)
    model = cifar_task.build_model("small_cnn", width=4)
    run = tmp_path / "run"
    save_model_dir(run, model, model, {"task": "cifar10", "model": "small_cnn", "model_kwargs": {"width": 4},
                                      "num_classes": 10, "method": "adr", "data_dir": cifar_task.data_dir})
    # the run's final evaluation, as a recipe writes it: a schema-v1 report of the student with the EMA copy's
    # headline as its "ema" section (here the EMA copy is the student's weights, so its figures are the same)
    from robustkd.eval.schema import validate_report
    from robustkd.eval.suite import run_evaluation

    ev = run_evaluation(cifar_task, model, "pgd:steps=1", max_samples=4, batch_size=4, curve_factors=(0, 1),
                        curve_steps=1, verbose=False,
                        model_meta={"name": "small_cnn", "checkpoint": str(run), "which": "student", "method": "adr",
                                    "epochs": 1, "preset": None},
                        sections={"run": {"preset": None, "overrides": {"epochs": 1}, "settings": {"epochs": 1}}})
    m = ev.report["metrics"]
    report = {**ev.report, "ema": {"clean_accuracy": m["clean"]["accuracy"], "report": "ema/report.json",
                                   "robust_accuracy": {k: d["accuracy"] for k, d in m["adversarial"].items()}}}
    validate_report(report)
    (run / "report.json").write_text(json.dumps(report))
    return run


def test_robustbench_protocol_and_export(cifar_task, cifar_dir, tmp_path, capsys, monkeypatch):
    import robustkd.robustbench as rb

    run = _tiny_run(tmp_path, cifar_task)
    # the leaderboard protocol on a cut-down point count: AutoAttack standard, 8/255, the first points in order
    rc = cli_main(["eval", "--checkpoint", str(run), "--robustbench", "--max-eval-samples", "3", "--batch-size", "3",
                   "--curve-factors", "0,1", "--curve-steps", "1", "--output-dir", str(tmp_path / "rb"),
                   "--no-progress"])
    report = json.loads((tmp_path / "rb" / "report.json").read_text())
    assert rc in (0, 3)
    aa = report["attacks"]["autoattack"]
    assert aa["version"] == "standard" and aa["components"] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert abs(aa["eps"] - 8 / 255) < 1e-12 and report["task"]["num_examples"] == 3
    assert list((tmp_path / "rb" / "autoattack-resume").glob("autoattack-*.pt"))  # finished batch kept
    assert report["points"] == {"split": "test", "selection": "first", "num_examples": 3,
                                "split_size": len(cifar_task.dataset("test"))}
    if not report["sanity"]["passed"]:  # a failed evaluation is refused (see below); this test exports a good one
        report["sanity"]["checks"] = [{**c, "status": "pass"} for c in report["sanity"]["checks"]]
        report["sanity"]["passed"] = True
        (tmp_path / "rb" / "report.json").write_text(json.dumps(report))
    capsys.readouterr()
    assert cli_main(["export", "robustbench", str(tmp_path / "rb"), "--name", "tiny", "--architecture", "SmallCNN"]) == 0
    out = capsys.readouterr()
    info = json.loads((tmp_path / "rb" / "model_info" / "cifar10" / "Linf" / "tiny.json").read_text())
    assert set(info) <= set(rb.MODEL_INFO_FIELDS) and info["eps"] == "8/255" and info["dataset"] == "cifar10"
    assert info["autoattack_acc"] == str(round(report["metrics"]["adversarial"]["autoattack"]["accuracy"] * 100, 2))
    assert info["footnote"] == "AutoAttack on the first 3 test points only."
    assert "not the leaderboard's 10000" in out.err
    # a seeded random sample is named as one (the points section `robustkd eval --max-eval-samples` records)
    sampled = {**report, "points": {"split": "test", "selection": "seeded_sample", "num_examples": 3,
                                    "split_size": 1017, "seed": 5}}
    (tmp_path / "rb" / "report.json").write_text(json.dumps(sampled))
    assert cli_main(["export", "robustbench", str(tmp_path / "rb"), "--name", "tiny"]) == 0
    info = json.loads((tmp_path / "rb" / "model_info" / "cifar10" / "Linf" / "tiny.json").read_text())
    assert info["footnote"] == "AutoAttack on a random sample of 3 of the 1017 test points (seed 5), not the first 3."
    # failed sanity checks: refused, or exported marked with --allow-failed-sanity
    failed = json.loads(json.dumps(sampled))
    failed["sanity"]["passed"] = False
    failed["sanity"]["checks"][0]["status"] = "fail"
    name = failed["sanity"]["checks"][0]["name"]
    (tmp_path / "rb" / "report.json").write_text(json.dumps(failed))
    (tmp_path / "rb" / "model_info" / "cifar10" / "Linf" / "tiny.json").unlink()
    capsys.readouterr()
    assert cli_main(["export", "robustbench", str(tmp_path / "rb"), "--name", "tiny"]) == 2
    err = capsys.readouterr().err
    assert f"sanity checks failed ({name})" in err and "--allow-failed-sanity" in err and err.count("\n") == 1
    assert not (tmp_path / "rb" / "model_info" / "cifar10" / "Linf" / "tiny.json").exists()
    assert cli_main(["export", "robustbench", str(tmp_path / "rb"), "--name", "tiny", "--allow-failed-sanity"]) == 0
    info = json.loads((tmp_path / "rb" / "model_info" / "cifar10" / "Linf" / "tiny.json").read_text())
    assert info["footnote"].endswith(f"robustkd's sanity checks failed: {name}.")
    if __import__("importlib").util.find_spec("robustbench") is not None:
        rb.import_robustbench()
        from robustbench.utils import ModelInfo

        ModelInfo(**info)  # RobustBench reads it
    # an evaluation with another attack is refused with the fix
    monkeypatch.setattr(rb, "PROTOCOL", rb.PROTOCOL)
    report["attacks"]["autoattack"]["version"] = "custom"
    (tmp_path / "rb" / "report.json").write_text(json.dumps(report))
    assert cli_main(["export", "robustbench", str(tmp_path / "rb")]) == 2
    assert "robustkd eval --robustbench" in capsys.readouterr().err


@pytest.mark.skipif(__import__("importlib").util.find_spec("robustbench") is None,
                    reason="the robustbench extra is not installed")
def test_robustbench_benchmark_runs_on_a_robustkd_model_and_agrees_with_robustkd(cifar_task, tmp_path, monkeypatch):
    """RobustBench's own benchmark() fails on pyautoattack 0.2.0's renamed arguments; with
    patch_autoattack() it runs (offline, on the task's points via use_task_data), writes its own
    model_info through update_json and gives robustkd's verdicts on the same points, attack and seed."""
    import robustkd.robustbench as rb
    from robustkd.attacks.base import create_attack
    from robustkd.eval.robustness import evaluate_predictions

    rb.import_robustbench()
    import robustbench.eval as rb_eval

    model = cifar_task.load_pretrained("autoattack-example:resnet18")
    eps, n = 0.5 / 255, 4  # a small budget: some points stand, some fall
    own_class = rb_eval.AutoAttack
    monkeypatch.chdir(tmp_path)  # update_json writes model_info/ under the working directory
    with rb.use_task_data(cifar_task):
        with pytest.raises(TypeError, match="log_path"):  # RobustBench's own call on the installed AutoAttack
            rb_eval.benchmark(model, n_examples=n, dataset="cifar10", threat_model="Linf", eps=eps, batch_size=n)
        with rb.patch_autoattack(attacks=["apgd-ce"], steps=3, n_restarts=1, seed=0):
            clean, robust = rb_eval.benchmark(model, n_examples=n, dataset="cifar10", threat_model="Linf", eps=eps,
                                              batch_size=n, to_disk=True, model_name="aa_example",
                                              log_path=str(tmp_path / "aa.log"))
    assert rb_eval.AutoAttack is own_class and rb_eval.load_clean_dataset is not None
    assert "apgd-ce" in (tmp_path / "aa.log").read_text()  # the old driver's log_path is honoured
    spec = f"autoattack:version=custom,attacks=apgd-ce,steps=3,n_restarts=1,eps={eps}"
    batch = cifar_task.collate_fn("test")([cifar_task.dataset("test")[i] for i in range(n)])
    ours = evaluate_predictions(cifar_task, model, [batch], {"aa": create_attack(spec, cifar_task)}).summary()
    assert clean == ours["clean_accuracy"] and robust == ours["robust_accuracy"]["aa"]
    assert 0 < robust < clean
    info = json.loads((tmp_path / "model_info" / "cifar10" / "Linf" / "aa_example.json").read_text())
    assert info["autoattack_acc"] == str(round(robust * 100, 2))
    # without overrides the driver is RobustBench's protocol: AutoAttack standard
    standard = rb.autoattack_v1_class()(model, norm="Linf", eps=8 / 255, version="standard", device="cpu")
    assert standard.attacks_to_run == ["apgd-ce", "apgd-t", "fab-t", "square"]
    with pytest.raises(ValueError, match="version='custom'"):
        rb.patch_autoattack(version="standard", steps=3)


def test_push_offline_writes_a_hub_folder_that_loads_back(cifar_task, cifar_dir, tmp_path, capsys):
    from robustkd.hub import RobustKDRun

    run = _tiny_run(tmp_path, cifar_task)
    cli_main(["eval", "--checkpoint", str(run), "--attacks", "pgd:steps=1", "--max-eval-samples", "4",
              "--batch-size", "4", "--curve-factors", "0,1", "--curve-steps", "1", "--output-dir",
              str(tmp_path / "ev"), "--no-progress"])
    capsys.readouterr()
    assert cli_main(["push", str(run), "--repo-id", "me/tiny", "--eval", str(tmp_path / "ev")]) == 0
    out = capsys.readouterr().out
    assert "ready-to-push folder" in out and "offline" in out
    folder = run / "hub"
    for name in ("model.safetensors", "ema.safetensors", "robustkd.json", "report.json", "eval_report.json",
                 "README.md"):
        assert (folder / name).exists(), name
    from huggingface_hub import ModelCard

    card = ModelCard.load(folder / "README.md")
    results = card.data.eval_results
    names = {r.metric_name: r.metric_value for r in results}
    ev = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert names["clean accuracy (ema model)"] == round(ev["metrics"]["clean"]["accuracy"], 4)
    assert "clean ECE (ema model)" in names and any(n.startswith("robust accuracy, pgd") for n in names)
    assert card.data.library_name == "robustkd" and "adr" in card.data.tags
    loaded = RobustKDRun.from_pretrained(str(folder)).load_model(cifar_task)
    x = torch.rand(2, 3, 32, 32)
    from robustkd.checkpoint import load_model

    with torch.no_grad():
        assert torch.equal(loaded(x), load_model(run, cifar_task)(x))


def test_model_card_of_a_run_without_eval_shows_its_final_evaluation(cifar_task, tmp_path, capsys):
    from huggingface_hub import ModelCard

    run = _tiny_run(tmp_path, cifar_task)
    report = json.loads((run / "report.json").read_text())
    assert cli_main(["push", str(run), "--repo-id", "me/tiny"]) == 0
    card = ModelCard.load(run / "hub" / "README.md")
    names = {r.metric_name: r.metric_value for r in card.data.eval_results}
    clean = round(report["metrics"]["clean"]["accuracy"], 4)
    assert names["clean accuracy (EMA model)"] == names["clean accuracy (student model)"] == clean
    assert names["clean ECE (student model)"] == round(report["metrics"]["clean"]["ece"], 4)
    spec = next(iter(report["metrics"]["adversarial"]))
    assert names[f"robust accuracy, {spec} (student model)"] == \
        round(report["metrics"]["adversarial"][spec]["accuracy"], 4)
    assert f"robust accuracy, {spec} (EMA model)" in names
    assert '"overrides"' in card.text  # the run's configuration section
    assert "Calibration (ECE) is measured by" not in card.text  # the run's report has it
    # a report without schema_version (an older recipe wrote it) is refused in one line, nothing written
    shutil.rmtree(run / "hub")
    (run / "report.json").write_text(json.dumps({"task": "cifar10", "clean_accuracy": 0.5,
                                                 "robust_accuracy": {"pgd20": 0.25}}))
    capsys.readouterr()
    assert cli_main(["push", str(run), "--repo-id", "me/tiny"]) == 2
    err = capsys.readouterr().err
    assert "unversioned report" in err and "--eval EVAL_DIR" in err and err.count("\n") == 1
    assert not (run / "hub").exists()


# -- multi-process evaluation -------------------------------------------------------------------
@pytest.mark.timeout(500)
@pytest.mark.distributed
def test_two_process_evaluation_equals_one_process(cifar_task, cifar_dir, tmp_path):
    run = _tiny_run(tmp_path, cifar_task)
    args = ["eval", "--checkpoint", str(run), "--attacks", "pgd:steps=2,autoattack:version=custom,attacks=apgd-ce,"
            "steps=3,n_restarts=1", "--max-eval-samples", "20", "--batch-size", "8", "--curve-factors", "0,1",
            "--curve-steps", "1", "--cpu", "--no-progress", "--output-dir"]
    assert cli_main(args + [str(tmp_path / "one")]) in (0, 3)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541",
           "-m", "robustkd", *args, str(tmp_path / "two")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=450)
    one, two = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("one", "two"))
    # torchrun turns the main process's exit status 3 (a failed sanity check) into its own failure
    assert proc.returncode == (0 if one["sanity"]["passed"] else 1), proc.stderr[-3000:]
    assert one["task"]["num_examples"] == two["task"]["num_examples"] == 20
    assert one["metrics"] == two["metrics"] and one["curve"] == two["curve"]
    assert proc.stdout.count("report:") == 1  # only the main process prints and writes


# -- trackers -----------------------------------------------------------------------------------
def test_a_named_tracker_that_is_not_installed_is_refused_with_the_extra(monkeypatch):
    import accelerate.tracking

    from robustkd.trainer import check_trackers

    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: [])
    with pytest.raises(ValueError, match=r"robustkd\[tensorboard\]"):
        check_trackers("tensorboard")
    check_trackers(None)
