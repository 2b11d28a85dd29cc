"""The readiness file the DaemonSet's probes test (``test -f $DP_READY_FILE``).

Contract (daemonset/base/daemonset.yaml, docs/deploy.md): the plugin deletes the file when it
starts (the emptyDir holding it outlives a container restart), creates it once every resource
with devices is served and registered with the kubelet (also when there is nothing to register,
e.g. idle after an initialisation error with ``--fail-on-init-error=false``), deletes it while
any registration is lost (a kubelet restart) and creates it again once re-registered. It is
deleted when the plugin stops.

The file is created atomically (written beside it, then renamed), so a probe never sees a
half-written file; its content is informational (the Unix time it was created).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time

log = logging.getLogger(__name__)

READY_FILE_ENV = "DP_READY_FILE"
DEFAULT_READY_FILE = "/run/nvidia-device-plugin/ready"


class ReadinessFile:
    """Creates or deletes one file as readiness changes; ``path == ""`` disables it.

    Failures (a missing or read-only directory) are logged once per kind and never raised:
    readiness is advisory, and the plugin must keep serving the kubelet without it.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Condition()
        self._ready: bool | None = None  # what the file says now; None: unknown (an error)
        self._wanted: bool | None = None  # the last state asked for, even when disabled
        self._warned: set[str] = set()

    @property
    def enabled(self) -> bool:
        """True when a path is configured."""
        return bool(self.path)

    def set(self, ready: bool) -> None:
        """Create the file when ``ready``, else delete it (both idempotent, thread-safe)."""
        with self._lock:
            self._wanted = ready
            self._lock.notify_all()
            if not self.path or ready == self._ready:
                return
            done = self._create() if ready else self._delete()
            self._ready = ready if done else None

    @property
    def ready(self) -> bool:
        """The readiness last reported (False before any report)."""
        with self._lock:
            return bool(self._wanted)

    def wait(self, ready: bool, timeout: float) -> bool:
        """Wait until the readiness last reported is ``ready``; False on timeout (tests)."""
        with self._lock:
            return self._lock.wait_for(lambda: self._wanted is ready, timeout=timeout)

    def clear(self) -> None:
        """Delete the file whatever we last did (start-up: it may be a previous run's)."""
        with self._lock:
            self._wanted = False
            if self.path:
                self._ready = False if self._delete() else None

    def _create(self) -> bool:
        directory = os.path.dirname(self.path) or "."
        temporary = os.path.join(directory, f".{os.path.basename(self.path)}.{os.getpid()}")
        try:
            with open(temporary, "w", encoding="ascii") as handle:
                handle.write(f"{int(time.time())}\n")
            os.replace(temporary, self.path)
        except OSError as err:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            self._warn("create", f"cannot create readiness file {self.path}: {err.strerror}")
            return False
        log.info("ready: created %s", self.path)
        return True

    def _delete(self) -> bool:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            return True
        except OSError as err:
            self._warn("delete", f"cannot delete readiness file {self.path}: {err.strerror}")
            return False
        log.info("not ready: deleted %s", self.path)
        return True

    def _warn(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            log.warning("%s", message)
