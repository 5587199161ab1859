"""`robustkd sweep`: a tiny study of two real recipe runs (small_cnn, 64 CIFAR-10 images, one epoch),
resumed without re-running what finished, and the aggregate recomputed from the cells' reports."""
from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

import pytest
import yaml

from robustkd.cli import main as cli_main
from robustkd.sweep import cell_metrics, load_study, read_cell_report

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def study_file(tmp_path, cifar_dir, monkeypatch) -> Path:
    # the cells are subprocesses: they must import this checkout's robustkd, as the test does
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    study = {
        "description": "two seeds of PGD-AT, tiny",
        "recipe": str(REPO / "recipes" / "cifar_adr.py"),
        "output_dir": str(tmp_path / "study"),
        "seeds": [0, 1],
        "flags": {"data-dir": cifar_dir, "model": "small_cnn", "model-kwargs": {"width": 8}, "epochs": 1,
                  "batch-size": 32, "max-train-samples": 64, "max-eval-samples": 16, "attack-steps": 1,
                  "eval-attacks": "pgd2", "final-attacks": "pgd20", "curve-steps": 2, "cpu": True, "no-progress": True,
                  "awp": False},
        "variants": {"pgd_at": {"label": "PGD-AT", "flags": {"method": "pgd_at"}}},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def test_sweep_runs_resumes_and_aggregates(study_file, tmp_path, capsys):
    out = tmp_path / "study"
    assert cli_main(["sweep", str(study_file), "--dry-run"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 2 and all("--method pgd_at" in line and '--model-kwargs \'{"width": 8}\'' in line
                                     for line in printed)
    assert "--seed 1" in printed[1] and f"--output-dir {out}/pgd_at/seed1" in printed[1]
    assert "--awp" not in printed[0] and "--cpu" in printed[0]  # false leaves a switch out, true gives it
    assert not out.exists()  # a dry run does no work

    assert cli_main(["sweep", str(study_file), "--no-progress"]) == 0
    cells = [out / "pgd_at" / "seed0", out / "pgd_at" / "seed1"]
    reports = [read_cell_report(c) for c in cells]
    assert all(r is not None for r in reports)
    stamp = (cells[0] / "report.json").stat().st_mtime_ns

    # an interrupted sweep: seed 1's report is gone (its checkpoint is still there); seed 0 is finished
    (cells[1] / "report.json").unlink()
    capsys.readouterr()
    assert cli_main(["sweep", str(study_file), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "1 run, 1 already finished (skipped), 0 failed" in text
    assert (cells[0] / "report.json").stat().st_mtime_ns == stamp  # never re-run
    meta = json.loads((cells[1] / "sweep.json").read_text())
    assert meta["returncode"] == 0 and meta["resumed"] and "--resume" in meta["command"]
    assert read_cell_report(cells[1]) is not None

    doc = tmp_path / "page.md"
    doc.write_text("# Results\n\nkept\n<!-- sweep:tiny -->\nold table\n<!-- /sweep:tiny -->\nkept too\n")
    assert cli_main(["sweep", str(study_file), "--report", "--update-doc", str(doc)]) == 0
    results = json.loads((out / "results.json").read_text())
    row, = results["rows"]
    assert row["label"] == "PGD-AT" and row["n_finished"] == 2
    for key in ("clean", "pgd20", "overfitting_gap"):
        values = [cell_metrics(read_cell_report(c))[key] for c in cells]
        assert row["metrics"][key]["n"] == 2
        assert row["metrics"][key]["mean"] == pytest.approx(statistics.fmean(values))
        assert row["metrics"][key]["std"] == pytest.approx(statistics.stdev(values))
    clean = [read_cell_report(c) for c in cells]
    assert row["metrics"]["clean"]["values"] == pytest.approx([r["metrics"]["clean"]["accuracy"] for r in clean])
    md = (out / "results.md").read_text()
    m = row["metrics"]["clean"]
    assert f"{m['mean']:.3f} ± {m['std']:.3f} (n=2)" in md and "robustkd sweep" in md
    page = doc.read_text()
    assert "old table" not in page and md.strip() in page and page.startswith("# Results\n\nkept\n")
    assert page.endswith("<!-- /sweep:tiny -->\nkept too\n") and "--update-doc" in page
    assert (out / "results_scatter.png").stat().st_size > 1000 and (out / "results_curves.png").stat().st_size > 1000
    assert results["curves"]["PGD-AT"]["epoch"] == [1] and results["curves"]["PGD-AT"]["n"] == [2]


def test_bad_study_files_are_refused_before_any_work(tmp_path, capsys, cifar_dir):
    assert cli_main(["sweep", str(tmp_path / "missing.yaml")]) == 2
    assert "no study file" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    cases = [
        ({"recipe": "recipes/cifar_adr.py", "seeds": [0], "variants": {"a": {}}, "seed": 3}, "unknown key(s) seed"),
        ({"recipe": "recipes/nope.py", "seeds": [0], "variants": {"a": {}}}, "does not exist"),
        ({"recipe": str(REPO / "recipes/cifar_adr.py"), "seeds": [0, 0], "variants": {"a": {}}}, "a seed twice"),
        ({"recipe": str(REPO / "recipes/cifar_adr.py"), "seeds": [0], "variants": {"a": {"flags": {"seed": 1}}}},
         "the sweep sets these"),
        ({"recipe": str(REPO / "recipes/cifar_adr.py"), "seeds": [0], "variants": {"a": {}},
          "output_dir": str(tmp_path / "o"), "grid": {"epochs": []}}, "non-empty list"),
    ]
    for study, message in cases:
        bad.write_text(yaml.safe_dump(study))
        assert cli_main(["sweep", str(bad)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_grid_crosses_variants_and_seeds(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump({"recipe": str(REPO / "recipes/cifar_adr.py"), "seeds": [0, 1],
                                    "output_dir": str(tmp_path / "o"),
                                    "variants": {"adr": {"flags": {"method": "adr"}, "ema_label": "ADR + WA"},
                                                 "pgd": {"flags": {"method": "pgd_at"}}},
                                    "grid": {"epochs": [2, 8], "ema_decay": [0.99]}}, sort_keys=False))
    study = load_study(path)
    cells = study.cells()
    assert len(cells) == 2 * 2 * 2
    assert {c.dir.parent.name for c in cells} == {"adr__epochs=2__ema-decay=0.99", "adr__epochs=8__ema-decay=0.99",
                                                  "pgd__epochs=2__ema-decay=0.99", "pgd__epochs=8__ema-decay=0.99"}
    from robustkd.sweep import cell_command

    cmd = cell_command(study, cells[0])
    assert cmd[cmd.index("--epochs") + 1] == "2" and cmd[cmd.index("--ema-decay") + 1] == "0.99"


def test_accelerate_launcher_wraps_each_cell(tmp_path):
    from robustkd.sweep import cell_command

    path = tmp_path / "a.yaml"
    path.write_text(yaml.safe_dump({"recipe": str(REPO / "recipes/cifar_adr.py"), "seeds": [3],
                                    "output_dir": str(tmp_path / "o"), "launcher": "accelerate",
                                    "launch_args": ["--num_processes", 2, "--mixed_precision", "bf16"],
                                    "flags": {"preset": "adr/short-schedule"},
                                    "variants": {"adr": {"flags": {"method": "adr"}}}}, sort_keys=False))
    study = load_study(path)
    cell, = study.cells()
    assert cell_command(study, cell) == [
        "accelerate", "launch", "--num_processes", "2", "--mixed_precision", "bf16", str(REPO / "recipes/cifar_adr.py"),
        "--preset", "adr/short-schedule", "--method", "adr", "--seed", "3", "--output-dir", str(tmp_path / "o/adr/seed3")]


def test_a_cell_another_sweep_is_running_is_left_to_it(tmp_path, capsys):
    import subprocess

    path = tmp_path / "l.yaml"
    path.write_text(yaml.safe_dump({"recipe": str(REPO / "recipes/cifar_adr.py"), "seeds": [0, 1],
                                    "output_dir": str(tmp_path / "o"), "variants": {"adr": {}}}))
    (tmp_path / "o" / "adr" / "seed0").mkdir(parents=True)
    (tmp_path / "o" / "adr" / "seed1").mkdir(parents=True)
    other = subprocess.Popen(["sleep", "60"])
    try:
        (tmp_path / "o" / "adr" / "seed0" / "sweep.lock").write_text(f"{other.pid}\n")
        (tmp_path / "o" / "adr" / "seed1" / "sweep.lock").write_text("999999999\n")  # a dead sweep's stale lock
        assert cli_main(["sweep", str(path), "--dry-run"]) == 0
        printed = capsys.readouterr().out.strip().splitlines()
        assert len(printed) == 1 and "--seed 1" in printed[0]
    finally:
        other.kill()
        other.wait()


FAKE_RECIPE = '''
import argparse, json, os, sys, time
from pathlib import Path
p = argparse.ArgumentParser()
p.add_argument("--output-dir"); p.add_argument("--seed", type=int); p.add_argument("--fail-seed", type=int, default=-1)
p.add_argument("--teacher"); p.add_argument("--resume", action="store_true"); p.add_argument("--sleep", type=float)
p.add_argument("--bonus", type=float, default=0.0)
a = p.parse_args()
out = Path(a.output_dir); out.mkdir(parents=True, exist_ok=True)
start = time.time()
time.sleep(a.sleep or 0)
(out / "env.json").write_text(json.dumps({"threads": os.environ.get("OMP_NUM_THREADS"), "teacher": a.teacher,
                                          "start": start, "end": time.time()}))
if a.seed == a.fail_seed:
    sys.exit(1)
if a.teacher and not (Path(a.teacher) / "report.json").is_file():
    sys.exit(3)  # the cell it runs after has not finished
def dist(acc):
    return {"accuracy": acc, "ece": 0.0, "confidence_correct": None, "confidence_wrong": None,
            "reliability": {"edges": [], "count": [], "confidence": [], "accuracy": []}}
def report(clean, adversarial):  # a minimal report of the current schema (docs/evaluation.md)
    return {"schema_version": 1, "robustkd_version": "test", "created": "", "seed": a.seed,
            "task": {"name": "fake", "modality": "speech", "num_classes": 2, "split": "test", "num_examples": 1,
                     "data_dir": None, "threat_model": {}},
            "model": {"name": "fake", "class": "Fake", "num_parameters": 0},
            "attacks": {k: {"attack": "pgd"} for k in adversarial},
            "metrics": {"num_examples": 1, "clean": dist(clean), "adversarial": {
                k: {**dist(v), "kl_clean_adv": 0.0, "agreement": 1.0} for k, v in adversarial.items()}},
            "curve": {"axis": "snr_db", "default_x": None, "attack": {}, "clean_accuracy": clean, "points": [],
                      "large_budget": None},
            "sanity": {"passed": True, "checks": []}, "training": None, "plots": {},
            "environment": {"torch": "", "python": "", "device": "cpu"}, "seconds": 0.0}
(out / "report.json").write_text(json.dumps(report(0.5 + a.seed / 10 + a.bonus, {
    "pgd10:snr_db=30": 0.3, "pgd10:snr_db=40": 0.4 + a.seed / 100})))
'''


def test_after_orders_cells_threads_are_shared_and_attack_columns_are_tabled(tmp_path, capsys, monkeypatch):
    """A variant that distils from another cell (`after:` + `{output_dir}/.../seed{seed}`) runs once that cell has
    finished, and not at all when it failed; parallel cells split the cores; `attack_columns` become columns."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    recipe = tmp_path / "fake_recipe.py"
    recipe.write_text(FAKE_RECIPE)
    out = tmp_path / "o"
    study = {"recipe": str(recipe), "seeds": [0, 1, 2], "output_dir": str(out), "pgd_metric": "pgd10:snr_db=30",
             "attack_columns": {"pgd10:snr_db=40": "SNR 40 dB"},
             "baseline": "teacher",
             "variants": {"student": {"after": "teacher", "flags": {"teacher": "{output_dir}/teacher/seed{seed}",
                                                                   "bonus": 0.05}},
                          "teacher": {"flags": {"fail-seed": 1, "sleep": "{seed}"}}}}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    assert cli_main(["sweep", str(path), "--jobs", "2", "--no-progress"]) == 1  # teacher seed 1 fails
    err = capsys.readouterr().err
    assert "teacher/seed1" in err and "student/seed1" in err
    for seed in (0, 2):
        assert read_cell_report(out / "student" / f"seed{seed}") is not None
        env = json.loads((out / "student" / f"seed{seed}" / "env.json").read_text())
        assert env["teacher"] == str(out / "teacher" / f"seed{seed}")
        assert env["threads"] == str(max(1, (os.cpu_count() or 1) // 2))
    assert not (out / "student" / "seed1" / "env.json").exists()  # never started: its teacher has no report
    # a student starts as soon as its own teacher is done, not after every teacher (seed 2's sleeps 2 s)
    started = json.loads((out / "student" / "seed0" / "env.json").read_text())["start"]
    assert started < json.loads((out / "teacher" / "seed2" / "env.json").read_text())["end"]

    assert cli_main(["sweep", str(path), "--report"]) == 0
    md = (out / "results.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| model"))
    assert header.startswith("| model | clean | pgd10:snr_db=30 | SNR 40 dB |")
    assert "| student | 0.650 ± 0.141 (n=2) | 0.300 ± 0.000 (n=2) | 0.410 ± 0.014 (n=2) |" in md
    # paired by seed against the baseline: +0.05 on clean in both seeds, an interval of width 0
    assert "| +0.050 [+0.050, +0.050] (n=2) | +0.000 [+0.000, +0.000] (n=2) |" in md and "the same seed's model of the baseline, teacher" in md
    assert not (out / "results_curves.png").exists() and "No per-epoch evaluation" in md
    clean = json.loads((out / "results.json").read_text())["rows"][0]["metrics"]["clean"]
    assert clean["values"] == pytest.approx([0.55, 0.75]) and clean["ci95"] == pytest.approx(12.706 * 0.1)  # t(1) * std / sqrt(2)

    # one table onto several pages; a page without the block is refused before any page is touched
    pages = [tmp_path / "a.md", tmp_path / "b.md"]
    pages[0].write_text("A\n<!-- sweep:s -->\nold\n<!-- /sweep:s -->\n")
    pages[1].write_text("B, no block\n")
    args = ["sweep", str(path), "--report", "--update-doc", str(pages[0]), "--update-doc", str(pages[1])]
    assert cli_main(args) == 2
    assert "b.md needs one '<!-- sweep:s -->' line" in capsys.readouterr().err
    assert "old" in pages[0].read_text()
    pages[1].write_text("B\n<!-- sweep:s -->\n<!-- /sweep:s -->\ntail\n")
    assert cli_main(args) == 0
    assert all("| student | 0.650" in p.read_text() and "old" not in p.read_text() for p in pages)
    assert pages[1].read_text().endswith("<!-- /sweep:s -->\ntail\n") and f"--update-doc {pages[1]}" in md + pages[1].read_text()

    # a study can read runs made elsewhere (here: the cells above) beside its own, and pair with them
    ext = tmp_path / "ext.yaml"
    ext.write_text(yaml.safe_dump({"recipe": str(recipe), "seeds": [0, 1, 2], "output_dir": str(tmp_path / "ext"),
                                   "variants": {"t": {"runs": str(out / "teacher"), "label": "old teacher"},
                                                "s": {"runs": str(out / "student"), "baseline": "t"}}}))
    capsys.readouterr()
    assert cli_main(["sweep", str(ext), "--no-progress"]) == 0  # nothing to run: it never runs them
    assert "0 run" in capsys.readouterr().out and not any((out / "teacher" / "seed1").glob("report.json"))
    assert cli_main(["sweep", str(ext), "--report"]) == 0
    assert "| s | 0.650 ± 0.141 (n=2) |" in (tmp_path / "ext" / "results.md").read_text()
    assert "+0.050 [+0.050, +0.050] (n=2)" in (tmp_path / "ext" / "results.md").read_text()

    study["variants"]["student"]["after"] = "nobody"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    assert cli_main(["sweep", str(path)]) == 2
    assert "`after` must name other variants" in capsys.readouterr().err


def test_a_misspelt_flag_is_refused_before_any_cell_runs(tmp_path, capsys, cifar_dir):
    """Every variant's flags are checked against the recipe's own parser, abbreviations off."""
    out = tmp_path / "o"
    base = {"recipe": str(REPO / "recipes/cifar_adr.py"), "seeds": [0], "output_dir": str(out),
            "flags": {"data-dir": cifar_dir, "epochs": 1}}
    bad = tmp_path / "bad.yaml"
    cases = [({"ok": {"flags": {"method": "pgd_at"}}, "typo": {"flags": {"epoch": 2}}}, "no flag --epoch"),
             ({"short": {"flags": {"max-train": 64}}}, "no flag --max-train"),  # no abbreviations
             ({"a": {"flags": {"epochs": "two"}}}, "--epochs 'two' is refused"),
             ({"a": {"flags": {"optimizer": "adam"}}}, "--optimizer 'adam' is not one of"),
             ({"a": {"flags": {"lr": True}}}, "--lr takes a value")]
    for variants, message in cases:
        bad.write_text(yaml.safe_dump({**base, "variants": variants}))
        assert cli_main(["sweep", str(bad), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and message in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()  # refused before any cell ran
    bad.write_text(yaml.safe_dump({**base, "variants": {"typo": {"flags": {"epoch": 2}}}}))
    assert cli_main(["sweep", str(bad), "--dry-run"]) == 2
    assert "did you mean --epochs" in capsys.readouterr().err


def test_report_without_finished_runs_keeps_the_measured_tables(tmp_path, capsys, cifar_dir):
    """`--report` (with or without `--update-doc`) on a study none of whose runs finished here is refused in
    one line, and the results already there (e.g. docs/results/<study>/ on a fresh clone) are left as they are."""
    results = tmp_path / "docs_results"
    results.mkdir()
    kept = {"results.json": '{"cells": [{"view": "model", "finished": true}]}', "results.md": "measured table\n",
            "results_curves.png": "png", "results_scatter.png": "png"}
    for name, text in kept.items():
        (results / name).write_text(text)
    doc = tmp_path / "page.md"
    doc.write_text("<!-- sweep:study -->\nmeasured\n<!-- /sweep:study -->\n")
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({"recipe": str(REPO / "recipes/cifar_adr.py"), "seeds": [0, 1],
                                     "output_dir": str(tmp_path / "runs"), "results_dir": str(results),
                                     "variants": {"a": {"flags": {"epochs": 1}}}}))
    for extra in ([], ["--update-doc", str(doc)]):
        assert cli_main(["sweep", str(study), "--report", *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: no run of") and "0 of 2" in err and len(err.strip().splitlines()) == 1
        assert {p.name: p.read_text() for p in results.iterdir()} == kept
        assert doc.read_text() == "<!-- sweep:study -->\nmeasured\n<!-- /sweep:study -->\n"


def test_a_cell_with_an_unversioned_report_is_refused_with_what_to_do(tmp_path, capsys):
    """A report without schema_version (an older robustkd recipe's) is neither re-run over nor tabled: the sweep,
    its dry run and --report stop with one line naming the file and the way to measure the run again."""
    recipe = tmp_path / "fake_recipe.py"
    recipe.write_text(FAKE_RECIPE)
    out = tmp_path / "o"
    path = tmp_path / "u.yaml"
    path.write_text(yaml.safe_dump({"recipe": str(recipe), "seeds": [0, 1], "output_dir": str(out),
                                    "variants": {"old": {}}}))
    (out / "old" / "seed0").mkdir(parents=True)
    old = out / "old" / "seed0" / "report.json"
    old.write_text(json.dumps({"clean_accuracy": 0.5, "robust_accuracy": {"pgd20": 0.3}}))
    for args in (["--dry-run"], ["--no-progress"], ["--report"]):
        assert cli_main(["sweep", str(path), *args]) == 2
        captured = capsys.readouterr()
        errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
        err = errors[-1]  # (the sweep first warns that it cannot check a script's flags: not a robustkd Recipe)
        assert len(errors) == 1 and err.startswith(f"error: {old} is an unversioned report"), captured.err
        assert f"robustkd eval --checkpoint {old.parent}" in err
        assert "--seed" not in captured.out  # nothing was run or printed as to run
    assert not (out / "old" / "seed1").exists() and not (out / "results.json").exists()
