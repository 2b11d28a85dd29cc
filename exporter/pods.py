"""Which pod a GPU process belongs to: ``/proc/<pid>/cgroup`` joined with the kubelet's log names.

The PodResources API says which pods hold a device but not which processes are theirs, and
gives neither pod UIDs nor container ids. A process's cgroup path carries its pod UID and
container id (kubelet's cgroup layout, cgroup v1 and v2, cgroupfs and systemd drivers, for
containerd, CRI-O and Docker). To turn those into the (namespace, pod, container) names that
PodResources uses, without the API server, we read the names the kubelet gives container logs:
``/var/log/containers/<pod>_<namespace>_<container>-<container id>.log`` (every CRI runtime
writes them; log collectors rely on them). A pid whose container is not (yet) listed is
unattributed: its pod's series fall back to the device value with ``shared="true"``.

Reading happens on the sampler thread, never on the scrape path.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from gpus.records import record

log = logging.getLogger(__name__)

PROC_ROOT = "/proc"
CONTAINER_LOGS = "/var/log/containers"
_POD_UID = re.compile(
    r"pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})")
_CONTAINER_ID = re.compile(r"^(?:cri-containerd-|crio-|docker-|containerd-)?([0-9a-f]{64})"
                           r"(?:\.scope)?$")
_LOG_NAME = re.compile(r"^([^_]+)_([^_]+)_(.+)-([0-9a-f]{64})\.log$")


@dataclass(frozen=True, order=True)
class PodOwner:
    """The container a process runs in, by the names PodResources uses."""

    namespace: str
    pod: str
    container: str


@record
class CgroupIds:
    """What a cgroup path says: the pod UID (dashes) and the container id, where present."""

    pod_uid: str | None
    container_id: str | None


def parse_cgroup(text: str) -> CgroupIds:
    """``/proc/<pid>/cgroup`` content -> pod UID and container id (first line that has them).

    Handles v1 (``12:memory:/kubepods/burstable/pod<uid>/<id>``) and v2 / systemd
    (``0::/kubepods.slice/.../kubepods-burstable-pod<uid_>.slice/cri-containerd-<id>.scope``).
    """
    for line in text.splitlines():
        path = line.split(":", 2)[-1]
        match = _POD_UID.search(path)
        if match is None:
            continue
        uid = match.group(1).replace("_", "-")
        last = path.rstrip("/").rsplit("/", 1)[-1]
        container = _CONTAINER_ID.match(last)
        return CgroupIds(uid, container.group(1) if container else None)
    return CgroupIds(None, None)


def parse_log_name(name: str) -> tuple[str, PodOwner] | None:
    """``<pod>_<namespace>_<container>-<id>.log`` -> (container id, owner); None otherwise."""
    match = _LOG_NAME.match(name)
    if match is None:
        return None
    pod, namespace, container, container_id = match.groups()
    return container_id, PodOwner(namespace, pod, container)


class PidMapper:
    """pid -> :class:`PodOwner`, reading ``proc_root`` and ``container_logs``."""

    def __init__(self, proc_root: str = PROC_ROOT, container_logs: str = CONTAINER_LOGS) -> None:
        self.proc_root = proc_root
        self.container_logs = container_logs
        self._containers: dict[str, PodOwner] = {}
        self._listed = False

    def _relist(self) -> None:
        try:
            names = os.listdir(self.container_logs)
        except OSError as err:
            log.debug("cannot list %s: %s", self.container_logs, err)
            names = []
        found = (parse_log_name(n) for n in names)
        self._containers = dict(f for f in found if f is not None)
        self._listed = True

    def owners(self, pids: set[int]) -> dict[int, PodOwner]:
        """The owners of the pids that can be attributed (the log names are listed again at
        most once per call, when a container is not known yet)."""
        ids: dict[int, str] = {}
        for pid in pids:
            try:
                text = (Path(self.proc_root) / str(pid) / "cgroup").read_text()
            except OSError:
                continue  # gone, or not visible (no host PID namespace)
            container = parse_cgroup(text).container_id
            if container is not None:
                ids[pid] = container
        if not self._listed or any(c not in self._containers for c in ids.values()):
            self._relist()
        return {pid: self._containers[c] for pid, c in ids.items() if c in self._containers}
