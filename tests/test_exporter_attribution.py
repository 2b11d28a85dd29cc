"""Pod attribution: pure mapping from PodResources answers, the refresher, and a real kubelet."""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections.abc import Callable, Iterator

import builders
import grpc
import pytest
from test_plugin_mig_e2e import TIMEOUT, mig_config
from test_plugin_sharing_e2e import shared
from test_podresources import pod_resources_env
from test_server_support import make_snapshot, short_tmpdir

from deviceplugin.mockkubelet import MockKubelet, PodResourcesFault
from exporter.attribution import (
    Attribution,
    AttributionRefresher,
    Current,
    DeviceKey,
    Health,
    PodRef,
    PodResourcesClient,
    ResourceFilter,
    allocatable_from_response,
    attribution_from_list,
    classify,
    resolver_from_snapshot,
    split_replica,
)
from gpus.config import ReplicatedResource
from gpus.model import GPU, MigDevice, Snapshot
from protos.podresources.v1 import api_pb2 as pr_pb2

G0 = "GPU-00000000-0000-0000-0000-000000000000"
G1 = "GPU-00000001-0000-0000-0000-000000000000"
MIG_A = "MIG-aaaaaaaa-0000-0000-0000-000000000000"
MIG_B = "MIG-bbbbbbbb-0000-0000-0000-000000000000"
GPU_RES = "nvidia.com/gpu"


def mig(uuid: str, index: int, parent: GPU, gi: int) -> MigDevice:
    return builders.mig_device(parent.index, index, uuid=uuid, parent_uuid=parent.uuid,
                               gpu_instance_id=gi, profile="3g.20gb", memory_bytes=20 << 30,
                               gpu_instance_slices=3, compute_instance_slices=3)


def snapshot() -> Snapshot:
    """GPU 0 whole, GPU 1 with two MIG devices (GPU instances 1 and 2)."""
    base = make_snapshot(2)
    g0, g1 = base.gpus
    assert (g0.uuid, g1.uuid) == (G0, G1)
    g1 = dataclasses.replace(g1, mig_enabled=True, mig_capable=True,
                             mig_devices=(mig(MIG_A, 0, g1, 1), mig(MIG_B, 1, g1, 2)))
    return builders.snapshot(g0, g1, driver="570.124.06", cuda=12080, links=base.links)


def pod(namespace: str, name: str, *containers: tuple[str, list[tuple[str, list[str]]]]
        ) -> pr_pb2.PodResources:
    return pr_pb2.PodResources(name=name, namespace=namespace, containers=[
        pr_pb2.ContainerResources(name=c, devices=[
            pr_pb2.ContainerDevices(resource_name=r, device_ids=ids) for r, ids in devices])
        for c, devices in containers])


def listing(*pods: pr_pb2.PodResources) -> pr_pb2.ListPodResourcesResponse:
    return pr_pb2.ListPodResourcesResponse(pod_resources=pods)


RESOLVE = resolver_from_snapshot(snapshot())


# pure mapping ------------------------------------------------------------------------------


def test_whole_gpu_and_mig_devices_map_to_their_keys() -> None:
    result = attribution_from_list(listing(
        pod("ml", "train", ("main", [(GPU_RES, [G0])])),
        pod("ml", "small", ("main", [("nvidia.com/mig-3g.20gb", [MIG_B])])),
    ), RESOLVE)
    assert dict(result.pods) == {
        DeviceKey(G0): (PodRef("ml", "train", "main", GPU_RES),),
        DeviceKey(G1, 2): (PodRef("ml", "small", "main", "nvidia.com/mig-3g.20gb"),),
    }
    assert result.unresolved == ()
    assert result.pods_of(DeviceKey(G1, 1)) == ()


def test_every_pod_sharing_a_replicated_gpu_is_kept() -> None:
    # Time-slicing / MPS replicas: three pods on GPU 0, one holding two replicas of it.
    result = attribution_from_list(listing(
        pod("a", "p1", ("c", [(GPU_RES, [f"{G0}::0"])])),
        pod("a", "p2", ("c", [(GPU_RES, [f"{G0}::1", f"{G0}::2"])])),
        pod("b", "p3", ("c", [(GPU_RES, [f"{G0}::3"])])),
        pod("b", "m", ("c", [("nvidia.com/mig-3g.20gb", [f"{MIG_A}::1"])])),
    ), RESOLVE)
    assert result.pods_of(DeviceKey(G0)) == (
        PodRef("a", "p1", "c", GPU_RES), PodRef("a", "p2", "c", GPU_RES),
        PodRef("b", "p3", "c", GPU_RES))
    assert result.pods_of(DeviceKey(G1, 1)) == (PodRef("b", "m", "c", "nvidia.com/mig-3g.20gb"),)


def test_containers_and_resources_of_one_pod_are_separate_refs() -> None:
    result = attribution_from_list(listing(
        pod("ns", "p", ("a", [(GPU_RES, [G0])]), ("b", [("nvidia.com/gpu.shared", [f"{G0}::4"])])),
    ), RESOLVE)
    assert result.pods_of(DeviceKey(G0)) == (
        PodRef("ns", "p", "a", GPU_RES), PodRef("ns", "p", "b", "nvidia.com/gpu.shared"))


def test_renamed_resources_are_read_and_the_flag_adds_other_domains() -> None:
    response = listing(
        pod("ns", "shared", ("c", [("nvidia.com/gpu.shared", [f"{G0}::0"])])),
        pod("ns", "renamed", ("c", [("nvidia.com/tesla", [f"{G0}::1"])])),
        pod("ns", "other", ("c", [("example.com/gpu", [G1])])),
        pod("ns", "nic", ("c", [("intel.com/sriov", ["0000:3b:00.1"])])),
    )
    default = attribution_from_list(response, RESOLVE)
    assert [r.pod for r in default.pods_of(DeviceKey(G0))] == ["renamed", "shared"]
    assert default.pods_of(DeviceKey(G1)) == ()
    flagged = attribution_from_list(
        response, RESOLVE, ResourceFilter.from_flag("example.com/gpu, ,other.io/x").accepts)
    assert flagged.pods_of(DeviceKey(G1)) == (PodRef("ns", "other", "c", "example.com/gpu"),)
    assert flagged.unresolved == ()  # the NIC's resource is not read at all


def test_resource_filter_from_flag() -> None:
    assert ResourceFilter.from_flag(None) == ResourceFilter()
    assert ResourceFilter.from_flag("a/b,c/d").extra == {"a/b", "c/d"}
    assert ResourceFilter.from_flag(["a/b"]).accepts("a/b")
    assert ResourceFilter().accepts("nvidia.com/mig-1g.5gb")
    assert not ResourceFilter().accepts("nvidia.comx/gpu")
    assert not ResourceFilter().accepts("example.com/gpu")


def test_index_ids_and_old_mig_ids_resolve() -> None:
    result = attribution_from_list(listing(
        pod("ns", "by-index", ("c", [(GPU_RES, ["0", "1:1", "0::2"])])),
        pod("ns", "old", ("c", [("nvidia.com/mig-3g.20gb", [f"MIG-{G1}/1/0"])])),
    ), RESOLVE)
    assert dict(result.pods) == {
        DeviceKey(G0): (PodRef("ns", "by-index", "c", GPU_RES),),
        DeviceKey(G1, 1): (PodRef("ns", "old", "c", "nvidia.com/mig-3g.20gb"),),
        DeviceKey(G1, 2): (PodRef("ns", "by-index", "c", GPU_RES),),
    }


def test_ids_of_no_device_here_are_reported_not_guessed() -> None:
    result = attribution_from_list(listing(
        pod("ns", "p", ("c", [(GPU_RES, ["GPU-gone", "GPU-gone::1", "7", f"MIG-{G0}/x/0",
                                          "MIG-GPU-unknown/1/0"])])),
    ), RESOLVE)
    assert dict(result.pods) == {}
    assert result.unresolved == ("7", "GPU-gone", "GPU-gone::1", f"MIG-{G0}/x/0",
                                 "MIG-GPU-unknown/1/0")


def test_mapping_is_deterministic_and_immutable() -> None:
    pods = [pod("ns", f"p{n}", ("c", [(GPU_RES, [f"{G0}::{n}"])])) for n in range(5)]
    forward = attribution_from_list(listing(*pods), RESOLVE)
    backward = attribution_from_list(listing(*reversed(pods)), RESOLVE)
    assert forward == backward
    assert list(forward.pods_of(DeviceKey(G0))) == sorted(forward.pods_of(DeviceKey(G0)))
    with pytest.raises(TypeError):
        forward.pods[DeviceKey(G1)] = ()  # type: ignore[index]  # read-only: on purpose


def test_split_replica() -> None:
    assert split_replica(f"{G0}::12") == (G0, "12")
    assert split_replica(G0) == (G0, None)


def test_allocatable_keys() -> None:
    response = pr_pb2.AllocatableResourcesResponse(devices=[
        pr_pb2.ContainerDevices(resource_name=GPU_RES, device_ids=[f"{G0}::0", f"{G0}::1"]),
        pr_pb2.ContainerDevices(resource_name="nvidia.com/mig-3g.20gb", device_ids=[MIG_A]),
        pr_pb2.ContainerDevices(resource_name="example.com/x", device_ids=[G1]),
        pr_pb2.ContainerDevices(resource_name=GPU_RES, device_ids=["GPU-gone"]),
    ])
    assert allocatable_from_response(response, RESOLVE) == {DeviceKey(G0), DeviceKey(G1, 1)}


# the refresher with a scripted kubelet --------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Script:
    """A fetch that answers or raises what the test says next."""

    def __init__(self) -> None:
        self.answer: pr_pb2.ListPodResourcesResponse | BaseException = listing()
        self.calls = 0

    def __call__(self) -> pr_pb2.ListPodResourcesResponse:
        self.calls += 1
        if isinstance(self.answer, BaseException):
            raise self.answer
        return self.answer


class RpcFailure(grpc.RpcError, grpc.Call):  # type: ignore[misc]  # grpc ships no types
    """What a failed unary call raises."""

    def __init__(self, code: grpc.StatusCode, details: str = "boom") -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def initial_metadata(self) -> None: ...
    def trailing_metadata(self) -> None: ...
    def is_active(self) -> bool: return False
    def time_remaining(self) -> None: ...
    def cancel(self) -> bool: return False
    def add_callback(self, callback: Callable[[], None]) -> bool: return False


ONE_POD = listing(pod("ns", "p", ("c", [(GPU_RES, [G0])])))


def scripted(keep_last_good_s: float = 60.0) -> tuple[AttributionRefresher, Script, Clock]:
    script, clock = Script(), Clock()
    return AttributionRefresher(script, RESOLVE, keep_last_good_s=keep_last_good_s,
                                clock=clock), script, clock


def test_before_any_refresh_the_mapping_is_empty_and_pending() -> None:
    refresher, script, _ = scripted()
    current = refresher.current()
    assert current.attribution == Attribution() and current.fetched_at is None
    assert current.health.kind == "pending" and not current.stale
    assert script.calls == 0


def test_success_publishes_and_generation_moves_only_on_change() -> None:
    refresher, script, clock = scripted()
    script.answer = ONE_POD
    first = refresher.refresh_now()
    assert first.attribution.pods_of(DeviceKey(G0)) == (PodRef("ns", "p", "c", GPU_RES),)
    assert (first.health, first.fetched_at, first.generation) == (Health("ok"), 1000.0, 1)
    clock.now = 1005.0
    same = refresher.refresh_now()
    assert (same.generation, same.fetched_at) == (1, 1005.0)
    script.answer = listing()
    assert refresher.refresh_now().generation == 2
    assert refresher.counters().mapping_changes == 2


def test_failure_keeps_the_last_good_mapping_with_its_age_then_drops_it() -> None:
    refresher, script, clock = scripted(keep_last_good_s=60)
    script.answer = ONE_POD
    good = refresher.refresh_now()
    script.answer = RpcFailure(grpc.StatusCode.UNAVAILABLE)
    clock.now += 30
    kept = refresher.refresh_now()
    assert kept.attribution == good.attribution and kept.stale
    assert kept.health.kind == "unavailable" and kept.age(clock.now) == 30
    assert kept.generation == good.generation
    clock.now += 31  # past keep_last_good_s
    dropped = refresher.refresh_now()
    assert dropped.attribution == Attribution() and dropped.fetched_at is None
    assert dropped.age(clock.now) is None and not dropped.stale
    assert dropped.generation == good.generation + 1
    assert refresher.counters().expired == 1
    script.answer = ONE_POD
    back = refresher.refresh_now()
    assert back.attribution == good.attribution and back.health.ok


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (RpcFailure(grpc.StatusCode.DEADLINE_EXCEEDED), "timeout"),
        (RpcFailure(grpc.StatusCode.UNAVAILABLE), "unavailable"),
        (RpcFailure(grpc.StatusCode.PERMISSION_DENIED), "error:PERMISSION_DENIED"),
        (ValueError("bad"), "internal"),
    ],
)
def test_failures_are_classified(error: BaseException, kind: str) -> None:
    assert classify(error).kind == kind
    refresher, script, _ = scripted()
    script.answer = error
    assert refresher.refresh_now().health.kind == kind  # never raises


def test_problems_are_logged_once_per_state_change_and_counted(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="exporter.attribution")
    refresher, script, _ = scripted()
    script.answer = ONE_POD
    refresher.refresh_now()
    script.answer = RpcFailure(grpc.StatusCode.UNAVAILABLE, "connection refused")
    for _ in range(5):
        refresher.refresh_now()
    script.answer = RpcFailure(grpc.StatusCode.DEADLINE_EXCEEDED)
    for _ in range(3):
        refresher.refresh_now()
    script.answer = ONE_POD
    for _ in range(2):
        refresher.refresh_now()
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "PodResources: the kubelet answers",
        "PodResources: unavailable (UNAVAILABLE: connection refused); keeping the last good "
        "pod mapping for up to 60 s",
        "PodResources: timeout (DEADLINE_EXCEEDED: boom); keeping the last good pod mapping "
        "for up to 60 s",
        "PodResources: the kubelet answers again (was timeout)",
    ]
    counters = refresher.counters()
    assert (counters.refreshes, counters.failures, counters.state_changes) == (11, 8, 4)
    assert dict(counters.failures_by_kind) == {"unavailable": 5, "timeout": 3}


def test_a_bad_resolver_is_an_internal_failure_not_a_crash() -> None:
    def broken(device_id: str) -> DeviceKey | None:
        raise KeyError(device_id)

    refresher = AttributionRefresher(lambda: ONE_POD, broken)
    current = refresher.refresh_now()
    assert current.health.kind == "internal" and "KeyError" in current.health.detail


# the thread ------------------------------------------------------------------------------


# Starts a refresher over a fetch function (the `running` fixture's value); stopped at teardown.
Start = Callable[..., AttributionRefresher]


@pytest.fixture
def running() -> Iterator[Start]:
    started: list[AttributionRefresher] = []

    def start(fetch: Callable[[], pr_pb2.ListPodResourcesResponse], **kwargs: object
              ) -> AttributionRefresher:
        refresher = AttributionRefresher(fetch, RESOLVE, **kwargs)  # type: ignore[arg-type]  # options a test names
        started.append(refresher)
        refresher.start()
        return refresher

    yield start
    for refresher in started:
        refresher.stop()


def test_thread_refreshes_on_start_and_on_request(running: Start) -> None:
    script = Script()
    script.answer = ONE_POD
    refresher = running(script, interval_s=3600)
    assert refresher.wait_for(lambda c: c.generation == 1, TIMEOUT)
    script.answer = listing()
    refresher.request_refresh()
    assert refresher.wait_for(lambda c: c.generation == 2, TIMEOUT)
    assert refresher.current().attribution == Attribution()


def test_a_scrape_reads_while_the_kubelet_hangs(running: Start) -> None:
    entered, release = threading.Event(), threading.Event()
    answers = iter([ONE_POD])

    def fetch() -> pr_pb2.ListPodResourcesResponse:
        answer = next(answers, None)
        if answer is not None:
            return answer
        entered.set()
        release.wait(TIMEOUT)
        raise RpcFailure(grpc.StatusCode.DEADLINE_EXCEEDED)

    refresher = running(fetch, interval_s=3600)
    assert refresher.wait_for(lambda c: c.generation == 1, TIMEOUT)
    refresher.request_refresh()
    assert entered.wait(TIMEOUT)
    # The fetch is stuck; a reader on another thread still gets the mapping.
    read: list[Current] = []
    reader = threading.Thread(target=lambda: read.append(refresher.current()))
    reader.start()
    reader.join(TIMEOUT)
    assert read and read[0].attribution.pods_of(DeviceKey(G0))
    release.set()
    assert refresher.wait_for(lambda c: c.health.kind == "timeout", TIMEOUT)


# a real kubelet over a real socket ---------------------------------------------------------


def test_pods_through_the_mock_kubelet_appear_on_their_gpus() -> None:
    with short_tmpdir() as directory:
        config = shared(mig_config(directory, "dgx-a100", "none"),
                        ReplicatedResource(GPU_RES, 4), rename_by_default=True)
        with pod_resources_env(config, directory) as (env, path):
            name = "nvidia.com/gpu.shared"
            held = {n: env.kubelet.allocate(name, 1, pod=f"pod-{n}", must_include=())
                    .allocated[0] for n in range(3)}
            client = PodResourcesClient(path, timeout_s=TIMEOUT)
            assert env.plugin.snapshot is not None
            refresher = AttributionRefresher(client.list,
                                             resolver_from_snapshot(env.plugin.snapshot))
            current = refresher.refresh_now()
            env.kubelet.free_pod("default", "pod-1")
            after = refresher.refresh_now()
            client.close()
    assert current.health.ok
    expected: dict[DeviceKey, list[str]] = {}
    for n, device_id in held.items():
        expected.setdefault(DeviceKey(split_replica(device_id)[0]), []).append(f"pod-{n}")
    assert {k: [r.pod for r in v] for k, v in current.attribution.pods.items()} == expected
    assert all(r.resource == name for v in current.attribution.pods.values() for r in v)
    assert "pod-1" not in {r.pod for v in after.attribution.pods.values() for r in v}


def test_mig_pods_through_the_mock_kubelet_map_to_parent_and_instance() -> None:
    with short_tmpdir() as directory, pod_resources_env(
        mig_config(directory, "a100-mig-mixed", "mixed"), directory
    ) as (env, path):
        snap = env.plugin.snapshot
        assert snap is not None
        resource = next(r for r in env.kubelet.resources() if r.startswith("nvidia.com/mig-"))
        (mig_id,) = env.kubelet.allocate(resource, 1, pod="m", namespace="ns").allocated
        client = PodResourcesClient(path, timeout_s=TIMEOUT)
        current = AttributionRefresher(client.list, resolver_from_snapshot(snap)).refresh_now()
        allocatable = allocatable_from_response(client.allocatable(),
                                                resolver_from_snapshot(snap))
        client.close()
    device = next(m for g in snap.gpus for m in g.mig_devices if m.uuid == mig_id)
    key = DeviceKey(device.parent_uuid, device.gpu_instance_id)
    assert dict(current.attribution.pods) == {key: (PodRef("ns", "m", "main", resource),)}
    assert key in allocatable


def test_no_socket_then_a_kubelet_then_a_restart_then_errors(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="exporter.attribution")
    with short_tmpdir() as directory:
        path = os.path.join(directory, "pr.sock")
        client = PodResourcesClient(path, timeout_s=0.5)
        refresher = AttributionRefresher(client.list, RESOLVE)
        missing = refresher.refresh_now()
        assert missing.health.kind == "no-socket" and "No such file" in missing.health.detail
        kubelet = MockKubelet(directory, pod_resources_socket=path)
        with kubelet:
            assert refresher.refresh_now().health.ok
            kubelet.restart()  # a new socket: the client's old channel is replaced
            assert refresher.refresh_now().health.ok
            kubelet.set_pod_resources_fault(PodResourcesFault(error=grpc.StatusCode.INTERNAL))
            assert refresher.refresh_now().health.kind == "error:INTERNAL"
            kubelet.set_pod_resources_fault(PodResourcesFault(delay_s=60))
            slow = refresher.refresh_now()  # bounded by the client's 0.5 s deadline
            assert slow.health.kind == "timeout"
            kubelet.set_pod_resources_fault(PodResourcesFault())
            assert refresher.refresh_now().health.ok
        gone = refresher.refresh_now()
        client.close()
    assert gone.health.kind == "no-socket"
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == [
        "PodResources: no-socket", "PodResources: error:INTERNAL", "PodResources: timeout",
        "PodResources: no-socket"]


def test_a_kubelet_back_on_a_stale_socket_is_reached_at_once() -> None:
    # A socket file nobody listens on (a kubelet that died): the call fails and gRPC would
    # wait out its reconnect backoff on that channel; a fresh channel reaches the new kubelet.
    import socket

    with short_tmpdir() as directory:
        path = os.path.join(directory, "pr.sock")
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(path)
        stale.close()
        client = PodResourcesClient(path, timeout_s=TIMEOUT)
        refresher = AttributionRefresher(client.list, RESOLVE)
        assert refresher.refresh_now().health.kind == "unavailable"
        with MockKubelet(directory, pod_resources_socket=path):
            assert refresher.refresh_now().health.ok
        client.close()
