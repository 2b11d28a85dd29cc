"""``nvidia-device-plugin``: the device plugin daemon.

Start-up: parse flags (flag > env > config file > default), pick the NVML backend, read the
snapshot once, build the resource map, serve one gRPC server per resource and register each with
the kubelet, then watch health. SIGHUP re-reads the configuration and re-enumerates the GPUs
(a bad configuration keeps the running one; Unhealthy devices stay Unhealthy); SIGTERM/SIGINT
stop every server, remove our sockets and exit 0.

Readiness (``--ready-file``, env ``DP_READY_FILE``, default /run/nvidia-device-plugin/ready, ""
disables): deleted at start, created once every resource with devices is registered (or when
idling after an init error), deleted while a registration is lost; its content is the status
(JSON: readiness, device counts, problems such as invalid MIG layouts). ``--status-file`` (env
``DP_STATUS_FILE``, default "" = none) holds the same JSON and is always present. See
deviceplugin.readiness.

Sockets go to the kubelet socket's directory. ``--socket-dir`` (env ``PLUGIN_SOCKET_DIR``) may
name another only when registration is off (``--kubelet-socket ""``); otherwise it is refused at
start: the kubelet resolves the endpoint we register, a base name, in its own directory.

Exit status: 0 after a signal; 1 for an initialisation error with ``--fail-on-init-error``
(the default), after one line on stderr; 2 for invalid flags or configuration, including an
``--nvml`` backend that cannot be used as given (unknown or invalid fake profile), whatever
``--fail-on-init-error`` says.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from types import FrameType
from typing import TYPE_CHECKING, Any

from deviceplugin.readiness import (
    DEFAULT_READY_FILE,
    READY_FILE_ENV,
    STATUS_FILE_ENV,
    ReadinessFile,
    ResourceStatus,
)
from gpus import config as configmod
from gpus.config import Config, ConfigError
from gpus.model import Snapshot
from gpus.resources import ResourceMap, build_resource_map

if TYPE_CHECKING:  # imported lazily at run time: start-up time matters (docs/benchmarks.md)
    from deviceplugin.health import HealthMonitor
    from deviceplugin.manager import PluginManager
    from deviceplugin.rm import NodeManagers
    from gpus.fake import FakeNvml
    from gpus.nvml import Nvml

log = logging.getLogger("deviceplugin")

PROG = "nvidia-device-plugin"
SOCKET_DIR_ENV = "PLUGIN_SOCKET_DIR"
EXIT_OK, EXIT_INIT_ERROR, EXIT_USAGE = 0, 1, 2


class InitError(RuntimeError):
    """The plugin cannot start; the message is the one line the user sees."""


class BackendSpecError(InitError):
    """``--nvml`` names a backend that cannot be used as given (bad form, unknown or invalid
    profile): a usage error, exit 2 whatever ``--fail-on-init-error`` says, as GFD does."""


def socket_dir_for(config: Config, override: str = "") -> str:
    """Where plugin sockets go: ``override``, else the kubelet socket's directory."""
    if override:
        return override
    kubelet_socket = config.flags.plugin.kubelet_socket
    if kubelet_socket:
        return os.path.dirname(kubelet_socket) or "."
    return os.path.dirname(configmod.PluginFlags().kubelet_socket)


def socket_dir_problem(config: Config, override: str) -> str | None:
    """Why ``override`` (--socket-dir) cannot be used with ``config``'s kubelet socket, or None.

    Register sends only the socket's base name and the kubelet looks for it in its own
    directory, so plugin sockets anywhere else would register and never be reached.
    """
    kubelet_socket = config.flags.plugin.kubelet_socket
    if not override or not kubelet_socket:
        return None
    kubelet_dir = os.path.dirname(kubelet_socket) or "."
    if os.path.realpath(override) == os.path.realpath(kubelet_dir):
        return None
    return (f"--socket-dir {override!r} differs from the kubelet socket's directory "
            f"{kubelet_dir!r}: the kubelet could not reach our sockets; drop --socket-dir "
            "or set --kubelet-socket \"\" (no registration)")


def socket_dir_unusable(config: Config, override: str) -> str | None:
    """Why no plugin socket can be created where they go, naming the setting that chose the
    directory, or None.

    Checked once before any server starts: otherwise each resource would fail with the same
    reason, logged by the manager and then printed again as the start-up error.
    """
    from deviceplugin.server import socket_dir_unusable as unusable

    directory = socket_dir_for(config, override)
    problem = unusable(directory)
    if problem is None:
        return None
    if override:
        return f"{problem} (--socket-dir, env {SOCKET_DIR_ENV})"
    kubelet_socket = config.flags.plugin.kubelet_socket
    if not kubelet_socket:
        return f"{problem} (no registration: choose the directory with --socket-dir)"
    return (f"{problem}: it is the directory of the kubelet socket {kubelet_socket!r}; set "
            "--kubelet-socket (env KUBELET_SOCKET) to the kubelet's device-plugins socket, "
            "or set it to \"\" and choose a directory with --socket-dir to serve without "
            "registering")


class DevicePlugin:
    """The daemon's state and lifecycle, usable in-process (demo, tests) and from :func:`main`.

    ``reload_config`` returns ``(config, error)`` like :func:`gpus.config.reload`; without it
    a reload re-enumerates with the current configuration. ``ready_file`` is the readiness file
    and ``status_file`` the always-present status file (:mod:`deviceplugin.readiness`; ""
    disables either).

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
    ) -> None:
        self.config = config
        self.environ = dict(environ)
        self._socket_dir_override = socket_dir
        self._reload_config = reload_config
        self._poll_interval = poll_interval
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
        self.controller: FakeNvml | None = None  # set when a fake backend is used
        self._backend_spec: str | None = None
        self.nvml: Nvml | None = None
        self.snapshot: Snapshot | None = None
        self.manager: PluginManager | None = None
        self.health: HealthMonitor | None = None

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
        """Install the configured NVML backend (once); returns the fake's controller or None."""
        from gpus.backend import BackendError, effective_config, select_backend

        spec = self.config.flags.nvml
        if self._backend_spec != spec:
            if self.controller is not None:
                self.controller.uninstall()
                self.controller = None
            try:
                self.controller = select_backend(spec, sysfs_root=self.config.flags.sysfs_root)
            except BackendError as err:  # bad spec or profile: a restart would not help
                raise BackendSpecError(f"invalid --nvml: {err}") from err  # err names spec
            except Exception as err:  # control socket, sysfs tree: one line
                raise InitError(f"--nvml {spec!r}: {err}") from err
            self._backend_spec = spec
        # A fake's profile answers sysfs too (PCI class, NUMA): read where it wrote them.
        self.config = effective_config(self.config, self.controller)
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
        from deviceplugin.manager import PluginManager
        from gpus.nvml import Nvml, NvmlError

        problem = socket_dir_problem(self.config, self._socket_dir_override)
        if problem is not None:
            raise InitError(problem)
        self.select_backend()
        nvml = Nvml()
        try:
            nvml.init()
        except NvmlError as err:
            raise InitError(f"failed to initialise NVML: {err}") from err
        self.nvml = nvml
        snapshot = self._read_snapshot()
        resource_map = build_resource_map(snapshot, self.config)
        self._cdi_problems = self._write_cdi(resource_map)
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
        )
        result = self.manager.apply(resource_map)
        if result.errors and not result.started:
            name, error = next(iter(result.errors.items()))
            raise InitError(f"cannot serve {name}: {error}")
        self.publish_status()
        if not result.started:
            log.warning("no devices to advertise on this node (%d GPUs)", len(snapshot.gpus))
        self.manager.start()
        with self._lock:
            self.health = self._new_health(snapshot, None)
        self.health.start()
        log.info(
            "serving %s from %d GPUs in %s",
            ", ".join(result.started) or "nothing",
            len(snapshot.gpus),
            self.socket_dir,
        )

    def _read_snapshot(self) -> Snapshot:
        from gpus.nvml import NvmlError

        if self.nvml is None:
            raise InitError("NVML is not initialised")
        try:
            snapshot: Snapshot = self.nvml.read_snapshot(self.config.flags.sysfs_root)
        except NvmlError as err:
            raise InitError(f"failed to enumerate GPUs: {err}") from err
        return snapshot

    def _write_cdi(self, resource_map: ResourceMap) -> tuple[str, ...]:
        """Write the CDI spec; returns its problems (MIG devices left out of it)."""
        from deviceplugin.cdi import CdiError, write_cdi_spec

        problems: list[str] = []
        try:
            write_cdi_spec(resource_map, self.config, problems=problems)
        except CdiError as err:
            raise InitError(str(err)) from err
        return tuple(problems)

    def publish_status(self) -> None:
        """Report the served resources and every known problem to the readiness files."""
        manager = self.manager
        resources: dict[str, ResourceStatus] = {}
        problems: list[str] = []
        if manager is not None:
            served = manager.resource_map
            for name, resource in served.resources.items():
                healthy = sum(1 for d in resource.devices if d.healthy)
                resources[name] = ResourceStatus(len(resource.devices), healthy)
            problems += served.problems
            problems += (f"cannot serve {name}: {error}"
                         for name, error in sorted(manager.errors.items()))
            problems += self._cdi_problems
        if self._init_problem:
            problems.append(self._init_problem)
        self.readiness.report(resources, problems)

    def _context(self, snapshot: Snapshot) -> NodeManagers:
        from deviceplugin.rm import NodeManagers

        return NodeManagers.create(self.config, snapshot)

    def _new_health(self, snapshot: Snapshot, previous: HealthMonitor | None) -> HealthMonitor:
        """A health monitor for ``snapshot`` reporting to us (call with ``_lock`` held).

        ``previous`` (stopped) hands over its unhealthy devices; see HealthMonitor.
        """
        from deviceplugin.health import HealthMonitor

        if self.nvml is None:
            raise InitError("NVML is not initialised")
        self._health_generation += 1
        generation = self._health_generation
        plugin = self.config.flags.plugin
        return HealthMonitor(
            self.nvml,
            snapshot,
            lambda unhealthy: self._on_health_change(generation, unhealthy),
            self.environ,
            recovery_interval=plugin.health_recovery_interval,
            quiet_period=plugin.health_quiet_period,
            previous=previous,
        )

    # --- changes --------------------------------------------------------------------------------

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
                    from gpus.backend import effective_config

                    new_config = effective_config(new_config, self.controller)
            if self.manager is None:  # idle after an init error: try to start again
                self.config = new_config
                return self._restart("reload: still cannot start")
            if socket_dir_for(new_config, self._socket_dir_override) != self.socket_dir or (
                new_config.flags.plugin.kubelet_socket != self.config.flags.plugin.kubelet_socket
                or new_config.flags.nvml != self.config.flags.nvml
            ):
                # Where we serve or what we read changed: restart everything.
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
            snapshot = self._read_snapshot()
            resource_map = build_resource_map(snapshot, new_config)
            cdi_problems = self._write_cdi(resource_map)
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
            if self.nvml is not None:
                try:
                    self.nvml.shutdown()
                except Exception as err:  # shutting down anyway; say why it was untidy
                    log.warning("NVML shutdown failed: %s", err)
                self.nvml = None

    def close(self) -> None:
        """Stop, and remove the fake NVML backend if one was installed."""
        self.stop()
        if self.controller is not None:
            self.controller.uninstall()
            self.controller = None
            self._backend_spec = None


# --- command line -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The daemon's flags: the shared configuration flags plus our own."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    configmod.add_flags(parser, "plugin")
    parser.add_argument(
        "--socket-dir",
        default=None,
        help="directory for the plugin sockets (default: the kubelet socket's directory); "
        "another directory only with --kubelet-socket \"\" (no registration) "
        f"[env {SOCKET_DIR_ENV}]",
    )
    parser.add_argument(
        "--ready-file",
        default=None,
        help="readiness file for the DaemonSet's probes, created once every resource is "
        f"registered; empty disables it (default {DEFAULT_READY_FILE}) [env {READY_FILE_ENV}]",
    )
    parser.add_argument(
        "--status-file",
        default=None,
        help="status file, always present: JSON with readiness, device counts and problems "
        f"(invalid MIG layouts...); empty disables it (default empty) [env {STATUS_FILE_ENV}]",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=("debug", "info", "warning", "error"),
        help="logging verbosity (default info)",
    )
    return parser


class _Signals:
    """Signal handlers that only queue the signal; the main loop acts on it."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

    def __init__(self) -> None:
        self.pending: collections.deque[int] = collections.deque()
        self.event = threading.Event()
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        """Queue SIGTERM, SIGINT and SIGHUP from now on."""
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        """Put the previous handlers back (main() may run inside a test process)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.pending.append(signum)
        self.event.set()

    def next(self) -> int:
        """Block until a signal arrives; return it."""
        while not self.pending:
            self.event.wait(1.0)
            self.event.clear()
        return self.pending.popleft()


def ready_file_path(flag: str | None, environ: Mapping[str, str]) -> str:
    """The readiness file: the flag, else ``$DP_READY_FILE``, else the default ("" disables)."""
    if flag is not None:
        return flag
    return environ.get(READY_FILE_ENV, DEFAULT_READY_FILE)


def status_file_path(flag: str | None, environ: Mapping[str, str]) -> str:
    """The status file: the flag, else ``$DP_STATUS_FILE``, else "" (none)."""
    if flag is not None:
        return flag
    return environ.get(STATUS_FILE_ENV, "")


def _die(message: str, status: int) -> int:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """Run the daemon until SIGTERM/SIGINT; see the module docstring for exit statuses."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    environ = dict(os.environ)
    try:
        config = configmod.resolve(args, environ)
    except ConfigError as err:
        return _die(f"error: {err}", EXIT_USAGE)
    spec = config.flags.nvml
    if spec != "real" and not spec.startswith("fake:"):
        return _die(
            f"error: --nvml {spec!r} is not valid: use real or fake:<profile name or .yaml path>",
            EXIT_USAGE,
        )
    socket_dir = args.socket_dir or environ.get(SOCKET_DIR_ENV, "")
    problem = socket_dir_problem(config, socket_dir)
    if problem is not None:
        return _die(f"error: {problem}", EXIT_USAGE)
    signals = _Signals()
    signals.install()
    plugin = DevicePlugin(
        config,
        environ,
        socket_dir=socket_dir,
        reload_config=lambda current: configmod.reload(current, args, environ),
        ready_file=ready_file_path(args.ready_file, environ),
        status_file=status_file_path(args.status_file, environ),
    )
    plugin.readiness.clear()  # a previous run's file (the emptyDir outlives the container)
    try:
        plugin.start()
    except BackendSpecError as err:
        plugin.close()
        signals.restore()
        return _die(f"error: {err}", EXIT_USAGE)
    except InitError as err:
        if plugin.config.flags.fail_on_init_error:
            plugin.close()
            signals.restore()
            return _die(f"initialisation failed: {err}", EXIT_INIT_ERROR)
        log.error(
            "initialisation failed: %s; idling (--fail-on-init-error=false), SIGHUP retries", err
        )
        # Idle on purpose: nothing to register, and a restart by the probes would not help.
        plugin.idle(err)
    try:
        while True:
            signum = signals.next()
            if signum == signal.SIGHUP:
                log.info("SIGHUP: reloading configuration and re-enumerating GPUs")
                plugin.reload()
                continue
            log.info("%s: stopping", signal.Signals(signum).name)
            return EXIT_OK
    finally:
        plugin.close()
        signals.restore()


def replace_flags(config: Config, **changes: Any) -> Config:
    """``config`` with some ``flags`` fields changed (demo and tests)."""
    return dataclasses.replace(config, flags=dataclasses.replace(config.flags, **changes))


def replace_plugin_flags(config: Config, **changes: Any) -> Config:
    """``config`` with some ``flags.plugin`` fields changed (demo and tests)."""
    plugin = dataclasses.replace(config.flags.plugin, **changes)
    return replace_flags(config, plugin=plugin)


if __name__ == "__main__":
    sys.exit(main())
