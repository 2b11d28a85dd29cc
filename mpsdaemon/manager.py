"""Every MPS control daemon of the node: start, ``.ready``, health checks, restarts, stop."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace

from gpus.backoff import Backoff
from gpus.mps import CONTROL_BINARY, MpsError, MpsRoot
from gpus.records import record
from gpus.resources import Resource, ResourceMap
from mpsdaemon.daemon import ComputeModes, MpsDaemon
from mpsdaemon.logfollow import LogFollower

log = logging.getLogger(__name__)

CHECK_INTERVAL_S = 5.0  # how often each running daemon is asked whether it still answers
STARTING, RUNNING, FAILED, STOPPED = "starting", "running", "failed", "stopped"


def mps_resources(resource_map: ResourceMap) -> list[Resource]:
    """The resources of a map that an MPS control daemon serves, by name."""
    return [resource for resource in resource_map.resources.values() if resource.mps]


@record
class DaemonStatus:
    """Where one resource's daemon stands, for logs and status files."""

    state: str = STARTING  # starting, running, failed (retrying) or stopped
    error: str = ""  # the last failure, while failed
    restarts: int = 0  # times it was found dead and restarted
    retry_in: float = 0.0  # seconds until the next start attempt, while failed


class MpsManager:
    """Starts one :class:`MpsDaemon` per MPS resource and keeps them running.

    ``<root>/.ready`` exists exactly while every daemon runs. A daemon that fails to start, or
    stops answering ``get_default_active_thread_percentage``, is reported (logged as an error,
    :meth:`status`, ``on_change``), undone (compute mode DEFAULT, markers removed) and started
    again after a capped exponential backoff; a success resets its backoff.
    """

    def __init__(self, resources: Iterable[Resource], root: MpsRoot, nvml: ComputeModes,
                 binary: str = CONTROL_BINARY, environ: Mapping[str, str] | None = None, *,
                 check_interval: float = CHECK_INTERVAL_S,
                 backoff: Callable[[], Backoff] = lambda: Backoff(initial=1.0, cap=60.0),
                 on_change: Callable[[dict[str, DaemonStatus]], None] | None = None,
                 log_poll_interval: float = 0.5) -> None:
        self.root = root
        self.daemons = [MpsDaemon(resource, root, nvml, binary, environ)
                        for resource in resources if resource.mps]
        self.check_interval = check_interval
        self.on_change = on_change
        self._log_poll = log_poll_interval
        self._backoff = {d.name: backoff() for d in self.daemons}
        self._status = {d.name: DaemonStatus() for d in self.daemons}
        self._next_try: dict[str, float] = {}
        self._followers: dict[str, LogFollower] = {}
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="mps-supervisor", daemon=True)

    # -- life cycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Start every daemon once, then supervise them on a thread."""
        if not self.daemons:
            log.info("no resource is shared with MPS; nothing to start")
        for daemon in self.daemons:
            self._try_start(daemon)
        self._publish()
        self._thread.start()

    def stop(self) -> None:
        """Stop supervising, remove ``.ready`` and stop every daemon (compute mode DEFAULT).

        Raises MpsError listing the daemons that could not be stopped cleanly (all are tried).
        """
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.root.ready_file.unlink(missing_ok=True)
        problems: list[str] = []
        for daemon in self.daemons:
            try:
                daemon.stop()
            except MpsError as error:
                problems.append(str(error))
            self._stop_following(daemon)
            self._set(daemon, DaemonStatus(STOPPED, restarts=self._status[daemon.name].restarts))
        self._publish()
        if problems:
            raise MpsError("; ".join(problems))

    # -- queries --------------------------------------------------------------------------------

    def status(self) -> dict[str, DaemonStatus]:
        """Each resource's daemon status (a copy)."""
        with self._cond:
            return dict(self._status)

    def problems(self) -> list[str]:
        """One line per daemon that is not running, saying why."""
        return [f"MPS control daemon for {name}: {status.error}"
                for name, status in self.status().items() if status.state == FAILED]

    def wait_for(self, predicate: Callable[[dict[str, DaemonStatus]], bool],
                 timeout: float) -> bool:
        """Wait until ``predicate(status)`` holds (checked at every change); False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(dict(self._status)), timeout)

    # -- supervision ----------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.wait(self._wait_time()):
            for daemon in self.daemons:
                if self._stop.is_set():
                    return
                self._check(daemon)
            self._publish()

    def _wait_time(self) -> float:
        now = time.monotonic()
        pending = [at - now for name, at in self._next_try.items()
                   if self._status[name].state == FAILED]
        return max(0.0, min([self.check_interval, *pending]))

    def _check(self, daemon: MpsDaemon) -> None:
        state = self._status[daemon.name].state
        if state == RUNNING:
            try:
                daemon.healthy()
            except MpsError as error:
                self._died(daemon, error)
        elif state == FAILED and time.monotonic() >= self._next_try.get(daemon.name, 0.0):
            self._try_start(daemon)

    def _died(self, daemon: MpsDaemon, error: MpsError) -> None:
        log.error("%s: the MPS control daemon stopped answering: %s; undoing and restarting",
                  daemon.name, error)
        self._stop_following(daemon)
        try:
            daemon.stop()
        except MpsError as stop_error:
            log.error("%s: cleaning up the dead daemon: %s", daemon.name, stop_error)
        restarts = self._status[daemon.name].restarts + 1
        self._failed(daemon, f"stopped answering: {error}", restarts)

    def _try_start(self, daemon: MpsDaemon) -> None:
        restarts = self._status[daemon.name].restarts
        try:
            daemon.start()
        except MpsError as error:
            self._failed(daemon, str(error), restarts)
            return
        self._backoff[daemon.name].reset()
        self._next_try.pop(daemon.name, None)
        self._follow(daemon)
        self._set(daemon, DaemonStatus(RUNNING, restarts=restarts))

    def _failed(self, daemon: MpsDaemon, error: str, restarts: int) -> None:
        delay = self._backoff[daemon.name].next_delay()
        self._next_try[daemon.name] = time.monotonic() + delay
        log.error("%s: MPS control daemon not running: %s; next try in %gs", daemon.name,
                  error, delay)
        self._set(daemon, DaemonStatus(FAILED, error, restarts, delay))

    def _set(self, daemon: MpsDaemon, status: DaemonStatus) -> None:
        with self._cond:
            self._status[daemon.name] = status

    def _publish(self) -> None:
        """``.ready`` while all run; then wake waiters and tell ``on_change``."""
        status = self.status()
        all_running = bool(status) and all(s.state == RUNNING for s in status.values())
        try:
            if all_running:
                self.root.ready_file.touch()
            else:
                self.root.ready_file.unlink(missing_ok=True)
        except OSError as error:
            log.error("cannot update %s: %s", self.root.ready_file, error)
        with self._cond:
            self._cond.notify_all()
        if self.on_change is not None:
            self.on_change({name: replace(s) for name, s in status.items()})

    # -- control logs ---------------------------------------------------------------------------

    def _follow(self, daemon: MpsDaemon) -> None:
        self._stop_following(daemon)
        name = daemon.name
        follower = LogFollower(daemon.log_file, lambda line: log.info("%s: %s", name, line),
                               self._log_poll)
        self._followers[name] = follower
        follower.start()

    def _stop_following(self, daemon: MpsDaemon) -> None:
        follower = self._followers.pop(daemon.name, None)
        if follower is not None:
            follower.stop()
