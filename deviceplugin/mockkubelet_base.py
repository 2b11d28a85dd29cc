"""What the mock kubelet's parts share: its constants, its plain data, its error, and listening.

Part of :mod:`deviceplugin.mockkubelet` (import the names from there); split out so that the
device-manager side (:mod:`deviceplugin.mockkubelet_devicemanager`) and the PodResources side
(:mod:`deviceplugin.mockkubelet_podresources`) can both use them without importing each other.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import grpc

from gpus.records import record
from protos.deviceplugin.v1beta1 import api_pb2

KUBELET_SOCKET = "kubelet.sock"
POD_RESOURCES_SOCKET = "/var/lib/kubelet/pod-resources/kubelet.sock"  # the kubelet's path
SUPPORTED_VERSIONS = ("v1beta1",)
DIAL_TIMEOUT_S = 10.0  # what the kubelet allows a plugin to answer when it dials back
RPC_TIMEOUT_S = 10.0


class MockKubeletError(RuntimeError):
    """The mock kubelet cannot listen; the message says where and why."""


@record
class DeviceInfo:
    """One device as the kubelet saw it in ListAndWatch."""

    id: str
    health: str
    numa_nodes: tuple[int, ...] = ()


@record
class AllocationOutcome:
    """What an allocation through the kubelet's path returned."""

    resource: str
    preferred: tuple[str, ...]  # GetPreferredAllocation's answer (may be empty)
    allocated: tuple[str, ...]  # the IDs sent to Allocate
    response: api_pb2.ContainerAllocateResponse


@record
class PodAllocation:
    """Devices of one resource allocated to one container of one pod (what List reports)."""

    namespace: str
    pod: str
    container: str
    resource: str
    device_ids: tuple[str, ...]


@record
class PodResourcesFault:
    """How the PodResources server misbehaves (tests of its clients): every call first waits
    ``delay_s`` (cut short when the mock stops), then fails with ``error`` if set."""

    delay_s: float = 0.0
    error: grpc.StatusCode | None = None


def listen(
    path: str, add_servicer: Callable[[grpc.Server], None], thread_prefix: str
) -> tuple[grpc.Server, ThreadPoolExecutor]:
    """A started gRPC server on the Unix socket ``path`` (a stale socket there is replaced).

    MockKubeletError when the path cannot be replaced or bound; nothing is left running then.
    """
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    except OSError as err:
        raise MockKubeletError(f"cannot replace {path}: {err.strerror}") from err
    executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix=thread_prefix)
    server = grpc.server(executor)
    add_servicer(server)
    try:
        server.add_insecure_port(f"unix:{path}")
    except RuntimeError as err:  # gRPC's bind failure carries no errno
        server.stop(None)
        executor.shutdown(wait=False)
        raise MockKubeletError(f"cannot listen on {path}: {err}") from err
    server.start()
    return server, executor
