"""Plug-ins: the conformance kit (``robustkd.testing``) on every built-in task and attack, on a
third-party package (``examples/robustkd-tabular``) pip-installed here and used by name from a
recipe and ``robustkd list``, and on deliberately broken plug-ins, whose failures must name the
check (or the entry point, or both conflicting sources) and say why.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from robustkd import ATTACKS, MODELS, TASKS, create_task
from robustkd.attacks.base import Attack
from robustkd.registry import DuplicateNameError, Registry, RegistryError
from robustkd.task import Adversarial
from robustkd.testing import ConformanceError, attack_checks, check_attack, check_task, task_checks

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "robustkd-tabular"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}

TASK_CHECKS = ["num_classes", "datasets", "batch_structure", "labels_in_range", "input_domain", "models", "zero_delta",
               "logits_differentiable", "threat_model", "teachers_and_students", "default_attacks", "train_step",
               "dataloader_deterministic", "distributed"]
ATTACK_CHECKS = ["construct", "returns_adversarial", "labels_unchanged", "in_threat_model", "no_side_effects",
                 "beats_random_noise", "soft_targets", "reproducible", "frozen_victim"]


def _assert_all_pass(report, skipped: tuple[str, ...] = ()) -> None:
    print(report)
    assert report.passed, str(report)
    assert [r.name for r in report.results if r.skipped] == list(skipped)


# -- built-in tasks --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def synthetic():
    return create_task("synthetic")


def test_kit_passes_on_synthetic_images(synthetic):
    # models=[...]: the teacher/student swap across architectures; every image model passes, but
    # WRN-34-10 and the ResNets take most of a minute on a shared CPU, so CI checks two.
    report = check_task(synthetic, "small_cnn", models=["small_cnn", "preact_resnet18"])
    assert [r.name for r in report.results] == TASK_CHECKS
    _assert_all_pass(report, skipped=("distributed",))
    assert "small_cnn, preact_resnet18 work as frozen teachers and as students" in report["teachers_and_students"].message
    assert "pass distributed=True" in report["distributed"].message


def test_kit_passes_on_cifar10(cifar_task):
    _assert_all_pass(check_task(cifar_task, "small_cnn", models=["small_cnn"]), skipped=("distributed",))


def test_kit_passes_on_fsdd_speech(shared):
    task = create_task("fsdd", data_dir=str(shared / "data" / "fsdd"))
    torch.manual_seed(0)
    model = task.build_model("mel_cnn", width=8)
    _assert_all_pass(check_task(task, model, models=[]), skipped=("distributed",))
    for spec in ("snr_pgd:steps=2", "linf_fgsm"):
        _assert_all_pass(check_attack(spec, task, model))


WORDS = "the a movie film good bad great awful fun boring plot acting is was not very and but it this".split()


def _tiny_text(root: Path) -> tuple[str, str]:
    """A tiny random BERT and a tiny SST-2-layout data set (no downloads)."""
    import pandas as pd
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(str(root / "vocab.txt"))
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, num_labels=2)
    torch.manual_seed(0)
    BertForSequenceClassification(cfg).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    g = torch.Generator().manual_seed(0)
    rows = [{"idx": i, "label": i % 2, "sentence": " ".join(WORDS[j] for j in torch.randint(0, 20, (6,), generator=g))
             + (" good great" if i % 2 else " bad awful")} for i in range(48)]
    (root / "data").mkdir()
    pd.DataFrame(rows[:32]).to_parquet(root / "data" / "train-00000-of-00001.parquet")
    pd.DataFrame(rows[32:]).to_parquet(root / "data" / "validation-00000-of-00001.parquet")
    return str(root / "data"), str(root / "model")


def test_kit_passes_on_sst2_text(tmp_path):
    data_dir, model_dir = _tiny_text(tmp_path)
    task = create_task("sst2", data_dir=data_dir, max_length=32)
    model = task.build_model(model_dir)
    _assert_all_pass(check_task(task, model, models=[]), skipped=("distributed",))
    for spec in ("embedding_pgd:steps=2", "token_substitution"):
        _assert_all_pass(check_attack(spec, task, model))


# -- built-in attacks ------------------------------------------------------------------------------
class NearestMean(nn.Module):
    """A linear nearest-class-mean classifier: accurate on the synthetic images, so attacks have
    correctly classified points to work on (a random network has almost none)."""

    def __init__(self, means: Tensor):
        super().__init__()
        self.weight = nn.Parameter(means.flatten(1).clone())
        self.register_buffer("bias", -0.5 * means.flatten(1).pow(2).sum(1))

    def forward(self, x: Tensor) -> Tensor:
        return 0.05 * (x.flatten(1) @ self.weight.t() + self.bias)


@pytest.fixture(scope="module")
def fitted(synthetic):
    batch = next(iter(synthetic.dataloader("train", 512, shuffle=False)))
    x, y = batch["inputs"], batch["labels"]
    model = NearestMean(torch.stack([x[y == c].mean(0) for c in range(synthetic.num_classes)])).eval()
    test = next(iter(synthetic.dataloader("test", 8, shuffle=False)))
    assert (model(test["inputs"]).argmax(1) == test["labels"]).float().mean() >= 0.75
    return model


# AutoAttack with a cheap custom configuration; a wide budget so that it fools (and so moves) points.
AUTOATTACK = "autoattack:version=custom,attacks=apgd-ce+square,steps=5,n_queries=20,eps=64/255"


@pytest.mark.parametrize("spec", ["pgd:steps=3", "fgsm", "fgsm_rs", "pgd_l2:steps=3", AUTOATTACK])
def test_kit_passes_on_builtin_image_attacks(spec, synthetic, fitted):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # AutoAttack's note when the official package is absent
        report = check_attack(spec, synthetic, fitted)
        _assert_all_pass(report)
        assert [r.name for r in report.results] == ATTACK_CHECKS
        batch = next(iter(synthetic.dataloader("test", 8, shuffle=False)))
        from robustkd import create_attack

        torch.manual_seed(0)
        delta = create_attack(spec, synthetic)(fitted, batch).delta
    assert float(delta.abs().max()) > 0, "the attack moved nothing: the in-ball check would be vacuous"


# -- deliberately broken plug-ins ------------------------------------------------------------------
class EscapingAttack(Attack):
    """Broken on purpose: steps twice the budget and never projects."""

    def perturb(self, model, batch, targets=None):
        eps = self.task.threat_model().eps
        return Adversarial(batch, 2 * eps * torch.randn_like(batch["inputs"]).sign())


def test_attack_escaping_its_ball_fails_the_threat_model_check(synthetic, fitted):
    with pytest.raises(ConformanceError) as err:
        check_attack(EscapingAttack, synthetic, fitted)
    message = str(err.value)
    print(message)
    assert "in_threat_model: example 0 is perturbed by 0.0627451 in linf norm but the threat model allows " \
           "0.0313725 (eps=0.0313725)" in message
    report = err.value.report
    assert {"in_threat_model", "soft_targets", "frozen_victim"} <= {r.name for r in report.failures()}
    assert report["labels_unchanged"].passed and report["no_side_effects"].passed


def test_attack_descending_the_loss_fails_the_noise_check(synthetic, fitted):
    from robustkd.attacks.pgd import PGD, ce_objective

    def descending(task):  # a sign error: PGD that minimises the loss
        return PGD(task, steps=3, loss=lambda logits, y: -ce_objective(logits, y))

    report = check_attack(descending, synthetic, fitted, raise_on_failure=False)
    print(report)
    assert [r.name for r in report.failures()] == ["beats_random_noise"]
    assert "loss above 4 random points of its ball on 0 of the 8 examples moved" in report["beats_random_noise"].message
    assert "not maximising the loss" in report["beats_random_noise"].message


def _synthetic_subclass(**overrides):
    from robustkd_tasks.image import SyntheticImages

    name = "Broken" + "".join(k.title() for k in overrides)
    return type(name, (SyntheticImages,), {"__module__": __name__, **overrides})(n_train=64, n_test=32)


def test_non_differentiable_logits_fail_the_gradient_check():
    def quantised(self, model, batch, delta=None):  # rounds to 8-bit pixels: the gradient is zero
        x = batch["inputs"] if delta is None else batch["inputs"] + delta
        return model(torch.round(x * 255) / 255)

    check = {c.name: c for c in task_checks(_synthetic_subclass(logits=quantised), "small_cnn", models=[])}
    assert check["zero_delta"]().passed
    with pytest.raises(ConformanceError, match=r"logits_differentiable: the gradient with respect to delta is zero "
                                               r"everywhere \(a rounding, argmax"):
        check["logits_differentiable"]()

    def detached(self, model, batch, delta=None):
        x = batch["inputs"] if delta is None else (batch["inputs"] + delta).detach()
        return model(x)

    check = {c.name: c for c in task_checks(_synthetic_subclass(logits=detached), "small_cnn", models=[])}
    with pytest.raises(ConformanceError, match=r"logits_differentiable: logits\(model, batch, delta\) is not "
                                               r"differentiable in delta: the gradient is None"):
        check["logits_differentiable"]()

    def no_graph(self, model, batch, delta=None):
        with torch.no_grad():
            return model(batch["inputs"] if delta is None else batch["inputs"] + delta)

    result = {c.name: c for c in task_checks(_synthetic_subclass(logits=no_graph), "small_cnn", models=[])}[
        "logits_differentiable"].run()
    assert not result.passed and "does not depend on delta through autograd" in result.message


def test_labels_out_of_range_fail_the_label_check():
    task = _synthetic_subclass()
    task.num_classes = 5  # the data has 10 classes
    report = check_task(task, "small_cnn", models=[], raise_on_failure=False)
    print(report)
    failed = {r.name: r.message for r in report.failures()}
    assert "outside 0..4 (num_classes=5)" in failed["labels_in_range"]
    assert "outside the task's 5 classes" in failed["batch_structure"]  # the task's own validate_batch agrees
    assert report["num_classes"].passed and report["logits_differentiable"].passed and report["zero_delta"].passed


def test_checks_one_by_one_for_parametrize(synthetic, fitted):
    checks = task_checks(synthetic, "small_cnn", models=[])
    assert [repr(c) for c in checks] == TASK_CHECKS
    result = checks[0]()
    assert (result.name, result.passed, result.message) == ("num_classes", True, "10 classes")
    escaping = {c.name: c for c in attack_checks(EscapingAttack(synthetic), synthetic, fitted)}
    assert escaping["labels_unchanged"]().passed
    with pytest.raises(AssertionError, match="in_threat_model"):  # ConformanceError is an AssertionError
        escaping["in_threat_model"]()


# -- entry points: duplicates and import failures ----------------------------------------------------
def _fake_dist(site: Path, dist: str, entry_points: dict[str, dict[str, str]], modules: dict[str, str]) -> None:
    """An installed distribution as importlib.metadata sees it: a dist-info folder and modules."""
    info = site / f"{dist}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{name} = {value}\n" for name, value in eps.items()) for group, eps in entry_points.items()))
    for name, source in modules.items():
        (site / f"{name}.py").write_text(source)


ATTACK_SOURCE = '''
from robustkd.attacks.pgd import PGD

class {cls}(PGD):
    """{doc}"""
'''


def test_duplicate_names_from_two_plugins_name_both_sources(tmp_path, monkeypatch):
    group = "robustkd_test_dup.attacks"
    _fake_dist(tmp_path, "plugin_one", {group: {"sharp": "plugin_one_mod:SharpOne", "only_one": "plugin_one_mod:Solo"}},
               {"plugin_one_mod": ATTACK_SOURCE.format(cls="SharpOne", doc="one") + "\nclass Solo(PGD):\n    'solo'\n"})
    _fake_dist(tmp_path, "plugin_two", {group: {"sharp": "plugin_two_mod:SharpTwo"}},
               {"plugin_two_mod": ATTACK_SOURCE.format(cls="SharpTwo", doc="two")})
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = Registry("attack", group=group)
    with pytest.warns(RuntimeWarning, match="two plug-ins register the attack name 'sharp'"):
        registry.discover()
    with pytest.raises(DuplicateNameError) as err:
        registry.get("sharp")
    message = str(err.value)
    for part in ("plugin_one (robustkd_test_dup.attacks:sharp)", "plugin_one_mod.SharpOne",
                 "plugin_two (robustkd_test_dup.attacks:sharp)", "plugin_two_mod.SharpTwo", "Rename one of them"):
        assert part in message
    assert registry.get("only_one").__name__ == "Solo"  # the rest of the plug-ins stay usable
    # the decorator route: a second registration of a taken name names both definitions
    with pytest.raises(RegistryError, match=r"'only_one': .*plugin_one_mod.Solo.*test_plugins.*Other"):
        @registry.register("only_one")
        class Other(Attack):
            def perturb(self, model, batch, targets=None):
                """Never called: only the registration matters here."""


def test_plugin_that_fails_to_import_is_named_and_the_others_stay_usable(tmp_path, monkeypatch):
    group = "robustkd_test_broken.tasks"
    _fake_dist(tmp_path, "broken_plugin", {group: {"broken": "robustkd_no_such_module_xyz"}}, {})
    _fake_dist(tmp_path, "good_plugin", {group: {"good": "good_plugin_mod:make"}},
               {"good_plugin_mod": "def make(data_dir=None):\n    'A working plug-in.'\n    return 'ok'\n"})
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = Registry("task", group=group)
    with pytest.warns(RuntimeWarning, match=r"could not load entry point 'broken' = 'robustkd_no_such_module_xyz' in "
                                            r"group 'robustkd_test_broken.tasks' \(broken_plugin\): "
                                            r"ModuleNotFoundError.*the other plug-ins stay usable"):
        registry.discover()
    assert registry.get("good")() == "ok"
    assert registry.entry("good").source == "good_plugin (robustkd_test_broken.tasks:good)"
    with pytest.raises(RegistryError, match=r"unknown task 'broken'.*It failed to load: could not load entry point"):
        registry.get("broken")


def test_list_command_reports_sources_and_problems(tmp_path, monkeypatch, capsys):
    from robustkd import cli, registry

    group = "robustkd_test_list"
    _fake_dist(tmp_path, "list_plugin", {f"{group}.attacks": {"dup": "list_a:Dup", "missing": "list_nothing_here"},
                                         f"{group}.models": {"dup": "list_b:Dup"}},
               {"list_a": ATTACK_SOURCE.format(cls="Dup", doc="An attack from a plug-in."),
                "list_b": "def Dup():\n    'A model from a plug-in.'\n"})
    monkeypatch.syspath_prepend(str(tmp_path))
    for kind in ("task", "attack", "method", "model"):
        monkeypatch.setattr(registry, f"{kind.upper()}S", Registry(kind, group=f"{group}.{kind}s"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # `list` shows load errors itself instead of warning
        assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    print(out)
    assert "dup   list_plugin (robustkd_test_list.attacks:dup)  An attack from a plug-in." in out
    assert "A model from a plug-in." in out
    assert "plug-ins that failed to load (1; the others above are usable)" in out
    assert "could not load entry point 'missing' = 'list_nothing_here'" in out
    assert cli.main(["list", "--strict"]) == 1
    capsys.readouterr()
    assert cli.main(["list", "attacks", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert [e["name"] for e in listing["attacks"]] == ["dup"] and "models" not in listing
    assert cli.main(["list", "widgets"]) == 2


# -- the example third-party package ---------------------------------------------------------------
@pytest.fixture(scope="module")
def tabular_installed(tmp_path_factory):
    """pip-install examples/robustkd-tabular (a copy, so no build files land in the repository) into
    the running interpreter's environment, and uninstall it afterwards."""
    src = tmp_path_factory.mktemp("example") / "robustkd-tabular"
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    pip = [sys.executable, "-m", "pip"]
    # a regular (not editable) install: the running process sees it without a new .pth file
    done = subprocess.run([*pip, "install", "--no-deps", "--quiet", str(src)], capture_output=True, text=True, env=ENV)
    assert done.returncode == 0, done.stderr[-2000:]
    try:
        with TASKS.temporary(), ATTACKS.temporary(), MODELS.temporary():  # later tests see the registries as before
            for reg in (TASKS, ATTACKS, MODELS):
                reg.discover(refresh=True)  # installed after this process looked for plug-ins
            yield
    finally:
        subprocess.run([*pip, "uninstall", "--yes", "--quiet", "robustkd-tabular"], check=True, capture_output=True,
                       env=ENV)


def test_example_plugin_is_found_by_name_and_conforms_in_two_processes(tabular_installed):
    task = create_task("tabular_blobs")
    assert TASKS.entry("tabular_blobs").source == "robustkd-tabular (robustkd.tasks:tabular)"
    assert ATTACKS.entry("random_search").source == "robustkd-tabular (robustkd.attacks:random_search)"
    assert MODELS.entry("tabular_mlp").source.startswith("robustkd-tabular")
    report = check_task(task, distributed=True)
    _assert_all_pass(report)
    assert "identical student and EMA teacher" in report["distributed"].message
    _assert_all_pass(check_attack("random_search", task, task.build_model("tabular_mlp")))


def test_example_plugin_from_a_recipe_and_robustkd_list(tabular_installed, tmp_path):
    out = tmp_path / "run"
    run = subprocess.run(
        [sys.executable, str(REPO / "recipes" / "cifar_adr.py"), "--dataset", "tabular_blobs", "--model", "tabular_mlp",
         "--epochs", "1", "--batch-size", "32", "--max-train-samples", "128", "--max-eval-samples", "64",
         "--eps", "0.05", "--attack-step-size", "0.0125", "--attack-steps", "3", "--eval-attacks", "pgd:steps=3",
         "--final-attacks", "pgd:steps=3,random_search16", "--cpu", "--no-progress", "--output-dir", str(out),
         "--curve-steps", "2"],
        capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["task"]["name"] == "tabular_blobs" and report["model"]["name"] == "tabular_mlp"
    assert report["model"]["method"] == "adr" and set(report["metrics"]["adversarial"]) == {"pgd:steps=3", "random_search16"}
    assert report["attacks"]["random_search16"] == {"attack": "random_search", "type": "ThreatModel", "norm": "linf",
                                                    "eps": 0.05, "domain": [0.0, 1.0], "per_token": False,
                                                    "relative": False, "samples": 16}

    # `robustkd list` with the example installed and a broken plug-in in the real group next to it
    site = tmp_path / "site"
    _fake_dist(site, "broken_plugin", {"robustkd.tasks": {"broken_task": "robustkd_no_such_module_xyz"}}, {})
    listing = subprocess.run([str(Path(sys.executable).parent / "robustkd"), "list"], capture_output=True, text=True,
                             env={**ENV, "PYTHONPATH": str(site)}, timeout=300)
    assert listing.returncode == 0, listing.stderr[-3000:]
    print(listing.stdout)
    lines = listing.stdout.splitlines()

    def row(name: str) -> str:
        return next(line for line in lines if line.split()[:1] == [name])

    assert "robustkd-tabular (robustkd.tasks:tabular)" in row("tabular_blobs")
    assert "Synthetic Gaussian clusters" in row("tabular_blobs")
    assert "robustkd-tabular (robustkd.attacks:random_search)" in row("random_search")
    assert "robustkd-tabular" in row("tabular_mlp")
    for name in ("cifar10", "pgd", "autoattack", "adr", "resnet18"):
        assert "built-in" in row(name)
    assert "could not load entry point 'broken_task' = 'robustkd_no_such_module_xyz' in group 'robustkd.tasks' " \
           "(broken_plugin): ModuleNotFoundError" in listing.stdout


# -- docs/plugins.md runs as written --------------------------------------------------------------
def _doc_blocks(first_line: str) -> str:
    text = (REPO / "docs" / "plugins.md").read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```python\n")[1:]]
    return "\n".join(b for b in blocks if b.startswith(first_line))


def test_docs_walkthrough_runs(tmp_path, monkeypatch):
    import importlib

    (tmp_path / "my_plugin.py").write_text(_doc_blocks("# my_plugin.py"))
    (tmp_path / "test_my_plugin.py").write_text(_doc_blocks("# test_my_plugin.py"))
    monkeypatch.syspath_prepend(str(tmp_path))
    with TASKS.temporary(), ATTACKS.temporary(), MODELS.temporary():
        importlib.import_module("my_plugin")
        assert TASKS.entry("rings").description == "Two concentric rings of 2-D points (synthetic, only when asked for by name)."
        walkthrough = importlib.import_module("test_my_plugin")
        walkthrough.test_rings_task()
        walkthrough.test_mifgsm_attack()
        task = create_task("rings")
        report = check_task(task)
        print(report)
        documented = (REPO / "docs" / "plugins.md").read_text()
        for r in report.results:  # the table in the docs is this run's output (the kit seeds its models)
            line = f"{r.status}  {r.name:<24}  {r.message}"
            if r.name == "default_attacks":  # lists the attacks registered in this process too
                line = line.split(";")[0]
            assert line in documented, r
    for module in ("my_plugin", "test_my_plugin"):
        sys.modules.pop(module, None)


# -- the core knows no modality ------------------------------------------------------------------
def test_core_imports_no_plugin_package_and_names_no_modality():
    import ast

    core = REPO / "robustkd"
    offenders = []
    for path in sorted(core.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [f"{path.relative_to(REPO)}:{node.lineno} imports {n}" for n in names
                          if n.split(".")[0] in ("tasks", "robustkd_tasks")]
            # any comparison involving a ``.modality`` attribute is a branch on the modality
            if isinstance(node, ast.Compare) and any(
                    isinstance(n, ast.Attribute) and n.attr == "modality" for n in ast.walk(node)):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno} branches on .modality")
    assert not offenders, "\n".join(offenders)


def test_builtin_plugins_install_as_robustkd_tasks_with_every_package_listed():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    setup = project["tool"]["setuptools"]
    assert setup["package-dir"] == {"robustkd_tasks": "tasks"}
    packages = set(setup["packages"])
    on_disk = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "robustkd").rglob("__init__.py")}
    assert on_disk <= packages, f"packages missing from pyproject.toml: {sorted(on_disk - packages)}"
    assert "robustkd_tasks" in packages and (REPO / "tasks" / "__init__.py").exists()
    points = project["project"]["entry-points"]["robustkd.tasks"]
    assert all(v.startswith("robustkd_tasks.") for v in points.values()), points

    assert TASKS.entry("cifar10").source == "built-in" and TASKS.get("cifar10").__module__ == "robustkd_tasks.image"


def test_temporary_on_an_undiscovered_registry_keeps_the_builtin_plugins():
    """A fresh process: the first look for plug-ins happens inside ``temporary()`` (a test registering a
    throw-away task); afterwards the built-in tasks, which register when their module is first imported, are
    still found, and the throw-away one is gone."""
    code = ("from robustkd import TASKS, create_task\n"
            "assert not TASKS._discovered\n"
            "with TASKS.temporary():\n"
            "    TASKS.add('throwaway', object)\n"
            "    assert 'cifar10' in TASKS.names()\n"
            "assert TASKS._discovered and 'throwaway' not in TASKS.names()\n"
            "assert TASKS.entry('cifar10').source == 'built-in', TASKS.names()\n"
            "assert create_task('synthetic').name == 'synthetic'\n"
            "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_a_dataset_without_len_is_refused_where_a_sample_is_drawn():
    from torch.utils.data import IterableDataset

    class Stream(IterableDataset):
        def __iter__(self):
            yield {"inputs": torch.zeros(3, 32, 32), "labels": torch.tensor(0)}

    task = _synthetic_subclass(dataset=lambda self, split: Stream())
    with pytest.raises(TypeError, match=r"'train' split of the task 'synthetic' is a Stream without len\(\): "
                                        r"Task.dataset must return a map-style dataset"):
        task.dataloader("train", 4, max_samples=2)


def test_the_hugging_face_model_tasks_share_one_base_and_keep_their_names():
    """``hf_image`` and ``hf_audio`` are one base (``robustkd_tasks.hf_model``) with what differs per
    modality; both are still registered by their modules under their names and input keys."""
    from robustkd_tasks.hf_model import HFModelTask
    from robustkd_tasks.image import HFImageTask
    from robustkd_tasks.speech import HFAudioTask

    assert issubclass(HFImageTask, HFModelTask) and issubclass(HFAudioTask, HFModelTask)
    for name, module, key in (("hf_image", "robustkd_tasks.image", "pixel_values"),
                              ("hf_audio", "robustkd_tasks.speech", "input_values")):
        factory = TASKS.get(name)
        assert factory.__module__ == module and factory._robustkd_hf_input == key

    class Out:
        def __init__(self, logits):
            self.logits = logits

    class Seen(nn.Module):  # a stand-in transformers classifier: records the keywords it is called with
        config = type("Config", (), {"num_labels": 3})()

        def forward(self, **kwargs):
            self.kwargs = kwargs
            return Out(torch.zeros(2, 3))

    model = Seen()
    with pytest.raises(ValueError, match="the model has no config.num_labels: pass a transformers "
                                         "audio-classification model"):
        TASKS.get("hf_audio")(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="unknown norm 'l3'"):
        TASKS.get("hf_image")(model, None, norm="l3")
    with pytest.raises(ValueError, match="unknown norm 'l3'"):
        TASKS.get("hf_audio")(model, None, norm="l3")
    audio = TASKS.get("hf_audio")(model, None)
    batch = {"input_values": torch.zeros(2, 5), "attention_mask": torch.ones(2, 5, dtype=torch.long),
             "labels": torch.zeros(2, dtype=torch.long)}
    audio.logits(model, batch, torch.ones(2, 5))
    assert set(model.kwargs) == {"input_values", "attention_mask"} and bool((model.kwargs["input_values"] == 1).all())
    with pytest.raises(ValueError, match="has no data of its own"):
        audio.dataset("train")
    with pytest.raises(TypeError, match=r"unknown threat-model options \['snr_db'\] for hf_image: eps and norm"):
        TASKS.get("hf_image")(model).threat_model(snr_db=30)
    image = TASKS.get("hf_image")(model, None, norm="l2")
    assert image.threat_model().norm == "l2" and image.threat_model().eps == 0.5
