"""Shared helpers for the device plugin's gRPC tests (no tests here).

Sockets live in short /tmp directories (AF_UNIX paths are limited to 107 bytes).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import builders
import grpc

from deviceplugin.rm import GpuResourceManager, NodeManagers
from deviceplugin.shared_policy import SharedRequest
from gpus.config import Config
from gpus.model import GPU, Snapshot
from gpus.resources import Device, Resource, ResourceMap
from protos.deviceplugin.v1beta1 import api_pb2_grpc

GIB = 1 << 30


@contextmanager
def short_tmpdir() -> Iterator[str]:
    """A short temporary directory for Unix sockets, removed afterwards."""
    path = tempfile.mkdtemp(prefix="nvk", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def make_gpu(index: int, numa: int | None = 0) -> GPU:
    """A plain A100-like GPU."""
    return builders.gpu(index, uuid=f"GPU-{index:08d}-0000-0000-0000-000000000000",
                        bus=index + 7, numa_node=numa)


def make_snapshot(count: int) -> Snapshot:
    """``count`` GPUs, the first half on NUMA node 0, the rest on node 1."""
    gpus = tuple(make_gpu(i, 0 if i < count // 2 else 1) for i in range(count))
    return builders.snapshot(*gpus)


def make_resource(
    snapshot: Snapshot,
    name: str = "nvidia.com/gpu",
    unhealthy: Sequence[str] = (),
    replicas: int = 1,
) -> Resource:
    """A resource over every GPU of the snapshot (replicated when ``replicas`` > 1)."""
    devices: list[Device] = []
    for gpu in snapshot.gpus:
        ok = gpu.uuid not in unhealthy
        if replicas > 1:
            devices += [
                Device(f"{gpu.uuid}::{n}", gpu.uuid, gpu, replica=n, healthy=ok)
                for n in range(replicas)
            ]
        else:
            devices.append(Device(gpu.uuid, gpu.uuid, gpu, healthy=ok))
    return Resource(name=name, devices=tuple(devices), replicas=replicas)


def make_map(*resources: Resource) -> ResourceMap:
    """A resource map of the given resources."""
    return ResourceMap(resources={r.name: r for r in resources})


def plugin_stub(socket_path: str) -> tuple[grpc.Channel, api_pb2_grpc.DevicePluginStub]:
    """A client channel and DevicePlugin stub on a plugin socket (close the channel after)."""
    channel = grpc.insecure_channel(f"unix:{socket_path}")
    return channel, api_pb2_grpc.DevicePluginStub(channel)


def default_config() -> Config:
    """The default configuration."""
    return Config()


class FakeAllocator:
    """Records preferred-allocation calls; picks must-include first, then available order.

    ``preferred`` stands in for the topology allocator, ``shared`` for the shared policy.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str], list[str], int]] = []
        self.counts: list[dict[str, int]] = []  # allocated_counts of each shared call

    def preferred(self, available: Sequence[str], must: Sequence[str], size: int) -> list[str]:
        self.calls.append(("whole", list(available), list(must), size))
        return list(dict.fromkeys([*must, *available]))[:size]

    def shared(
        self,
        request: SharedRequest,
        must: Sequence[str],
        size: int,
        policy: str,
        allocated_counts: Mapping[str, int] | None = None,
    ) -> list[str]:
        available = [i for run in request.runs for i in run.ids]
        self.calls.append((policy, available, list(must), size))
        self.counts.append(dict(allocated_counts or {}))
        return list(dict.fromkeys([*must, *available]))[:size]


def fake_context(snapshot: Snapshot, allocator: FakeAllocator | None = None) -> NodeManagers:
    """Resource managers with the real Allocate and a FakeAllocator for preferred sets."""
    allocator = allocator or FakeAllocator()
    return NodeManagers(default_config(), snapshot, whole=allocator, shared=allocator.shared)


def fake_manager(
    resource: Resource, snapshot: Snapshot, allocator: FakeAllocator | None = None
) -> GpuResourceManager:
    """The manager of ``resource`` from :func:`fake_context`."""
    return fake_context(snapshot, allocator).manager(resource)
