"""The entry point every daemon's ``main`` runs its body through."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TextIO

from gpus.errors import NvkError

from .exits import exit_code


def error_line(prog: str, error: NvkError) -> str:
    """The one stderr line for ``error``: ``<prog>: <summary>: <message>``."""
    summary = f"{error.summary}: " if error.summary else ""
    return f"{prog}: {summary}{error}"


def run_daemon(prog: str, body: Callable[[], int], stderr: TextIO | None = None) -> int:
    """Run ``body`` (returns an exit code) and turn the error tree into exit codes.

    An :class:`~gpus.errors.NvkError` ends the daemon with one clear line on stderr and its
    exit code (:mod:`gpus.runtime.exits`: 2 for configuration, 1 otherwise); anything else is
    a bug and keeps its traceback.
    """
    try:
        return body()
    except NvkError as error:
        print(error_line(prog, error), file=stderr or sys.stderr, flush=True)
        return exit_code(error)
