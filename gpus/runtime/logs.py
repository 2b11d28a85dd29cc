"""Logging set-up shared by the daemons: one format, the level on the root logger.

The level is set on the root logger, so every package's loggers (``gpus.*``,
``deviceplugin.*``, ``gfd.*``) obey ``--log-level``; setting it on a daemon's own logger
would leave the others at the root's default (WARNING).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import TextIO

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LEVELS = ("debug", "info", "warning", "error")


def setup_logging(level: str, stream: TextIO | None = None) -> Callable[[], None]:
    """Log at ``level`` (any case) and above to ``stream`` (stderr); returns an undo.

    A handler is added to the root logger only when it has none (a daemon run inside a test
    process keeps pytest's). The undo puts the root's level back and removes the handler added
    here, so a daemon's ``main()`` leaves its caller's logging as it found it.
    """
    name = level.strip().upper()
    if name.lower() not in LEVELS:
        raise ValueError(f"unknown log level {level!r}: must be one of {', '.join(LEVELS)}")
    root = logging.getLogger()
    previous = root.level
    added: logging.Handler | None = None
    if not root.handlers:
        added = logging.StreamHandler(stream or sys.stderr)
        added.setFormatter(logging.Formatter(FORMAT))
        root.addHandler(added)
    root.setLevel(name)

    def undo() -> None:
        root.setLevel(previous)
        if added is not None:
            root.removeHandler(added)

    return undo
