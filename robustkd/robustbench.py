"""RobustBench: zoo models by name, the leaderboard's evaluation protocol, its ``model_info`` JSON.

The ``robustbench`` package is an optional extra (``pip install 'robustkd[robustbench]'``; it pins
timm 1.0.9). RobustBench 1.1.1 imports AutoAttack under its git name ``autoattack``, while the
PyPI release it depends on installs as ``pyautoattack``; :func:`import_robustbench` makes the
PyPI package answer to that name before importing it (the same code, nothing substituted).

Model files live where RobustBench puts them: ``MODEL_DIR/<dataset>/<threat_model>/<name>.pt``.
Offline (``HF_HUB_OFFLINE=1``), a missing file fails at once with that path instead of a download.
"""
from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from torch import nn

DATASETS = {"cifar10": "cifar10", "cifar100": "cifar100", "imagenet": "imagenet"}
THREAT_MODELS = ("Linf", "L2", "corruptions")
# The leaderboard protocol (RobustBench README / robustbench.eval.benchmark defaults): AutoAttack
# "standard" on the first n_ex test points, at these budgets.
PROTOCOL = {("cifar10", "Linf"): {"eps": 8 / 255, "n_ex": 10000}, ("cifar10", "L2"): {"eps": 0.5, "n_ex": 10000},
            ("cifar100", "Linf"): {"eps": 8 / 255, "n_ex": 10000}, ("imagenet", "Linf"): {"eps": 4 / 255, "n_ex": 5000}}
EXTRA_HINT = "pip install 'robustkd[robustbench]'"


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def import_robustbench():
    """``robustbench`` with ``autoattack`` resolved to the installed ``pyautoattack``."""
    try:
        import pyautoattack
        import pyautoattack.state
    except ImportError as exc:  # a dependency of robustkd: only a broken install gets here
        raise ImportError("pyautoattack is missing: reinstall robustkd") from exc
    sys.modules["autoattack"] = pyautoattack
    sys.modules["autoattack.state"] = pyautoattack.state
    try:
        return importlib.import_module("robustbench")
    except ImportError as exc:
        raise ValueError(f"robustbench models need the robustbench extra ({type(exc).__name__}: {exc}): "
                         f"{EXTRA_HINT}") from exc


def parse_name(spec: str) -> tuple[str, str | None]:
    """``robustbench:NAME`` or ``robustbench:THREAT/NAME`` -> (name, threat model or None)."""
    body = spec.split(":", 1)[1] if spec.startswith("robustbench:") else spec
    if "/" in body:
        threat, name = body.split("/", 1)
        return name, threat
    return body, None


def checkpoint_path(model_dir: str | Path, dataset: str, threat_model: str, name: str) -> Path:
    """Where RobustBench keeps (and looks for) a zoo model's weights."""
    return Path(model_dir).expanduser() / dataset / threat_model / f"{name}.pt"


def zoo_entry(name: str, dataset: str, threat_model: str) -> dict[str, Any]:
    """The zoo's entry (architecture factory, download id) or a clear error listing near names."""
    import_robustbench()
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    try:
        models = model_dicts[BenchmarkDataset(dataset)][ThreatModel(threat_model)]
    except (KeyError, ValueError) as exc:
        raise ValueError(f"RobustBench has no {dataset}/{threat_model} zoo: datasets {sorted(DATASETS)}, "
                         f"threat models {', '.join(THREAT_MODELS)}") from exc
    if name not in models:
        import difflib

        near = difflib.get_close_matches(name, list(models), n=5, cutoff=0.4)
        raise ValueError(f"RobustBench's {dataset}/{threat_model} zoo has no model {name!r}"
                         + (f"; did you mean {', '.join(near)}?" if near else f" ({len(models)} models; see "
                            "robustbench.model_zoo)"))
    return models[name]


def load_robustbench(spec: str, dataset: str, model_dir: str | Path | None = None,
                     threat_model: str | None = None) -> nn.Module:
    """A RobustBench zoo model (inputs in [0, 1], its own normalisation inside), in eval mode."""
    name, threat = parse_name(spec)
    threat_model = threat or threat_model or "Linf"
    if dataset not in DATASETS:
        raise ValueError(f"RobustBench has models for {', '.join(DATASETS)}, not for the task {dataset!r}")
    model_dir = Path(model_dir or os.environ.get("ROBUSTKD_MODEL_DIR", "models")).expanduser()
    path = checkpoint_path(model_dir, dataset, threat_model, name)
    zoo_entry(name, dataset, threat_model)  # an unknown name fails here, before any download
    if not path.exists() and offline():
        raise FileNotFoundError(f"the RobustBench model {name!r} needs the file {path} and the network is off "
                                "(HF_HUB_OFFLINE=1): put the checkpoint there, or pass --model-dir where it is")
    from robustbench.utils import load_model

    try:
        model = load_model(model_name=name, model_dir=str(model_dir), dataset=dataset, threat_model=threat_model)
    except Exception as exc:  # noqa: BLE001 - failed download or a file of another architecture: say which file
        raise ValueError(f"could not load the RobustBench model {name!r} from {path} ({type(exc).__name__}: "
                         f"{str(exc)[:300]}): download it (online) or put the zoo's checkpoint at that path") from exc
    model.robustkd_source = {"robustbench": name, "threat_model": threat_model, "file": str(path),
                             "architecture": type(model).__name__}
    return model.eval()


# -- the leaderboard's model_info JSON -------------------------------------------------------------
# The fields of robustbench.utils.ModelInfo (1.1.1), which RobustBench's own update_json writes.
MODEL_INFO_FIELDS = ("link", "name", "authors", "additional_data", "number_forward_passes", "dataset", "venue",
                     "architecture", "eps", "clean_acc", "reported", "corruptions_acc", "corruptions_acc_3d",
                     "corruptions_mce", "corruptions_mce_3d", "autoattack_acc", "footnote")


def model_info(report: dict[str, Any], *, name: str = "", link: str = "", authors: str = "", venue: str = "",
               architecture: str = "", additional_data: bool = False, reported: str | None = None,
               footnote: str | None = None) -> tuple[dict[str, Any], str, list[str]]:
    """RobustBench's ``model_info`` entry from a robustkd evaluation report (``robustkd eval --robustbench``):
    returns (the JSON fields, the threat model, warnings). Accuracies are percent strings rounded to two
    decimals and ``eps`` a float, as RobustBench's ``update_json`` writes them."""
    aa = [k for k, d in report["attacks"].items() if d.get("attack") == "autoattack"]
    if not aa:
        raise ValueError("the report has no AutoAttack result: evaluate with `robustkd eval --robustbench` first")
    desc = report["attacks"][aa[0]]
    if desc.get("version") != "standard":
        raise ValueError(f"RobustBench lists AutoAttack version standard; this report ran version "
                         f"{desc.get('version')!r}: re-evaluate with `robustkd eval --robustbench`")
    threat = {"linf": "Linf", "l2": "L2"}.get(str(desc.get("norm")), str(desc.get("norm")))
    dataset = report["task"]["name"]
    notes: list[str] = []
    protocol = PROTOCOL.get((dataset, threat))
    if protocol is None:
        raise ValueError(f"RobustBench has no {threat} leaderboard for {dataset!r}")
    if abs(float(desc.get("eps", -1)) - protocol["eps"]) > 1e-9:
        raise ValueError(f"the report's budget eps={desc.get('eps')} is not the leaderboard's {protocol['eps']:.6g}: "
                         "re-evaluate with `robustkd eval --robustbench`")
    n = int(report["task"]["num_examples"])
    if n < protocol["n_ex"]:
        notes.append(f"evaluated on {n} points, not the leaderboard's {protocol['n_ex']}: an estimate, not an entry")
        footnote = footnote or f"AutoAttack on the first {n} test points only."
    clean = str(round(report["metrics"]["clean"]["accuracy"] * 100, 2))
    robust = str(round(report["metrics"]["adversarial"][aa[0]]["accuracy"] * 100, 2))
    info = dict.fromkeys(MODEL_INFO_FIELDS)
    info.update(link=link, name=name, authors=authors, additional_data=additional_data, number_forward_passes=1,
                dataset=dataset, venue=venue, architecture=architecture or report["model"].get("name", ""),
                eps=protocol["eps"], clean_acc=clean, reported=reported if reported is not None else robust,
                autoattack_acc=robust, footnote=footnote)
    return {k: v for k, v in info.items() if v is not None}, threat, notes


def write_model_info(info: dict[str, Any], out_dir: str | Path, model_name: str, threat: str) -> Path:
    """``OUT/model_info/<dataset>/<threat>/<model_name>.json``, RobustBench's layout."""
    path = Path(out_dir) / "model_info" / info["dataset"] / threat / f"{model_name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(info, indent=2) + "\n")
    return path
