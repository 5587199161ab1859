"""The README's commands, run in order as a new user would copy them (offline, from a fresh folder),
at small sizes: each line must do what it says, and read what the lines before it wrote.

Every command of the README's ``bash`` blocks is classified below; a new line must be classified
too (the test fails on an unknown one). Training lines run with flags appended that make them tiny
(argparse: the last value of a flag wins); lines that would take too long for CI (the SST-2 and
speech recipes) are checked with ``--print-config`` (flags, preset and paths resolve).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"

# appended to training lines: a tiny run of the same recipe (last value wins)
TINY = ["--model", "small_cnn", "--model-kwargs", '{"width": 8}', "--epochs", "1", "--max-train-samples", "64",
        "--max-eval-samples", "16", "--batch-size", "32", "--attack-steps", "1", "--eval-attacks", "pgd2",
        "--final-attacks", "pgd2", "--curve-steps", "1", "--cpu", "--no-progress"]
TINY_EVAL = ["--max-eval-samples", "16", "--curve-factors", "0,1", "--curve-steps", "1", "--cpu", "--no-progress"]


def readme_commands() -> list[str]:
    """Every command of the README's bash blocks, continuation lines joined, comments dropped."""
    text = README.read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(shlex.join(words))
    return commands


def plan(argv: list[str]) -> tuple[str, list[str]]:
    """(how, argv to run): ``skip`` (the install and the test suite themselves), ``env``, ``run``,
    ``check`` (``--print-config``), ``refused`` (must exit 2 with one line)."""
    if argv[0] == "pip" or argv == ["pytest"]:
        return "skip", argv
    if argv[0] == "export":
        return "env", argv[1:]
    if argv[:2] == ["accelerate", "launch"]:  # one process: the recipe itself (the launcher is tested below)
        rest = argv[2:]
        while rest and rest[0].startswith("-"):
            rest = rest[2:] if rest[0] in ("--mixed_precision", "--num_processes") else rest[1:]
        argv = ["python", *rest]
    if argv[0] == "python" and argv[1].startswith("recipes/"):
        recipe = Path(argv[1]).name
        if "--print-config" in argv or "--help" in argv:
            return "run", argv
        if recipe in ("sst2_adr.py", "speech_adr.py"):
            return "check", [*argv, "--print-config"]
        return "run", [*argv, *TINY, *(["--compile", "false"] if "--compile" in argv else [])]
    if argv[0] == "robustkd":
        sub = argv[1]
        if sub == "eval":
            extra = ["--attacks", "pgd:steps=1", "--max-eval-samples", "4"] if "resnet18" in " ".join(argv) else []
            return "run", [*argv, *TINY_EVAL, *extra]
        if sub == "sweep" and "--report" in argv:
            return "refused", argv  # no run of the study has finished here: the committed tables stay
        if sub in ("presets", "list", "compare", "push", "sweep"):
            return "run", argv
    raise AssertionError(f"README line not classified in tests/test_readme.py: {shlex.join(argv)}")


def test_readme_commands_chain(tmp_path, shared):
    """The README top to bottom in a fresh folder (recipes/, studies/ and docs/ from the checkout,
    ../shared the test data): every line succeeds, later lines find what earlier ones wrote."""
    for name in ("recipes", "studies", "docs"):
        (tmp_path / name).symlink_to(REPO / name)
    results = REPO / "docs" / "results" / "cifar_subset"
    committed = {p.name: p.read_bytes() for p in results.iterdir() if p.is_file()}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    for k in ("ROBUSTKD_SHARED", "NLTK_DATA", "HF_HUB_OFFLINE"):
        env.pop(k, None)  # the README's export line must set what its lines need
    done: dict[str, subprocess.CompletedProcess] = {}
    for command in readme_commands():
        argv = [w.replace("../shared", str(shared)) for w in shlex.split(command)]
        how, argv = plan(argv)
        if how == "skip":
            continue
        if how == "env":
            env.update(dict(a.split("=", 1) for a in argv))
            continue
        exe = [sys.executable] + argv[1:] if argv[0] == "python" else [sys.executable, "-m", "robustkd", *argv[1:]]
        proc = subprocess.run(exe, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        done[command] = proc
        if argv[:2] == ["robustkd", "eval"]:  # at these sizes a sanity check may fail: 3, with the report written
            assert proc.returncode in (0, 3), (command, proc.stderr[-3000:])
            continue
        if how == "refused":
            assert proc.returncode == 2, (command, proc.stderr[-2000:])
            assert proc.stderr.startswith("error:") and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        else:
            assert proc.returncode == 0, (command, proc.stdout[-1500:], proc.stderr[-3000:])

    def output(prefix: str) -> subprocess.CompletedProcess:
        return next(p for c, p in done.items() if c.startswith(prefix))

    runs = tmp_path / "runs"
    # the main job and the smoke run: weights, reports, the page; each epoch's line is printed
    for run in ("cifar_adr", "adr1", "bmtard", "cifar_adr_fast"):
        assert (runs / run / "report.json").exists() and (runs / run / "report.html").exists(), run
    smoke = output("accelerate launch recipes/cifar_adr.py --preset adr/short-schedule")
    assert re.search(r"^epoch 1 \| loss \d", smoke.stderr, flags=re.M), smoke.stderr[-2000:]
    assert "[RANK 0]" not in smoke.stderr
    fast = json.loads((runs / "cifar_adr_fast" / "report.json").read_text())
    assert fast["run"]["config_file"].endswith("runs/cifar_adr/config.yaml")
    # the evaluations: the EMA copy by default, a checkpoint of the run, a pretrained model
    ema_eval = json.loads((runs / "adr1-eval" / "report.json").read_text())
    assert ema_eval["model"]["which"] == "ema"
    epoch1 = json.loads((runs / "adr1-epoch1" / "report.json").read_text())
    assert epoch1["model"]["which"] == "student" and epoch1["model"]["checkpoint"].endswith("checkpoints/epoch-1")
    assert (runs / "resnet18-eval" / "report.json").exists()
    compared = output("robustkd compare").stdout
    assert "compared like with like" in compared and "EMA copy" in compared
    assert len(compared.split("metric ")[0].splitlines()) < 15  # the settings noise is one line per side
    assert "ready-to-push folder" in output("robustkd push").stdout
    assert (runs / "adr1" / "hub" / "README.md").exists()
    assert len(output("robustkd sweep studies/cifar_subset.yaml --dry-run").stdout.splitlines()) >= 2
    assert {p.name: p.read_bytes() for p in results.iterdir() if p.is_file()} == committed


def test_a_bad_flag_under_accelerate_launch_is_one_line(tmp_path, cifar_dir):
    """What the README's notes say about `accelerate launch`: with -q, the recipe's one `error:` line and no
    traceback (the launcher's status is 1); the recipe itself, without the launcher, exits 2."""
    recipe = str(REPO / "recipes" / "cifar_adr.py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    direct = subprocess.run([sys.executable, recipe, "--data-dir", cifar_dir, "--epochz", "1"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=300)
    assert direct.returncode == 2 and "--epochz" in direct.stderr and "Traceback" not in direct.stderr
    launched = subprocess.run(["accelerate", "launch", "-q", "--num_processes", "1", "--num_machines", "1",
                               "--mixed_precision", "no", "--dynamo_backend", "no", recipe, "--data-dir", cifar_dir,
                               "--epochz", "1"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert launched.returncode == 1, launched.stderr[-2000:]
    assert "Traceback" not in launched.stderr and "CalledProcessError" not in launched.stderr
    assert launched.stderr.count("--epochz") == direct.stderr.count("--epochz")  # printed once, not twice
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("line", [c for c in readme_commands() if c.startswith(("robustkd", "python", "accelerate"))])
def test_every_readme_line_is_classified(line):
    assert plan(shlex.split(line))[0] in ("run", "check", "refused")


def test_the_plugin_walkthrough_runs_as_written(tmp_path):
    """docs/plugins.md: my_plugin.py and test_my_plugin.py as the page gives them, `pytest test_my_plugin.py`
    in their folder (nothing installed, nothing imported beforehand), and a pyproject.toml that names the
    module to install."""
    import tomllib

    text = (REPO / "docs" / "plugins.md").read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```python\n")[1:]]
    for name in ("my_plugin.py", "test_my_plugin.py"):
        (tmp_path / name).write_text("\n".join(b for b in blocks if b.startswith(f"# {name}")))
    toml = tomllib.loads(text.split("```toml\n", 1)[1].split("```", 1)[0])
    assert toml["tool"]["setuptools"]["py-modules"] == ["my_plugin"] and "build-system" in toml
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_my_plugin.py"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "2 passed" in done.stdout


def test_a_recipe_prints_its_status_lines(tmp_path, cifar_dir):
    """What the README says a run prints: one line per epoch, and where --resume resumed from."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    base = [sys.executable, str(REPO / "recipes" / "cifar_adr.py"), "--data-dir", cifar_dir, *TINY,
            "--output-dir", str(tmp_path / "run")]
    first = subprocess.run([*base, "--epochs", "1"], env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert re.search(r"^epoch 1 \| loss \d.* \| clean \d", first.stderr, flags=re.M), first.stderr[-2000:]
    again = subprocess.run([*base, "--epochs", "2", "--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {tmp_path / 'run' / 'checkpoints' / 'epoch-1'} (epoch 1" in again.stderr
    assert re.search(r"^epoch 2 \| loss", again.stderr, flags=re.M) and not re.search(r"^epoch 1 \|", again.stderr,
                                                                                          flags=re.M)
