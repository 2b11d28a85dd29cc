"""The DevicePlugin gRPC server over a real Unix socket, with a stand-in allocator."""

from __future__ import annotations

import logging
import os
import random
import threading
from collections.abc import Iterator, Sequence

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_server_support import (
    FakeAllocator,
    default_config,
    fake_manager,
    make_resource,
    make_snapshot,
    plugin_stub,
    short_tmpdir,
)

from deviceplugin.rm import NodeManagers, PreferredQuery, RequestIndex, in_use_counts
from deviceplugin.server import (
    MAX_UNIX_PATH,
    PluginServer,
    ServeError,
    socket_name,
)
from deviceplugin.shared_policy import device_order
from gpus.model import Snapshot
from protos.deviceplugin.v1beta1 import api_pb2, api_pb2_grpc

TIMEOUT = 10.0


@pytest.fixture
def snapshot() -> Snapshot:
    return make_snapshot(4)


@pytest.fixture
def allocator() -> FakeAllocator:
    return FakeAllocator()


@pytest.fixture
def server(sockdir: str, snapshot: Snapshot, allocator: FakeAllocator) -> Iterator[PluginServer]:
    srv = PluginServer(fake_manager(make_resource(snapshot), snapshot, allocator), sockdir)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def stub(server: PluginServer) -> Iterator[api_pb2_grpc.DevicePluginStub]:
    channel, stub = plugin_stub(server.socket_path)
    yield stub
    channel.close()


def test_socket_names_follow_nvidia() -> None:
    assert socket_name("nvidia.com/gpu") == "nvidia-gpu.sock"
    assert socket_name("nvidia.com/mig-1g.10gb") == "nvidia-mig-1g.10gb.sock"
    assert socket_name("nvidia.com/gpu.shared") == "nvidia-gpu.shared.sock"


def test_options(stub: api_pb2_grpc.DevicePluginStub) -> None:
    options = stub.GetDevicePluginOptions(api_pb2.Empty(), timeout=TIMEOUT)
    assert options.get_preferred_allocation_available is True
    assert options.pre_start_required is False


def test_prestart_is_empty(stub: api_pb2_grpc.DevicePluginStub) -> None:
    response = stub.PreStartContainer(
        api_pb2.PreStartContainerRequest(devices_ids=["x"]), timeout=TIMEOUT
    )
    assert response == api_pb2.PreStartContainerResponse()


def test_list_and_watch_full_list_then_changes(
    server: PluginServer,
    stub: api_pb2_grpc.DevicePluginStub,
    snapshot: Snapshot,
) -> None:
    stream = stub.ListAndWatch(api_pb2.Empty(), timeout=TIMEOUT)
    first = next(stream)
    assert [d.ID for d in first.devices] == [g.uuid for g in snapshot.gpus]
    assert {d.health for d in first.devices} == {"Healthy"}
    assert [d.topology.nodes[0].ID for d in first.devices] == [0, 0, 1, 1]

    sick = snapshot.gpus[2].uuid
    assert server.update(fake_manager(make_resource(snapshot, unhealthy=[sick]), snapshot)) is True
    second = next(stream)
    health = {d.ID: d.health for d in second.devices}
    assert health[sick] == "Unhealthy"
    assert sum(h == "Healthy" for h in health.values()) == 3
    stream.cancel()


def test_unchanged_update_pushes_nothing(server: PluginServer, snapshot: Snapshot) -> None:
    assert server.update(fake_manager(make_resource(snapshot), snapshot)) is False


def test_no_topology_when_numa_unknown(sockdir: str, allocator: FakeAllocator) -> None:
    snap = make_snapshot(2)
    gpus = tuple(g.__class__(**{**g.__dict__, "numa_node": None}) for g in snap.gpus)
    snap = Snapshot(system=snap.system, gpus=gpus)
    srv = PluginServer(fake_manager(make_resource(snap), snap, allocator), sockdir)
    srv.start()
    channel, stub = plugin_stub(srv.socket_path)
    try:
        stream = stub.ListAndWatch(api_pb2.Empty(), timeout=TIMEOUT)
        first = next(stream)
        assert all(not d.HasField("topology") for d in first.devices)
        stream.cancel()
    finally:
        channel.close()
        srv.stop()


def test_stream_ends_cleanly_on_stop_and_threads_go(
    sockdir: str,
    snapshot: Snapshot,
    allocator: FakeAllocator,
) -> None:
    srv = PluginServer(fake_manager(make_resource(snapshot), snapshot, allocator), sockdir)
    srv.start()
    channel, stub = plugin_stub(srv.socket_path)
    stream = stub.ListAndWatch(api_pb2.Empty(), timeout=TIMEOUT)
    next(stream)
    assert srv.wait_streams(1, TIMEOUT)
    srv.stop()
    # The stream ends (OK or UNAVAILABLE/CANCELLED as the server goes), never hangs.
    with pytest.raises((StopIteration, grpc.RpcError)):
        next(stream)
    channel.close()
    assert srv.active_streams == 0
    assert not os.path.exists(srv.socket_path)
    leftovers = [t for t in threading.enumerate() if t.name.startswith(srv.endpoint)]
    assert leftovers == []


def test_client_going_away_ends_the_stream(
    server: PluginServer,
    stub: api_pb2_grpc.DevicePluginStub,
) -> None:
    stream = stub.ListAndWatch(api_pb2.Empty(), timeout=TIMEOUT)
    next(stream)
    assert server.wait_streams(1, TIMEOUT)
    stream.cancel()
    assert server.wait_streams(0, TIMEOUT)
    # And the server keeps serving new clients.
    again = stub.ListAndWatch(api_pb2.Empty(), timeout=TIMEOUT)
    assert len(next(again).devices) == 4
    again.cancel()


def allocate(stub: api_pb2_grpc.DevicePluginStub, ids: Sequence[str]) -> api_pb2.AllocateResponse:
    request = api_pb2.AllocateRequest(
        container_requests=[api_pb2.ContainerAllocateRequest(devices_ids=list(ids))]
    )
    response: api_pb2.AllocateResponse = stub.Allocate(request, timeout=TIMEOUT)
    return response


def test_allocate_envvar(stub: api_pb2_grpc.DevicePluginStub, snapshot: Snapshot) -> None:
    ids = [snapshot.gpus[1].uuid, snapshot.gpus[0].uuid]
    response = allocate(stub, ids)
    assert response.container_responses[0].envs["NVIDIA_VISIBLE_DEVICES"] == ",".join(ids)


def test_allocate_several_containers(
    stub: api_pb2_grpc.DevicePluginStub,
    snapshot: Snapshot,
) -> None:
    request = api_pb2.AllocateRequest(
        container_requests=[
            api_pb2.ContainerAllocateRequest(devices_ids=[snapshot.gpus[0].uuid]),
            api_pb2.ContainerAllocateRequest(devices_ids=[snapshot.gpus[3].uuid]),
        ]
    )
    response = stub.Allocate(request, timeout=TIMEOUT)
    envs = [r.envs["NVIDIA_VISIBLE_DEVICES"] for r in response.container_responses]
    assert envs == [snapshot.gpus[0].uuid, snapshot.gpus[3].uuid]


def test_allocate_duplicates_are_removed(
    stub: api_pb2_grpc.DevicePluginStub,
    snapshot: Snapshot,
) -> None:
    uuid = snapshot.gpus[0].uuid
    response = allocate(stub, [uuid, uuid])
    assert response.container_responses[0].envs["NVIDIA_VISIBLE_DEVICES"] == uuid


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        (
            ["GPU-nope"],
            'invalid allocation request for "nvidia.com/gpu": '
            "invalid request: unknown device: GPU-nope",
        ),
        ([], 'invalid allocation request for "nvidia.com/gpu": invalid request:'),
        ([""], 'invalid allocation request for "nvidia.com/gpu": invalid request:'),
    ],
)
def test_allocate_bad_ids_are_invalid_argument_and_change_nothing(
    server: PluginServer, stub: api_pb2_grpc.DevicePluginStub, snapshot: Snapshot, ids: list[str],
    message: str,
) -> None:
    before = server.resource
    with pytest.raises(grpc.RpcError) as info:
        allocate(stub, ids)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(message)
    assert server.resource == before
    # The server keeps serving good requests.
    assert allocate(stub, [snapshot.gpus[0].uuid]).container_responses


def preferred(stub: api_pb2_grpc.DevicePluginStub, available: Sequence[str],
              must: Sequence[str] = (), size: int = 1) -> list[str]:
    request = api_pb2.PreferredAllocationRequest(
        container_requests=[
            api_pb2.ContainerPreferredAllocationRequest(
                available_deviceIDs=list(available),
                must_include_deviceIDs=list(must),
                allocation_size=size,
            )
        ]
    )
    response = stub.GetPreferredAllocation(request, timeout=TIMEOUT)
    return list(response.container_responses[0].deviceIDs)


def test_preferred_uses_whole_gpu_allocator(
    stub: api_pb2_grpc.DevicePluginStub,
    snapshot: Snapshot,
    allocator: FakeAllocator,
) -> None:
    uuids = [g.uuid for g in snapshot.gpus]
    assert preferred(stub, uuids, [uuids[3]], 2) == [uuids[3], uuids[0]]
    assert allocator.calls == [("whole", uuids, [uuids[3]], 2)]


@pytest.mark.parametrize(
    ("available", "must", "size", "why"),
    [
        ([0, 1], [], 3, "allocation size 3 exceeds the 2 available devices"),
        ([0, 1], [2], 1, "must-include devices not available: GPU-00000002"),
        ([0, 1, 2], [0, 1], 1, "2 must-include devices exceed allocation size 1"),
        ([0, 1], [], 0, "allocation size 0 is not positive"),
    ],
)
def test_impossible_preferred_is_empty_and_logged(
    stub: api_pb2_grpc.DevicePluginStub, snapshot: Snapshot, allocator: FakeAllocator,
    available: list[int], must: list[int], size: int, why: str, caplog: pytest.LogCaptureFixture,
) -> None:
    uuids = [g.uuid for g in snapshot.gpus]
    with caplog.at_level(logging.WARNING, logger="deviceplugin.rm"):
        result = preferred(stub, [uuids[i] for i in available], [uuids[i] for i in must], size)
    assert result == []
    assert allocator.calls == []
    (record,) = [r for r in caplog.records if r.name == "deviceplugin.rm"]
    assert record.levelno == logging.WARNING
    assert "nvidia.com/gpu" in record.getMessage() and why in record.getMessage()


def test_preferred_ignores_unknown_available_ids(
    stub: api_pb2_grpc.DevicePluginStub,
    snapshot: Snapshot,
) -> None:
    uuid = snapshot.gpus[0].uuid
    assert preferred(stub, ["GPU-gone", uuid], [], 1) == [uuid]
    assert preferred(stub, ["GPU-gone", uuid], [], 2) == []


class PaddingAllocator:
    """A broken topology allocator: answers with padding slots."""

    def preferred(self, available: Sequence[str], must: Sequence[str], size: int) -> list[str]:
        return ["GPU-padding"] * size


def test_bad_allocator_answer_is_empty_not_garbage(sockdir: str, snapshot: Snapshot) -> None:
    managers = NodeManagers(default_config(), snapshot, PaddingAllocator(),
                            shared=lambda *a: [])
    srv = PluginServer(managers.manager(make_resource(snapshot)), sockdir)
    srv.start()
    channel, stub = plugin_stub(srv.socket_path)
    try:
        assert preferred(stub, [g.uuid for g in snapshot.gpus], [], 2) == []
    finally:
        channel.close()
        srv.stop()


def test_replicas_use_shared_policy(
    sockdir: str,
    snapshot: Snapshot,
    allocator: FakeAllocator,
) -> None:
    resource = make_resource(snapshot, name="nvidia.com/gpu.shared", replicas=2)
    srv = PluginServer(fake_manager(resource, snapshot, allocator), sockdir)
    srv.start()
    channel, stub = plugin_stub(srv.socket_path)
    try:
        ids = [d.id for d in resource.devices]
        assert preferred(stub, ids, [], 2) == ids[:2]
        assert allocator.calls[0][0] == "distributed"
        response = allocate(stub, [ids[0], ids[1]])
        # Replica suffixes are stripped and duplicates removed.
        assert response.container_responses[0].envs["NVIDIA_VISIBLE_DEVICES"] == ids[0][:-3]
    finally:
        channel.close()
        srv.stop()


def test_shared_policy_gets_in_use_counts_from_the_full_list(
    sockdir: str,
    snapshot: Snapshot,
    allocator: FakeAllocator,
) -> None:
    # GPU 1 is Unhealthy: its replicas are neither offered nor counted as in use. GPU 0's
    # replica 0 is allocated (Healthy and not offered); GPUs 2 and 3 are untouched.
    sick = snapshot.gpus[1].uuid
    resource = make_resource(snapshot, name="nvidia.com/gpu.shared", unhealthy=[sick],
                             replicas=2)
    srv = PluginServer(fake_manager(resource, snapshot, allocator), sockdir)
    srv.start()
    channel, stub = plugin_stub(srv.socket_path)
    try:
        offered = [d.id for d in resource.devices if d.healthy][1:]
        assert preferred(stub, offered, [], 1) == offered[:1]
        gpus = [g.uuid for g in snapshot.gpus]
        assert allocator.counts == [{gpus[0]: 1, gpus[1]: 0, gpus[2]: 0, gpus[3]: 0}]
    finally:
        channel.close()
        srv.stop()


def test_request_index_follows_health_changes(
    sockdir: str,
    snapshot: Snapshot,
    allocator: FakeAllocator,
) -> None:
    # The server indexes each resource version once; a health change must reach the in-use
    # counts of the next request (GPU 1's replicas, now Unhealthy, are no longer in use).
    resource = make_resource(snapshot, name="nvidia.com/gpu.shared", replicas=2)
    srv = PluginServer(fake_manager(resource, snapshot, allocator), sockdir)
    srv.start()
    channel, stub = plugin_stub(srv.socket_path)
    try:
        gpus = [g.uuid for g in snapshot.gpus]
        offered = [d.id for d in resource.devices if d.gpu.uuid != gpus[1]]
        preferred(stub, offered, [], 1)
        srv.update(fake_manager(make_resource(snapshot, name="nvidia.com/gpu.shared",
                                              unhealthy=[gpus[1]], replicas=2),
                                snapshot, allocator))
        preferred(stub, offered, [], 1)
        assert allocator.counts == [
            {gpus[0]: 0, gpus[1]: 2, gpus[2]: 0, gpus[3]: 0},
            {gpus[0]: 0, gpus[1]: 0, gpus[2]: 0, gpus[3]: 0},
        ]
    finally:
        channel.close()
        srv.stop()


@settings(max_examples=100, deadline=None)
@given(st.sets(st.integers(0, 3), max_size=4), st.sets(st.integers(0, 11), max_size=12),
       st.randoms(use_true_random=False))
def test_request_index_matches_the_reference(sick: set[int], offered: set[int],
                                             rng: random.Random) -> None:
    snap = make_snapshot(4)
    resource = make_resource(snap, name="nvidia.com/gpu.shared", replicas=3,
                             unhealthy=[snap.gpus[i].uuid for i in sick])
    index = RequestIndex.of(resource)
    available = [resource.devices[i].id for i in offered]
    rng.shuffle(available)
    missing = index.missing(index.id_map.keys() - set(available))
    assert index.in_use(missing) == in_use_counts(resource, set(available))
    request = index.shared_request(set(available), missing)
    assert [i for run in request.runs for i in run.ids] == [
        d.id for d in sorted((index.known[i] for i in available), key=device_order)]
    assert [(run.uuid, run.index) for run in request.runs] == sorted(
        {(index.known[i].gpu.uuid, index.known[i].gpu.index) for i in available},
        key=lambda gpu: gpu[1])
    assert request.available == len(available)
    assert all(request.gpu_of(i) == index.known[i].gpu.uuid for i in available)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 11), max_size=16), st.lists(st.sampled_from(["bogus", "GPU-x::9"]),
                                                         max_size=3),
       st.randoms(use_true_random=False))
def test_request_scan_matches_the_reference(offered: list[int], strangers: list[str],
                                            rng: random.Random) -> None:
    # Repeats and unknown IDs, alone or together (a repeat and an unknown ID make the count
    # of IDs sent match a clean request of one more device): the scan must see through both.
    snap = make_snapshot(4)
    resource = make_resource(snap, name="nvidia.com/gpu.shared", replicas=3)
    index = RequestIndex.of(resource)
    requested = [resource.devices[i].id for i in offered] + strangers
    rng.shuffle(requested)
    scan = PreferredQuery.of(requested, [], 1).scan(index)
    assert set(scan.offered) == set(requested) & index.id_map.keys()
    assert len(scan.offered) == len(set(requested) & index.id_map.keys())
    assert all(i in scan.offered for i in requested if i in index.id_map)
    assert not any(i in scan.offered for i in strangers)
    assert set(scan.unknown) == set(strangers)
    assert [set(m) for m in scan.missing] == [
        set(run.ids) - set(requested) for run in index.runs]


def test_socket_path_too_long(snapshot: Snapshot, allocator: FakeAllocator) -> None:
    with short_tmpdir() as base:
        deep = os.path.join(base, "d" * (MAX_UNIX_PATH - len(base)))
        os.mkdir(deep)
        srv = PluginServer(fake_manager(make_resource(snapshot), snapshot, allocator), deep)
        with pytest.raises(ServeError, match="AF_UNIX allows at most 107"):
            srv.start()
        assert not srv.serving
        assert os.listdir(deep) == []


def test_missing_directory(snapshot: Snapshot, allocator: FakeAllocator, sockdir: str) -> None:
    missing = os.path.join(sockdir, "missing")
    srv = PluginServer(fake_manager(make_resource(snapshot), snapshot, allocator), missing)
    with pytest.raises(ServeError, match="does not exist"):
        srv.start()


def test_directory_is_a_file(snapshot: Snapshot, allocator: FakeAllocator, sockdir: str) -> None:
    path = os.path.join(sockdir, "file")
    open(path, "w").close()
    srv = PluginServer(fake_manager(make_resource(snapshot), snapshot, allocator), path)
    with pytest.raises(ServeError, match="is not a directory"):
        srv.start()


def test_non_socket_in_the_way_is_left_alone(
    snapshot: Snapshot,
    allocator: FakeAllocator,
    sockdir: str,
) -> None:
    path = os.path.join(sockdir, "nvidia-gpu.sock")
    with open(path, "w") as handle:
        handle.write("keep me")
    srv = PluginServer(fake_manager(make_resource(snapshot), snapshot, allocator), sockdir)
    with pytest.raises(ServeError, match="not a socket"):
        srv.start()
    with open(path) as handle:
        assert handle.read() == "keep me"


def test_restart_after_socket_removed(server: PluginServer, snapshot: Snapshot) -> None:
    generation = server.generation
    os.unlink(server.socket_path)
    assert not server.intact()
    server.restart()
    assert server.intact()
    assert server.generation == generation + 1
    channel, stub = plugin_stub(server.socket_path)
    try:
        assert stub.GetDevicePluginOptions(api_pb2.Empty(), timeout=TIMEOUT)
    finally:
        channel.close()


def test_update_refuses_another_resource(server: PluginServer, snapshot: Snapshot) -> None:
    with pytest.raises(ValueError, match="cannot serve"):
        server.update(fake_manager(make_resource(snapshot, name="nvidia.com/mig-1g.5gb"), snapshot))
