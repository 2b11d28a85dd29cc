"""The exporter assembled: NVML, sampler, XID listener, pod attribution and HTTP server.

:func:`build_exporter` takes plain options (the CLI, added with the shared daemon runtime, maps
dcgm-exporter's flags onto :class:`ExporterOptions`) and returns an :class:`Exporter` with
``start()``/``stop()``.
"""

from __future__ import annotations

import logging
import re
import socket
from dataclasses import replace

from exporter.attribution import (
    POD_RESOURCES_SOCKET,
    AttributionRefresher,
    DeviceKey,
    PodResourcesClient,
    Resolver,
    ResourceFilter,
    resolver_from_snapshot,
)
from exporter.collector import ExporterCollector, Sampler
from exporter.fields import DEFAULT_COLLECTORS, Collector
from exporter.http import MetricsServer, WebConfig
from exporter.pods import CONTAINER_LOGS, PROC_ROOT, PidMapper
from exporter.series import SeriesOptions, wanted_attributes
from exporter.xid import DEFAULT_WINDOW_MS, XidListener, XidTracker
from gpus.model import Snapshot
from gpus.nvml import Nvml
from gpus.records import record
from gpus.telemetry import TelemetryReader

log = logging.getLogger(__name__)

_DEVICE_NAME = re.compile(r"^nvidia(\d+)$")


@record
class ExporterOptions:
    """dcgm-exporter's flags that mean something without DCGM."""

    collectors: tuple[Collector, ...] = DEFAULT_COLLECTORS  # -f
    address: tuple[str, int] = ("", 9400)  # -a
    collect_interval_ms: int = 30000  # -c
    kubernetes: bool = False  # -k
    kubernetes_gpu_id_type: str = "uid"  # uid | device-name
    pod_resources_socket: str = POD_RESOURCES_SOCKET
    nvidia_resource_names: tuple[str, ...] = ()
    no_hostname: bool = False  # -n
    hostname: str | None = None  # NODE_NAME, else the host's name
    replace_blanks_in_model_name: bool = False
    use_old_namespace: bool = False
    xid_count_window_ms: int = DEFAULT_WINDOW_MS  # -x
    web_config: WebConfig | None = None
    sysfs_root: str = "/"
    proc_root: str = PROC_ROOT
    container_logs: str = CONTAINER_LOGS


def gpu_id_resolver(snapshot: Snapshot, id_type: str) -> Resolver:
    """The snapshot's resolver; with ``device-name`` also ``nvidia<index>`` device ids
    (dcgm-exporter's ``device`` label: ``nvidia`` + the GPU id, which is NVML's index)."""
    if id_type not in ("uid", "device-name"):
        raise ValueError(f"--kubernetes-gpu-id-type must be uid or device-name, got {id_type!r}")
    base = resolver_from_snapshot(snapshot)
    if id_type == "uid":
        return base
    by_index = {gpu.index: DeviceKey(gpu.uuid) for gpu in snapshot.gpus}

    def resolve(device_id: str) -> DeviceKey | None:
        match = _DEVICE_NAME.match(device_id)
        return by_index.get(int(match.group(1))) if match else base(device_id)

    return resolve


class Exporter:
    """Every part of a running exporter; ``start()`` then ``stop()``."""

    def __init__(self, options: ExporterOptions) -> None:
        self.options = options
        self.nvml = Nvml()
        self.sampler: Sampler | None = None
        self.collector: ExporterCollector | None = None
        self.refresher: AttributionRefresher | None = None
        self.listener: XidListener | None = None
        self.server: MetricsServer | None = None
        self._client: PodResourcesClient | None = None
        self._reader: TelemetryReader | None = None

    def start(self) -> None:
        """Initialise NVML, sample once, then serve; on an error nothing is left running."""
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        opts = self.options
        self.nvml.init()
        snapshot = self.nvml.read_snapshot(opts.sysfs_root)
        self._reader = TelemetryReader(wanted_attributes(opts.collectors))
        pids = PidMapper(opts.proc_root, opts.container_logs) if opts.kubernetes else None
        self.sampler = Sampler(snapshot, self._reader, opts.collect_interval_ms / 1000.0, pids)
        self.sampler.sample_now()
        tracker = XidTracker(opts.xid_count_window_ms)
        self.listener = XidListener(self.nvml, [g.uuid for g in snapshot.gpus], tracker)
        self.listener.start()
        if opts.kubernetes:
            self._client = PodResourcesClient(opts.pod_resources_socket)
            self.refresher = AttributionRefresher(
                self._client.list, gpu_id_resolver(snapshot, opts.kubernetes_gpu_id_type),
                ResourceFilter.from_flag(opts.nvidia_resource_names).accepts)
            self.refresher.start()
        hostname = None if opts.no_hostname else (opts.hostname or socket.gethostname())
        series = SeriesOptions(hostname, opts.replace_blanks_in_model_name,
                               opts.use_old_namespace)
        self.collector = ExporterCollector(self.sampler, opts.collectors, series,
                                           self.refresher, tracker)
        self.sampler.start()
        self.server = MetricsServer(opts.address, self.collector, self.collector.formats,
                                    self.sampler.fresh, opts.web_config)
        self.server.start()
        log.info("gpu-metrics-exporter serving on port %d: %d GPUs, %d collectors",
                 self.server.port, len(snapshot.gpus), len(opts.collectors))

    def set_collectors(self, collectors: tuple[Collector, ...]) -> None:
        """Serve another collectors set (SIGHUP); a field new to the set appears from the next
        NVML sample on. ValueError for an empty set, and the old set keeps serving."""
        if not collectors:
            raise ValueError("-f/--collectors: no fields to collect")
        if self.collector is None or self._reader is None:
            raise RuntimeError("the exporter is not running")
        self.options = replace(self.options, collectors=collectors)
        self._reader.wanted = wanted_attributes(collectors)
        self.collector.set_collectors(collectors)
        log.info("serving %d collectors", len(collectors))

    def stop(self) -> None:
        """Stop every thread and release NVML."""
        for part in (self.server, self.refresher, self.sampler, self.listener):
            if part is not None:
                part.stop()
        self.server = self.refresher = self.sampler = self.listener = None
        if self._client is not None:
            self._client.close()
        if self._reader is not None:
            self._reader.close()
        self.nvml.shutdown()


def check_options(options: ExporterOptions) -> None:
    """ValueError naming the flag for options no exporter could run with."""
    if options.collect_interval_ms <= 0:
        raise ValueError(f"-c/--collect-interval must be > 0 ms, got {options.collect_interval_ms}")
    if options.xid_count_window_ms <= 0:
        raise ValueError("-x/--xid-count-window-size must be > 0 ms, got "
                         f"{options.xid_count_window_ms}")
    if options.kubernetes_gpu_id_type not in ("uid", "device-name"):
        raise ValueError("--kubernetes-gpu-id-type must be uid or device-name, got "
                         f"{options.kubernetes_gpu_id_type!r}")
    if not options.collectors:
        raise ValueError("-f/--collectors: no fields to collect")


def build_exporter(options: ExporterOptions) -> Exporter:
    """An exporter for ``options`` (not started); ValueError for unusable options."""
    check_options(options)
    return Exporter(options)
