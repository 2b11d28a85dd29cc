"""Oversized requests on the plugin socket: refused before their IDs become Python objects.

An Allocate or GetPreferredAllocation carrying 1,000,000 two-character IDs (4 MB on the wire)
used to be refused only after every ID had become a Python string: 67 -> 175 MiB RSS, and four
at once went past the DaemonSet's 160Mi limit. Now gRPC refuses anything above what a kubelet
can send (RESOURCE_EXHAUSTED), and the handlers count IDs with ``len()`` before reading any
(INVALID_ARGUMENT). Memory is measured with tracemalloc, which sees every Python object the
handler makes but not the message gRPC and upb hold in C: a handler that reads the IDs of a
refused request shows a peak of about 60 bytes per ID, one that counts them shows ~0.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable, Iterator

import grpc
import pytest
from test_server_support import (
    FakeAllocator,
    fake_manager,
    make_resource,
    make_snapshot,
    plugin_stub,
)

from deviceplugin.server import (
    MAX_KUBELET_ID_BYTES,
    MAX_MESSAGE_BYTES,
    MAX_NODE_DEVICES,
    PluginServer,
)
from protos.deviceplugin.v1beta1 import api_pb2

TIMEOUT = 30.0
ATTACK_IDS = 1_000_000
# Distinct three-character IDs just under the receive cap: past gRPC, so only the handler's
# count stops them. 5 bytes each on the wire (tag, length, three characters); distinct, so
# that reading them into a set costs as much as into a list.
UNDER_CAP_IDS = (MAX_MESSAGE_BYTES - 1024) // 5
# What the server may allocate in Python objects while refusing UNDER_CAP_IDS IDs, per byte of
# the message: grpcio hands the handler's deserialiser the message as Python bytes (2x the
# message measured); reading the IDs costs ~60 bytes more per ID (a str object and a list or
# set slot), over 10x the message.
MAX_PEAK_PER_MESSAGE_BYTE = 3
SERVICE = "/v1beta1.DevicePlugin/"


@pytest.fixture
def server(sockdir: str) -> Iterator[PluginServer]:
    snapshot = make_snapshot(8)
    srv = PluginServer(fake_manager(make_resource(snapshot), snapshot, FakeAllocator()), sockdir)
    srv.start()
    yield srv
    srv.stop()


def two_char_ids(count: int) -> list[str]:
    return [f"{n % 1296:02x}"[-2:] for n in range(count)]


def distinct_short_ids(count: int) -> list[str]:
    """``count`` distinct three-character printable ASCII IDs."""
    alphabet = [chr(c) for c in range(33, 127)]
    assert count <= len(alphabet) ** 3
    base = len(alphabet)
    return [alphabet[n // base**2] + alphabet[n // base % base] + alphabet[n % base]
            for n in range(count)]


def allocate_bytes(ids: list[str], containers: int = 1) -> bytes:
    return api_pb2.AllocateRequest(container_requests=[
        api_pb2.ContainerAllocateRequest(devices_ids=ids) for _ in range(containers)
    ]).SerializeToString()


def preferred_bytes(ids: list[str]) -> bytes:
    return api_pb2.PreferredAllocationRequest(container_requests=[
        api_pb2.ContainerPreferredAllocationRequest(available_deviceIDs=ids, allocation_size=1)
    ]).SerializeToString()


def raw_call(channel: grpc.Channel, method: str) -> Callable[[bytes], bytes]:
    """A unary call sending pre-serialised bytes: the client makes no Python object per ID."""
    call = channel.unary_unary(SERVICE + method)
    return lambda payload: call(payload, timeout=TIMEOUT)


def refused(call: Callable[[bytes], bytes], payload: bytes) -> tuple[grpc.StatusCode, str, int]:
    """(status, details, peak Python allocation in bytes) of a call that must fail."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        with pytest.raises(grpc.RpcError) as info:
            call(payload)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    err = info.value
    assert isinstance(err, grpc.Call)
    return err.code(), err.details() or "", peak


@pytest.mark.parametrize("method", ["Allocate", "GetPreferredAllocation"])
def test_a_million_ids_are_refused_by_grpc(server: PluginServer, method: str) -> None:
    build = allocate_bytes if method == "Allocate" else preferred_bytes
    payload = build(two_char_ids(ATTACK_IDS))
    assert len(payload) > 4_000_000
    channel, _ = plugin_stub(server.socket_path)
    with channel:
        code, details, _ = refused(raw_call(channel, method), payload)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in details and str(MAX_MESSAGE_BYTES) in details


@pytest.mark.parametrize("method", ["Allocate", "GetPreferredAllocation"])
def test_many_ids_under_the_cap_are_counted_not_read(server: PluginServer, method: str) -> None:
    build = allocate_bytes if method == "Allocate" else preferred_bytes
    payload = build(distinct_short_ids(UNDER_CAP_IDS))
    assert len(payload) <= MAX_MESSAGE_BYTES
    channel, stub = plugin_stub(server.socket_path)
    with channel:
        call = raw_call(channel, method)
        refused(call, payload)  # once untraced: gRPC's own one-time allocations
        code, details, peak = refused(call, payload)
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert f"{UNDER_CAP_IDS} device IDs in one container request" in details
        assert "nvidia.com/gpu has 8 devices" in details
        assert peak < MAX_PEAK_PER_MESSAGE_BYTE * len(payload), (
            f"the server allocated {peak} bytes refusing a {len(payload)}-byte request")
        # And it keeps serving.
        ok = stub.Allocate(api_pb2.AllocateRequest(container_requests=[
            api_pb2.ContainerAllocateRequest(devices_ids=[server.resource.devices[0].id])]),
            timeout=TIMEOUT)
        assert len(ok.container_responses) == 1


def test_ids_spread_over_containers_are_counted_per_call(server: PluginServer) -> None:
    # Each container within the per-container bound (16 = twice the 8 devices), 64 of them.
    ids = [d.id for d in server.resource.devices] * 2
    channel, _ = plugin_stub(server.socket_path)
    with channel:
        code, details, _ = refused(raw_call(channel, "Allocate"), allocate_bytes(ids, 64))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "1024 device IDs in one call; nvidia.com/gpu has 8 devices" in details


def test_the_cap_admits_the_largest_kubelet_request() -> None:
    # Every device of the largest resource we allow, with the longest kubelet ID, in both
    # lists of GetPreferredAllocation: what a kubelet could legitimately send.
    longest = "G" * MAX_KUBELET_ID_BYTES
    assert len("MIG-00000000-0000-0000-0000-000000000000::1023") == MAX_KUBELET_ID_BYTES
    ids = [longest] * MAX_NODE_DEVICES
    request = api_pb2.PreferredAllocationRequest(container_requests=[
        api_pb2.ContainerPreferredAllocationRequest(
            available_deviceIDs=ids, must_include_deviceIDs=ids, allocation_size=2**31 - 1)])
    assert request.ByteSize() <= MAX_MESSAGE_BYTES
    # ... and the 4 MB attack (4 bytes per two-character ID) is beyond it.
    per_id = len(allocate_bytes(two_char_ids(1000))) / 1000
    assert per_id * ATTACK_IDS > MAX_MESSAGE_BYTES


@pytest.fixture
def shared_server(sockdir: str) -> Iterator[PluginServer]:
    snapshot = make_snapshot(2)
    resource = make_resource(snapshot, name="nvidia.com/gpu.shared", replicas=4)
    srv = PluginServer(fake_manager(resource, snapshot, FakeAllocator()), sockdir)
    srv.start()
    yield srv
    srv.stop()


def preferred(
    stub: object, available: list[str], must: list[str], size: int
) -> list[str]:
    request = api_pb2.PreferredAllocationRequest(container_requests=[
        api_pb2.ContainerPreferredAllocationRequest(
            available_deviceIDs=available, must_include_deviceIDs=must, allocation_size=size)])
    response = stub.GetPreferredAllocation(request, timeout=TIMEOUT)  # type: ignore[attr-defined]
    return list(response.container_responses[0].deviceIDs)


@pytest.mark.parametrize("where", ["available", "must"])
def test_long_unknown_preferred_id_is_refused(shared_server: PluginServer, where: str) -> None:
    ids = [d.id for d in shared_server.resource.devices]
    long_id = "G" * 300
    available, must = (ids + [long_id], []) if where == "available" else (ids, [long_id])
    channel, stub = plugin_stub(shared_server.socket_path)
    with channel, pytest.raises(grpc.RpcError) as info:
        preferred(stub, available, must, 1)
    assert isinstance(info.value, grpc.Call)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == "a device ID of 300 characters; IDs are at most 256"


def test_stale_replica_ids_are_not_available(shared_server: PluginServer) -> None:
    ids = [d.id for d in shared_server.resource.devices]
    stale = [f"{ids[0].split('::')[0]}::{n}" for n in (4, 5)]
    channel, stub = plugin_stub(shared_server.socket_path)
    with channel:
        # Only ids[3] is really free: a size-2 request is impossible, size 1 gets it.
        assert preferred(stub, [*stale, ids[3]], [], 2) == []
        assert preferred(stub, [*stale, ids[3], ids[3]], [], 1) == [ids[3]]
        assert preferred(stub, ids[::-1], [ids[5]], 2) == [ids[5], ids[0]]
