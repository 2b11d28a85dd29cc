"""The daemons' own Prometheus metrics (device plugin, GFD), on an opt-in HTTP port.

Each daemon builds its metrics object on its own :class:`CollectorRegistry` (never
prometheus_client's global one: a test or the demo may run several daemons in one process) and
serves it with :func:`serve` on the address of ``--metrics-address`` (``host:port``, ``:port``
for every interface; empty, the default, serves nothing and the daemon gets ``None`` instead of
a metrics object, so every hook is one ``is None`` test). Hot paths (Allocate,
GetPreferredAllocation) bind their labelled children once per resource and observe one
histogram per call.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Final
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import start_http_server

from gpus.runtime.metricsaddress import MetricsAddressError, parse_address

__all__ = ["GfdMetrics", "MetricsAddressError", "MetricsEndpoint", "PluginMetrics",
           "parse_address", "serve"]

log = logging.getLogger(__name__)

# Allocate takes ~0.1-1 ms in-process (docs/benchmarks.md); the kubelet's own timeout is long.
RPC_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)
PASS_BUCKETS: Final = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass
class MetricsEndpoint:
    """A running metrics HTTP server; ``stop()`` closes it."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        return int(self.server.server_address[1])

    def stop(self) -> None:
        """Stop serving and free the port."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def serve(address: tuple[str, int], registry: CollectorRegistry) -> MetricsEndpoint:
    """Serve ``registry`` on ``address`` (prometheus_client's threaded server, /metrics)."""
    host, port = address
    server, thread = start_http_server(port, addr=host or "0.0.0.0", registry=registry)
    endpoint = MetricsEndpoint(server, thread)
    log.info("serving the daemon's metrics on %s:%d/metrics", host or "*", endpoint.port)
    return endpoint


class PluginMetrics:
    """The device plugin's metrics (prefix ``nvidia_device_plugin_``)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        p = "nvidia_device_plugin_"
        self.registrations = Counter(
            p + "registrations", "Register calls to the kubelet, by resource and result.",
            ["resource", "result"], registry=self.registry)
        self.kubelet_restarts = Counter(
            p + "kubelet_restarts", "Kubelet restarts seen (its socket replaced).",
            registry=self.registry)
        self.rpc_seconds = Histogram(
            p + "rpc_duration_seconds",
            "Allocate and GetPreferredAllocation handling time, by RPC and resource.",
            ["rpc", "resource"], buckets=RPC_BUCKETS, registry=self.registry)
        self.rpc_errors = Counter(
            p + "rpc_errors", "Allocate and GetPreferredAllocation calls refused, by RPC and "
            "resource.", ["rpc", "resource"], registry=self.registry)
        self.health_transitions = Counter(
            p + "health_transitions",
            "Device health changes, by new state (Healthy/Unhealthy) and reason.",
            ["state", "reason"], registry=self.registry)
        self.unhealthy_devices = Gauge(
            p + "unhealthy_devices", "Devices currently marked Unhealthy.",
            registry=self.registry)
        self.nvml_errors = Counter(
            p + "nvml_errors", "NVML calls that failed, by call and NVML error.",
            ["call", "error"], registry=self.registry)


class GfdMetrics:
    """GPU feature discovery's metrics (prefix ``gpu_feature_discovery_``)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        p = "gpu_feature_discovery_"
        self.label_passes = Counter(
            p + "label_passes", "Labelling passes, by result (ok/failed).", ["result"],
            registry=self.registry)
        self.pass_seconds = Histogram(
            p + "label_pass_duration_seconds", "Time a labelling pass took.",
            buckets=PASS_BUCKETS, registry=self.registry)
        self.labels = Gauge(
            p + "labels", "Labels the last successful pass produced.", registry=self.registry)
        self.api_errors = Counter(
            p + "api_server_errors", "Kubernetes API calls that failed, by operation and HTTP "
            "status (0 when no answer).", ["operation", "status"], registry=self.registry)
        self.nvml_errors = Counter(
            p + "nvml_errors", "NVML initialisation or read failures, by NVML error.",
            ["error"], registry=self.registry)
