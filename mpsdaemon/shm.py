"""NVIDIA's ``mount-shm`` step: a tmpfs at ``<mps root>/shm`` for the daemons and clients.

The init container runs it once; the host directory is then mounted at ``/dev/shm`` in the
daemon and (by Allocate) in every MPS client. Size: half the node's memory (``MemTotal / 2``
from ``/proc/meminfo``), else NVIDIA's old fixed ``65536k``. Mounting goes through a
:class:`Mounter` so tests need no root.
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)

FALLBACK_SIZE = "65536k"
MOUNT_OPTIONS = ("rw", "nosuid", "nodev", "noexec", "relatime")


class Mounter(Protocol):
    """Mount operations (``SystemMounter`` runs mount/umount; tests record them)."""

    def is_mounted(self, path: Path) -> bool: ...

    def unmount(self, path: Path) -> None: ...

    def mount(self, source: str, target: Path, fstype: str, options: Sequence[str]) -> None: ...


class MountError(Exception):
    """The shm mount could not be made."""


class SystemMounter:
    """The host's ``mount`` and ``umount`` (needs CAP_SYS_ADMIN, as NVIDIA's privileged pod)."""

    def __init__(self, mountinfo: str = "/proc/self/mountinfo") -> None:
        self.mountinfo = mountinfo

    def is_mounted(self, path: Path) -> bool:
        """Whether ``path`` is a mount point (from mountinfo's fifth field)."""
        target = os.path.realpath(path)
        try:
            with open(self.mountinfo, encoding="utf-8") as handle:
                return any(len(fields) > 4 and fields[4] == target
                           for fields in (line.split() for line in handle))
        except OSError:
            return False

    def unmount(self, path: Path) -> None:
        """``umount <path>``."""
        self._run(["umount", str(path)])

    def mount(self, source: str, target: Path, fstype: str, options: Sequence[str]) -> None:
        """``mount -t <fstype> -o <options> <source> <target>``."""
        self._run(["mount", "-t", fstype, "-o", ",".join(options), source, str(target)])

    @staticmethod
    def _run(command: list[str]) -> None:
        try:
            done = subprocess.run(command, capture_output=True, text=True, check=False)
        except OSError as error:
            raise MountError(f"{command[0]}: {error}") from None
        if done.returncode != 0:
            raise MountError(f"{' '.join(command)}: {done.stderr.strip() or done.returncode}")


def shm_size(meminfo: str = "/proc/meminfo") -> str:
    """Half of MemTotal in KiB (``<n>k``), or the fallback when it cannot be read."""
    try:
        with open(meminfo, encoding="utf-8") as handle:
            for line in handle:
                name, _, rest = line.partition(":")
                if name == "MemTotal":
                    kib = int(rest.split()[0])
                    if kib > 1:
                        return f"{kib // 2}k"
    except (OSError, ValueError, IndexError) as error:
        log.warning("cannot read MemTotal from %s (%s); shm size %s", meminfo, error,
                    FALLBACK_SIZE)
    return FALLBACK_SIZE


def mount_shm(root: str | Path, mounter: Mounter | None = None,
              meminfo: str = "/proc/meminfo") -> Path:
    """(Re)mount a tmpfs at ``<root>/shm``: unmount a previous one, create the directory, mount.

    Returns the directory; raises MountError.
    """
    mounter = mounter if mounter is not None else SystemMounter()
    shm = Path(root, "shm")
    if mounter.is_mounted(shm):
        mounter.unmount(shm)
    try:
        shm.mkdir(mode=0o755, parents=True, exist_ok=True)
    except OSError as error:
        raise MountError(f"cannot create {shm}: {error}") from None
    options = [*MOUNT_OPTIONS, f"size={shm_size(meminfo)}"]
    mounter.mount("shm", shm, "tmpfs", options)
    log.info("mounted tmpfs at %s (%s)", shm, ",".join(options))
    return shm
