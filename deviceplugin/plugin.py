"""The device plugin's state and lifecycle, usable in-process (demo, tests) and from the CLI
(:mod:`deviceplugin.main`).

Start: install the NVML backend, open NVML, read the snapshot, build the resource map, write
the CDI spec, serve and register every resource (:mod:`deviceplugin.manager`), then watch
health. Health changes and reloads recompute the map and the manager applies the difference.
The parts: :mod:`deviceplugin.session` (NVML backend and session, CDI writing),
:mod:`deviceplugin.socketdir`, :mod:`deviceplugin.status`, :mod:`deviceplugin.health`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from deviceplugin.allocate import cdi_enabled
from deviceplugin.extras import check_imex
from deviceplugin.manager import PluginManager
from deviceplugin.mpsgate import mps_gate
from deviceplugin.readiness import ReadinessFile
from deviceplugin.rm import NodeManagers
from deviceplugin.session import NvmlSession, remove_cdi, write_cdi
from deviceplugin.socketdir import socket_dir_for, socket_dir_problem, socket_dir_unusable
from deviceplugin.status import plugin_status
from gpus.backoff import Backoff
from gpus.config import Config
from gpus.errors import InitError
from gpus.model import Snapshot
from gpus.mps import local_root
from gpus.resources import Resource, ResourceMap, build_resource_map

if TYPE_CHECKING:
    from deviceplugin.health import HealthMonitor
    from gpus.fake import FakeNvml
    from gpus.nvml import Nvml
    from gpus.runtime.metrics import PluginMetrics  # prometheus_client: only with metrics on

log = logging.getLogger("deviceplugin")

# How long start() lets the first Register go before starting the health monitor (see _start).
# The mock kubelet answers in ~10 ms; a kubelet that does not answer must not hold health
# checks back for the whole Register timeout.
FIRST_REGISTER_WAIT_S = 1.0


def needs_restart(old: Config, new: Config, socket_dir: str) -> bool:
    """Reload policy: True when ``new`` changes where we serve or what we read (the socket
    directory, the kubelet socket, the NVML backend), so every server must restart; otherwise
    the running servers take the new map in place."""
    return (socket_dir_for(new, socket_dir) != socket_dir_for(old, socket_dir)
            or new.flags.plugin.kubelet_socket != old.flags.plugin.kubelet_socket
            or new.flags.nvml != old.flags.nvml)


class DevicePlugin:
    """The daemon's state and lifecycle.

    ``reload_config`` returns ``(config, error)`` like :func:`gpus.config.reload`; without it
    a reload re-enumerates with the current configuration. ``ready_file`` is the readiness file
    and ``status_file`` the always-present status file (:mod:`deviceplugin.readiness`; ""
    disables either). ``environ`` is the environment the configuration came from.
    ``mps_root_view`` is where this process sees the MPS root (None: ``/mps`` if mounted, else
    ``--mps-root``); MPS resources are served once their daemon answers there
    (:mod:`deviceplugin.mpsgate`), checked again after ``mps_backoff`` delays until then.

    Locking: ``_lock`` guards the state (config, snapshot, manager, health) and is never held
    while waiting for a thread: health callbacks take it, so joining the health monitor under it
    would deadlock. ``_reload_lock`` serialises reloads and stops.
    """

    def __init__(
        self,
        config: Config,
        environ: Mapping[str, str],
        *,
        socket_dir: str = "",
        reload_config: Callable[[Config], tuple[Config, str | None]] | None = None,
        poll_interval: float = 0.1,
        ready_file: str = "",
        status_file: str = "",
        mps_root_view: str | None = None,
        mps_backoff: Callable[[], Backoff] = lambda: Backoff(initial=1.0, cap=30.0),
        metrics: PluginMetrics | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics  # None: --metrics-address unset
        self.environ = dict(environ)
        self._socket_dir_override = socket_dir
        self._reload_config = reload_config
        self._poll_interval = poll_interval
        self._mps_root_view = mps_root_view
        self._mps_backoff = mps_backoff
        self._lock = threading.RLock()
        self._reload_lock = threading.RLock()
        # Bumped whenever the health monitor is replaced or stopped: a late callback of an old
        # monitor (blocked on _lock meanwhile) sees a stale generation and does nothing.
        self._health_generation = 0
        self.readiness = ReadinessFile(ready_file, status_file)
        # Problems outside the resource map, for the status: MIG devices left out of the CDI
        # spec, or why we idle after an initialisation error.
        self._cdi_problems: tuple[str, ...] = ()
        self._init_problem = ""
        self.session = NvmlSession(self.environ)
        self.snapshot: Snapshot | None = None
        self.manager: PluginManager | None = None
        self.health: HealthMonitor | None = None

    @property
    def controller(self) -> FakeNvml | None:
        """The fake backend's controller, when a fake is installed."""
        return self.session.controller

    @property
    def nvml(self) -> Nvml | None:
        """The open NVML session (None while stopped)."""
        return self.session.nvml

    @property
    def socket_dir(self) -> str:
        """Where this plugin's sockets live."""
        return socket_dir_for(self.config, self._socket_dir_override)

    @property
    def resource_map(self) -> ResourceMap:
        """The map currently served (empty before start)."""
        return self.manager.resource_map if self.manager is not None else ResourceMap()

    # --- start ----------------------------------------------------------------------------------

    def select_backend(self) -> FakeNvml | None:
        """Install the configured NVML backend (once); returns the fake's controller or None.

        Raises BackendSpecError (an InitError that is a usage error) or InitError.
        """
        self.config = self.session.select(self.config)
        return self.controller

    def start(self) -> None:
        """Initialise NVML, serve every resource and start the health monitor.

        Raises InitError (one clear line) when NVML cannot start, no resource can be served,
        or the CDI spec cannot be written. Nothing is left running after an error.
        """
        self._init_problem = ""
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def idle(self, error: InitError) -> None:
        """Idle after an initialisation error (--fail-on-init-error=false): ready, since a
        restart by the probes would not help, with the error as the status's problem."""
        self._init_problem = f"initialisation failed: {error}"
        self.publish_status()
        self.readiness.set(True)

    def _start(self) -> None:
        problem = socket_dir_problem(self.config, self._socket_dir_override)
        if problem is not None:
            raise InitError(problem)
        self.select_backend()
        check_imex(self.config)  # --imex-required: a missing channel is an InitError
        self.session.open()
        snapshot = self.session.read_snapshot(self.config.flags.sysfs_root)
        resource_map = build_resource_map(snapshot, self.config)
        self._cdi_problems = self._write_cdi(resource_map, snapshot, self.config)
        self.snapshot = snapshot
        problem = socket_dir_unusable(self.config, self._socket_dir_override)
        if problem is not None:
            raise InitError(problem)
        self.manager = PluginManager(
            self.socket_dir,
            self.config.flags.plugin.kubelet_socket,
            self._context(snapshot),
            poll_interval=self._poll_interval,
            on_ready=self.readiness.set,
            gate=self._mps_gate(),
            gate_backoff=self._mps_backoff,
            on_status=self.publish_status,
            metrics=self.metrics,
        )
        result = self.manager.apply(resource_map)
        if result.errors and not result.started:
            name, error = next(iter(result.errors.items()))
            raise InitError(f"cannot serve {name}: {error}")
        self.publish_status()
        if not result.started and not result.held:
            log.warning("no devices to advertise on this node (%d GPUs)", len(snapshot.gpus))
        self.manager.start()
        # As NVIDIA's plugin (serve, register, then check health): the health monitor starts
        # once the first Register is done. Built beside it, its imports and NVML event set
        # competed with the watch thread for the GIL: the Register took ~14 ms instead of ~9.
        self.manager.registration.wait_first_tick(FIRST_REGISTER_WAIT_S)
        with self._lock:
            self.health = self._new_health(snapshot, None)
        self.health.start()
        log.info("serving %s from %d GPUs in %s", ", ".join(result.started) or "nothing",
                 len(snapshot.gpus), self.socket_dir)

    def _write_cdi(self, resource_map: ResourceMap, snapshot: Snapshot,
                   config: Config) -> tuple[str, ...]:
        """The CDI spec for ``resource_map`` (CDI mode only); InitError as write_cdi says.
        Plain files stand in for device nodes only under a fake backend's simulated root."""
        return write_cdi(resource_map, config, snapshot.system.driver_version or None,
                         allow_plain_device_files=self.controller is not None)

    def publish_status(self) -> None:
        """Report the served resources and every known problem to the readiness files."""
        manager = self.manager
        extra = list(self._cdi_problems) if manager is not None else []
        if self._init_problem:
            extra.append(self._init_problem)
        resources, problems = plugin_status(
            manager.resource_map if manager is not None else None,
            manager.unserved if manager is not None else {}, extra)
        self.readiness.report(resources, problems)

    def _mps_gate(self) -> Callable[[Resource], str | None]:
        root = self._mps_root_view
        if root is None:
            root = local_root(self.config.flags.mps_root)
        return mps_gate(root, self.environ)

    def _context(self, snapshot: Snapshot) -> NodeManagers:
        return NodeManagers.create(self.config, snapshot)

    # --- health lifecycle -----------------------------------------------------------------------

    def _new_health(self, snapshot: Snapshot, previous: HealthMonitor | None) -> HealthMonitor:
        """A health monitor for ``snapshot`` reporting to us (call with ``_lock`` held).

        ``previous`` (stopped) hands over its unhealthy devices; see HealthMonitor. The policy
        comes from DP_DISABLE_HEALTHCHECKS / DP_ENABLE_HEALTHCHECKS, resolved by gpus.config.
        """
        # Imported here, after the first Register (see _start): the monitor, its policy and
        # the NVML event watcher are ~2 ms of imports (-X importtime, best of 10, 2-CPU
        # machine) that would otherwise come before it.
        from deviceplugin.health import HealthMonitor, health_policy

        if self.nvml is None:
            raise InitError("NVML is not initialised")
        self._health_generation += 1
        generation = self._health_generation
        plugin, options = self.config.flags.plugin, self.config.daemon.plugin
        return HealthMonitor(
            self.nvml,
            snapshot,
            lambda unhealthy: self._on_health_change(generation, unhealthy),
            health_policy(options.disable_healthchecks, options.enable_healthchecks),
            recovery_interval=plugin.health_recovery_interval,
            quiet_period=plugin.health_quiet_period,
            previous=previous,
            metrics=self.metrics,
        )

    def _on_health_change(self, generation: int, unhealthy: frozenset[str]) -> None:
        """Recompute the map with the new unhealthy set and push it (ListAndWatch at once)."""
        with self._lock:
            if (
                generation != self._health_generation
                or self.manager is None
                or self.snapshot is None
            ):
                return  # a replaced monitor's last word, or we are stopping
            self.manager.apply(build_resource_map(self.snapshot, self.config, unhealthy))
            self.publish_status()

    # --- reload ---------------------------------------------------------------------------------

    def reload(self) -> str | None:
        """SIGHUP: re-read the config and re-enumerate. Returns the error, or None when applied.

        On any error the running configuration, snapshot and servers stay as they were. Devices
        that are Unhealthy stay so (the new health monitor starts from the old one's set) until
        they recover.
        """
        with self._reload_lock:
            new_config = self.config
            if self._reload_config is not None:
                new_config, error = self._reload_config(self.config)
                if error is not None:
                    log.error("reload: keeping the running configuration: %s", error)
                    return error
                if new_config.flags.nvml == self.config.flags.nvml:
                    new_config = self.session.backend.effective(new_config)
            if self.manager is None:  # idle after an init error: try to start again
                self.config = new_config
                return self._restart("reload: still cannot start")
            if needs_restart(self.config, new_config, self._socket_dir_override):
                self.stop()
                self.config = new_config
                return self._restart("reload: cannot start with the new configuration")
            return self._reload_in_place(new_config, self.manager)

    def _restart(self, what: str) -> str | None:
        """Start after a stop or while idle; on failure stay idle (and ready: see readiness)."""
        try:
            self.start()
        except InitError as err:
            log.error("%s: %s", what, err)
            self.idle(err)
            return str(err)
        return None

    def _reload_in_place(self, new_config: Config, manager: PluginManager) -> str | None:
        """Same sockets and backend: re-enumerate and apply the new map to the running servers."""
        old_config = self.config
        self.config = new_config
        try:
            check_imex(new_config)
            snapshot = self.session.read_snapshot(new_config.flags.sysfs_root)
            resource_map = build_resource_map(snapshot, new_config)
            cdi_problems = self._write_cdi(resource_map, snapshot, new_config)
            if not cdi_enabled(new_config):  # left CDI mode: our names must not resolve
                remove_cdi(old_config)
        except InitError as err:
            self.config = old_config
            log.error("reload: keeping the running state: %s", err)
            return str(err)
        # Stop the old monitor first, without _lock (its callback may be waiting for it), so
        # its unhealthy set is final when the new one takes it over.
        old_health = self.health
        if old_health is not None:
            old_health.stop()
        with self._lock:
            self.health = self._new_health(snapshot, old_health)
            self.snapshot = snapshot
            carried = self.health.unhealthy
            self._cdi_problems = cdi_problems
            manager.apply(
                build_resource_map(snapshot, new_config, carried), self._context(snapshot)
            )
            self.publish_status()
        self.health.start()
        log.info("reloaded: serving %s", ", ".join(sorted(resource_map.resources)))
        return None

    # --- stop -----------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop health checks and servers (removing our sockets) and shut NVML down.

        The readiness file is deleted. Threads are joined outside ``_lock`` (see the class
        docstring).
        """
        with self._reload_lock:
            with self._lock:
                health, self.health = self.health, None
                manager, self.manager = self.manager, None
                self._health_generation += 1  # late health callbacks become no-ops
                self.snapshot = None
            if health is not None:
                health.stop()
            if manager is not None:
                manager.stop()
            # After the watch thread is gone: a last tick cannot create the file again.
            self.readiness.set(False)
            self._cdi_problems = ()
            self.publish_status()
            remove_cdi(self.config)  # no CDI name of ours outlives the plugin
            self.session.close()

    def close(self) -> None:
        """Stop, and remove the fake NVML backend if one was installed."""
        self.stop()
        self.session.uninstall()
