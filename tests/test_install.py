"""What a fresh install gives: the core without any extra, and one clear line when an extra is missing.

The extras are simulated as absent by putting ``None`` in ``sys.modules`` (an import then fails as it
does when the package is not installed) in a child process that runs the entry point a user runs.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[1]


def _project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _name(req: str) -> str:
    import re

    return re.split(r"[\s<>=!~\[;]", req, maxsplit=1)[0].lower()


def test_core_dependencies_are_ranges_without_any_modality_extra():
    deps = _project()["dependencies"]
    names = {_name(d) for d in deps}
    assert not names & {"torchaudio", "soundfile", "textattack", "robustbench", "peft", "pyarrow"}
    assert all("==" not in d for d in deps), "the core takes ranges with a tested minimum, not exact pins"
    transformers = next(d for d in deps if _name(d) == "transformers")
    assert "<5" not in transformers.replace(" ", ""), "the transformers < 5 cap belongs to the text extra only"
    extras = _project()["optional-dependencies"]
    assert {_name(d) for d in extras["speech"]} == {"torchaudio", "soundfile"}
    assert "textattack" in {_name(d) for d in extras["text"]}
    assert any(_name(d) == "transformers" and "<5" in d.replace(" ", "") for d in extras["text"])


def test_version_has_one_source():
    import importlib.metadata

    import robustkd

    assert "version" in _project()["dynamic"] and "version" not in _project()
    assert importlib.metadata.version("robustkd") == robustkd.__version__


def test_ci_installs_from_the_committed_lock():
    lock = (REPO / ".ci" / "constraints.txt").read_text().splitlines()
    pins = {line.split("==")[0].lower(): line.split("==")[1] for line in lock if "==" in line}
    for pkg in ("torch", "torchvision", "torchaudio", "transformers", "timm", "accelerate"):
        assert pkg in pins, f"{pkg} is not pinned in .ci/constraints.txt"
    assert "-c .ci/constraints.txt" in (REPO / ".ci" / "run").read_text()


def _run_without(modules: list[str], code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    prelude = "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in modules)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", prelude + code], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)


def test_robustkd_list_works_without_the_speech_and_text_extras(tmp_path):
    done = _run_without(["torchaudio", "soundfile", "textattack"],
                        "from robustkd.cli import main; sys.exit(main(['list']))", tmp_path)
    assert done.returncode == 0, done.stderr
    assert "fsdd" in done.stdout and "cifar10" in done.stdout


def test_speech_recipe_without_the_speech_extra_is_one_line_naming_the_install(tmp_path, shared):
    code = ("import runpy; sys.argv = ['speech_adr.py', '--data-dir', {data!r}, '--epochs', '1', '--output-dir', "
            "'out']; runpy.run_path({recipe!r}, run_name='__main__')").format(
        data=str(shared / "data" / "fsdd"), recipe=str(REPO / "recipes" / "speech_adr.py"))
    done = _run_without(["torchaudio", "soundfile"], code, tmp_path)
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and lines[0].startswith("error:") and '.[speech]' in lines[0], lines
    assert not (tmp_path / "out").exists(), "refused before any work"


def test_sst2_recipe_without_the_text_extra_is_one_line_naming_the_install(tmp_path, shared):
    code = ("import runpy; sys.argv = ['sst2_adr.py', '--model', {model!r}, '--data-dir', {data!r}, '--epochs', '1', "
            "'--output-dir', 'out']; runpy.run_path({recipe!r}, run_name='__main__')").format(
        model=str(shared / "models" / "all-MiniLM-L6-v2"), data=str(shared / "data" / "sst2" / "data"),
        recipe=str(REPO / "recipes" / "sst2_adr.py"))
    done = _run_without(["textattack"], code, tmp_path)
    lines = [ln for ln in done.stderr.splitlines() if ln.startswith("error:")]
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1, done.stderr
    assert '.[text]' in lines[0], lines
    assert not (tmp_path / "out").exists(), "refused before any work"


@pytest.mark.parametrize("module", ["torchaudio", "soundfile"])
def test_require_names_the_extra(module):
    from robustkd.extras import MissingExtraError, require

    saved = sys.modules.get(module)
    sys.modules[module] = None  # type: ignore[assignment]
    try:
        with pytest.raises(MissingExtraError, match=r'pip install -e "\.\[speech\]"'):
            require(module, purpose="the test")
    finally:
        if saved is None:
            sys.modules.pop(module, None)
        else:
            sys.modules[module] = saved


# -- CI: linters, type checker, then the tests ----------------------------------------------------
def _readme_test_command() -> str:
    for line in (REPO / "README.md").read_text().splitlines():
        command, _, comment = line.partition("#")
        if "run the tests" in comment:
            return command.strip()
    raise AssertionError("the README names no test command (a line commented '# run the tests')")


def _fake_tools(tmp_path: Path, failing: str | None) -> dict[str, str]:
    """``ruff``, ``mypy`` and the README's test command as scripts that log their arguments (``failing``
    exits 1), first on PATH, so .ci/checks runs for real without linting or testing anything."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    for tool in ("ruff", "mypy", _readme_test_command().split()[0]):
        script = bin_dir / tool
        script.write_text(f'#!/bin/sh\necho "{tool} $*" >> "{log}"\nexit {1 if tool == failing else 0}\n')
        script.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


def _run_checks(tmp_path: Path, failing: str | None = None) -> tuple[subprocess.CompletedProcess, list[str]]:
    done = subprocess.run(["bash", str(REPO / ".ci" / "checks")], env=_fake_tools(tmp_path, failing),
                          capture_output=True, text=True, timeout=60)
    log = tmp_path / "calls.log"
    return done, log.read_text().splitlines() if log.exists() else []


def test_ci_checks_run_ruff_and_mypy_then_the_readme_test_command(tmp_path):
    done, calls = _run_checks(tmp_path)
    assert done.returncode == 0, done.stderr
    # mypy without arguments: what it checks is [tool.mypy] in pyproject.toml
    assert [c.strip() for c in calls] == ["ruff check .", "mypy", _readme_test_command()], calls


@pytest.mark.parametrize("failing", ["ruff", "mypy"])
def test_ci_checks_stop_at_the_first_failing_linter_with_one_clear_line(tmp_path, failing):
    done, calls = _run_checks(tmp_path, failing)
    assert done.returncode != 0
    assert calls[-1].split()[0] == failing, calls  # nothing after it ran: no tests
    errors = [ln for ln in done.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and failing in errors[0], done.stderr


def test_linters_are_configured_pinned_and_cover_the_task_plugins():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert {"ruff", "mypy"} <= {_name(d) for d in _project()["optional-dependencies"]["dev"]}
    lock = (REPO / ".ci" / "constraints.txt").read_text().splitlines()
    pinned = {line.split("==")[0].lower() for line in lock if "==" in line}
    assert {"ruff", "mypy"} <= pinned, "ruff and mypy are pinned in .ci/constraints.txt"
    assert "ruff" in pyproject["tool"] and "mypy" in pyproject["tool"]
    # the plug-in package robustkd_tasks is the folder tasks/: mypy with no arguments checks it and the core
    folder = pyproject["tool"]["setuptools"]["package-dir"]["robustkd_tasks"]
    assert {"robustkd", folder} <= set(pyproject["tool"]["mypy"]["files"])
