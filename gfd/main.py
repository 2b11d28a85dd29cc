"""``gpu-feature-discovery``: label the node's GPUs, once or every ``--sleep-interval``.

The command line over :class:`gfd.daemon.Daemon` (the labelling loop) and the shared runtime
(gpus.runtime: signals, logging, the NVML backend, exit codes). Every flag is a row of the
configuration table (gpus/config/model.py): NVIDIA's GFD settings, and our own options in
``daemon`` (``--output-mode``, ``--node-name``, ``--kubeconfig``, ``--health-file``,
``--dry-run``, ``--log-level``/``GFD_LOG_LEVEL``, any case, for every package's loggers).

Metrics: ``--metrics-address`` (env ``GFD_METRICS_ADDRESS``, default "" = off), ``[host]:port``,
serves GFD's own Prometheus metrics (gpus.runtime.metrics, docs/metrics.md); a row of the
configuration table like every other option.

Exit status (gpus.runtime.exits): 0 ok (after a signal, or a oneshot pass that succeeded);
1 a runtime failure (NVML with --fail-on-init-error, the API server, a kubeconfig); 2 bad
usage or configuration.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from gfd.daemon import (
    ONESHOT_PATCH_ATTEMPTS,
    Daemon,
    Options,
    read_machine_type,
    read_nvml_snapshot,
)
from gpus.config import (
    DEFAULT_HEALTH_FILE,
    OUTPUT_MODES,
    Config,
    ConfigError,
    DaemonOptions,
    GfdOptions,
    add_flags,
    resolve,
    resolve_section,
    resolve_setting,
)
from gpus.errors import InitError
from gpus.runtime import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    NvmlBackend,
    Signals,
    run_daemon,
    setup_logging,
)
from gpus.runtime.metricsaddress import MetricsAddressError
from gpus.runtime.metricsaddress import parse_address as parse_metrics_address
from gpus.runtime.version import add_version_flag

if TYPE_CHECKING:
    from gpus.runtime.metrics import GfdMetrics, MetricsEndpoint

__all__ = [  # re-exported: tests and the bench import them from here
    "DEFAULT_HEALTH_FILE",
    "EXIT_FAILURE",
    "EXIT_OK",
    "EXIT_USAGE",
    "ONESHOT_PATCH_ATTEMPTS",
    "OPTION_ENV_VARS",
    "OUTPUT_MODES",
    "PROG",
    "Daemon",
    "InitError",
    "Options",
    "build_parser",
    "main",
    "read_machine_type",
    "read_nvml_snapshot",
    "resolve_options",
]

PROG = "gpu-feature-discovery"
# Environment variables of the process's own options (rows of gpus.config's ``daemon``).
OUTPUT_MODE_ENV = "GFD_OUTPUT_MODE"
NODE_NAME_ENV = "NODE_NAME"
KUBECONFIG_ENV = "GFD_KUBECONFIG"
LOG_LEVEL_ENV = "GFD_LOG_LEVEL"
HEALTH_FILE_ENV = "GFD_HEALTH_FILE"
OPTION_ENV_VARS = (OUTPUT_MODE_ENV, NODE_NAME_ENV, KUBECONFIG_ENV, LOG_LEVEL_ENV, HEALTH_FILE_ENV)


def build_parser() -> argparse.ArgumentParser:
    """The command line: every flag a row of the configuration table."""
    parser = argparse.ArgumentParser(
        prog=PROG, allow_abbrev=False,
        description="Generate nvidia.com/ node labels describing the node's GPUs.")
    add_flags(parser, "gfd")
    add_version_flag(parser)
    return parser


METRICS_ADDRESS_ENV = "GFD_METRICS_ADDRESS"


def metrics_address(flag: str | None, environ: Mapping[str, str]) -> tuple[str, int] | None:
    """Where to serve metrics (flag > env > off); ConfigError (exit 2) for a bad address."""
    text: str = resolve_setting(GfdOptions, "metrics_address", flag, environ, "gfd")
    try:
        return parse_metrics_address(text)
    except MetricsAddressError as err:
        raise ConfigError(str(err)) from None


def resolve_options(args: argparse.Namespace, environ: Mapping[str, str],
                    config: Config | None = None) -> Options:
    """Our own options alone (flag > env var > default; no config file). Raises ConfigError.

    ``config`` (the resolved configuration) lets ``--use-node-feature-api`` choose the output
    mode when ``--output-mode`` is not given.
    """
    level = resolve_section(DaemonOptions, args, environ, "gfd").log_level
    use_api = config.flags.use_node_feature_api if config is not None else None
    return Options.from_config(resolve_section(GfdOptions, args, environ, "gfd"), level, use_api)


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Run GFD; returns the process exit code (0 ok, 1 failure, 2 bad configuration)."""
    env = os.environ if environ is None else environ
    args = build_parser().parse_args(argv)
    return run_daemon(PROG, lambda: _run(args, env))


def _run(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    config = resolve(args, environ)
    options = Options.from_config(config.daemon.gfd, config.daemon.log_level,
                                  config.flags.use_node_feature_api)
    address = metrics_address(args.metrics_address, environ)
    undo_logging = setup_logging(options.log_level)
    metrics: GfdMetrics | None = None
    endpoint: MetricsEndpoint | None = None
    if address is not None:
        # prometheus_client and its HTTP server: ~30 ms of start-up, paid only when metrics are on.
        from gpus.runtime.metrics import GfdMetrics, serve

        metrics = GfdMetrics()
        endpoint = serve(address, metrics.registry)
    backend = NvmlBackend(environ)
    signals = Signals().install()
    try:
        backend.select(config.flags.nvml, config.flags.sysfs_root)
        config = backend.effective(config)
        daemon = Daemon(config, options, args=args, environ=environ, backend=backend,
                        wakeup=signals, metrics=metrics)
        return daemon.run()
    finally:
        signals.restore()
        backend.close()
        if endpoint is not None:
            endpoint.stop()
        undo_logging()


if __name__ == "__main__":
    sys.exit(main())
