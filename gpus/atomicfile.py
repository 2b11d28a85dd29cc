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

    ``mode`` is set explicitly because mkstemp creates 0600 files and the readers (NFD, runtimes,
    monitoring agents) may run as other users. Raises OSError; no temporary file is left behind.
    """
    target = os.fspath(path)
    directory = os.path.dirname(target) or "."
    fd, temporary = tempfile.mkstemp(
        prefix=f".{os.path.basename(target)}.", suffix=".tmp", dir=directory
    )
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
