"""The gRPC shell alone: a fake ResourceManager behind a real socket, no allocator at all.

The server only adapts: the messages go to the manager as they came (their ID lists still
protobuf fields, so the manager can count before reading), what it returns becomes the
response field by field, and an AllocationError becomes INVALID_ARGUMENT with its text.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import grpc
import pytest
from test_server_support import make_resource, make_snapshot, plugin_stub

from deviceplugin.allocate import AllocationError, ContainerAllocation, DeviceSpec, Mount
from deviceplugin.rm import AllocateRequest, PreferredRequest, ResourceManager
from deviceplugin.server import PluginServer
from gpus.resources import Resource
from protos.deviceplugin.v1beta1 import api_pb2, api_pb2_grpc

TIMEOUT = 10.0
FULL = ContainerAllocation(
    envs={"A": "1", "B": "2"},
    mounts=(Mount("/c/m", "/h/m"), Mount("/c/w", "/h/w", read_only=False)),
    devices=(DeviceSpec("/dev/nvidia0", "/host/dev/nvidia0"), DeviceSpec("/dev/x", "/h/x", "r")),
    annotations={"cdi.k8s.io/k": "v"},
    cdi_devices=("k8s.device-plugin.nvidia.com/gpu=GPU-0",),
)


@dataclass
class FakeManager:
    """Records what the shell hands it; answers or refuses as told."""

    resource: Resource
    refuse: str = ""
    allocate_calls: list[list[list[str]]] = field(default_factory=list)
    preferred_calls: list[list[tuple[list[str], list[str], int]]] = field(default_factory=list)

    def allocate(self, requests: Sequence[AllocateRequest]) -> list[ContainerAllocation]:
        self.allocate_calls.append([list(r.devices_ids) for r in requests])
        if self.refuse:
            raise AllocationError(self.refuse)
        return [FULL for _ in requests]

    def preferred(self, requests: Sequence[PreferredRequest]) -> list[list[str]]:
        self.preferred_calls.append([
            (list(r.available_deviceIDs), list(r.must_include_deviceIDs), r.allocation_size)
            for r in requests])
        if self.refuse:
            raise AllocationError(self.refuse)
        return [list(r.available_deviceIDs)[: r.allocation_size] for r in requests]


def _typed(manager: FakeManager) -> ResourceManager:
    return manager  # `mypy tests/test_server_adapter.py` checks the fake keeps to the protocol


@pytest.fixture
def fake(sockdir: str) -> Iterator[tuple[FakeManager, api_pb2_grpc.DevicePluginStub]]:
    manager = FakeManager(make_resource(make_snapshot(2)))
    server = PluginServer(_typed(manager), sockdir)
    server.start()
    channel, stub = plugin_stub(server.socket_path)
    yield manager, stub
    channel.close()
    server.stop()


def test_allocate_passes_ids_and_converts_every_field(
    fake: tuple[FakeManager, api_pb2_grpc.DevicePluginStub],
) -> None:
    manager, stub = fake
    response = stub.Allocate(api_pb2.AllocateRequest(container_requests=[
        api_pb2.ContainerAllocateRequest(devices_ids=["a", "b"]),
        api_pb2.ContainerAllocateRequest(devices_ids=["c"])]), timeout=TIMEOUT)
    assert manager.allocate_calls == [[["a", "b"], ["c"]]]
    assert len(response.container_responses) == 2
    expected = api_pb2.ContainerAllocateResponse(
        envs={"A": "1", "B": "2"},
        mounts=[api_pb2.Mount(container_path="/c/m", host_path="/h/m", read_only=True),
                api_pb2.Mount(container_path="/c/w", host_path="/h/w", read_only=False)],
        devices=[api_pb2.DeviceSpec(container_path="/dev/nvidia0",
                                    host_path="/host/dev/nvidia0", permissions="rw"),
                 api_pb2.DeviceSpec(container_path="/dev/x", host_path="/h/x", permissions="r")],
        annotations={"cdi.k8s.io/k": "v"},
        cdi_devices=[api_pb2.CDIDevice(name="k8s.device-plugin.nvidia.com/gpu=GPU-0")],
    )
    assert list(response.container_responses) == [expected, expected]


def test_preferred_passes_the_request_and_returns_the_sets(
    fake: tuple[FakeManager, api_pb2_grpc.DevicePluginStub],
) -> None:
    manager, stub = fake
    response = stub.GetPreferredAllocation(api_pb2.PreferredAllocationRequest(container_requests=[
        api_pb2.ContainerPreferredAllocationRequest(
            available_deviceIDs=["x", "y", "z"], must_include_deviceIDs=["y"],
            allocation_size=2)]), timeout=TIMEOUT)
    assert manager.preferred_calls == [[(["x", "y", "z"], ["y"], 2)]]
    assert [list(r.deviceIDs) for r in response.container_responses] == [["x", "y"]]


@pytest.mark.parametrize("method", ["Allocate", "GetPreferredAllocation"])
def test_a_refusal_is_invalid_argument_with_the_managers_text(
        fake: tuple[FakeManager, api_pb2_grpc.DevicePluginStub], method: str) -> None:
    manager, stub = fake
    manager.refuse = 'invalid allocation request for "nvidia.com/gpu": invalid request: no'
    call: Callable[[], object]
    if method == "Allocate":
        call = lambda: stub.Allocate(api_pb2.AllocateRequest(container_requests=[  # noqa: E731
            api_pb2.ContainerAllocateRequest(devices_ids=["a"])]), timeout=TIMEOUT)
    else:
        call = lambda: stub.GetPreferredAllocation(  # noqa: E731
            api_pb2.PreferredAllocationRequest(container_requests=[
                api_pb2.ContainerPreferredAllocationRequest(allocation_size=1)]),
            timeout=TIMEOUT)
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == manager.refuse
