"""Running a study (``robustkd sweep STUDY``): every unfinished cell as its own recipe process, ``jobs``
at a time, resumably. A finished cell is never run again, an interrupted one continues from its last
checkpoint (``--resume``), a cell another sweep is running (its ``sweep.lock`` names a live process) is
left to it, and a variant with ``after:`` waits for the same seed's cells it names."""
from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .study import CELL_FILE, Cell, Study, cell_meta, check_flags, read_cell_report

logger = logging.getLogger(__name__)

LOG_FILE = "sweep.log"
LOCK_FILE = "sweep.lock"


def _expand(value: str, cell: Cell | None, study: Study | None) -> str:
    value = os.path.expandvars(value)
    if cell is not None:
        value = value.replace("{seed}", str(cell.seed))
    if study is not None:
        value = value.replace("{output_dir}", str(study.output_dir))
    return value


def _flag_args(flags: Mapping[str, Any], cell: Cell | None = None, study: Study | None = None) -> list[str]:
    """``{seed}`` in a value is the cell's seed and ``{output_dir}`` the study's output directory, so a variant
    can name another cell's run, e.g. ``robust-teacher: "{output_dir}/pgd_at/seed{seed}"``."""
    args: list[str] = []
    for key, value in flags.items():
        if value is None or value is False:
            continue
        if value is True:
            args.append(f"--{key}")
        elif isinstance(value, (dict, list)):
            args += [f"--{key}", json.dumps(value)]
        else:
            args += [f"--{key}", _expand(str(value), cell, study)]
    return args


def cell_command(study: Study, cell: Cell, resume: bool = False) -> list[str]:
    """The command line that runs ``cell``: study flags, then the variant's, then the grid point's."""
    flags = {**study.flags, **cell.variant.flags, **cell.grid}
    head = ([sys.executable, str(study.recipe)] if study.launcher == "python" else
            ["accelerate", "launch", *study.launch_args, str(study.recipe)])
    return [*head, *_flag_args(flags, cell, study), "--seed", str(cell.seed), "--output-dir", str(cell.dir),
            *(["--resume"] if resume else [])]


def _locked_by_other(run_dir: Path) -> int | None:
    """The pid of a live process on this machine that holds the cell's lock (another sweep running it)."""
    try:
        pid = int((run_dir / LOCK_FILE).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    if pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None  # a stale lock from a sweep that died
    except PermissionError:
        return pid
    return pid


def _run_cell(study: Study, cell: Cell, threads: int | None = None) -> tuple[Cell, int | None, float]:
    cell.dir.mkdir(parents=True, exist_ok=True)
    if read_cell_report(cell.dir) is not None or _locked_by_other(cell.dir):
        return cell, None, 0.0  # finished or taken by another sweep since the list was made
    resume = (cell.dir / "checkpoints").is_dir() and any((cell.dir / "checkpoints").iterdir())
    cmd = cell_command(study, cell, resume=resume)
    started = time.perf_counter()
    (cell.dir / LOCK_FILE).write_text(f"{os.getpid()}\n")  # this sweep runs the cell while it is alive
    with open(cell.dir / LOG_FILE, "a") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env).returncode
    (cell.dir / LOCK_FILE).unlink(missing_ok=True)
    seconds = time.perf_counter() - started
    previous = cell_meta(cell.dir)
    meta = {"command": shlex.join(cmd), "returncode": rc, "seconds": seconds,
            "seconds_total": previous.get("seconds_total", 0.0) + seconds, "resumed": resume,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (cell.dir / CELL_FILE).write_text(json.dumps(meta, indent=2))
    return cell, rc, seconds


@dataclass
class SweepOutcome:
    ran: list[str]
    skipped: list[str]
    failed: list[tuple[str, int, Path]]
    seconds: float


def run_sweep(study: Study, jobs: int = 1, dry_run: bool = False, progress: bool = True) -> SweepOutcome:
    """Run every unfinished cell (``jobs`` at a time); finished cells are skipped, never re-run."""
    from tqdm.auto import tqdm

    check_flags(study)  # a misspelt flag fails here, before any cell runs
    cells = study.cells()
    for cell in [c for c in cells if c.variant.runs is not None and read_cell_report(c.dir) is None]:
        logger.warning("no finished run at %s (variant %s reads runs made elsewhere; the sweep does not run it)",
                       cell.dir, cell.variant.name)
    cells = [c for c in cells if c.variant.runs is None]
    todo = [c for c in cells if read_cell_report(c.dir) is None]
    skipped = [c.key for c in cells if c not in todo]
    for key in skipped:
        logger.info("finished already, skipped: %s", key)
    for cell in [c for c in todo if _locked_by_other(c.dir)]:
        logger.info("being run by another process (%s), skipped: %s", cell.dir / LOCK_FILE, cell.key)
        todo.remove(cell)
        skipped.append(cell.key)
    if dry_run:
        for cell in todo:
            print(shlex.join(cell_command(study, cell)))
        return SweepOutcome([], skipped, [], 0.0)
    started = time.perf_counter()
    ran, failed = [], []
    # `jobs` processes share the machine: unless the user chose OMP_NUM_THREADS, each gets an equal share
    # of the cores instead of every process starting one thread per core (oversubscription is slower)
    threads = None if jobs <= 1 or "OMP_NUM_THREADS" in os.environ else max(1, (os.cpu_count() or 1) // jobs)
    # a variant with `after:` runs once the same-seed cells it names have finished: it is queued when the
    # last of them ends (behind the cells already queued), or at once when they finished in an earlier sweep
    by_name = {v.name: v for v in study.variants}

    def needs(cell: Cell) -> list[Path]:  # the same seed's (and grid point's) cells of the variants it runs after
        out = []
        for name in cell.variant.after:
            runs = by_name[name].runs
            out.append(runs / cell.dir.name if runs is not None else
                       study.output_dir / study.cell_name(name, cell.grid) / cell.dir.name)
        return out

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool, \
            tqdm(total=len(todo), desc=f"sweep {study.title}", unit="run", disable=not progress) as bar:
        pending = {c.dir for c in todo}  # cells this sweep has still to finish (queued, running or waiting)
        waiting = list(todo)
        futures: dict[Future, Cell] = {}

        def submit_ready() -> None:
            for cell in list(waiting):
                deps = needs(cell)
                if pending.intersection(deps):
                    continue  # a cell it runs after is still to run in this sweep
                waiting.remove(cell)
                if missing := [d for d in deps if read_cell_report(d) is None]:
                    bar.update(1)
                    failed.append((cell.key, -1, cell.dir / LOG_FILE))
                    logger.warning("NOT RUN %s: it runs after %s, which has no finished report", cell.key,
                                   ", ".join(f"{d.parent.name}/{d.name}" for d in missing))
                    pending.discard(cell.dir)
                else:
                    futures[pool.submit(_run_cell, study, cell, threads)] = cell

        submit_ready()
        while futures:
            done, _ = wait(futures, return_when=FIRST_COMPLETED)
            for future in done:
                cell, rc, seconds = future.result()
                del futures[future]
                pending.discard(cell.dir)
                bar.update(1)
                if rc is None:
                    skipped.append(cell.key)
                elif rc == 0 and read_cell_report(cell.dir) is not None:
                    ran.append(cell.key)
                    logger.info("finished %s in %.0f s", cell.key, seconds)
                else:
                    failed.append((cell.key, rc, cell.dir / LOG_FILE))
                    logger.warning("FAILED %s (exit %d): see %s", cell.key, rc, cell.dir / LOG_FILE)
            submit_ready()
    return SweepOutcome(ran, skipped, failed, time.perf_counter() - started)

