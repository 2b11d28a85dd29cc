"""Files that probes and monitors read: the plugin's readiness and status files, GFD's health
file. One implementation: atomic replacement (never half a file), deletion, and failures
logged once per kind of failure (and again when they recover), never raised: these files are
advisory, and a daemon must keep working without them.
"""

from __future__ import annotations

import contextlib
import logging
import os

from gpus.atomicfile import replace_file


def make_dirs(directory: str, mode: int = 0o755) -> None:
    """``mkdir -p`` with every new level ``mode`` whatever the umask (os.makedirs gives
    parents the umask's mode)."""
    missing = []
    while not os.path.exists(directory):
        missing.append(directory)
        directory = os.path.dirname(directory)
    for level in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(level, mode)
            os.chmod(level, mode)  # mkdir's mode is masked by the umask too


def write_atomically(path: str, content: str) -> None:
    """Replace ``path`` with ``content``, creating missing directories (0755) first.

    Raises OSError naming ``path`` (the reason says which directory could not be created).
    """
    directory = os.path.dirname(os.path.abspath(path))
    try:
        make_dirs(directory)
    except OSError as err:
        raise OSError(err.errno, f"cannot create directory {err.filename}: {err.strerror}",
                      path) from err
    replace_file(path, content)


class StateFile:
    """One such file. ``path == ""`` disables it (every call does nothing and succeeds).

    ``name`` is how messages call it ("status file", "the health file"); ``hint`` is added to
    a failure's warning; ``make_dirs`` creates missing directories before writing.
    """

    def __init__(self, path: str, name: str, log: logging.Logger, *, hint: str = "",
                 make_dirs: bool = False) -> None:
        self.path = path
        self.name = name
        self._log = log
        self._hint = hint
        self._make_dirs = make_dirs
        self._failure = ""  # the kind of the last failure ("" after a success)

    @property
    def enabled(self) -> bool:
        """True when a path is configured."""
        return bool(self.path)

    def write(self, content: str) -> bool:
        """Replace the file with ``content``; False (warned once per kind) on failure."""
        if not self.path:
            return True
        try:
            if self._make_dirs:
                write_atomically(self.path, content)
            else:
                replace_file(self.path, content)
        except OSError as err:
            self._failed("write", err)
            return False
        self._succeeded("written")
        return True

    def delete(self) -> bool:
        """Delete the file; True when it is gone (or was never there)."""
        if not self.path:
            return True
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            return True
        except OSError as err:
            self._failed("delete", err)
            return False
        self._succeeded("deleted")
        return True

    def _failed(self, action: str, err: OSError) -> None:
        kind = f"{action} {type(err).__name__} {err.errno}"
        if kind != self._failure:
            self._log.warning("cannot %s %s %s: %s%s", action, self.name, self.path,
                              err.strerror or err, self._hint)
        self._failure = kind

    def _succeeded(self, done: str) -> None:
        if self._failure:
            self._log.info("%s %s %s again", self.name, self.path, done)
        self._failure = ""
