"""``nvidia-device-plugin``: the device plugin daemon's command line.

Start-up: parse flags (flag > env > config file > default, all from the table in
gpus.config), then :class:`deviceplugin.plugin.DevicePlugin` picks the NVML backend, reads the
snapshot once, builds the resource map, serves one gRPC server per resource and registers each
with the kubelet, then watches health. SIGHUP re-reads the configuration and re-enumerates the
GPUs (a bad configuration keeps the running one; Unhealthy devices stay Unhealthy);
SIGTERM/SIGINT stop every server, remove our sockets and exit 0.

Readiness (``--ready-file``, env ``DP_READY_FILE``, default /run/nvidia-device-plugin/ready, ""
disables): deleted at start, created once every resource with devices is registered (or when
idling after an init error), deleted while a registration is lost; its content is the status
(JSON: readiness, device counts, problems such as invalid MIG layouts). ``--status-file`` (env
``DP_STATUS_FILE``, default "" = none) holds the same JSON and is always present. See
deviceplugin.readiness.

Sockets go to the kubelet socket's directory. ``--socket-dir`` (env ``PLUGIN_SOCKET_DIR``) may
name another only when registration is off (``--kubelet-socket ""``); otherwise it is refused at
start: the kubelet resolves the endpoint we register, a base name, in its own directory.

Logging: ``--log-level`` (env ``DP_LOG_LEVEL``), any case, for every package's loggers.

Metrics: ``--metrics-address`` (env ``DP_METRICS_ADDRESS``, default "" = off), ``[host]:port``,
serves the plugin's own Prometheus metrics (gpus.runtime.metrics, docs/metrics.md).

Exit status (gpus.runtime.exits): 0 after a signal; 1 for an initialisation error with
``--fail-on-init-error`` (the default), after one line on stderr; 2 for invalid flags or
configuration, including an ``--nvml`` backend that cannot be used as given (unknown or invalid
fake profile), whatever ``--fail-on-init-error`` says.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from deviceplugin.plugin import DevicePlugin
from deviceplugin.readiness import DEFAULT_READY_FILE, READY_FILE_ENV, STATUS_FILE_ENV
from deviceplugin.socketdir import (
    SOCKET_DIR_ENV,
    socket_dir_for,
    socket_dir_problem,
    socket_dir_unusable,
)
from gpus import config as configmod
from gpus.config import Config, ConfigError, PluginOptions
from gpus.errors import InitError
from gpus.runtime import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    BackendSpecError,
    Signals,
    run_daemon,
    setup_logging,
)
from gpus.runtime.heap import steady_heap
from gpus.runtime.metricsaddress import MetricsAddressError
from gpus.runtime.metricsaddress import parse_address as parse_metrics_address
from gpus.runtime.version import add_version_flag

if TYPE_CHECKING:
    from gpus.runtime.metrics import MetricsEndpoint, PluginMetrics

__all__ = [  # re-exported: tests, bench and the demo import them from here
    "DEFAULT_READY_FILE",
    "EXIT_INIT_ERROR",
    "EXIT_OK",
    "EXIT_USAGE",
    "PROG",
    "READY_FILE_ENV",
    "SOCKET_DIR_ENV",
    "STATUS_FILE_ENV",
    "BackendSpecError",
    "DevicePlugin",
    "InitError",
    "build_parser",
    "main",
    "ready_file_path",
    "replace_flags",
    "replace_plugin_flags",
    "socket_dir_for",
    "socket_dir_problem",
    "socket_dir_unusable",
    "status_file_path",
]

log = logging.getLogger("deviceplugin")

PROG = "nvidia-device-plugin"
EXIT_INIT_ERROR = EXIT_FAILURE


def build_parser() -> argparse.ArgumentParser:
    """The daemon's flags, every one a row of the configuration table."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    configmod.add_flags(parser, "plugin")
    add_version_flag(parser)
    return parser


METRICS_ADDRESS_ENV = "DP_METRICS_ADDRESS"


def metrics_address(flag: str | None, environ: Mapping[str, str]) -> tuple[str, int] | None:
    """Where to serve metrics (flag > env > off); ConfigError (exit 2) for a bad address."""
    text: str = configmod.resolve_setting(PluginOptions, "metrics_address", flag, environ,
                                          "plugin")
    try:
        return parse_metrics_address(text)
    except MetricsAddressError as err:
        raise ConfigError(str(err)) from None


def ready_file_path(flag: str | None, environ: Mapping[str, str]) -> str:
    """The readiness file: the flag, else ``$DP_READY_FILE``, else the default ("" disables)."""
    path: str = configmod.resolve_setting(PluginOptions, "ready_file", flag, environ, "plugin")
    return path


def status_file_path(flag: str | None, environ: Mapping[str, str]) -> str:
    """The status file: the flag, else ``$DP_STATUS_FILE``, else "" (none)."""
    path: str = configmod.resolve_setting(PluginOptions, "status_file", flag, environ, "plugin")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """Run the daemon until SIGTERM/SIGINT; see the module docstring for exit statuses."""
    args = build_parser().parse_args(argv)
    environ = dict(os.environ)
    return run_daemon(PROG, lambda: _run(args, environ))


def _run(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    config = configmod.resolve(args, environ)
    options = config.daemon.plugin
    problem = socket_dir_problem(config, options.socket_dir)
    if problem is not None:
        raise ConfigError(problem)
    address = metrics_address(args.metrics_address, environ)
    undo_logging = setup_logging(config.daemon.log_level)
    steady_heap()  # kubelet requests of hundreds of KiB: no page faults to take memory back
    metrics: PluginMetrics | None = None
    endpoint: MetricsEndpoint | None = None
    if address is not None:
        # prometheus_client and its HTTP server: ~30 ms of start-up, paid only when metrics are on.
        from gpus.runtime.metrics import PluginMetrics, serve

        metrics = PluginMetrics()
        endpoint = serve(address, metrics.registry)
    signals = Signals().install()
    plugin = DevicePlugin(
        config,
        environ,
        socket_dir=options.socket_dir,
        reload_config=lambda current: configmod.reload(current, args, environ),
        ready_file=options.ready_file,
        status_file=options.status_file,
        metrics=metrics,
    )
    plugin.readiness.clear()  # a previous run's file (the emptyDir outlives the container)
    try:
        _start(plugin)
        while signals.wait() == "reload":
            log.info("SIGHUP: reloading configuration and re-enumerating GPUs")
            plugin.reload()
        log.info("stopping")
        return EXIT_OK
    finally:
        plugin.close()
        signals.restore()
        if endpoint is not None:
            endpoint.stop()
        undo_logging()


def _start(plugin: DevicePlugin) -> None:
    """Start, or idle after an initialisation error when --fail-on-init-error=false."""
    try:
        plugin.start()
    except ConfigError:
        raise  # a usage error (BackendSpecError): exit 2 whatever --fail-on-init-error says
    except InitError as err:
        if plugin.config.flags.fail_on_init_error:
            raise
        log.error(
            "initialisation failed: %s; idling (--fail-on-init-error=false), SIGHUP retries", err
        )
        # Idle on purpose: nothing to register, and a restart by the probes would not help.
        plugin.idle(err)


def replace_flags(config: Config, **changes: Any) -> Config:
    """``config`` with some ``flags`` fields changed (demo and tests)."""
    return dataclasses.replace(config, flags=dataclasses.replace(config.flags, **changes))


def replace_plugin_flags(config: Config, **changes: Any) -> Config:
    """``config`` with some ``flags.plugin`` fields changed (demo and tests)."""
    plugin = dataclasses.replace(config.flags.plugin, **changes)
    return replace_flags(config, plugin=plugin)


if __name__ == "__main__":
    sys.exit(main())
