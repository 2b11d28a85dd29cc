"""Where labels go: the node-feature-discovery features file, stdout, or a table; and the
health file the DaemonSet's probes read.

The features file is what node-feature-discovery's local source reads: one ``key=value`` per
line. It is replaced atomically (:func:`gpus.atomicfile.replace_file`: temp file in the same
directory, fsync, ``os.replace``, directory fsync) so NFD never reads half a file, and it is only
rewritten when its content changes.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import TextIO

from gpus.runtime.statefile import StateFile, write_atomically

__all__ = ["STDOUT", "FeaturesFile", "HealthFile", "format_features", "parse_features",
           "render_table", "write_atomically"]

log = logging.getLogger(__name__)

STDOUT = "-"


def format_features(labels: Mapping[str, str]) -> str:
    """``key=value`` lines, sorted by key, newline-terminated (empty string for no labels)."""
    return "".join(f"{key}={labels[key]}\n" for key in sorted(labels))


def parse_features(text: str) -> dict[str, str]:
    """The inverse of :func:`format_features` (lines without ``=`` are ignored)."""
    labels: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            labels[key.strip()] = value.strip()
    return labels


class FeaturesFile:
    """The features file output: writes only when the content changes, removes on request."""

    def __init__(self, path: str, stream: TextIO | None = None) -> None:
        """``path`` is a file path, or ``-`` for ``stream`` (default stdout)."""
        self.path = path
        self._stream = stream
        self._last: str | None = None

    @property
    def is_stdout(self) -> bool:
        """True when labels go to stdout rather than a file."""
        return self.path == STDOUT

    def write(self, labels: Mapping[str, str]) -> bool:
        """Write the labels; returns True when something was written."""
        content = format_features(labels)
        if self.is_stdout:
            stream = self._stream or sys.stdout
            stream.write(content)
            stream.flush()
            return True
        if content == self._last and os.path.exists(self.path):
            return False
        write_atomically(self.path, content)
        self._last = content
        log.info("wrote %d labels to %s", len(labels), self.path)
        return True

    def remove(self) -> None:
        """Remove the file (clean exit in loop mode, so NFD drops the labels)."""
        if self.is_stdout:
            return
        try:
            os.unlink(self.path)
            log.info("removed %s", self.path)
        except FileNotFoundError:
            pass
        except OSError as err:
            log.warning("could not remove %s: %s", self.path, err)
        self._last = None


def render_table(labels: Mapping[str, str]) -> str:
    """A two-column table of labels for ``--dry-run``."""
    if not labels:
        return "(no labels)\n"
    width = max(len("LABEL"), *(len(k) for k in labels))
    lines = [f"{'LABEL':<{width}}  VALUE"]
    lines += [f"{key:<{width}}  {labels[key]}" for key in sorted(labels)]
    return "\n".join(lines) + "\n"


class HealthFile:
    """The liveness contract with the DaemonSet's probes (``GFD_HEALTH_FILE``).

    Deleted when GFD starts (the emptyDir holding it outlives a container restart, so a stale
    file would make a fresh, not yet working GFD look healthy), then atomically replaced with
    the Unix time in seconds after every successful labelling pass. An empty path disables it.
    A write failure is logged once per change of state and never stops labelling: the probes
    then see a stale file, which is the truth. (:class:`gpus.runtime.StateFile` does the
    writing, as for the device plugin's readiness file.)
    """

    def __init__(self, path: str, clock: Callable[[], float] = time.time) -> None:
        """``path`` empty disables; ``clock`` is wall-clock seconds (injectable for tests)."""
        self.path = path
        self._clock = clock
        self._file = StateFile(path, "the health file", log, make_dirs=True,
                               hint=" (liveness probes reading it will fail; --health-file '' "
                               "disables it)")

    @property
    def enabled(self) -> bool:
        """True when a path is configured."""
        return bool(self.path)

    def reset(self) -> None:
        """Delete the file left by an earlier run, if any."""
        if self.path and os.path.lexists(self.path) and self._file.delete():
            log.info("removed the health file %s left by an earlier run", self.path)

    def mark(self) -> None:
        """Record a successful pass: the file holds the current Unix time in seconds."""
        self._file.write(f"{int(self._clock())}\n")
