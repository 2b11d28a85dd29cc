"""Reconciles the running gRPC servers with the resource map.

The map is recomputed, never patched: a health change or a config reload hands :meth:`apply` a
whole new :class:`ResourceMap` and the manager works out the difference against the servers it
runs: start new resources, hand existing ones the resource manager of their new version
(their ListAndWatch streams get a changed list at once), stop removed ones. A resource with no
devices is not served.

A ``gate`` may hold a resource back before it is first served (MPS: until its control daemon
answers, :mod:`deviceplugin.mpsgate`). A held resource is not served nor registered, the node
is not ready, and :attr:`PluginManager.unserved` says why; the watch thread applies the last
map again after a capped backoff, so the resource is served once the gate opens. Resources
already served are never gated again (as NVIDIA, which checks only before serving).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import field
from typing import TYPE_CHECKING

from deviceplugin.kubelet import RegistrationLoop
from deviceplugin.rm import ResourceManager, ResourceManagers
from deviceplugin.server import PluginServer, ServeError
from gpus.backoff import Backoff
from gpus.records import record
from gpus.resources import Resource, ResourceMap

if TYPE_CHECKING:  # prometheus_client: imported only with --metrics-address
    from gpus.runtime.metrics import PluginMetrics

log = logging.getLogger(__name__)


@record(shared_init=True)
class ApplyResult:
    """What one :meth:`PluginManager.apply` did, by resource name."""

    started: tuple[str, ...] = ()
    updated: tuple[str, ...] = ()
    stopped: tuple[str, ...] = ()
    errors: dict[str, str] = field(default_factory=dict)  # resource -> why it is not served
    held: dict[str, str] = field(default_factory=dict)  # resource -> why the gate holds it


class PluginManager:
    """Owns one PluginServer per non-empty resource and the kubelet registration loop.

    ``socket_dir`` is where plugin sockets go (the kubelet socket's directory). An empty
    ``kubelet_socket`` serves without registering.

    ``on_ready(ready)`` is called from the watch thread whenever readiness changes: ready means
    every resource with devices is served and registered with the kubelet that is up now (or
    there is nothing to serve). The first time the node is ready with a set of managers
    (``managers``: one per start or reload, see :class:`deviceplugin.rm.NodeManagers`), their
    ``warm`` (allocator tables) runs on a background daemon thread, so it never delays
    registration.
    """

    def __init__(
        self,
        socket_dir: str,
        kubelet_socket: str,
        managers: ResourceManagers,
        *,
        poll_interval: float = 0.1,
        server_factory: Callable[[ResourceManager, str], PluginServer] = PluginServer,
        on_ready: Callable[[bool], None] | None = None,
        gate: Callable[[Resource], str | None] | None = None,
        gate_backoff: Callable[[], Backoff] = lambda: Backoff(initial=1.0, cap=30.0),
        on_status: Callable[[], None] | None = None,
        metrics: PluginMetrics | None = None,
    ) -> None:
        self.socket_dir = socket_dir
        self.kubelet_socket = kubelet_socket
        self._managers = managers
        if metrics is not None and server_factory is PluginServer:
            server_factory = functools.partial(PluginServer, metrics=metrics)
        self._factory = server_factory
        self._lock = threading.Lock()
        self._servers: dict[str, PluginServer] = {}
        self._map = ResourceMap()
        self.errors: dict[str, str] = {}
        self.held: dict[str, str] = {}  # resource -> why the gate holds it back
        self._gate = gate
        self._gate_backoff = gate_backoff()
        self._retry_at = 0.0
        self._on_status = on_status
        self._on_ready = on_ready
        self._ready: bool | None = None  # last readiness reported
        self._warmed: ResourceManagers | None = None  # the last managers warmed
        self.warm_thread: threading.Thread | None = None
        self._loop = RegistrationLoop(
            kubelet_socket, self.servers, poll_interval=poll_interval, on_tick=self.check_ready,
            metrics=metrics,
        )

    @property
    def registration(self) -> RegistrationLoop:
        """The registration loop (status and tests)."""
        return self._loop

    @property
    def resource_map(self) -> ResourceMap:
        """The map last applied."""
        with self._lock:
            return self._map

    def servers(self) -> list[PluginServer]:
        """The running servers."""
        with self._lock:
            return list(self._servers.values())

    def server(self, name: str) -> PluginServer | None:
        """The server of one resource, if running."""
        with self._lock:
            return self._servers.get(name)

    def start(self) -> None:
        """Start watching the kubelet (servers start as maps are applied)."""
        self._loop.start()

    @property
    def unserved(self) -> Mapping[str, str]:
        """Resources with devices that are not served, and why (held, or failed to serve)."""
        with self._lock:
            return {**self.held, **self.errors}

    def ready(self) -> bool:
        """Every resource with devices served and registered (see the class docstring)."""
        with self._lock:
            if self.errors or self.held:
                return False
        return self._loop.all_registered()

    def check_ready(self) -> None:
        """Report a readiness change, and start warming new managers once ready.

        Runs on the watch thread after every tick; retries held resources when their backoff
        is over.
        """
        self._retry_held()
        ready = self.ready()
        if ready != self._ready:
            self._ready = ready
            log.info("readiness: %s", "ready" if ready else "not ready")
            if self._on_ready is not None:
                self._on_ready(ready)
        if ready:
            self._start_warm()

    def _start_warm(self) -> None:
        with self._lock:
            managers = self._managers
            if managers is self._warmed:
                return
            self._warmed = managers
        warm = managers.warm
        if warm is None:
            return
        thread = threading.Thread(target=_warm, args=(warm,), name="allocator-warm",
                                  daemon=True)
        self.warm_thread = thread
        thread.start()

    def _retry_held(self) -> None:
        """Apply the last map again once the held resources' backoff is over."""
        with self._lock:
            if not self.held or time.monotonic() < self._retry_at:
                return
            current, before = self._map, dict(self.held)
        result = self._apply(current, None, expected=current)
        if result is not None and result.held != before and self._on_status is not None:
            self._on_status()  # the status's problems changed

    def apply(
        self, new_map: ResourceMap, managers: ResourceManagers | None = None
    ) -> ApplyResult:
        """Make the running servers match ``new_map`` (with new managers after a reload)."""
        result = self._apply(new_map, managers)
        assert result is not None  # only a retry (expected=...) can be superseded
        return result

    def _held(self, new_map: ResourceMap) -> dict[str, str]:
        """The gate's verdict on the resources of ``new_map`` not served yet (outside the
        lock: a gate may run a program)."""
        if self._gate is None:
            return {}
        running = {server.resource.name for server in self.servers()}
        held: dict[str, str] = {}
        for name, resource in sorted(new_map.resources.items()):
            if resource.devices and name not in running:
                reason = self._gate(resource)
                if reason is not None:
                    held[name] = reason
        return held

    def _apply(self, new_map: ResourceMap, managers: ResourceManagers | None,
               expected: ResourceMap | None = None) -> ApplyResult | None:
        held = self._held(new_map)
        with self._lock:
            if expected is not None and self._map is not expected:
                return None  # a newer map was applied meanwhile; it decided already
            if managers is not None:
                self._managers = managers
            result = self._reconcile(new_map, held)
            self._schedule_retry(result.held)
            old_problems = set(self._map.problems)
            self._map = new_map
        if result.started or result.errors:
            self._loop.wake()
        # Health changes rebuild the map many times a minute; a layout problem is news only
        # when it first appears, not on every rebuild. ERROR: devices are missing until an
        # operator fixes the layout (the status file lists the problems while they last).
        for problem in new_map.problems:
            if problem not in old_problems:
                log.error("resource map: %s", problem)
        return result

    def _schedule_retry(self, held: Mapping[str, str]) -> None:
        """Log changes of the held set and set when to look again (call with ``_lock``)."""
        for name, reason in sorted(held.items()):
            if self.held.get(name) != reason:
                log.warning("not serving %s yet: %s", name, reason)
        for name in sorted(set(self.held) - set(held)):
            log.info("%s: no longer held back", name)
        self.held = dict(held)
        if held:
            self._retry_at = time.monotonic() + self._gate_backoff.next_delay()
        else:
            self._gate_backoff.reset()

    def _reconcile(self, new_map: ResourceMap, held: Mapping[str, str]) -> ApplyResult:
        wanted = {name: r for name, r in new_map.resources.items()
                  if r.devices and name not in held}
        started: list[str] = []
        updated: list[str] = []
        stopped: list[str] = []
        errors: dict[str, str] = {}
        for name in sorted(set(self._servers) - set(wanted)):
            self._servers.pop(name).stop()
            stopped.append(name)
            log.info("stopped %s: no longer advertised", name)
        for name, resource in sorted(wanted.items()):
            manager = self._managers.manager(resource)
            running = self._servers.get(name)
            if running is not None:
                if running.update(manager):
                    updated.append(name)
                continue
            server = self._factory(manager, self.socket_dir)
            try:
                server.start()
            except (ServeError, OSError) as err:
                errors[name] = str(err)
                log.error("cannot serve %s: %s", name, err)
                continue
            self._servers[name] = server
            started.append(name)
        for name in set(new_map.resources) - set(wanted) - set(held):
            log.info("not advertising %s: it has no devices", name)
        self.errors = errors
        return ApplyResult(tuple(started), tuple(updated), tuple(stopped), errors, dict(held))

    def stop(self) -> None:
        """Stop the watch and every server; removes our sockets."""
        self._loop.stop()
        with self._lock:
            servers, self._servers = list(self._servers.values()), {}
        for server in servers:
            server.stop()


def _warm(warm: Callable[[], None]) -> None:
    """Run the managers' warm-up, logging instead of raising (a daemon thread's body)."""
    try:
        warm()
    except Exception:  # the tables are then built on first use, as without warm-up
        log.exception("allocator warm-up failed")
    else:
        log.info("allocator warm-up done")
