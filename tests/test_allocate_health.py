"""Guard: once a device turns Unhealthy, Allocate refuses it, whatever the request path caches.

The plugin runs on the fake DGX A100 against the mock kubelet; an XID through the fake NVML marks
a GPU Unhealthy by the real health path (monitor -> manager -> server update). The device is
allocated once before, so any per-resource index or cache on the Allocate path (the allocate
function's ID index, the server's request index) already holds the Healthy version of it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from plugin_support import controller_of, installed_fake, monitor_of, snapshot_of
from test_server_support import short_tmpdir

from deviceplugin.main import DevicePlugin, replace_flags, replace_plugin_flags
from deviceplugin.mockkubelet import MockKubelet
from gpus.config import Config
from protos.deviceplugin.v1beta1 import api_pb2

TIMEOUT = 10.0
GPU = "nvidia.com/gpu"
SICK = 3


@pytest.fixture
def env() -> Iterator[tuple[MockKubelet, DevicePlugin]]:
    with short_tmpdir() as directory:
        config = replace_flags(
            Config(), nvml="fake:dgx-a100", sysfs_root=os.path.join(directory, "root")
        )
        # A quiet period far beyond the test: the GPU stays Unhealthy once marked.
        config = replace_plugin_flags(
            config,
            kubelet_socket=os.path.join(directory, "kubelet.sock"),
            cdi_spec_dir=os.path.join(directory, "cdi"),
            health_recovery_interval=0.02,
            health_quiet_period=3600.0,
        )
        kubelet = MockKubelet(directory)
        kubelet.start()
        plugin = DevicePlugin(config, {}, poll_interval=0.02)
        installed_fake(plugin.select_backend()).write_sysfs(Path(config.flags.sysfs_root))
        plugin.start()
        try:
            assert kubelet.wait_for_registration(GPU, TIMEOUT)
            yield kubelet, plugin
        finally:
            plugin.close()
            kubelet.stop()


def allocate(kubelet: MockKubelet, ids: list[str]) -> api_pb2.AllocateResponse:
    request = api_pb2.AllocateRequest(
        container_requests=[api_pb2.ContainerAllocateRequest(devices_ids=ids)]
    )
    response: api_pb2.AllocateResponse = kubelet.stub(GPU).Allocate(request, timeout=TIMEOUT)
    return response


def preferred(kubelet: MockKubelet, ids: list[str], size: int) -> list[str]:
    request = api_pb2.PreferredAllocationRequest(container_requests=[
        api_pb2.ContainerPreferredAllocationRequest(available_deviceIDs=ids, allocation_size=size)
    ])
    response = kubelet.stub(GPU).GetPreferredAllocation(request, timeout=TIMEOUT)
    return list(response.container_responses[0].deviceIDs)


def test_allocate_refuses_a_device_that_became_unhealthy(
    env: tuple[MockKubelet, DevicePlugin],
) -> None:
    kubelet, plugin = env
    uuids = [g.uuid for g in snapshot_of(plugin).gpus]
    sick = uuids[SICK]
    # Warm every cache on the request path with the Healthy device.
    assert allocate(kubelet, [sick]).container_responses[0].envs["NVIDIA_VISIBLE_DEVICES"] == sick
    assert preferred(kubelet, uuids, 1)

    assert monitor_of(plugin).wait_watching(TIMEOUT)
    controller_of(plugin).inject_xid(SICK, 79)
    seen = kubelet.wait_for_devices(
        GPU, lambda ds: any(d.id == sick and d.health == "Unhealthy" for d in ds), TIMEOUT
    )
    assert seen is not None

    with pytest.raises(grpc.RpcError) as info:
        allocate(kubelet, [uuids[0], sick])
    assert isinstance(info.value, grpc.Call)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == (
        f'invalid allocation request for "{GPU}": invalid request: unhealthy device: {sick}'
    )
    # The other GPUs are still allocated as before.
    ok = allocate(kubelet, [uuids[0]])
    assert ok.container_responses[0].envs["NVIDIA_VISIBLE_DEVICES"] == uuids[0]
