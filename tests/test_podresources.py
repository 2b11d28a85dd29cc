"""The mock kubelet's PodResources v1 server: real gRPC on a real socket, real plugin beneath."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from plugin_support import installed_fake
from test_plugin_mig_e2e import TIMEOUT, Env, mig_config, served
from test_plugin_sharing_e2e import shared
from test_server_support import short_tmpdir

from deviceplugin.main import DevicePlugin
from deviceplugin.mockkubelet import (
    MockKubelet,
    MockKubeletError,
    PodAllocation,
    PodResourcesFault,
    main,
)
from gpus.config import Config, ReplicatedResource
from protos.podresources.v1 import api_pb2 as pr_pb2
from protos.podresources.v1 import api_pb2_grpc as pr_pb2_grpc

GPU = "nvidia.com/gpu"


@contextmanager
def pod_resources_env(config: Config, directory: str) -> Iterator[tuple[Env, str]]:
    """The mock kubelet (serving PodResources) and the real plugin on ``config``."""
    pr_socket = os.path.join(directory, "pod-resources.sock")
    kubelet = MockKubelet(directory, pod_resources_socket=pr_socket)
    kubelet.start()
    plugin = DevicePlugin(config, {}, poll_interval=0.02)
    try:
        controller = installed_fake(plugin.select_backend())
        controller.write_sysfs(Path(config.flags.sysfs_root))
        controller.write_driver_root(config.flags.nvidia_driver_root, config.flags.dev_root)
        plugin.start()
        assert plugin.readiness.wait(True, TIMEOUT), "the plugin never became ready"
        env = Env(kubelet, plugin, directory)
        for name in served(env):
            assert kubelet.wait_for_registration(name, TIMEOUT), name
        yield env, pr_socket
    finally:
        plugin.close()
        kubelet.stop()


@contextmanager
def lister(path: str) -> Iterator[pr_pb2_grpc.PodResourcesListerStub]:
    channel = grpc.insecure_channel(f"unix:{path}")
    try:
        yield pr_pb2_grpc.PodResourcesListerStub(channel)
    finally:
        channel.close()


@pytest.fixture
def whole_gpus() -> Iterator[tuple[Env, str]]:
    with short_tmpdir() as directory, pod_resources_env(
        mig_config(directory, "dgx-a100", "none"), directory
    ) as env:
        yield env


def flat(response: pr_pb2.ListPodResourcesResponse) -> list[tuple[str, str, str, str, str]]:
    """(namespace, pod, container, resource, device id) for every device List reports."""
    return [
        (p.namespace, p.name, c.name, d.resource_name, i)
        for p in response.pod_resources
        for c in p.containers
        for d in c.devices
        for i in d.device_ids
    ]


def test_list_reports_allocations_made_on_behalf_of_pods(whole_gpus: tuple[Env, str]) -> None:
    env, path = whole_gpus
    with lister(path) as stub:
        assert flat(stub.List(pr_pb2.ListPodResourcesRequest(), timeout=TIMEOUT)) == []
        a = env.kubelet.allocate(GPU, 2, pod="trainer-0", namespace="ml", container="worker")
        b = env.kubelet.allocate(GPU, 1, pod="trainer-0", namespace="ml", container="sidecar")
        c = env.kubelet.allocate(GPU, 1, pod="infer", namespace="web")
        response = stub.List(pr_pb2.ListPodResourcesRequest(), timeout=TIMEOUT)
    assert flat(response) == [
        *(("ml", "trainer-0", "worker", GPU, i) for i in a.allocated),
        ("ml", "trainer-0", "sidecar", GPU, b.allocated[0]),
        ("web", "infer", "main", GPU, c.allocated[0]),
    ]
    # One pod entry per pod, one container entry per container.
    assert [(p.namespace, p.name, [c.name for c in p.containers])
            for p in response.pod_resources] == [
        ("ml", "trainer-0", ["worker", "sidecar"]), ("web", "infer", ["main"])]
    # Each device carries its NUMA node, as the plugin listed it.
    numa = {d.id: d.numa_nodes for d in env.kubelet.devices(GPU)}
    for container in response.pod_resources[0].containers:
        for entry in container.devices:
            (device_id,) = entry.device_ids
            assert tuple(n.ID for n in entry.topology.nodes) == numa[device_id]


def test_held_devices_are_not_offered_again_until_the_pod_is_freed(
    whole_gpus: tuple[Env, str],
) -> None:
    env, path = whole_gpus
    first = env.kubelet.allocate(GPU, 6, pod="big")
    second = env.kubelet.allocate(GPU, 2, pod="small")
    assert not set(first.allocated) & set(second.allocated)
    with pytest.raises(ValueError, match="1 requested, 0 healthy devices available"):
        env.kubelet.allocate(GPU, 1, pod="third")
    assert env.kubelet.free_pod("default", "big")
    assert not env.kubelet.free_pod("default", "big")  # already gone
    assert [a.pod for a in env.kubelet.pod_allocations()] == ["small"]
    third = env.kubelet.allocate(GPU, 6, pod="third")
    assert set(third.allocated) == set(first.allocated)
    with lister(path) as stub:
        pods = stub.List(pr_pb2.ListPodResourcesRequest(), timeout=TIMEOUT).pod_resources
    assert sorted(p.name for p in pods) == ["small", "third"]


def test_freeing_a_pod_keeps_its_namesakes_in_other_namespaces(whole_gpus: tuple[Env, str]) -> None:
    env, _ = whole_gpus
    env.kubelet.allocate(GPU, 1, pod="p", namespace="a")
    env.kubelet.allocate(GPU, 1, pod="p", namespace="b")
    assert env.kubelet.free_pod("a", "p")
    assert [(x.namespace, x.pod) for x in env.kubelet.pod_allocations()] == [("b", "p")]


def test_allocations_without_a_pod_are_not_recorded(whole_gpus: tuple[Env, str]) -> None:
    env, path = whole_gpus
    for _ in range(3):  # the old API: nothing held, the same devices may come back
        assert env.kubelet.allocate(GPU, 8).allocated
    assert env.kubelet.pod_allocations() == []
    with lister(path) as stub:
        assert not stub.List(pr_pb2.ListPodResourcesRequest(), timeout=TIMEOUT).pod_resources


def test_get_returns_one_pod_or_not_found(whole_gpus: tuple[Env, str]) -> None:
    env, path = whole_gpus
    held = env.kubelet.allocate(GPU, 1, pod="p", namespace="ns")
    env.kubelet.allocate(GPU, 1, pod="p", namespace="other")  # same name, other namespace
    with lister(path) as stub:
        got = stub.Get(pr_pb2.GetPodResourcesRequest(pod_name="p", pod_namespace="ns"),
                       timeout=TIMEOUT).pod_resources
        assert (got.namespace, got.name) == ("ns", "p")
        assert [i for c in got.containers for d in c.devices for i in d.device_ids] == list(
            held.allocated)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Get(pr_pb2.GetPodResourcesRequest(pod_name="q", pod_namespace="ns"),
                     timeout=TIMEOUT)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert caught.value.details() == "pod q in namespace ns not found"


def test_allocatable_resources_are_the_listed_devices(whole_gpus: tuple[Env, str]) -> None:
    env, path = whole_gpus
    env.kubelet.allocate(GPU, 3, pod="p")  # allocated devices stay allocatable
    with lister(path) as stub:
        response = stub.GetAllocatableResources(pr_pb2.AllocatableResourcesRequest(),
                                                timeout=TIMEOUT)
    listed = env.kubelet.devices(GPU)
    assert [(d.resource_name, tuple(d.device_ids)) for d in response.devices] == [
        (GPU, (d.id,)) for d in listed]
    assert [tuple(n.ID for n in d.topology.nodes) for d in response.devices] == [
        d.numa_nodes for d in listed]


def test_replicas_and_renamed_resources_are_reported_per_pod() -> None:
    with short_tmpdir() as directory:
        config = shared(mig_config(directory, "dgx-a100", "none"),
                        ReplicatedResource(GPU, 4), rename_by_default=True)
        with pod_resources_env(config, directory) as (env, path):
            name = "nvidia.com/gpu.shared"
            pods = [env.kubelet.allocate(name, 1, pod=f"pod-{n}").allocated[0] for n in range(3)]
            assert len(set(pods)) == 3 and all("::" in i for i in pods)
            with lister(path) as stub:
                response = stub.List(pr_pb2.ListPodResourcesRequest(), timeout=TIMEOUT)
    assert flat(response) == [("default", f"pod-{n}", "main", name, i) for n, i in enumerate(pods)]


def test_mig_devices_are_reported_by_their_uuid() -> None:
    with short_tmpdir() as directory, pod_resources_env(
        mig_config(directory, "a100-mig-mixed", "mixed"), directory
    ) as (env, path):
        resource = next(r for r in env.kubelet.resources() if r.startswith("nvidia.com/mig-"))
        (mig,) = env.kubelet.allocate(resource, 1, pod="m").allocated
        with lister(path) as stub:
            response = stub.List(pr_pb2.ListPodResourcesRequest(), timeout=TIMEOUT)
    assert mig.startswith("MIG-")
    assert flat(response) == [("default", "m", "main", resource, mig)]


def test_restart_keeps_allocations_and_serves_again(whole_gpus: tuple[Env, str]) -> None:
    env, path = whole_gpus
    held = env.kubelet.allocate(GPU, 1, pod="survivor").allocated
    env.kubelet.restart()
    assert os.path.exists(path)
    with lister(path) as stub:
        response = stub.List(pr_pb2.ListPodResourcesRequest(), timeout=TIMEOUT)
    assert flat(response) == [("default", "survivor", "main", GPU, held[0])]
    env.kubelet.stop()
    assert not os.path.exists(path)


def test_injected_error_and_delay(whole_gpus: tuple[Env, str]) -> None:
    env, path = whole_gpus
    env.kubelet.set_pod_resources_fault(PodResourcesFault(error=grpc.StatusCode.UNAVAILABLE))
    with lister(path) as stub:
        with pytest.raises(grpc.RpcError) as caught:
            stub.List(pr_pb2.ListPodResourcesRequest(), timeout=TIMEOUT)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        # A delay longer than the client's deadline: the client gives up, not the server.
        env.kubelet.set_pod_resources_fault(PodResourcesFault(delay_s=60))
        with pytest.raises(grpc.RpcError) as caught:
            stub.List(pr_pb2.ListPodResourcesRequest(), timeout=0.2)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        env.kubelet.set_pod_resources_fault(PodResourcesFault())
        assert stub.List(pr_pb2.ListPodResourcesRequest(), timeout=TIMEOUT) is not None
    # stop() cuts a pending delay short instead of waiting it out.
    env.kubelet.set_pod_resources_fault(PodResourcesFault(delay_s=600))
    channel = grpc.insecure_channel(f"unix:{path}")
    pending = pr_pb2_grpc.PodResourcesListerStub(channel).List.future(
        pr_pb2.ListPodResourcesRequest(), timeout=TIMEOUT)
    assert env.kubelet.wait_for_pod_resources_calls(4, TIMEOUT)  # the server holds it now
    stopped = threading.Event()

    def stop() -> None:
        env.kubelet.stop()
        stopped.set()

    threading.Thread(target=stop, daemon=True).start()
    assert stopped.wait(TIMEOUT)
    pending.cancel()
    channel.close()


def test_pod_allocation_is_plain_data() -> None:
    a = PodAllocation("ns", "p", "c", GPU, ("GPU-1",))
    assert a == PodAllocation("ns", "p", "c", GPU, ("GPU-1",))


def test_pod_resources_socket_that_cannot_be_replaced_leaves_nothing_listening(
    sockdir: str,
) -> None:
    blocker = Path(sockdir, "pr")
    (blocker / "inside").mkdir(parents=True)
    kubelet = MockKubelet(sockdir, pod_resources_socket=str(blocker))
    with pytest.raises(MockKubeletError, match=f"cannot replace {blocker}: Is a directory"):
        kubelet.start()
    assert not os.path.exists(os.path.join(sockdir, "kubelet.sock"))
    assert (blocker / "inside").is_dir()


@pytest.fixture
def restore_signals() -> Any:
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_cli_serves_pod_resources_and_cleans_up(sockdir: str, restore_signals: Any) -> None:
    path = os.path.join(sockdir, "pod-resources.sock")
    assert main(["--dir", sockdir, "--pod-resources-socket", path, "--exit-after", "0"]) == 0
    assert not os.path.exists(path)


def test_cli_pod_resources_directory_missing_is_one_line_and_exit_2(
    sockdir: str, capsys: pytest.CaptureFixture[str], restore_signals: Any
) -> None:
    path = os.path.join(sockdir, "absent", "kubelet.sock")
    assert main(["--dir", sockdir, "--pod-resources-socket", path, "--exit-after", "0"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        f"mock-kubelet: --pod-resources-socket {path!r}: directory "
        f"{os.path.dirname(path)!r} does not exist"]
    assert os.listdir(sockdir) == []
