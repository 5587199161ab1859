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
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypedDict

from torch import nn

DATASETS = {"cifar10": "cifar10", "cifar100": "cifar100", "imagenet": "imagenet"}
THREAT_MODELS = ("Linf", "L2", "corruptions")


class LeaderboardProtocol(TypedDict, total=False):
    """A RobustBench leaderboard's budget ``eps`` and number of test points ``n_ex`` (every entry of
    :data:`PROTOCOL` has both; ``total=False`` lets a lookup default to ``{}``)."""

    eps: float
    n_ex: int


# The leaderboard protocol (RobustBench README / robustbench.eval.benchmark defaults): AutoAttack
# "standard" on the first n_ex test points, at these budgets.
PROTOCOL: dict[tuple[str, str], LeaderboardProtocol] = {
    ("cifar10", "Linf"): {"eps": 8 / 255, "n_ex": 10000}, ("cifar10", "L2"): {"eps": 0.5, "n_ex": 10000},
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


# -- RobustBench's own benchmark() in this environment ------------------------------------------------
class Patch:
    """An installed change to RobustBench (made by :func:`patch_autoattack` / :func:`use_task_data`):
    in force from the call; ``undo()`` or the end of a ``with`` block restores what was there."""

    def __init__(self, module: Any, name: str, value: Any, what: str):
        self.module, self.name, self.what = module, name, what
        self.previous = getattr(module, name)
        setattr(module, name, value)

    def undo(self) -> None:
        setattr(self.module, self.name, self.previous)

    def __enter__(self) -> Patch:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.undo()

    def __repr__(self) -> str:
        return f"<robustkd.robustbench.Patch: {self.what}>"


_OFFICIAL_KNOBS = ("steps", "n_restarts", "n_queries", "n_target_classes")


def autoattack_v1_class(*, version: str | None = None, attacks: Sequence[str] | None = None, seed: int | None = None,
                        **knobs: int) -> type[Any]:
    """``AutoAttack`` with the argument names of the fra31/auto-attack driver RobustBench 1.1.1 calls
    (``AutoAttack(model, norm, eps, version, device, log_path, attacks_to_run, seed, verbose)``,
    ``run_standard_evaluation(x, y, bs, return_labels, state_path)`` returning the adversarial inputs),
    running the installed ``pyautoattack`` (0.2.0 renamed them). ``version``/``attacks``/``seed`` and the
    ``custom`` knobs (``steps``, ``n_restarts``, ``n_queries``, ``n_target_classes``, as robustkd's
    ``autoattack:`` spec names them) replace what the caller asks for: a quick check, not the leaderboard's
    protocol, so each run says so on stderr."""
    from pyautoattack import AutoAttack as Official

    unknown = sorted(set(knobs) - set(_OFFICIAL_KNOBS))
    if unknown:
        raise ValueError(f"patch_autoattack: unknown AutoAttack setting(s) {', '.join(unknown)}; settings: version, "
                         f"attacks, seed, {', '.join(_OFFICIAL_KNOBS)}")
    if (attacks is not None or knobs) and version not in (None, "custom"):
        raise ValueError("patch_autoattack: attacks= and the steps/restarts/queries settings need version='custom' "
                         "(a run labelled standard, plus or rand keeps the official settings)")
    if (attacks is not None or knobs) and version is None:
        version = "custom"
    overrides: dict[str, Any] = {k: v for k, v in (("version", version), ("attacks", attacks), ("seed", seed)) if v is not None}
    overrides.update(knobs)

    class AutoAttackV1(Official):
        robustkd_overrides: dict[str, Any] = overrides  # what replaces the caller's settings

        def __init__(self, model: nn.Module, norm: str = "Linf", eps: float = 0.3, seed: int | None = None,
                     verbose: bool = True, attacks_to_run: Sequence[str] = (), version: str = "standard",
                     is_tf_model: bool = False, device: Any = "cuda", log_path: str | None = None):
            if is_tf_model:
                raise ValueError("is_tf_model=True: pyautoattack 0.2.0 attacks PyTorch models only")
            version = overrides.get("version", version)
            chosen = overrides.get("attacks", attacks_to_run)
            if overrides:
                print(f"robustkd.robustbench.patch_autoattack: AutoAttack with {overrides} instead of the caller's "
                      f"settings (version {version}): a check, not RobustBench's protocol", file=sys.stderr)
            super().__init__(model, attacks=list(chosen) if version == "custom" else None, device=device, eps=eps,
                             norm=norm, seed=overrides.get("seed", seed), version=version)
            self.verbose = verbose
            if overrides.get("steps") is not None:
                self.apgd.n_iter = self.apgd_targeted.n_iter = self.fab.n_iter = overrides["steps"]
            if overrides.get("n_restarts") is not None:
                self.apgd.n_restarts = self.fab.n_restarts = overrides["n_restarts"]
            if overrides.get("n_queries") is not None:
                self.square.n_queries = overrides["n_queries"]
            if overrides.get("n_target_classes") is not None:
                self.apgd_targeted.n_target_classes = self.fab.n_target_classes = overrides["n_target_classes"]
            self.log_path = log_path
            if log_path is not None:  # the old driver's log file: the official logger's records go there too
                handler = logging.FileHandler(log_path)
                handler.setFormatter(logging.Formatter("%(message)s"))
                self._log_handler: logging.FileHandler | None = handler
                logging.getLogger("auto-attack").addHandler(handler)
                logging.getLogger("auto-attack").setLevel(logging.DEBUG)

        def _close_log(self) -> None:
            handler = getattr(self, "_log_handler", None)
            if handler is not None:
                logging.getLogger("auto-attack").removeHandler(handler)
                handler.close()
                self._log_handler = None

        def run_standard_evaluation(self, x_orig, y_orig, bs: int = 250, return_labels: bool = False,
                                    state_path: str | Path | None = None):
            try:
                x_adv, y_adv = super().run_standard_evaluation(
                    x_orig, y_orig, batch_size=bs, state_path=Path(state_path) if state_path is not None else None)
            finally:
                self._close_log()
            return (x_adv, y_adv) if return_labels else x_adv

        def run_standard_evaluation_individual(self, x_orig, y_orig, bs: int = 250, return_labels: bool = False):
            if return_labels:
                raise ValueError("run_standard_evaluation_individual(return_labels=True): pyautoattack 0.2.0 returns "
                                 "the adversarial inputs only")
            try:
                return super().run_standard_evaluation_individual(x_orig, y_orig, batch_size=bs)
            finally:
                self._close_log()

    AutoAttackV1.__qualname__ = AutoAttackV1.__name__ = "AutoAttack"
    return AutoAttackV1


def patch_autoattack(*, version: str | None = None, attacks: Sequence[str] | None = None, seed: int | None = None,
                     **knobs: int) -> Patch:
    """Make RobustBench's ``robustbench.eval.benchmark()`` run with the installed ``pyautoattack``: its
    ``AutoAttack(..., log_path=...)`` call and ``run_standard_evaluation(x, y, bs=...)`` use the argument
    names of the driver RobustBench 1.1.1 was written for, which pyautoattack 0.2.0 renamed. Installed
    when called, in ``robustbench.eval`` only (pyautoattack itself is unchanged); use it as a context
    manager, or call ``.undo()``, to restore RobustBench's own import.

    Without arguments the attack is RobustBench's (AutoAttack ``standard``, its seed). ``version``,
    ``attacks``, ``seed`` and the custom knobs (``steps``, ``n_restarts``, ``n_queries``, ``n_target_classes``)
    replace the caller's settings for a quick check::

        from robustbench.eval import benchmark
        with patch_autoattack(attacks=["apgd-ce"], steps=10, seed=0):
            clean, robust = benchmark(model, n_examples=100, dataset="cifar10", threat_model="Linf", eps=8 / 255)
    """
    import_robustbench()
    import robustbench.eval as rb_eval

    cls = autoattack_v1_class(version=version, attacks=attacks, seed=seed, **knobs)
    return Patch(rb_eval, "AutoAttack", cls, "robustbench.eval.AutoAttack -> pyautoattack with the old argument names"
                 + (f", overrides {cls.robustkd_overrides}" if cls.robustkd_overrides else ""))


def use_task_data(task: Any, split: str = "test") -> Patch:
    """Make RobustBench's ``benchmark()`` read its clean points from a robustkd task (the first
    ``n_examples`` of ``split``, in order, pixels in [0, 1]) instead of torchvision's data set files, which it
    downloads when they are missing: for offline use, and to give it the very points ``robustkd eval
    --robustbench`` evaluates."""
    import_robustbench()
    import robustbench.eval as rb_eval
    import torch

    def load_clean_dataset(dataset: Any, n_examples: int | None, data_dir: str, prepr: Any):
        name = getattr(dataset, "value", dataset)
        if name != task.name:
            raise ValueError(f"benchmark(dataset={name!r}) but use_task_data gave the task {task.name!r}")
        data = task.dataset(split)
        n = len(data) if n_examples is None else min(int(n_examples), len(data))
        batch = task.collate_fn(split)([data[i] for i in range(n)])
        return batch["inputs"].float(), torch.as_tensor(batch["labels"])

    return Patch(rb_eval, "load_clean_dataset", load_clean_dataset,
                 f"robustbench.eval.load_clean_dataset -> the first points of {task.name}/{split}")


# -- the leaderboard's model_info JSON -------------------------------------------------------------
# The fields of robustbench.utils.ModelInfo (1.1.1), which RobustBench's own update_json writes.
MODEL_INFO_FIELDS = ("link", "name", "authors", "additional_data", "number_forward_passes", "dataset", "venue",
                     "architecture", "eps", "clean_acc", "reported", "corruptions_acc", "corruptions_acc_3d",
                     "corruptions_mce", "corruptions_mce_3d", "autoattack_acc", "footnote")


def eps_string(eps: float) -> str:
    """A budget as RobustBench's ``model_info`` files write it: ``"8/255"`` for multiples of 1/255, else ``"0.5"``."""
    k = eps * 255
    if abs(k - round(k)) < 1e-6 and round(k) > 0:
        return f"{round(k)}/255"
    return f"{eps:g}"


def points_section(split: str, total: int, n: int, *, how: str, seed: int | None = None) -> dict[str, Any]:
    """The report's record of which points were evaluated: ``how`` is ``"first"`` (the first ``n`` of the
    split, in order: RobustBench's protocol), ``"seeded_sample"`` (a random sample drawn with ``seed``) or
    ``"all"``."""
    if how not in ("first", "seeded_sample", "all"):
        raise ValueError(f"points: how must be first, seeded_sample or all, got {how!r}")
    out: dict[str, Any] = {"split": split, "selection": how, "num_examples": int(n), "split_size": int(total)}
    if how == "seeded_sample":
        out["seed"] = seed
    return out


def points_footnote(report: dict[str, Any], protocol_n: int) -> tuple[str | None, list[str]]:
    """The footnote and warnings for an evaluation on fewer points than the leaderboard's, saying truthfully
    how its points were chosen (the report's ``points`` section)."""
    n = int(report["task"]["num_examples"])
    points = report.get("points") or {}
    how = points.get("selection")
    split = report["task"].get("split", "test")
    if n >= protocol_n and how in ("first", "all"):
        return None, []
    if how == "first":
        note = f"AutoAttack on the first {n} {split} points only."
    elif how == "seeded_sample":
        note = (f"AutoAttack on a random sample of {n} of the {points.get('split_size')} {split} points (seed "
                f"{points.get('seed')}), not the first {n}.")
    elif how == "all":
        note = f"AutoAttack on all {n} points of this copy of the {split} split, not the leaderboard's {protocol_n}."
    else:
        note = (f"AutoAttack on {n} {split} points only; the report does not record how they were chosen "
                "(re-evaluate with `robustkd eval --robustbench` to record it).")
    return note, [f"evaluated on {n} points, not the leaderboard's {protocol_n}: an estimate, not an entry"]


def model_info(report: dict[str, Any], *, name: str = "", link: str = "", authors: str = "", venue: str = "",
               architecture: str = "", additional_data: bool = False, reported: str | None = None,
               footnote: str | None = None, allow_failed_sanity: bool = False) -> tuple[dict[str, Any], str, list[str]]:
    """RobustBench's ``model_info`` entry from a robustkd evaluation report (``robustkd eval --robustbench``):
    returns (the JSON fields, the threat model, warnings). Accuracies are percent strings rounded to two
    decimals, as RobustBench's ``update_json`` writes them, and ``eps`` a string such as ``"8/255"``, as in
    RobustBench's ``model_info`` files. Fewer points than the leaderboard's get a footnote saying how they
    were chosen; a report whose sanity checks failed is refused, or with ``allow_failed_sanity`` exported
    with the failed checks in the footnote."""
    aa = [k for k, d in report["attacks"].items() if d.get("attack") == "autoattack"]
    if not aa:
        raise ValueError("the report has no AutoAttack result: evaluate with `robustkd eval --robustbench` first")
    desc = report["attacks"][aa[0]]
    if desc.get("version") != "standard":
        raise ValueError(f"RobustBench lists AutoAttack version standard; this report ran version "
                         f"{desc.get('version')!r}: re-evaluate with `robustkd eval --robustbench`")
    threat = {"linf": "Linf", "l2": "L2"}.get(str(desc.get("norm")), str(desc.get("norm")))
    dataset = report["task"]["name"]
    protocol = PROTOCOL.get((dataset, threat))
    if protocol is None:
        raise ValueError(f"RobustBench has no {threat} leaderboard for {dataset!r}")
    if abs(float(desc.get("eps", -1)) - protocol["eps"]) > 1e-9:
        raise ValueError(f"the report's budget eps={desc.get('eps')} is not the leaderboard's {protocol['eps']:.6g}: "
                         "re-evaluate with `robustkd eval --robustbench`")
    failed = [c["name"] for c in report.get("sanity", {}).get("checks", []) if c.get("status") == "fail"]
    if failed and not allow_failed_sanity:
        raise ValueError(f"the evaluation's sanity checks failed ({', '.join(failed)}): its robust accuracy cannot be "
                         "trusted; fix the evaluation (see report.html), or export it marked with --allow-failed-sanity")
    note, notes = points_footnote(report, protocol["n_ex"])
    given = footnote or note
    parts = [given] if given else []
    if failed:
        parts.append(f"robustkd's sanity checks failed: {', '.join(failed)}.")
        notes.append(f"exported with failed sanity checks ({', '.join(failed)}), marked in the footnote")
    clean = str(round(report["metrics"]["clean"]["accuracy"] * 100, 2))
    robust = str(round(report["metrics"]["adversarial"][aa[0]]["accuracy"] * 100, 2))
    info = dict.fromkeys(MODEL_INFO_FIELDS)
    info.update(link=link, name=name, authors=authors, additional_data=additional_data, number_forward_passes=1,
                dataset=dataset, venue=venue, architecture=architecture or report["model"].get("name", ""),
                eps=eps_string(protocol["eps"]), clean_acc=clean, reported=reported if reported is not None else robust,
                autoattack_acc=robust, footnote=" ".join(parts) if parts else None)
    return {k: v for k, v in info.items() if v is not None}, threat, notes


def write_model_info(info: dict[str, Any], out_dir: str | Path, model_name: str, threat: str) -> Path:
    """``OUT/model_info/<dataset>/<threat>/<model_name>.json``, RobustBench's layout."""
    path = Path(out_dir) / "model_info" / info["dataset"] / threat / f"{model_name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(info, indent=2) + "\n")
    return path
