"""What the entry points (the ``robustkd`` CLI and the recipes) share about the terminal: where
robustkd's status lines go, how help shows defaults, and how a failure ends the process.

A library user is left alone: importing robustkd configures no logging; only the entry points
call :func:`configure_logging`.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

EXIT_USER_ERROR = 2
EXIT_SANITY_FAILED = 3
EXIT_INTERRUPTED = 130


def configure_logging(level: int = logging.INFO) -> None:
    """Show robustkd's status lines (per-epoch summaries, "resumed from ...", notes; Accelerate's logger
    prints them on the main process only) on stderr, once per process. For entry points (the CLI,
    the recipes); a library user configures ``logging`` as they like."""
    root = logging.getLogger("robustkd")
    if not any(getattr(h, "_robustkd", False) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(_Formatter("%(message)s"))
        handler._robustkd = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a line is logged (not the stream of the moment it was made:
    a test's captured stream, since closed)."""

    @property  # type: ignore[override]
    def stream(self):  # noqa: D102
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # noqa: D102 - StreamHandler.__init__ assigns it
        pass


class _Formatter(logging.Formatter):
    """The message alone; Accelerate's ``[RANK 0]`` prefix only when several processes run."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if text.startswith("[RANK ") and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            text = text.split("] ", 1)[1] if "] " in text else text
        return text


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with each default shown once: a help text that already says its default (or has
    none worth showing: ``None``, a switch) is left as it is."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        help = action.help or ""
        if ("%(default)" in help or "default:" in help.lower() or action.default is None
                or action.default is False or action.default == argparse.SUPPRESS or action.nargs == 0):
            return help
        return super()._get_help_string(action)


def under_launcher() -> bool:
    """True in a process that ``accelerate launch`` (or torchrun) started."""
    return any(k in os.environ for k in ("ACCELERATE_MIXED_PRECISION", "ACCELERATE_DYNAMO_BACKEND", "LOCAL_RANK"))


def fail(message: str, status: int = EXIT_USER_ERROR) -> None:
    """Print ``error: message`` (one line, stderr) and end the process with ``status``."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(status)
