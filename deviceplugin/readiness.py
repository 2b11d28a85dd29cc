"""The readiness file the DaemonSet's probes test (``test -f $DP_READY_FILE``), and the status.

Contract (daemonset/base/daemonset.yaml, docs/deploy.md): the plugin deletes the file when it
starts (the emptyDir holding it outlives a container restart), creates it once every resource
with devices is served and registered with the kubelet (also when there is nothing to register,
e.g. idle after an initialisation error with ``--fail-on-init-error=false``), deletes it while
any registration is lost (a kubelet restart) and creates it again once re-registered. It is
deleted when the plugin stops. Probes test only that it exists.

Its content is the plugin's status, a small JSON document for people and metric exporters::

    {"ready": true, "resources": {"nvidia.com/gpu": {"devices": 8, "healthy": 7}},
     "problems": ["MIG strategy single: GPU 6 has MIG enabled but no MIG devices"]}

``problems`` lists what an operator must fix (invalid MIG layouts, resources that cannot be
served, MIG devices left out of the CDI spec, an initialisation error while idling). Because
the readiness file is absent while not ready, the same document can also go to a status file
(``--status-file``, env ``DP_STATUS_FILE``, default "" = none) that is always present.

Both files are rewritten atomically (written beside, then renamed) whenever their content
changes, so a reader never sees half a document (:class:`gpus.runtime.StateFile`, shared with
GFD's health file).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import field

from gpus.config import DEFAULT_READY_FILE
from gpus.records import record
from gpus.runtime import StateFile

log = logging.getLogger(__name__)

READY_FILE_ENV = "DP_READY_FILE"  # the rows are in gpus.config (daemon.plugin)
STATUS_FILE_ENV = "DP_STATUS_FILE"
__all__ = ["DEFAULT_READY_FILE", "READY_FILE_ENV", "STATUS_FILE_ENV", "ReadinessFile",
           "ResourceStatus", "Status"]


@record(shared_init=True)
class ResourceStatus:
    """One resource's device counts, as the status reports them."""

    devices: int
    healthy: int


@record(shared_init=True)
class Status:
    """What the readiness and status files say."""

    ready: bool = False
    resources: Mapping[str, ResourceStatus] = field(default_factory=dict)
    problems: tuple[str, ...] = ()

    def to_json(self) -> str:
        """The JSON document (one line, keys sorted, newline-terminated)."""
        document = {
            "ready": self.ready,
            "resources": {
                name: {"devices": r.devices, "healthy": r.healthy}
                for name, r in sorted(self.resources.items())
            },
            "problems": list(self.problems),
        }
        return json.dumps(document, sort_keys=True) + "\n"


class ReadinessFile:
    """Keeps the readiness file (present exactly when ready) and the status file up to date.

    ``path == ""`` disables the readiness file, ``status_path == ""`` the status file.
    Failures (a missing or read-only directory) are logged once per kind and never raised:
    both files are advisory, and the plugin must keep serving the kubelet without them.
    """

    def __init__(self, path: str, status_path: str = "") -> None:
        self.path = path
        self.status_path = status_path
        self._ready_file = StateFile(path, "readiness file", log)
        self._status_file = StateFile(status_path, "status file", log)
        self._lock = threading.Condition()
        self._wanted: bool | None = None  # the last readiness asked for, even when disabled
        self._resources: Mapping[str, ResourceStatus] = {}
        self._problems: tuple[str, ...] = ()
        # What each file holds now: its content, "" for absent, None for unknown (an error).
        self._ready_content: str | None = None
        self._status_content: str | None = None

    @property
    def enabled(self) -> bool:
        """True when a readiness path is configured."""
        return bool(self.path)

    @property
    def status(self) -> Status:
        """The status as last reported."""
        with self._lock:
            return self._status()

    def _status(self) -> Status:
        return Status(bool(self._wanted), self._resources, self._problems)

    def set(self, ready: bool) -> None:
        """Create the readiness file when ``ready``, else delete it (idempotent, thread-safe)."""
        with self._lock:
            self._wanted = ready
            self._lock.notify_all()
            self._sync()

    def report(self, resources: Mapping[str, ResourceStatus], problems: Sequence[str]) -> None:
        """Record what is served and what is wrong; the files are rewritten if that changed."""
        with self._lock:
            self._resources = dict(resources)
            self._problems = tuple(problems)
            self._lock.notify_all()
            self._sync()

    @property
    def ready(self) -> bool:
        """The readiness last reported (False before any report)."""
        with self._lock:
            return bool(self._wanted)

    def wait(self, ready: bool, timeout: float) -> bool:
        """Wait until the readiness last reported is ``ready``; False on timeout (tests)."""
        with self._lock:
            return self._lock.wait_for(lambda: self._wanted is ready, timeout=timeout)

    def wait_status(self, predicate: Callable[[Status], bool], timeout: float) -> bool:
        """Wait until the status satisfies ``predicate`` (files written); False on timeout."""
        with self._lock:
            return self._lock.wait_for(lambda: predicate(self._status()), timeout=timeout)

    def clear(self) -> None:
        """Delete the readiness file whatever we last did (start-up: it may be a previous
        run's) and write the status file afresh."""
        with self._lock:
            self._wanted = False
            self._ready_content = None  # unknown: a previous run may have left one
            self._status_content = None
            self._sync()

    def _sync(self) -> None:
        """Make both files say the current status (call with ``_lock`` held)."""
        content = self._status().to_json()
        if self.path:
            wanted = content if self._wanted else ""
            if wanted != self._ready_content:
                self._ready_content = self._put_ready(wanted)
        if self.status_path and content != self._status_content:
            written = self._status_file.write(content)
            self._status_content = content if written else None

    def _put_ready(self, content: str) -> str | None:
        """Write the readiness file, or delete it for ""; the new state (None: unknown)."""
        existed = os.path.exists(self.path)
        if not content:
            if not self._ready_file.delete():
                return None
            if existed:
                log.info("not ready: deleted %s", self.path)
            return ""
        if not self._ready_file.write(content):
            return None
        if self._wanted and not existed:
            log.info("ready: created %s", self.path)
        else:
            log.debug("readiness file %s updated", self.path)
        return content
