"""``nvidia-device-plugin``: the device plugin daemon.

Start-up: parse flags (flag > env > config file > default), pick the NVML backend, read the
snapshot once, build the resource map, serve one gRPC server per resource and register each with
the kubelet, then watch health. SIGHUP re-reads the configuration and re-enumerates the GPUs
(a bad configuration keeps the running one); SIGTERM/SIGINT stop every server, remove our
sockets and exit 0.

Exit status: 0 after a signal; 1 for an initialisation error with ``--fail-on-init-error``
(the default), after one line on stderr; 2 for invalid flags or configuration.
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
from typing import Any

from gpus import config as configmod
from gpus.config import Config, ConfigError
from gpus.model import Snapshot
from gpus.resources import ResourceMap, build_resource_map

log = logging.getLogger("deviceplugin")

PROG = "nvidia-device-plugin"
SOCKET_DIR_ENV = "PLUGIN_SOCKET_DIR"
EXIT_OK, EXIT_INIT_ERROR, EXIT_USAGE = 0, 1, 2


class InitError(RuntimeError):
    """The plugin cannot start; the message is the one line the user sees."""


def socket_dir_for(config: Config, override: str = "") -> str:
    """Where plugin sockets go: ``override``, else the kubelet socket's directory."""
    if override:
        return override
    kubelet_socket = config.flags.plugin.kubelet_socket
    if kubelet_socket:
        return os.path.dirname(kubelet_socket) or "."
    return os.path.dirname(configmod.PluginFlags().kubelet_socket)


class DevicePlugin:
    """The daemon's state and lifecycle, usable in-process (demo, tests) and from :func:`main`.

    ``reload_config`` returns ``(config, error)`` like :func:`gpus.config.reload`; without it
    a reload re-enumerates with the current configuration.
    """

    def __init__(
        self,
        config: Config,
        environ: Mapping[str, str],
        *,
        socket_dir: str = "",
        reload_config: Callable[[Config], tuple[Config, str | None]] | None = None,
        poll_interval: float = 0.1,
    ) -> None:
        self.config = config
        self.environ = dict(environ)
        self._socket_dir_override = socket_dir
        self._reload_config = reload_config
        self._poll_interval = poll_interval
        self._lock = threading.RLock()
        self.controller: Any = None  # the fake NVML controller when a fake backend is used
        self._backend_spec: str | None = None
        self.nvml: Any = None
        self.snapshot: Snapshot | None = None
        self.manager: Any = None
        self.health: Any = None

    @property
    def socket_dir(self) -> str:
        """Where this plugin's sockets live."""
        return socket_dir_for(self.config, self._socket_dir_override)

    @property
    def resource_map(self) -> ResourceMap:
        """The map currently served (empty before start)."""
        return self.manager.resource_map if self.manager is not None else ResourceMap()

    # --- start ----------------------------------------------------------------------------------

    def select_backend(self) -> Any:
        """Install the configured NVML backend (once); returns the fake's controller or None."""
        from gpus.backend import select_backend

        spec = self.config.flags.nvml
        if self._backend_spec != spec:
            if self.controller is not None:
                self.controller.uninstall()
                self.controller = None
            try:
                self.controller = select_backend(spec)
            except Exception as err:  # bad profile, unreadable file, control socket: one line
                raise InitError(f"--nvml {spec!r}: {err}") from err
            self._backend_spec = spec
        return self.controller

    def start(self) -> None:
        """Initialise NVML, serve every resource and start the health monitor.

        Raises InitError (one clear line) when NVML cannot start, no resource can be served,
        or the CDI spec cannot be written. Nothing is left running after an error.
        """
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        from deviceplugin.health import HealthMonitor
        from deviceplugin.manager import PluginManager
        from gpus.nvml import Nvml, NvmlError

        self.select_backend()
        nvml = Nvml()
        try:
            nvml.init()
        except NvmlError as err:
            raise InitError(f"failed to initialise NVML: {err}") from err
        self.nvml = nvml
        snapshot = self._read_snapshot()
        resource_map = build_resource_map(snapshot, self.config)
        self._write_cdi(resource_map)
        self.snapshot = snapshot
        self.manager = PluginManager(
            self.socket_dir,
            self.config.flags.plugin.kubelet_socket,
            self._context(snapshot),
            poll_interval=self._poll_interval,
        )
        result = self.manager.apply(resource_map)
        if result.errors and not result.started:
            raise InitError(next(iter(result.errors.values())))
        if not result.started:
            log.warning("no devices to advertise on this node (%d GPUs)", len(snapshot.gpus))
        self.manager.start()
        plugin = self.config.flags.plugin
        self.health = HealthMonitor(
            nvml,
            snapshot,
            self._on_health_change,
            self.environ,
            recovery_interval=plugin.health_recovery_interval,
            quiet_period=plugin.health_quiet_period,
        )
        self.health.start()
        log.info(
            "serving %s from %d GPUs in %s",
            ", ".join(result.started) or "nothing",
            len(snapshot.gpus),
            self.socket_dir,
        )

    def _read_snapshot(self) -> Snapshot:
        from gpus.nvml import NvmlError

        try:
            snapshot: Snapshot = self.nvml.read_snapshot(self.config.flags.sysfs_root)
        except NvmlError as err:
            raise InitError(f"failed to enumerate GPUs: {err}") from err
        return snapshot

    def _write_cdi(self, resource_map: ResourceMap) -> None:
        from deviceplugin.cdi import CdiError, write_cdi_spec

        try:
            write_cdi_spec(resource_map, self.config)
        except CdiError as err:
            raise InitError(str(err)) from err

    def _context(self, snapshot: Snapshot) -> Any:
        from deviceplugin.server import ServingContext

        return ServingContext.create(self.config, snapshot)

    # --- changes --------------------------------------------------------------------------------

    def _on_health_change(self, unhealthy: frozenset[str]) -> None:
        """Recompute the map with the new unhealthy set and push it (ListAndWatch at once)."""
        with self._lock:
            if self.manager is None or self.snapshot is None:
                return
            self.manager.apply(build_resource_map(self.snapshot, self.config, unhealthy))

    def reload(self) -> str | None:
        """SIGHUP: re-read the config and re-enumerate. Returns the error, or None when applied.

        On any error the running configuration, snapshot and servers stay as they were.
        """
        from deviceplugin.health import HealthMonitor

        with self._lock:
            new_config = self.config
            if self._reload_config is not None:
                new_config, error = self._reload_config(self.config)
                if error is not None:
                    log.error("reload: keeping the running configuration: %s", error)
                    return error
            if self.manager is None:  # idle after an init error: try to start again
                self.config = new_config
                try:
                    self.start()
                except InitError as err:
                    log.error("reload: still cannot start: %s", err)
                    return str(err)
                return None
            if socket_dir_for(new_config, self._socket_dir_override) != self.socket_dir or (
                new_config.flags.plugin.kubelet_socket != self.config.flags.plugin.kubelet_socket
                or new_config.flags.nvml != self.config.flags.nvml
            ):
                # Where we serve or what we read changed: restart everything.
                self.stop()
                self.config = new_config
                try:
                    self.start()
                except InitError as err:
                    log.error("reload: cannot start with the new configuration: %s", err)
                    return str(err)
                return None
            old_config = self.config
            self.config = new_config
            try:
                snapshot = self._read_snapshot()
                resource_map = build_resource_map(snapshot, new_config)
                self._write_cdi(resource_map)
            except InitError as err:
                self.config = old_config
                log.error("reload: keeping the running state: %s", err)
                return str(err)
            self.health.stop()
            self.snapshot = snapshot
            self.manager.apply(resource_map, self._context(snapshot))
            plugin = new_config.flags.plugin
            self.health = HealthMonitor(
                self.nvml,
                snapshot,
                self._on_health_change,
                self.environ,
                recovery_interval=plugin.health_recovery_interval,
                quiet_period=plugin.health_quiet_period,
            )
            self.health.start()
            log.info("reloaded: serving %s", ", ".join(sorted(resource_map.resources)))
            return None

    # --- stop -----------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop health checks and servers (removing our sockets) and shut NVML down."""
        with self._lock:
            if self.health is not None:
                self.health.stop()
                self.health = None
            if self.manager is not None:
                self.manager.stop()
                self.manager = None
            if self.nvml is not None:
                try:
                    self.nvml.shutdown()
                except Exception as err:  # shutting down anyway; say why it was untidy
                    log.warning("NVML shutdown failed: %s", err)
                self.nvml = None
            self.snapshot = None

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
        help="directory for the plugin sockets (default: the kubelet socket's directory) "
        f"[env {SOCKET_DIR_ENV}]",
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
    signals = _Signals()
    signals.install()
    plugin = DevicePlugin(
        config,
        environ,
        socket_dir=args.socket_dir or environ.get(SOCKET_DIR_ENV, ""),
        reload_config=lambda current: configmod.reload(current, args, environ),
    )
    try:
        plugin.start()
    except InitError as err:
        if plugin.config.flags.fail_on_init_error:
            plugin.close()
            signals.restore()
            return _die(f"initialisation failed: {err}", EXIT_INIT_ERROR)
        log.error(
            "initialisation failed: %s; idling (--fail-on-init-error=false), SIGHUP retries", err
        )
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
