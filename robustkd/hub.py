"""Run directories on the Hugging Face Hub: ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub``
through ``huggingface_hub.ModelHubMixin``, with a model card written from the run's report.

    from robustkd.hub import RobustKDRun
    run = RobustKDRun.from_pretrained("runs/adr")            # a run directory, or a Hub repo id
    run.save_pretrained("runs/adr-hub")                      # weights, robustkd.json, reports, README.md
    run.push_to_hub("me/cifar10-adr")                        # online
    model = run.load_model(task)                             # the EMA model when the run kept one

The folder holds the run's ``model.safetensors`` (student), ``ema.safetensors`` (EMA / weight
average, when kept), ``robustkd.json`` and ``config.json`` (how to rebuild the model), ``report.json`` and, when the run
was evaluated with ``robustkd eval``, ``eval_report.json``; ``README.md`` is the model card with the
measured accuracies and calibration in the Hub's ``model-index`` metadata.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData, ModelHubMixin
from huggingface_hub.repocard_data import EvalResult
from torch import nn

from .checkpoint import META_FILE, WEIGHT_FILES, read_meta
from .eval.schema import UnversionedReportError, read_report
from .task import Task

REPORT_FILE = "report.json"
EVAL_REPORT_FILE = "eval_report.json"
COPIED = (META_FILE, *WEIGHT_FILES.values(), REPORT_FILE, EVAL_REPORT_FILE, "metrics.jsonl")


class RobustKDRun(ModelHubMixin, library_name="robustkd",
                  tags=["adversarial-robustness", "knowledge-distillation", "robustkd"]):
    """A recipe's output directory as a Hub model. ``eval_dir``: a ``robustkd eval --output-dir`` of this
    run, whose report (clean / adversarial accuracy, ECE) goes into the model card."""

    def __init__(self, run_dir: str | Path, eval_dir: str | Path | None = None):
        self.run_dir = Path(run_dir).expanduser()
        self.meta = read_meta(self.run_dir)
        if not any((self.run_dir / f).exists() for f in WEIGHT_FILES.values()):
            raise FileNotFoundError(f"{self.run_dir} has no {' or '.join(WEIGHT_FILES.values())}: the run did not finish")
        self.eval_report = None
        if eval_dir is not None:
            path = Path(eval_dir).expanduser()
            path = path / REPORT_FILE if path.is_dir() else path
            if not path.exists():
                raise FileNotFoundError(f"no evaluation report at {path}: pass the --output-dir of `robustkd eval`")
            self.eval_report = read_report(path)
        elif (self.run_dir / EVAL_REPORT_FILE).exists():
            self.eval_report = read_report(self.run_dir / EVAL_REPORT_FILE)
        self.report: dict[str, Any] = {}
        if (self.run_dir / REPORT_FILE).exists():
            try:
                self.report = read_report(self.run_dir / REPORT_FILE)
            except UnversionedReportError as exc:
                raise UnversionedReportError(
                    f"{self.run_dir / REPORT_FILE} is an unversioned report (no schema_version; an older robustkd "
                    "recipe wrote it), which the model card is not built from: re-run the recipe with this robustkd, "
                    f"or move that report.json aside and push with --eval EVAL_DIR from `robustkd eval --checkpoint "
                    f"{self.run_dir} --output-dir EVAL_DIR`") from exc

    # -- the mixin's two hooks -------------------------------------------------------------------
    def _save_pretrained(self, save_directory: Path) -> None:
        for name in COPIED:
            src = self.run_dir / name
            if src.exists() and src.resolve() != (save_directory / name).resolve():
                shutil.copy2(src, save_directory / name)
        if self.eval_report is not None:
            (save_directory / EVAL_REPORT_FILE).write_text(json.dumps(self.eval_report, indent=2, default=str))
        # the Hub's config.json: how to rebuild the model (the mixin would otherwise record local paths)
        (save_directory / "config.json").write_text(json.dumps(self.meta, indent=2, default=str))

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: str | None, cache_dir: str | Path | None,
                         force_download: bool, proxies: dict | None, resume_download: bool | None,
                         local_files_only: bool, token: str | bool | None, **kwargs: Any) -> RobustKDRun:
        path = Path(model_id).expanduser()
        if not path.is_dir():
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(repo_id=model_id, revision=revision, cache_dir=cache_dir,
                                          force_download=force_download, local_files_only=local_files_only,
                                          token=token))
        return cls(path, eval_dir=kwargs.get("eval_dir"))

    # -- using it ----------------------------------------------------------------------------------
    def load_model(self, task: Task | None = None, which: str = "auto", data_dir: str | None = None) -> nn.Module:
        """The trained model (EMA when kept, with ``which="auto"``) for ``task`` (default: the recorded one)."""
        from .checkpoint import load_model
        from .registry import TASKS

        if task is None:
            task = TASKS.get(self.meta["task"])(data_dir=data_dir)
        return load_model(self.run_dir, task, which)  # type: ignore[arg-type]

    def generate_model_card(self, *args: Any, **kwargs: Any) -> ModelCard:
        return model_card(self.meta, self.report, self.eval_report)


# -- the model card ----------------------------------------------------------------------------------
def _report_rows(report: dict[str, Any], tag: str) -> list[dict[str, Any]]:
    """Rows of a (schema-v1) report's metrics: clean and per-attack accuracy and ECE, the worst case."""
    m = report["metrics"]
    rows = [{"name": f"clean accuracy{tag}", "type": "accuracy", "value": m["clean"]["accuracy"]},
            {"name": f"clean ECE{tag}", "type": "ece", "value": m["clean"]["ece"]}]
    for spec, d in m.get("adversarial", {}).items():
        rows.append({"name": f"robust accuracy, {spec}{tag}", "type": "accuracy", "value": d["accuracy"]})
        rows.append({"name": f"ECE under {spec}{tag}", "type": "ece", "value": d["ece"]})
    if "worst_case" in m:
        rows.append({"name": f"worst-case robust accuracy{tag}", "type": "accuracy",
                     "value": m["worst_case"]["accuracy"]})
    return rows


def _which_tag(report: dict[str, Any]) -> str:
    which = report.get("model", {}).get("which") or ""
    return f" ({which} model)" if which else ""


def _results(meta: dict[str, Any], report: dict[str, Any], eval_report: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Rows (name, metric type, value) of what was measured: the eval report's when there is one, else the
    training run's final evaluation (its ``ema`` section's headline figures first, when the run kept an EMA
    copy, then the student's figures). Both reports are schema-v1 (read by ``robustkd.eval.schema.read_report``)."""
    if eval_report is not None:
        return _report_rows(eval_report, _which_tag(eval_report))
    if not report:
        return []
    rows: list[dict[str, Any]] = []
    ema = report.get("ema")
    if isinstance(ema, dict) and "clean_accuracy" in ema:  # the recipe's headline of the EMA copy's report
        rows.append({"name": "clean accuracy (EMA model)", "type": "accuracy", "value": ema["clean_accuracy"]})
        for spec, acc in (ema.get("robust_accuracy") or {}).items():
            rows.append({"name": f"robust accuracy, {spec} (EMA model)", "type": "accuracy", "value": acc})
    return rows + _report_rows(report, _which_tag(report))


def model_card(meta: dict[str, Any], report: dict[str, Any], eval_report: dict[str, Any] | None = None) -> ModelCard:
    """A Hub model card: metadata (``model-index`` with every measured figure) and a readable summary."""
    run = report.get("run") if isinstance(report.get("run"), dict) else None  # the recipe's configuration section
    task = meta.get("task") or (report.get("task") or {}).get("name") or "unknown"
    method = meta.get("method") or (report.get("model") or {}).get("method") or "unknown"
    preset = meta.get("preset") or (report.get("model") or {}).get("preset") or (run or {}).get("preset")
    modality = (eval_report or {}).get("task", {}).get("modality")
    task_type = f"{modality}-classification" if modality else "classification"
    split = (eval_report or {}).get("split", "test")
    rows = _results(meta, report, eval_report)
    evals = [EvalResult(task_type=task_type, dataset_type=task, dataset_name=task, dataset_split=split,
                        metric_type=r["type"], metric_name=r["name"], metric_value=round(float(r["value"]), 4))
             for r in rows]
    name = f"{task}-{meta.get('model', 'model')}-{method}"
    data = ModelCardData(library_name="robustkd", model_name=name, eval_results=evals or None,
                         tags=["adversarial-robustness", "robustkd", method, task], datasets=[task],
                         metrics=sorted({r["type"] for r in rows}) or None)
    data.pipeline_tag = task_type if modality else None
    attacks = (eval_report or report).get("attacks", {})
    lines = [f"# {name}", "",
             f"A `{meta.get('model')}` trained on **{task}** with **{method}**"
             + (f" (preset `{preset}`)" if preset else "") + " by [robustkd](https://pypi.org/project/robustkd/).", "",
             "| measured | value |", "| --- | --- |"]
    lines += [f"| {r['name']} | {float(r['value']):.4f} |" for r in rows] or ["| (not evaluated) | |"]
    if not any(r["type"] == "ece" for r in rows):
        lines += ["", "Calibration (ECE) is measured by `robustkd eval`; pass its output with `robustkd push --eval`."]
    if attacks:
        lines += ["", "Attacks:", ""] + [f"- `{spec}`: " + ", ".join(f"{k}={v}" for k, v in d.items()
                                                                     if k not in ("runtime_checks",))
                                         for spec, d in attacks.items()]
    lines += ["", "## Use", "", "```python", "from robustkd.hub import RobustKDRun", "",
              "run = RobustKDRun.from_pretrained(\"REPO_ID\")", "model = run.load_model()  # the EMA model when kept",
              "```", "", "Inputs are raw values in the task's domain (pixels in [0, 1]); normalisation is inside "
              "the model.", "", "## Training configuration", "", "```json",
              json.dumps(run or meta, indent=2, default=str), "```", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


def offline() -> bool:
    import os

    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def check_repo_id(repo_id: str) -> None:
    """Refuse a repository id the Hub would refuse, before anything is written: ``USER/NAME``, two parts,
    each of letters, digits, ``-``, ``_`` and ``.`` (the Hub's own rule, ``huggingface_hub.utils.validate_repo_id``)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    parts = str(repo_id).split("/")
    if len(parts) != 2 or not all(p.strip() for p in parts):
        problem = (f"it has {len(parts)} parts" if len(parts) != 2 else "a part is empty") + \
            " but the Hub takes two, the user or organisation and the name"
    else:
        try:
            validate_repo_id(repo_id)
            return
        except HFValidationError:
            problem = ("the Hub allows only letters, digits, '-', '_' and '.' (no spaces, no '--' or '..', not "
                       "starting or ending with '-' or '.', at most 96 characters)")
    raise ValueError(f"--repo-id {repo_id!r} is not a Hub repository id: {problem}. Write it as USER/NAME, "
                     "e.g. me/cifar10-adr")


def prepare_push_folder(run: RobustKDRun, folder: Path, overwrite: bool = False) -> Path | None:
    """Refuse a ``--folder`` that is (or holds) the run itself, or that holds anything but this run's own Hub
    folder (another run's weights and reports would be replaced; ``overwrite`` moves it aside instead).
    Returns where an old folder was moved, else None."""
    from .checkpoint import RunDirError, check_unlocked, check_writable, move_aside

    folder = folder.expanduser()
    if folder.resolve() == run.run_dir.resolve() or folder.resolve() in run.run_dir.resolve().parents:
        raise RunDirError(f"--folder {folder} is the run {run.run_dir} (or holds it): the Hub folder is a copy, "
                          "written elsewhere. Choose another --folder (default: RUN/hub)")
    check_writable(folder, what="--folder")
    check_unlocked(folder, "--folder")
    if not folder.is_dir() or not any(folder.iterdir()):
        return None
    try:
        ours = json.loads((folder / META_FILE).read_text()) == json.loads(json.dumps(run.meta, default=str))
    except (OSError, ValueError):
        ours = False
    if ours and not (folder / "checkpoints").exists():
        return None  # this run's own Hub folder, written again
    if not overwrite:
        names = sorted(p.name for p in folder.iterdir())
        what = "another run" if (folder / META_FILE).exists() or any(
            (folder / f).exists() for f in (*WEIGHT_FILES.values(), REPORT_FILE, "checkpoints")) else "other files"
        raise RunDirError(f"--folder {folder} holds {what} ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''}), "
                          f"whose files this push would replace: choose an empty --folder, or pass --overwrite to move "
                          f"it aside to {folder.name}.old-<time>")
    return move_aside(folder)


def push_run(run_dir: str | Path, repo_id: str, *, eval_dir: str | Path | None = None, folder: str | Path | None = None,
             private: bool | None = None, overwrite: bool = False) -> tuple[Path, str | None]:
    """Write the Hub folder (``folder``, default ``RUN/hub``) and push it to ``repo_id`` when online.
    A ``repo_id`` the Hub would refuse, or a ``folder`` holding another run (unless ``overwrite``, which moves
    it aside), is refused before anything is written. Returns (the folder, the commit URL or None when offline)."""
    check_repo_id(repo_id)
    run = RobustKDRun(run_dir, eval_dir)
    folder = Path(folder) if folder is not None else run.run_dir / "hub"
    moved = prepare_push_folder(run, folder, overwrite)
    if moved is not None:
        logging.getLogger("robustkd.hub").warning(f"moved what {folder} held aside to {moved} (--overwrite)")
    run.save_pretrained(folder)
    if offline():
        return folder, None
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    url = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message="robustkd push")
    return folder, str(url)
