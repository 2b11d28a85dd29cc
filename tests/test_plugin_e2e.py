"""End to end: the device plugin on the fake DGX A100 against the mock kubelet.

Real gRPC over real Unix sockets; the fake NVML sits beneath pynvml. Health recovery uses tiny
intervals so a recovered device turns Healthy within a fraction of a second.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from plugin_support import (
    controller_of,
    installed_fake,
    manager_of,
    monitor_of,
    server_of,
    snapshot_of,
)
from test_server_support import short_tmpdir

from deviceplugin.main import DevicePlugin, replace_flags, replace_plugin_flags
from deviceplugin.mockkubelet import DeviceInfo, MockKubelet
from gpus.config import Config
from protos.deviceplugin.v1beta1 import api_pb2

TIMEOUT = 10.0
GPU = "nvidia.com/gpu"


def e2e_config(directory: str, profile: str = "dgx-a100") -> Config:
    config = replace_flags(
        Config(), nvml=f"fake:{profile}", sysfs_root=os.path.join(directory, "root")
    )
    return replace_plugin_flags(
        config,
        kubelet_socket=os.path.join(directory, "kubelet.sock"),
        cdi_spec_dir=os.path.join(directory, "cdi"),
        health_recovery_interval=0.02,
        health_quiet_period=0.1,
    )


def start_plugin(config: Config) -> DevicePlugin:
    plugin = DevicePlugin(config, {}, poll_interval=0.02)
    controller = installed_fake(plugin.select_backend())
    controller.write_sysfs(Path(config.flags.sysfs_root))
    plugin.start()
    return plugin


@pytest.fixture
def env() -> Iterator[tuple[MockKubelet, DevicePlugin]]:
    with short_tmpdir() as directory:
        kubelet = MockKubelet(directory)
        kubelet.start()
        plugin = start_plugin(e2e_config(directory))
        try:
            assert kubelet.wait_for_registration(GPU, TIMEOUT)
            yield kubelet, plugin
        finally:
            plugin.close()
            kubelet.stop()


def health_of(devices: list[DeviceInfo]) -> dict[str, str]:
    return {d.id: d.health for d in devices}


def test_eight_healthy_gpus_registered(env: tuple[MockKubelet, DevicePlugin]) -> None:
    kubelet, plugin = env
    (request,) = kubelet.registrations(GPU)
    assert request.endpoint == "nvidia-gpu.sock"
    devices = kubelet.devices(GPU)
    assert len(devices) == 8
    assert {d.health for d in devices} == {"Healthy"}
    assert [d.id for d in devices] == [g.uuid for g in snapshot_of(plugin).gpus]
    # NUMA nodes come from the sysfs tree the fake wrote.
    expected = [(g.numa_node,) if g.numa_node is not None else () for g in snapshot_of(plugin).gpus]
    assert [d.numa_nodes for d in devices] == expected


def test_allocate_two_gets_the_preferred_nvlinked_pair(
    env: tuple[MockKubelet, DevicePlugin],
) -> None:
    kubelet, plugin = env
    outcome = kubelet.allocate(GPU, 2)
    snapshot = snapshot_of(plugin)
    # The fake DGX A100: every pair has 12 NVLinks (NVSwitch), so PCIe decides. GPUs 0-1,
    # 2-3, 4-5 and 6-7 share a PCIe switch tree (score 40 + 1200), every other pair crosses
    # NUMA nodes (10 + 1200). Taking one of those four pairs leaves the other three for the
    # next requests (the best packing of the rest), and among equal answers the lowest
    # positions win: GPUs 0 and 1.
    assert list(outcome.preferred) == [snapshot.gpus[0].uuid, snapshot.gpus[1].uuid]
    assert snapshot.link(0, 1).nvlinks == 12
    assert outcome.response.envs["NVIDIA_VISIBLE_DEVICES"] == ",".join(outcome.preferred)


def test_xid_marks_unhealthy_then_recovers(env: tuple[MockKubelet, DevicePlugin]) -> None:
    kubelet, plugin = env
    uuid = snapshot_of(plugin).gpus[3].uuid
    # NVML only queues events for a registered event set: inject once the monitor watches.
    assert monitor_of(plugin).wait_watching(TIMEOUT)
    controller_of(plugin).inject_xid(3, 79)
    devices = kubelet.wait_for_devices(GPU, lambda ds: health_of(ds)[uuid] == "Unhealthy", TIMEOUT)
    assert devices is not None
    assert sum(h == "Healthy" for h in health_of(devices).values()) == 7
    # Quiet period over and the GPU answers probes: Healthy again.
    devices = kubelet.wait_for_devices(GPU, lambda ds: health_of(ds)[uuid] == "Healthy", TIMEOUT)
    assert devices is not None


def test_kubelet_restart_reregisters(env: tuple[MockKubelet, DevicePlugin]) -> None:
    kubelet, _ = env
    kubelet.restart()
    assert kubelet.wait_for_registration(GPU, TIMEOUT, count=2)
    assert len(kubelet.devices(GPU)) == 8
    assert kubelet.allocate(GPU, 1).response.envs["NVIDIA_VISIBLE_DEVICES"]


def allocate_ids(kubelet: MockKubelet, ids: list[str]) -> api_pb2.AllocateResponse:
    request = api_pb2.AllocateRequest(
        container_requests=[api_pb2.ContainerAllocateRequest(devices_ids=ids)]
    )
    response: api_pb2.AllocateResponse = kubelet.stub(GPU).Allocate(request, timeout=TIMEOUT)
    return response


@pytest.mark.parametrize("ids", [["GPU-unknown"], [], [""]])
def test_bad_allocate_is_refused_and_nothing_changes(env: tuple[MockKubelet, DevicePlugin],
                                                     ids: list[str]) -> None:
    kubelet, plugin = env
    before = kubelet.devices(GPU)
    with pytest.raises(grpc.RpcError) as info:
        allocate_ids(kubelet, ids)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith('invalid allocation request for "nvidia.com/gpu"')
    if ids == ["GPU-unknown"]:
        assert info.value.details().endswith("unknown device: GPU-unknown")
    assert kubelet.devices(GPU) == before
    assert kubelet.allocate(GPU, 2).response.envs["NVIDIA_VISIBLE_DEVICES"]


def test_duplicate_ids_are_collapsed(env: tuple[MockKubelet, DevicePlugin]) -> None:
    kubelet, plugin = env
    uuid = snapshot_of(plugin).gpus[0].uuid
    response = allocate_ids(kubelet, [uuid, uuid])
    assert response.container_responses[0].envs["NVIDIA_VISIBLE_DEVICES"] == uuid


def test_too_large_preferred_is_empty(env: tuple[MockKubelet, DevicePlugin]) -> None:
    kubelet, _ = env
    ids = [d.id for d in kubelet.devices(GPU)]
    request = api_pb2.PreferredAllocationRequest(
        container_requests=[
            api_pb2.ContainerPreferredAllocationRequest(
                available_deviceIDs=ids, allocation_size=9
            )
        ]
    )
    response = kubelet.stub(GPU).GetPreferredAllocation(request, timeout=TIMEOUT)
    assert list(response.container_responses[0].deviceIDs) == []


def test_client_disconnect_mid_stream_keeps_serving(env: tuple[MockKubelet, DevicePlugin]) -> None:
    kubelet, plugin = env
    server = server_of(manager_of(plugin), GPU)
    stream = kubelet.stub(GPU).ListAndWatch(api_pb2.Empty())
    next(stream)
    assert server.wait_streams(2, TIMEOUT)  # the kubelet's own stream plus ours
    stream.cancel()
    assert server.wait_streams(1, TIMEOUT)
    assert kubelet.allocate(GPU, 1).preferred


def test_reload_recomputes_the_map(env: tuple[MockKubelet, DevicePlugin]) -> None:
    kubelet, plugin = env
    assert plugin.reload() is None
    assert [s.name for s in manager_of(plugin).servers()] == [GPU]
    assert len(kubelet.devices(GPU)) == 8


def test_stop_removes_our_sockets() -> None:
    with short_tmpdir() as directory:
        kubelet = MockKubelet(directory)
        kubelet.start()
        plugin = start_plugin(e2e_config(directory))
        try:
            assert kubelet.wait_for_registration(GPU, TIMEOUT)
            assert os.path.exists(os.path.join(directory, "nvidia-gpu.sock"))
        finally:
            plugin.close()
        assert kubelet.wait_disconnected(GPU, TIMEOUT)
        assert not os.path.exists(os.path.join(directory, "nvidia-gpu.sock"))
        kubelet.stop()


@contextmanager
def slow_recovery_env(ready_file: str = "") -> Iterator[tuple[MockKubelet, DevicePlugin, str]]:
    """Like ``env`` but devices never recover during the test, and with a readiness file."""
    with short_tmpdir() as directory:
        kubelet = MockKubelet(directory)
        kubelet.start()
        config = replace_plugin_flags(e2e_config(directory), health_recovery_interval=0.0)
        path = ready_file or os.path.join(directory, "ready")
        plugin = DevicePlugin(config, {}, poll_interval=0.02, ready_file=path)
        try:
            installed_fake(plugin.select_backend()).write_sysfs(Path(config.flags.sysfs_root))
            plugin.start()
            assert kubelet.wait_for_registration(GPU, TIMEOUT)
            yield kubelet, plugin, path
        finally:
            plugin.close()
            kubelet.stop()


def test_ready_file_follows_registration() -> None:
    with slow_recovery_env() as (kubelet, plugin, path):
        assert plugin.readiness.wait(True, TIMEOUT)
        assert os.path.isfile(path)
        kubelet.stop()  # a kubelet restart: registration lost until it is back
        assert plugin.readiness.wait(False, TIMEOUT)
        assert not os.path.exists(path)
        kubelet.start()
        assert plugin.readiness.wait(True, TIMEOUT)
        assert os.path.isfile(path)
        assert len(kubelet.registrations(GPU)) == 2
        plugin.stop()
        assert not os.path.exists(path)


def test_ready_file_write_failure_keeps_serving() -> None:
    with short_tmpdir() as directory:
        missing = os.path.join(directory, "no-such-dir", "ready")
        with slow_recovery_env(missing) as (kubelet, plugin, _):
            assert plugin.readiness.wait(True, TIMEOUT)  # reported, though not written
            assert not os.path.exists(missing)
            assert kubelet.allocate(GPU, 1).response.envs


def wait_unhealthy(kubelet: MockKubelet, uuid: str) -> list[DeviceInfo] | None:
    return kubelet.wait_for_devices(GPU, lambda ds: health_of(ds)[uuid] == "Unhealthy", TIMEOUT)


def test_reload_keeps_unhealthy_devices() -> None:
    with slow_recovery_env() as (kubelet, plugin, _):
        assert monitor_of(plugin).wait_watching(TIMEOUT)
        uuid = snapshot_of(plugin).gpus[3].uuid
        controller_of(plugin).inject_xid(3, 79)
        assert wait_unhealthy(kubelet, uuid) is not None
        old_monitor = plugin.health
        assert plugin.reload() is None
        assert plugin.health is not old_monitor
        assert monitor_of(plugin).unhealthy == {uuid}
        assert plugin.resource_map.resources[GPU].devices[3].healthy is False
        # The kubelet never saw it Healthy again, and the new monitor still watches.
        assert health_of(kubelet.devices(GPU))[uuid] == "Unhealthy"
        assert monitor_of(plugin).wait_watching(TIMEOUT)
        other = snapshot_of(plugin).gpus[5].uuid
        controller_of(plugin).inject_xid(5, 79)
        devices = wait_unhealthy(kubelet, other)
        assert devices is not None and health_of(devices)[uuid] == "Unhealthy"


def test_reload_stops_the_old_monitor_without_holding_the_state_lock() -> None:
    # A health callback takes the plugin's state lock; a reload that joined the old monitor
    # while holding it would wait on a thread that waits on the reload (the reported deadlock).
    with slow_recovery_env() as (_, plugin, _path):
        old = monitor_of(plugin)
        original_stop = old.stop
        lock_free: list[bool] = []

        def stop() -> None:
            got = threading.Event()

            def probe() -> None:
                if plugin._lock.acquire(timeout=TIMEOUT):
                    got.set()
                    plugin._lock.release()

            thread = threading.Thread(target=probe)
            thread.start()
            thread.join()
            lock_free.append(got.is_set())
            original_stop()

        old.stop = stop  # type: ignore[method-assign]
        assert plugin.reload() is None
        assert lock_free == [True]


def test_late_callback_of_a_replaced_monitor_is_ignored() -> None:
    with slow_recovery_env() as (kubelet, plugin, _):
        old_generation = plugin._health_generation
        assert plugin.reload() is None
        sick = frozenset({snapshot_of(plugin).gpus[0].uuid})
        plugin._on_health_change(old_generation, sick)  # what a blocked old callback would do
        assert all(d.healthy for d in plugin.resource_map.resources[GPU].devices)
