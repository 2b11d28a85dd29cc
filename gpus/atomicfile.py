"""Replace a file so that readers see the old content or the new, never a mix.

The features file (read by NFD), the CDI spec (read by container runtimes) and the readiness
and status files (read by probes and monitoring) all need this.
"""

from __future__ import annotations

import contextlib
import os
import tempfile


def replace_file(path: str | os.PathLike[str], text: str, mode: int = 0o644) -> None:
    """Write ``text`` to a temporary file beside ``path``, fsync it, and rename it over ``path``.

    The temporary file lives in the target's directory because a rename is only atomic within
    one filesystem. Its ``mode`` is set before anything is written, because mkstemp creates
    0600 files and the readers (NFD, runtimes, monitoring agents) may run as other users: the
    target never exists with another mode. After the rename the directory is fsynced too
    (best effort), so the rename itself survives a crash.

    Raises OSError naming ``path`` (never the temporary file, whose name means nothing to the
    user); no temporary file is left behind.
    """
    target = os.fspath(path)
    directory = os.path.dirname(target) or "."
    try:
        fd, temporary = tempfile.mkstemp(
            prefix=f".{os.path.basename(target)}.", suffix=".tmp", dir=directory
        )
    except OSError as err:
        _name_target(err, target)
        raise
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            os.fchmod(handle.fileno(), mode)  # not masked by the umask, unlike open's mode
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        if isinstance(err, OSError):
            _name_target(err, target)
        raise
    _fsync_directory(directory)


def _name_target(err: OSError, target: str) -> None:
    """Make ``err`` (same type, errno and reason) name ``target``, not the temporary file."""
    if err.strerror is None:
        return  # a bare message (no errno): it names no file and has no place for one
    err.filename = target
    err.filename2 = None


def _fsync_directory(directory: str) -> None:
    """Persist the rename itself (best effort: some filesystems refuse a directory fsync)."""
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)
