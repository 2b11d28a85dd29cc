"""The device plugin's and GFD's own metrics (gpus.runtime.metrics): each family appears and moves.

Real parts: the plugin's gRPC server over a Unix socket, the registration loop against a real
socket file, the health monitor with the stand-in NVML of test_health, GFD's daemon against the
API-server stub, and the metrics served over HTTP by prometheus_client.
"""

from __future__ import annotations

import os
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from apiserver import FakeApiServer
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from test_gfd_main import NODE, daemon
from test_health import ALL_GPUS, SNAPSHOT, Event, Prober, WatcherFactory
from test_kubelet import FakeServer, Recorder, make_socket
from test_server import allocate, preferred
from test_server_support import (
    FakeAllocator,
    fake_manager,
    make_resource,
    make_snapshot,
    plugin_stub,
)

import deviceplugin.main as plugin_main
import gfd.main as gfd_main
from deviceplugin.health import HealthMonitor, reason_kind
from deviceplugin.kubelet import RegistrationLoop
from deviceplugin.server import PluginServer
from gfd.metrics import CountingNodeFeatureApi
from gfd.nodefeature import KubeNodeFeatureApi, TokenBucket
from gfd.nodepatch import KubeNodeApi, NodeApiError
from gpus.backoff import Backoff
from gpus.config import Config, ConfigError
from gpus.model import Snapshot
from gpus.nvml import NvmlError
from gpus.runtime.metrics import (
    GfdMetrics,
    MetricsAddressError,
    PluginMetrics,
    parse_address,
    serve,
)
from protos.deviceplugin.v1beta1 import api_pb2_grpc

TIMEOUT = 10.0


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """A sample's value, 0 when absent."""
    found = registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


# --------------------------------------------------------------------------------------------
# The address and the server.


@pytest.mark.parametrize(("text", "address"), [
    ("", None), ("  ", None), (":9401", ("", 9401)), ("127.0.0.1:0", ("127.0.0.1", 0)),
    ("[::1]:9401", ("::1", 9401)), ("0.0.0.0:65535", ("0.0.0.0", 65535)),
])
def test_address_parses(text: str, address: tuple[str, int] | None) -> None:
    assert parse_address(text) == address


@pytest.mark.parametrize(
    "text", ["9401", "host:", "host:port", ":70000", ":-1", "a:1:", ":²", ":٣"])
def test_bad_address_is_a_clear_error(text: str) -> None:
    with pytest.raises(MetricsAddressError, match=r"--metrics-address .*expected \[host\]:port"):
        parse_address(text)


def test_bad_address_is_a_usage_error_in_both_daemons() -> None:
    for module in (plugin_main, gfd_main):
        with pytest.raises(ConfigError, match="--metrics-address"):
            module.metrics_address("nope", {})
        with pytest.raises(ConfigError, match="--metrics-address"):
            module.metrics_address(None, {module.METRICS_ADDRESS_ENV: ":x"})
        assert module.metrics_address(None, {}) is None  # off by default
        assert module.metrics_address(None, {module.METRICS_ADDRESS_ENV: ":9401"}) == ("", 9401)
        assert module.metrics_address(":1", {module.METRICS_ADDRESS_ENV: ":2"}) == ("", 1)
    parsed = plugin_main.build_parser().parse_args(["--metrics-address", ":9401"])
    assert parsed.metrics_address == ":9401"
    assert gfd_main.build_parser().parse_args([]).metrics_address is None


def test_served_over_http_on_its_own_registry() -> None:
    plugin, gfd = PluginMetrics(), GfdMetrics()
    plugin.kubelet_restarts.inc()
    endpoint = serve(("127.0.0.1", 0), plugin.registry)
    try:
        url = f"http://127.0.0.1:{endpoint.port}/metrics"
        with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
            text = response.read().decode()
    finally:
        endpoint.stop()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["nvidia_device_plugin_kubelet_restarts"].samples[0].value == 1
    # Per-daemon registries: nothing of GFD's, nor the process-global defaults, in the plugin's.
    assert not any(name.startswith("gpu_feature_discovery_") for name in families)
    assert "python_info" not in families
    assert gfd.registry is not plugin.registry


# --------------------------------------------------------------------------------------------
# Device plugin.


Served = tuple[PluginMetrics, api_pb2_grpc.DevicePluginStub, list[str]]


@pytest.fixture
def served(sockdir: str) -> Iterator[Served]:
    snapshot = make_snapshot(4)
    metrics = PluginMetrics()
    server = PluginServer(fake_manager(make_resource(snapshot), snapshot, FakeAllocator()),
                          sockdir, metrics=metrics)
    server.start()
    channel, stub = plugin_stub(server.socket_path)
    yield metrics, stub, [g.uuid for g in snapshot.gpus]
    channel.close()
    server.stop()


def test_allocate_and_preferred_are_timed_and_refusals_counted(
        served: Served) -> None:
    metrics, stub, uuids = served
    reg, res = metrics.registry, "nvidia.com/gpu"
    count = "nvidia_device_plugin_rpc_duration_seconds_count"
    allocate(stub, uuids[:1])
    allocate(stub, uuids[1:2])
    preferred(stub, uuids, size=1)
    assert value(reg, count, rpc="Allocate", resource=res) == 2
    assert value(reg, count, rpc="GetPreferredAllocation", resource=res) == 1
    assert value(reg, "nvidia_device_plugin_rpc_duration_seconds_sum", rpc="Allocate",
                 resource=res) > 0
    with pytest.raises(grpc.RpcError):
        allocate(stub, ["GPU-nope"])
    assert value(reg, "nvidia_device_plugin_rpc_errors_total", rpc="Allocate",
                 resource=res) == 1
    assert value(reg, count, rpc="Allocate", resource=res) == 3  # refusals are timed too


def test_metrics_off_costs_no_timer(sockdir: str) -> None:
    snapshot = make_snapshot(1)
    server = PluginServer(fake_manager(make_resource(snapshot), snapshot, FakeAllocator()),
                          sockdir)
    assert server.metrics is None and server.allocate_seconds is None
    assert server.preferred_seconds is None


def test_registrations_and_kubelet_restarts(sockdir: str) -> None:
    metrics = PluginMetrics()
    path = os.path.join(sockdir, "kubelet.sock")
    recorder, server = Recorder(), FakeServer("nvidia.com/gpu")
    loop = RegistrationLoop(path, lambda: [server], register_fn=recorder, metrics=metrics)
    reg = metrics.registry
    ok = {"resource": "nvidia.com/gpu", "result": "ok"}
    with make_socket(path):
        loop.tick(now=0.0)
        loop.tick(now=1.0)
    assert value(reg, "nvidia_device_plugin_registrations_total", **ok) == 1
    assert value(reg, "nvidia_device_plugin_kubelet_restarts_total") == 0  # the first kubelet
    os.unlink(path)
    loop.tick(now=2.0)  # kubelet down: not yet a restart
    assert value(reg, "nvidia_device_plugin_kubelet_restarts_total") == 0
    with make_socket(path):  # a new kubelet
        recorder.failing = True
        loop.tick(now=3.0)
        assert value(reg, "nvidia_device_plugin_kubelet_restarts_total") == 1
        assert value(reg, "nvidia_device_plugin_registrations_total",
                     resource="nvidia.com/gpu", result="failed") == 1
        recorder.failing = False
        loop.tick(now=100.0)
        loop.tick(now=101.0)
    assert value(reg, "nvidia_device_plugin_registrations_total", **ok) == 2
    assert value(reg, "nvidia_device_plugin_kubelet_restarts_total") == 1


@pytest.mark.parametrize(("reason", "kind"), [
    ("critical XID 79", "xid"), ("GPU lost (NVML_ERROR_GPU_IS_LOST)", "gpu_lost"),
    ("probe failed: x", "probe_failed"), ("NVML event wait failed: y", "nvml_events"),
    ("cannot create NVML event set: z", "nvml_events"),
])
def test_health_reasons_are_bounded(reason: str, kind: str) -> None:
    assert reason_kind(reason) == kind


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_health_transitions_and_nvml_errors() -> None:
    metrics = PluginMetrics()
    reg = metrics.registry
    prober, clock = Prober(), Clock(1000.0)
    mon = HealthMonitor(prober, SNAPSHOT, lambda unhealthy: None, {}, quiet_period=30.0,
                        clock=clock, watcher_factory=WatcherFactory(), metrics=metrics)
    mon.handle_event(Event("GPU-0", xid=79))
    assert value(reg, "nvidia_device_plugin_health_transitions_total", state="Unhealthy",
                 reason="xid") == 1
    assert value(reg, "nvidia_device_plugin_unhealthy_devices") == 1
    mon.handle_event(Event("GPU-0", xid=79))  # still unhealthy: no new transition
    assert value(reg, "nvidia_device_plugin_health_transitions_total", state="Unhealthy",
                 reason="xid") == 1
    prober.failing["GPU-1"] = "NVML_ERROR_GPU_IS_LOST"
    clock.now += 60
    mon.step()  # GPU-0 recovers; GPU-1's probe fails: lost
    assert value(reg, "nvidia_device_plugin_health_transitions_total", state="Healthy",
                 reason="recovered") == 1
    assert value(reg, "nvidia_device_plugin_health_transitions_total", state="Unhealthy",
                 reason="gpu_lost") == 1
    assert value(reg, "nvidia_device_plugin_nvml_errors_total", call="probe",
                 error="NVML_ERROR_GPU_IS_LOST") >= 1
    assert value(reg, "nvidia_device_plugin_unhealthy_devices") == 1
    assert mon.unhealthy == frozenset({"GPU-1"}) and "GPU-1" in ALL_GPUS


# --------------------------------------------------------------------------------------------
# GFD.


def test_gfd_label_passes_and_api_server_errors(
        tmp_path: Path, fake_snapshot: Callable[..., Snapshot]) -> None:
    snapshot = fake_snapshot("dgx-a100")
    metrics = GfdMetrics()
    reg = metrics.registry
    with FakeApiServer() as server:
        server.add_node(NODE, labels={})
        server.fail_next(1, 500)
        api = KubeNodeApi.from_environment(server.kubeconfig(str(tmp_path / "kc")))
        d = daemon(tmp_path, lambda c: snapshot, oneshot=False, mode="node-api", node_api=api,
                   backoff=Backoff(initial=0.01, cap=0.05), metrics=metrics)
        assert not d.run_pass()  # the API server answered 500
        assert value(reg, "gpu_feature_discovery_api_server_errors_total",
                     operation="get_node", status="500") == 1
        assert value(reg, "gpu_feature_discovery_label_passes_total", result="failed") == 1
        assert d.run_pass()
    assert value(reg, "gpu_feature_discovery_label_passes_total", result="ok") == 1
    assert value(reg, "gpu_feature_discovery_label_pass_duration_seconds_count") == 2
    assert value(reg, "gpu_feature_discovery_labels") > 10


def test_gfd_nvml_errors(tmp_path: Path, fake_snapshot: Callable[..., Snapshot]) -> None:
    snapshot = fake_snapshot("dgx-a100")
    answers: list[Snapshot | NvmlError] = [
        snapshot, NvmlError("nvmlDeviceGetCount", 9, "Driver Not Loaded")]

    def reader(config: Config) -> Snapshot:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    metrics = GfdMetrics()
    d = daemon(tmp_path, reader, oneshot=False, metrics=metrics)
    assert d.run_pass() and not d.run_pass()
    samples = [s for f in metrics.registry.collect() for s in f.samples
               if s.name == "gpu_feature_discovery_nvml_errors_total"]
    assert [s.value for s in samples] == [1]


def test_gfd_node_feature_api_errors_are_counted(
        tmp_path: Path, fake_snapshot: Callable[..., Snapshot]) -> None:
    snapshot = fake_snapshot("dgx-a100")
    metrics = GfdMetrics()
    reg = metrics.registry
    with FakeApiServer() as server:  # no NodeFeature CRD yet: the kind answers 404
        api = KubeNodeFeatureApi.from_environment(server.kubeconfig(str(tmp_path / "kc")),
                                                  TokenBucket(1000, 1000))
        d = daemon(tmp_path, lambda c: snapshot, oneshot=False, mode="node-feature",
                   node_feature_api=api, backoff=Backoff(initial=0.01, cap=0.05),
                   metrics=metrics)
        assert not d.run_pass()
        assert value(reg, "gpu_feature_discovery_api_server_errors_total",
                     operation="get_nodefeature", status="404") == 1
        server.install_nodefeature_crd()
        server.fail_next(1, 500)
        assert not d.run_pass()
        assert value(reg, "gpu_feature_discovery_api_server_errors_total",
                     operation="get_nodefeature", status="500") == 1
        assert d.run_pass()
        assert value(reg, "gpu_feature_discovery_api_server_errors_total",
                     operation="create_nodefeature", status="500") == 0


def test_counting_node_feature_api_names_each_operation() -> None:
    metrics = GfdMetrics()

    class Failing:
        def get(self, namespace: str, name: str) -> dict[str, object] | None:
            raise NodeApiError("HTTP 503", "unavailable")

        def create(self, namespace: str, body: dict[str, object]) -> dict[str, object]:
            raise NodeApiError("HTTP 403", "forbidden")

        def replace(self, namespace: str, name: str, body: dict[str, object]
                    ) -> dict[str, object]:
            raise NodeApiError("HTTP 409", "conflict")

        def get_pod(self, namespace: str, name: str) -> dict[str, object]:
            raise NodeApiError("connection refused", "no answer")

    api = CountingNodeFeatureApi(Failing(), metrics)
    calls: list[tuple[str, Callable[[], object]]] = [
        ("get_nodefeature", lambda: api.get("ns", "n")),
        ("create_nodefeature", lambda: api.create("ns", {})),
        ("update_nodefeature", lambda: api.replace("ns", "n", {})),
        ("get_pod", lambda: api.get_pod("ns", "p")),
    ]
    for _, call in calls:
        with pytest.raises(NodeApiError):
            call()
    counted = {(s.labels["operation"], s.labels["status"]): s.value
               for f in metrics.registry.collect() for s in f.samples
               if s.name == "gpu_feature_discovery_api_server_errors_total"}
    assert counted == {("get_nodefeature", "503"): 1, ("create_nodefeature", "403"): 1,
                       ("update_nodefeature", "409"): 1, ("get_pod", "0"): 1}
