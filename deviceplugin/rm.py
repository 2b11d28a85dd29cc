"""Resource managers: what the device plugin decides for one resource, behind one interface.

In the spirit of NVIDIA's ``internal/rm``: per resource, a :class:`ResourceManager` validates
the kubelet's requests (counts first, then unknown and Unhealthy IDs, with NVIDIA's error
texts), chooses preferred allocations (the whole-GPU topology allocator, or the shared / MIG
policy) and builds Allocate responses (:mod:`deviceplugin.allocate`: environment, mounts,
device nodes, CDI names). The gRPC server only adapts it: protobuf in, these calls, protobuf
out, :class:`~deviceplugin.allocate.AllocationError` -> INVALID_ARGUMENT.

A manager is built from (Resource, Config, Snapshot) and serves exactly one version of its
resource: health changes and reloads build a new one (:class:`NodeManagers` keeps what the
versions share, such as the topology allocator and its warm-up). The request types are
structural (:class:`AllocateRequest`, :class:`PreferredRequest`): the server passes the
protobuf messages themselves, so their ID lists are counted with ``len()`` before any ID
becomes a Python object, and a refused request never costs one per ID.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Sized
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from functools import cached_property
from itertools import chain, filterfalse
from typing import Protocol

from deviceplugin.allocate import AllocationError, ContainerAllocation, build_allocation
from deviceplugin.allocator import Allocator, impossible_request
from deviceplugin.shared_policy import (
    FreeRun,
    SharedRequest,
    device_order,
    preferred_shared_runs,
)
from gpus.config import Config
from gpus.model import Snapshot
from gpus.records import record
from gpus.resources import Device, Resource

log = logging.getLogger(__name__)

# The kubelet sends one container per Allocate; the cap only bounds the work one call can ask.
MAX_CONTAINER_REQUESTS = 64
# Device IDs are UUIDs (40 characters) with at most a "::<replica>" suffix; a longer one is
# garbage, and echoing it in an error would bloat the status the kubelet receives.
MAX_DEVICE_ID_BYTES = 256


class AllocateRequest(Protocol):
    """One container of an Allocate call (``v1beta1.ContainerAllocateRequest``)."""

    @property
    def devices_ids(self) -> Sequence[str]: ...


class PreferredRequest(Protocol):
    """One container of a GetPreferredAllocation call
    (``v1beta1.ContainerPreferredAllocationRequest``)."""

    @property
    def available_deviceIDs(self) -> Sequence[str]: ...

    @property
    def must_include_deviceIDs(self) -> Sequence[str]: ...

    @property
    def allocation_size(self) -> int: ...


class ResourceManager(Protocol):
    """Everything the gRPC server asks about the one resource version it serves."""

    @property
    def resource(self) -> Resource:
        """The resource served (its name, and the device list ListAndWatch reports)."""
        ...

    def allocate(self, requests: Sequence[AllocateRequest]) -> list[ContainerAllocation]:
        """One allocation per container; raises AllocationError (the kubelet's message)."""
        ...

    def preferred(self, requests: Sequence[PreferredRequest]) -> list[list[str]]:
        """One preferred set per container ([] when impossible); raises AllocationError for
        a request no kubelet sends (too many parts, IDs too long)."""
        ...


class ResourceManagers(Protocol):
    """Builds the manager of each resource version; what the plugin manager is handed."""

    def manager(self, resource: Resource) -> ResourceManager:
        """The manager of ``resource``."""
        ...

    @property
    def warm(self) -> Callable[[], None] | None:
        """Builds caches ahead of the first request (run once the node is registered), or
        None when nothing is worth warming."""
        ...


class WholeGpuAllocator(Protocol):
    """Preferred whole GPUs: :meth:`deviceplugin.allocator.Allocator.preferred`."""

    def preferred(
        self, available: Sequence[str], must_include: Sequence[str], size: int
    ) -> list[str]: ...


# (the free devices GPU by GPU, must include, size, policy, devices in use per physical GPU
# UUID) -> chosen IDs: shared_policy.preferred_shared_runs.
SharedPolicy = Callable[[SharedRequest, Sequence[str], int, str, Mapping[str, int]], list[str]]


@record(shared_init=True)
class NodeManagers:
    """The resource managers of one (config, snapshot): built once per start or reload, while
    health changes only build new managers from it."""

    config: Config
    snapshot: Snapshot
    whole: WholeGpuAllocator
    shared: SharedPolicy = preferred_shared_runs
    warm: Callable[[], None] | None = None

    @classmethod
    def create(cls, config: Config, snapshot: Snapshot) -> NodeManagers:
        """The production managers: NVIDIA-compatible allocation and the topology allocator.

        Small nodes get every allocator table in the constructor (~0.1 s); on bigger ones one
        size takes 0.2-1.9 s on its first request (hgx-16), so they are built in the
        background once the node is registered instead (``warm``).
        """
        whole = Allocator.from_snapshot(snapshot)
        return cls(config, snapshot, whole, warm=whole.warm if whole.lazy else None)

    def manager(self, resource: Resource) -> GpuResourceManager:
        """The manager of one version of ``resource``."""
        return GpuResourceManager(resource, self.config, self.whole, self.shared)


def request_problem(resource: Resource, containers: Sized, counts: Iterable[int]) -> str | None:
    """Why a request has too many parts to be a kubelet's, or None; checked before any work.

    ``counts`` are the ID counts of each container request (lazily: only read when the number
    of containers is within bounds), taken with ``len()`` of the protobuf repeated fields,
    which builds nothing: a refused request never costs a Python object per ID (1,000,000 of
    them took the plugin from 67 to 175 MiB). Only a request within the counts has its IDs
    read, once, and then checked with :func:`long_id_problem` (GetPreferredAllocation checks
    only the IDs it does not know, see :meth:`PreferredQuery.id_problem`).
    """
    if len(containers) > MAX_CONTAINER_REQUESTS:
        return (f"{len(containers)} container requests; at most {MAX_CONTAINER_REQUESTS} "
                "are accepted in one call")
    # Replicas share a physical device, and a stale list may name old IDs: allow the total
    # twice over, which no kubelet request reaches (it sends one container per call).
    limit = 2 * len(resource.devices)
    total = 0
    for count in counts:
        if count > limit:
            return (f"{count} device IDs in one container request; {resource.name} has "
                    f"{len(resource.devices)} devices")
        total += count
    if total > max(limit, MAX_CONTAINER_REQUESTS):
        return (f"{total} device IDs in one call; {resource.name} has "
                f"{len(resource.devices)} devices")
    return None


def is_whole_gpu_resource(resource: Resource) -> bool:
    """True when the resource's devices are unshared, non-MIG GPUs (topology allocator)."""
    return not resource.shared and all(d.mig is None for d in resource.devices)


def in_use_counts(resource: Resource, available: set[str]) -> dict[str, int]:
    """Devices of ``resource`` in use per physical GPU UUID: Healthy ones not ``available``.

    The kubelet offers only free, Healthy devices, so a Healthy device it leaves out is
    allocated. Unhealthy devices are never offered whether or not a pod holds one, so they do
    not count: counting them would make ``packed`` prefer a GPU because it is failing. Only
    this resource's devices count (the kubelet says nothing about other resources).
    :meth:`RequestIndex.in_use` is the same, at C speed; this is its reference.
    """
    counts: dict[str, int] = {}
    for device in resource.devices:
        uuid = device.gpu.uuid
        busy = device.healthy and device.id not in available
        counts[uuid] = counts.get(uuid, 0) + int(busy)
    return counts


@record
class GpuRun:
    """One physical GPU's devices: positions ``start:stop`` of :attr:`RequestIndex.ordered_ids`."""

    uuid: str
    index: int  # the GPU's NVML index
    start: int
    stop: int
    ids: frozenset[str]  # the run's device IDs
    unhealthy: frozenset[str]  # those of them that are Unhealthy

    def in_use(self, missing: AbstractSet[str]) -> int:
        """Devices in use given the run's devices a request left out (:func:`in_use_counts`)."""
        return len(missing - self.unhealthy) if self.unhealthy else len(missing)


@record
class RequestIndex:
    """One resource version's devices as GetPreferredAllocation needs them, built once.

    Resources are immutable and replaced whole on every change (health included), so an index
    is valid for exactly the resource object it was built from. With it, a request naming all
    8,192 replicas of a time-sliced node costs one dict probe per ID (C speed) and the picks,
    instead of a sort with a Python key and a Python loop per device.
    """

    known: Mapping[str, Device]
    ordered_ids: tuple[str, ...]  # the allocator's pick order: each GPU's devices contiguous
    id_map: dict[str, None]  # the IDs as keys (all values None), for :meth:`left_out` to copy
    runs: tuple[GpuRun, ...]
    whole_gpus: bool

    @classmethod
    def of(cls, resource: Resource, known: Mapping[str, Device] | None = None) -> RequestIndex:
        """Index ``resource`` (linear in its devices; sorting dominates). ``known`` is its
        devices by ID when the caller has that map already."""
        ordered = tuple(sorted(resource.devices, key=device_order))
        ordered_ids = tuple(d.id for d in ordered)
        runs: list[GpuRun] = []
        start = 0
        for position in range(1, len(ordered) + 1):
            if position == len(ordered) or ordered[position].gpu.uuid != ordered[start].gpu.uuid:
                gpu = ordered[start].gpu
                sick = frozenset(d.id for d in ordered[start:position] if not d.healthy)
                runs.append(GpuRun(gpu.uuid, gpu.index, start, position,
                                   frozenset(ordered_ids[start:position]), sick))
                start = position
        return cls(
            known={d.id: d for d in resource.devices} if known is None else known,
            ordered_ids=ordered_ids,
            id_map=dict.fromkeys(ordered_ids),
            runs=tuple(runs),
            whole_gpus=is_whole_gpu_resource(resource),
        )

    def left_out(self, offered: Iterable[str]) -> AbstractSet[str] | None:
        """The index's device IDs that ``offered`` does not name, or None when it names an ID
        the index does not have or names one twice.

        One pass over the offered IDs at C speed: each is popped from a copy of
        :attr:`id_map` (a dict copies as one block, in half the memory of a set's table; its
        values are all None, so the copy touches no device object), so a repeat or a stranger
        is a KeyError and no set of the offered IDs is built.
        """
        left = self.id_map.copy()
        try:
            deque(map(left.pop, offered), maxlen=0)
        except KeyError:
            return None
        return left.keys()

    def missing(self, left_out: AbstractSet[str]) -> list[AbstractSet[str]]:
        """``left_out`` (IDs of the index's devices a request did not offer) split per run."""
        # Compacted first: what is left of the 8,192-ID map keeps the map's table size (a
        # set difference keeps the set's), and each intersection would walk all of its slots.
        few = set(left_out)
        return [run.ids & few for run in self.runs]

    def shared_request(self, available: AbstractSet[str],
                       missing: Sequence[AbstractSet[str]]) -> SharedRequest:
        """The shared policy's view of ``available`` (known IDs; ``missing`` from
        :meth:`missing` of them): per GPU with a free device, its free IDs in pick order."""
        ordered_ids = self.ordered_ids
        runs = [
            FreeRun(run.uuid, run.index,
                    filterfalse(left_out.__contains__, ordered_ids[run.start:run.stop]))
            for run, left_out in zip(self.runs, missing, strict=True)
            if run.stop - run.start > len(left_out)
        ]
        known = self.known
        return SharedRequest(runs, len(available), available, lambda i: known[i].gpu.uuid)

    def in_use(self, missing: Sequence[AbstractSet[str]]) -> dict[str, int]:
        """:func:`in_use_counts` from :meth:`missing` of the available IDs."""
        return {run.uuid: run.in_use(left_out)
                for run, left_out in zip(self.runs, missing, strict=True)}


@record
class KnownOffer(AbstractSet[str]):
    """The IDs a request offered when they are exactly the index's devices less ``left_out``:
    the kubelet's usual request, answered without a set of thousands of IDs."""

    known: Mapping[str, Device]
    left_out: AbstractSet[str]

    def __contains__(self, device_id: object) -> bool:
        return device_id in self.known and device_id not in self.left_out

    def __len__(self) -> int:
        return len(self.known) - len(self.left_out)

    def __iter__(self) -> Iterator[str]:
        return filterfalse(self.left_out.__contains__, self.known)


@record
class Scan:
    """What one request offers of one resource version (:meth:`PreferredQuery.scan`)."""

    index: RequestIndex
    offered: AbstractSet[str]  # the offered IDs the resource has, distinct
    unknown: AbstractSet[str]  # the offered IDs it does not have (stale or bogus)
    missing: list[AbstractSet[str]]  # per run of the index: its devices not offered


@dataclass
class PreferredQuery:
    """One GetPreferredAllocation container request, its IDs read out of the message once."""

    requested: Sequence[str]  # the available IDs as sent (the message's repeated field)
    must_include: list[str]  # distinct
    size: int
    _scan: Scan | None = None
    _available: list[str] | None = None

    @classmethod
    def of(cls, available: Sequence[str], must_include: Iterable[str], size: int
           ) -> PreferredQuery:
        """The request's fields; call it only on counted lists."""
        return cls(available, list(dict.fromkeys(must_include)), size)

    @property
    def available(self) -> list[str]:
        """The available IDs, distinct, in request order: only whole GPUs (few) need it."""
        if self._available is None:
            self._available = list(dict.fromkeys(self.requested))
        return self._available

    def scan(self, index: RequestIndex) -> Scan:
        """The request against ``index``, computed once per index.

        One pass over the message's IDs removes them from a copy of the index's ID map
        (:meth:`RequestIndex.left_out`), leaving the few devices not offered, and the offer
        needs no set of its own: 8,192 replicas cost one dict probe each. Only a request that
        names an unknown or repeated ID (a stale list) builds a set of what was sent, its IDs
        read out of the message a second time (it was counted first).
        """
        if self._scan is not None and self._scan.index is index:
            return self._scan
        available: AbstractSet[str]
        unknown: AbstractSet[str] = frozenset()
        left_out = index.left_out(self.requested)
        if left_out is not None:
            available = KnownOffer(index.known, left_out)
        else:
            available = set(self.requested)
            left_out = index.id_map.keys() - available
            unknown = available.difference(index.id_map)
            if unknown:
                available = available - unknown
        self._scan = Scan(index, available, unknown, index.missing(left_out))
        return self._scan

    def id_problem(self, index: RequestIndex) -> str | None:
        """A device ID too long to be one (only unknown IDs can be), or None."""
        return long_id_problem(chain(self.scan(index).unknown, self.must_include))


def long_id_problem(ids: Iterable[str]) -> str | None:
    """Why one of ``ids`` cannot be a device ID (its length), or None."""
    longest = max(map(len, ids), default=0)
    if longest > MAX_DEVICE_ID_BYTES:
        return f"a device ID of {longest} characters; IDs are at most {MAX_DEVICE_ID_BYTES}"
    return None



class GpuResourceManager:
    """The :class:`ResourceManager` of one version of a GPU, MIG or shared resource.

    Immutable but for caches built on first use (the ID index of Allocate, the request index
    of GetPreferredAllocation): a manager lives as long as its resource version, so no call
    rebuilds them. Safe from many threads: a race only builds the same cache twice.
    """

    def __init__(
        self,
        resource: Resource,
        config: Config,
        whole: WholeGpuAllocator,
        shared: SharedPolicy = preferred_shared_runs,
    ) -> None:
        self._resource = resource
        self.config = config
        self._whole = whole
        self._shared = shared

    @property
    def resource(self) -> Resource:
        """The resource version served."""
        return self._resource

    @cached_property
    def by_id(self) -> Mapping[str, Device]:
        """The resource's devices by kubelet device ID."""
        return {device.id: device for device in self._resource.devices}

    @cached_property
    def index(self) -> RequestIndex:
        """The resource's devices as GetPreferredAllocation needs them."""
        return RequestIndex.of(self._resource, self.by_id)

    def allocate(self, requests: Sequence[AllocateRequest]) -> list[ContainerAllocation]:
        """Validate the request, then build each container's allocation (see
        :func:`~deviceplugin.allocate.build_allocation` for the errors)."""
        resource = self._resource
        containers: list[tuple[str, ...]] = []
        problem = request_problem(resource, requests, (len(r.devices_ids) for r in requests))
        if problem is None:
            # Counted, so reading is bounded. Each ID list read out of the message once: every
            # pass over a repeated field builds new str objects, and Allocate is on the pod
            # start path.
            containers = [tuple(r.devices_ids) for r in requests]
            problem = next(filter(None, map(long_id_problem, containers)), None)
        if problem is not None:
            raise AllocationError(f'invalid allocation request for "{resource.name}": '
                                  f"invalid request: {problem}")
        config, by_id = self.config, self.by_id
        return [build_allocation(resource, ids, config, index=by_id) for ids in containers]

    def preferred(self, requests: Sequence[PreferredRequest]) -> list[list[str]]:
        """Validate the request's bounds, then choose each container's devices."""
        counts = (len(r.available_deviceIDs) + len(r.must_include_deviceIDs) for r in requests)
        problem = request_problem(self._resource, requests, counts)
        if problem is not None:
            raise AllocationError(problem)
        index = self.index
        # Counted, so reading the IDs is bounded; each list is read out of the message once
        # (every pass over a repeated field makes new str objects).
        queries = [
            PreferredQuery.of(r.available_deviceIDs, r.must_include_deviceIDs, r.allocation_size)
            for r in requests
        ]
        problem = next(filter(None, (q.id_problem(index) for q in queries)), None)
        if problem is not None:
            raise AllocationError(problem)
        return [self.preferred_for(query) for query in queries]

    def preferred_for(self, query: PreferredQuery) -> list[str]:
        """The preferred allocation for one container, or [] when the request is impossible.

        An impossible request (NVIDIA answers it with an empty list too) is logged as a
        warning naming the resource and why: the kubelet then falls back to its own choice.
        """
        resource = self._resource
        must, size = query.must_include, query.size
        # A stale id (the map changed since the kubelet's last list) is simply not available.
        scan = query.scan(self.index)
        offered = scan.offered
        problem = impossible_request(len(offered), must, size, offered)
        if problem is not None:
            log.warning("GetPreferredAllocation for %s: no preferred set: %s",
                        resource.name, problem)
            return []
        try:
            chosen = self._choose(query, scan)
        except Exception:  # the kubelet falls back to its own choice; never fail the pod
            log.exception("preferred allocation failed for %s", resource.name)
            return []
        # Never hand back fewer, padding or unknown devices, whatever the allocator did.
        if len(chosen) != size or len(set(chosen)) != size or not all(map(offered.__contains__,
                                                                          chosen)):
            log.error("allocator returned an invalid set for %s: %s", resource.name, chosen)
            return []
        return chosen

    def _choose(self, query: PreferredQuery, scan: Scan) -> list[str]:
        """The allocator's answer for a possible request (known IDs only)."""
        must, size, index = query.must_include, query.size, scan.index
        if index.whole_gpus:
            offered = query.available
            if scan.unknown:
                offered = [i for i in offered if i not in scan.unknown]
            return list(self._whole.preferred(offered, must, size))
        policy = self.config.flags.plugin.shared_devices_allocation_policy
        request = index.shared_request(scan.offered, scan.missing)
        return list(self._shared(request, must, size, policy, index.in_use(scan.missing)))
