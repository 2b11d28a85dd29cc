"""The mock kubelet's PodResources v1 server (``List``, ``GetAllocatableResources``, ``Get``).

Part of :mod:`deviceplugin.mockkubelet` (import the names from there). The answers come from
a :class:`PodBook`, the mock's record of what it allocated to which pod, and from the device
lists the plugins last sent in ListAndWatch.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import grpc

from deviceplugin.mockkubelet_base import DeviceInfo, PodAllocation, PodResourcesFault
from protos.podresources.v1 import api_pb2 as pr_pb2
from protos.podresources.v1 import api_pb2_grpc as pr_pb2_grpc

# The latest ListAndWatch list of every connected resource.
DeviceLists = Callable[[], dict[str, list[DeviceInfo]]]


class PodBook:
    """Allocations made on behalf of pods (the kubelet's checkpoint) and the injected fault."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._allocations: list[PodAllocation] = []
        self._fault = PodResourcesFault()
        self._calls = 0
        # Set while the mock is stopped: cuts a faulty PodResources delay short.
        self.stopping = threading.Event()

    def record(self, allocation: PodAllocation) -> None:
        """Remember an allocation until its pod is freed."""
        with self._cond:
            self._allocations.append(allocation)

    def allocations(self) -> list[PodAllocation]:
        """Every recorded allocation, oldest first."""
        with self._cond:
            return list(self._allocations)

    def free_pod(self, namespace: str, pod: str) -> bool:
        """Forget a pod's allocations (the pod ended); False if it held none."""
        with self._cond:
            kept = [a for a in self._allocations if (a.namespace, a.pod) != (namespace, pod)]
            freed = len(kept) != len(self._allocations)
            self._allocations = kept
        return freed

    def set_fault(self, fault: PodResourcesFault) -> None:
        """Make every later PodResources call slow or failing (``PodResourcesFault()`` heals)."""
        with self._cond:
            self._fault = fault

    def call(self) -> PodResourcesFault:
        """Count a PodResources call as received; the fault it is to suffer."""
        with self._cond:
            self._calls += 1
            self._cond.notify_all()
            return self._fault

    def wait_for_calls(self, count: int, timeout: float) -> bool:
        """Wait until ``count`` PodResources calls have been received in all."""
        with self._cond:
            return self._cond.wait_for(lambda: self._calls >= count, timeout=timeout)


def _container_devices(
    resource: str, device_ids: Sequence[str], known: dict[str, DeviceInfo]
) -> list[pr_pb2.ContainerDevices]:
    """One entry per device with its NUMA nodes, as the kubelet reports them."""
    entries = []
    for device_id in device_ids:
        info = known.get(device_id)
        topology = None
        if info is not None and info.numa_nodes:
            topology = pr_pb2.TopologyInfo(nodes=[pr_pb2.NUMANode(ID=n) for n in info.numa_nodes])
        entries.append(pr_pb2.ContainerDevices(
            resource_name=resource, device_ids=[device_id], topology=topology))
    return entries


def pod_resources(
    allocations: Sequence[PodAllocation], devices: dict[str, list[DeviceInfo]]
) -> list[pr_pb2.PodResources]:
    """Allocations as the kubelet's List reports them: pods and containers in first-seen order."""
    known = {d.id: d for listed in devices.values() for d in listed}
    pods: dict[tuple[str, str], dict[str, list[pr_pb2.ContainerDevices]]] = {}
    for a in allocations:
        containers = pods.setdefault((a.namespace, a.pod), {})
        containers.setdefault(a.container, []).extend(
            _container_devices(a.resource, a.device_ids, known))
    return [
        pr_pb2.PodResources(
            name=name,
            namespace=namespace,
            containers=[
                pr_pb2.ContainerResources(name=c, devices=d) for c, d in containers.items()
            ],
        )
        for (namespace, name), containers in pods.items()
    ]


class PodResourcesServicer(pr_pb2_grpc.PodResourcesListerServicer):
    """The kubelet's PodResources v1 server, answering from the mock's own bookkeeping."""

    def __init__(self, book: PodBook, devices: DeviceLists) -> None:
        self._book = book
        self._devices = devices

    def _misbehave(self, context: grpc.ServicerContext) -> None:
        fault = self._book.call()
        if fault.delay_s > 0:
            self._book.stopping.wait(fault.delay_s)
        if fault.error is not None:
            context.abort(fault.error, f"injected fault: {fault.error.name}")

    def List(
        self, request: pr_pb2.ListPodResourcesRequest, context: grpc.ServicerContext
    ) -> pr_pb2.ListPodResourcesResponse:
        self._misbehave(context)
        pods = pod_resources(self._book.allocations(), self._devices())
        return pr_pb2.ListPodResourcesResponse(pod_resources=pods)

    def GetAllocatableResources(
        self, request: pr_pb2.AllocatableResourcesRequest, context: grpc.ServicerContext
    ) -> pr_pb2.AllocatableResourcesResponse:
        self._misbehave(context)
        devices = self._devices()
        known = {d.id: d for listed in devices.values() for d in listed}
        entries = [
            entry
            for resource, listed in devices.items()
            for entry in _container_devices(resource, [d.id for d in listed], known)
        ]
        return pr_pb2.AllocatableResourcesResponse(devices=entries)

    def Get(
        self, request: pr_pb2.GetPodResourcesRequest, context: grpc.ServicerContext
    ) -> pr_pb2.GetPodResourcesResponse:
        self._misbehave(context)
        mine = [
            a for a in self._book.allocations()
            if (a.namespace, a.pod) == (request.pod_namespace, request.pod_name)
        ]
        if not mine:
            context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"pod {request.pod_name} in namespace {request.pod_namespace} not found",
            )
        (pod,) = pod_resources(mine, self._devices())
        return pr_pb2.GetPodResourcesResponse(pod_resources=pod)
