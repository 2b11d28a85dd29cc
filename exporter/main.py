"""``gpu-metrics-exporter``: dcgm-exporter's command line over :mod:`exporter.service`.

Every flag is a row of the configuration table (gpus/config/model.py, ``daemon.exporter``):
dcgm-exporter's flags and environment variables where they mean something without DCGM, plus
ours (``--nvml``, ``--sysfs-root``, ``--log-level``/``GPU_EXPORTER_LOG_LEVEL``). The rest of
dcgm-exporter's flags (:data:`REFUSED`) are refused with one line and exit 2, as are their
variables when set to anything but a value that asks for nothing.

Signals (gpus.runtime): SIGHUP re-reads the ``-f/--collectors`` file (a bad file is logged and
the running set keeps serving); SIGTERM/SIGINT stop (exit 0). Exit status: 0 after a signal,
1 a runtime failure (NVML, the listening socket), 2 bad usage or configuration (a collectors
file that does not parse names file, line and the known fields).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from exporter.fields import DEFAULT_COLLECTORS, Collector, CollectorsError, load_collectors
from exporter.http import WebConfigError, load_web_config
from exporter.service import Exporter, ExporterOptions, build_exporter
from gpus.config import Config, add_flags, resolve
from gpus.errors import ConfigError, InitError
from gpus.records import record
from gpus.runtime import EXIT_OK, EXIT_USAGE, NvmlBackend, Signals, run_daemon, setup_logging
from gpus.runtime.version import add_version_flag

log = logging.getLogger(__name__)

PROG = "gpu-metrics-exporter"
NEEDS_DCGM = "needs DCGM; not supported by this exporter"
_FALSE = frozenset({"", "false", "0", "no"})


@record
class Refused:
    """A dcgm-exporter flag we do not serve: its names, variables, and why."""

    flags: tuple[str, ...]
    env: tuple[str, ...] = ()
    reason: str = NEEDS_DCGM
    harmless: frozenset[str] = _FALSE  # variable values that ask for nothing (lower case)


_POD_INFORMER = "not supported by this exporter (needs a pod informer on the API server)"
# dcgm-exporter's flags (pkg/cmd/app.go) that need DCGM or what this exporter does not do.
REFUSED: tuple[Refused, ...] = (
    Refused(("-r", "--remote-hostengine-info"), ("DCGM_REMOTE_HOSTENGINE_INFO",)),
    Refused(("-d", "--devices"), ("DCGM_EXPORTER_DEVICES_STR",),
            harmless=frozenset({"", "f"})),
    Refused(("-s", "--switch-devices"), ("DCGM_EXPORTER_OTHER_DEVICES_STR",),
            harmless=frozenset({"", "f"})),
    Refused(("-p", "--cpu-devices"), ("DCGM_EXPORTER_CPU_DEVICES_STR",),
            harmless=frozenset({"", "f"})),
    Refused(("-m", "--configmap-data"), ("DCGM_EXPORTER_CONFIGMAP_DATA",),
            harmless=frozenset({"", "none"})),
    Refused(("--fake-gpus",)),
    Refused(("--clock-events-count-window-size",),
            ("DCGM_EXPORTER_CLOCK_EVENTS_COUNT_WINDOW_SIZE",),
            harmless=frozenset({"", "300000"})),
    Refused(("--enable-dcgm-log",)),
    Refused(("--dcgm-log-level",)),
    Refused(("--enable-gpu-bind-unbind-watch",)),
    Refused(("--gpu-bind-unbind-poll-interval",)),
    Refused(("--disable-startup-validate",)),
    Refused(("--dump-enabled",)),
    Refused(("--dump-directory",)),
    Refused(("--dump-retention",)),
    Refused(("--dump-compression",)),
    Refused(("--kubernetes-enable-pod-labels",),
            ("DCGM_EXPORTER_KUBERNETES_ENABLE_POD_LABELS",), _POD_INFORMER),
    Refused(("--kubernetes-pod-label-allowlist-regex",),
            ("DCGM_EXPORTER_KUBERNETES_POD_LABEL_ALLOWLIST_REGEX",), _POD_INFORMER),
    Refused(("--kubernetes-enable-pod-uid",),
            ("DCGM_EXPORTER_KUBERNETES_ENABLE_POD_UID",), _POD_INFORMER),
    Refused(("--kubernetes-virtual-gpus",), ("KUBERNETES_VIRTUAL_GPUS",),
            "not supported by this exporter, nor needed: every pod sharing a GPU gets its own "
            "series here (docs/metrics.md); drop the flag",
            harmless=_FALSE | {"true", "1", "yes"}),
    Refused(("--kubernetes-enable-dra",), ("KUBERNETES_ENABLE_DRA",),
            "not supported by this exporter (DRA claims are not attributed yet)"),
    Refused(("--hpc-job-mapping-dir",), ("DCGM_HPC_JOB_MAPPING_DIR",),
            "not supported by this exporter (no hpc_job label)"),
    Refused(("--debug",), (), "not supported by this exporter; use --log-level debug"),
    Refused(("--log-format",), (), "not supported by this exporter (text logs only)",
            harmless=frozenset({"", "text"})),
    Refused(("--web-systemd-socket",), (), "not supported by this exporter"),
    Refused(("--enable-pprof",), (), "not supported by this exporter"),
)


class _RefuseAction(argparse.Action):
    """Ends parsing with one line naming the flag and why (exit 2)."""

    def __init__(self, option_strings: Sequence[str], dest: str, reason: str = "",
                 **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs="?", default=argparse.SUPPRESS,
                         help=argparse.SUPPRESS)
        self.reason = reason

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        names = "/".join(self.option_strings)
        parser.exit(EXIT_USAGE, f"{parser.prog}: {names}: {self.reason}\n")


def build_parser() -> argparse.ArgumentParser:
    """The command line: the table's exporter rows, the refused flags and ``--version``."""
    parser = argparse.ArgumentParser(
        prog=PROG, allow_abbrev=False,
        description="Serve dcgm-exporter-compatible GPU metrics from NVML, with pod labels.")
    add_flags(parser, "exporter")
    for index, refused in enumerate(REFUSED):
        parser.add_argument(*refused.flags, action=_RefuseAction, dest=f"refused_{index}",
                            reason=refused.reason)
    add_version_flag(parser)
    return parser


def check_refused_env(environ: Mapping[str, str]) -> None:
    """ConfigError for a refused flag's variable set to a value that asks for something."""
    for refused in REFUSED:
        for name in refused.env:
            value = environ.get(name, "").strip()
            if value.lower() not in refused.harmless:
                raise ConfigError(f"{name}={value!r}: {refused.reason}")


def parse_address(text: str, label: str = "-a/--address") -> tuple[str, int]:
    """``[host]:port`` (``:9400``, ``127.0.0.1:9400``, ``[::]:9400``) as (host, port)."""
    host, sep, port_text = text.strip().rpartition(":")
    if not sep:
        raise ConfigError(f"{label}: {text!r} is not [host]:port (e.g. :9400)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise ConfigError(f"{label}: {text!r}: the port must be a number from 0 to 65535")
    return host, port


def read_collectors(path: str) -> tuple[Collector, ...]:
    """The collectors file's rows ("" : the built-in default set); ConfigError naming the file,
    line and known fields."""
    if not path:
        return DEFAULT_COLLECTORS
    try:
        return load_collectors(path)
    except CollectorsError as err:
        raise ConfigError(f"-f/--collectors: {err}") from None


def exporter_options(config: Config) -> ExporterOptions:
    """The service's options from the resolved configuration; ConfigError for bad values."""
    own = config.daemon.exporter
    web = None
    if own.web_config_file:
        try:
            web = load_web_config(own.web_config_file)
        except WebConfigError as err:
            raise ConfigError(f"--web-config-file: {err}") from None
    return ExporterOptions(
        collectors=read_collectors(own.collectors),
        address=parse_address(own.address),
        collect_interval_ms=own.collect_interval,
        kubernetes=own.kubernetes,
        kubernetes_gpu_id_type=own.kubernetes_gpu_id_type.value,
        pod_resources_socket=own.pod_resources_kubelet_socket,
        nvidia_resource_names=own.nvidia_resource_names,
        no_hostname=own.no_hostname,
        hostname=own.node_name or None,
        replace_blanks_in_model_name=own.replace_blanks_in_model_name,
        use_old_namespace=own.use_old_namespace,
        xid_count_window_ms=own.xid_count_window_size,
        web_config=web,
        sysfs_root=config.flags.sysfs_root,
    )


def reload_collectors(exporter: Exporter, path: str) -> bool:
    """SIGHUP: re-read the collectors file; on an error log it and keep the running set."""
    if not path:
        log.info("SIGHUP: serving the built-in collectors; no -f/--collectors file to re-read")
        return True
    try:
        rows = load_collectors(path)
    except CollectorsError as err:
        log.error("collectors reload failed, still serving the previous %d collectors: %s",
                  len(exporter.options.collectors), err)
        return False
    exporter.set_collectors(rows)
    return True


@record
class Hooks:
    """Calls into a running main (tests): the exporter once serving, each reload's outcome."""

    on_start: Callable[[Exporter], None] | None = None
    on_reload: Callable[[bool], None] | None = None


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None,
         hooks: Hooks | None = None) -> int:
    """Run the exporter until SIGTERM; returns the exit code (0 ok, 1 failure, 2 usage)."""
    env = os.environ if environ is None else environ
    args = build_parser().parse_args(argv)
    return run_daemon(PROG, lambda: _run(args, env, hooks or Hooks()))


def _run(args: argparse.Namespace, environ: Mapping[str, str], hooks: Hooks) -> int:
    check_refused_env(environ)
    config = resolve(args, environ)
    options = exporter_options(config)
    undo_logging = setup_logging(config.daemon.log_level)
    backend = NvmlBackend(environ)
    signals = Signals().install()
    exporter: Exporter | None = None
    try:
        backend.select(config.flags.nvml, config.flags.sysfs_root)
        config = backend.effective(config)
        started = build_exporter(dataclasses.replace(options, sysfs_root=config.flags.sysfs_root))
        try:
            started.start()  # stops what it started on an error
        except OSError as err:
            raise InitError(f"cannot listen on {config.daemon.exporter.address}: "
                            f"{err.strerror or err}") from None
        exporter = started
        if hooks.on_start is not None:
            hooks.on_start(exporter)
        while signals.wait() == "reload":
            ok = reload_collectors(exporter, config.daemon.exporter.collectors)
            if hooks.on_reload is not None:
                hooks.on_reload(ok)
        log.info("stopping on a signal")
        return EXIT_OK
    finally:
        if exporter is not None:
            exporter.stop()
        signals.restore()
        backend.close()
        undo_logging()


if __name__ == "__main__":
    sys.exit(main())
