"""One kubelet DevicePlugin gRPC server for one resource, on its own Unix socket.

The server holds the resource it serves and a :class:`ServingContext` (config, snapshot and the
allocation functions); :meth:`PluginServer.update` swaps both atomically and wakes every
ListAndWatch stream, so the kubelet sees a new device list at once. Nothing else is stateful:
Allocate and GetPreferredAllocation are pure functions of the current resource and context.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import stat
import tempfile
import threading
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import chain, compress
from typing import Any, Protocol, TypeVar

import grpc

from gpus.config import RESOURCE_PREFIX, Config
from gpus.model import Snapshot
from gpus.resources import HEALTHY, UNHEALTHY, Device, Resource
from protos.deviceplugin.v1beta1 import api_pb2, api_pb2_grpc

log = logging.getLogger(__name__)

# sockaddr_un.sun_path is 108 bytes including the terminating NUL.
MAX_UNIX_PATH = 107
# ListAndWatch streams each hold a worker for their whole life (the kubelet keeps one open),
# so the pool must leave room for unary calls beside a few streams.
MAX_WORKERS = 16
# A stream re-checks whether its client is still there this often even if no callback fires.
STREAM_RECHECK_S = 1.0
STOP_GRACE_S = 0.5
# Nodes with more GPUs get their allocator tables built in the background after registration.
EAGER_ALLOCATOR_GPUS = 12
# Only the kubelet (root) talks to our sockets; nobody else on the node may even connect.
SOCKET_MODE = 0o600
# What a kubelet can legitimately send us, derived so a request far beyond it is refused by
# gRPC before any of it is parsed: at most MAX_NODE_DEVICES devices per resource (16 GPUs, as
# in DGX-2/HGX-2, times the config's 1,024 replicas; or 16 x 7 MIG devices x 146 replicas),
# IDs of at most MAX_KUBELET_ID_BYTES ("GPU-"/"MIG-", a 36-character UUID, "::1023") plus 2
# bytes of protobuf framing, each listed at most twice (GetPreferredAllocation's available
# and must-include lists): 1.5 MiB; 2 MiB leaves a third for framing and margin (the usual
# request, available IDs only, fits ~43,000 devices). It was grpc-go's 4 MiB default, which
# let 1,000,000 two-character IDs in (RSS 67 -> 175 MiB).
MAX_NODE_DEVICES = 16 * 1024
MAX_KUBELET_ID_BYTES = 46
MAX_MESSAGE_BYTES = 2 * 1024 * 1024
# What we send is bounded by the kubelet's own receive limit, grpc-go's 4 MiB default.
MAX_SEND_BYTES = 4 * 1024 * 1024
GRPC_OPTIONS = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_SEND_BYTES),
)
# The kubelet sends one container per Allocate; the cap only bounds the work one call can ask.
MAX_CONTAINER_REQUESTS = 64
# Device IDs are UUIDs (40 characters) with at most a "::<replica>" suffix; a longer one is
# garbage, and echoing it in an error would bloat the status the kubelet receives.
MAX_DEVICE_ID_BYTES = 256


class ServeError(RuntimeError):
    """The server cannot listen on its socket; the message says where and why."""


class AllocationLike(Protocol):
    """What ``deviceplugin.allocate.build_allocation`` returns (a ContainerAllocation)."""

    @property
    def envs(self) -> Mapping[str, str]: ...

    @property
    def mounts(self) -> Sequence[Any]: ...

    @property
    def devices(self) -> Sequence[Any]: ...

    @property
    def annotations(self) -> Mapping[str, str]: ...

    @property
    def cdi_devices(self) -> Sequence[str]: ...


AllocateFn = Callable[[Resource, Sequence[str], Config], AllocationLike]
PreferredWholeFn = Callable[[Sequence[str], Sequence[str], int], list[str]]
# (free devices, distinct and in allocator.device_order, must include, size, policy, devices in
# use per physical GPU UUID)
PreferredSharedFn = Callable[
    [Sequence[Device], Sequence[str], int, str, Mapping[str, int]], list[str]
]


@dataclass(frozen=True)
class ServingContext:
    """Everything besides the resource that the RPC handlers read.

    The functions are parameters so the gRPC shell can be tested without the real allocator;
    :meth:`create` wires the real ones.
    """

    config: Config
    snapshot: Snapshot
    allocate: AllocateFn
    preferred_whole: PreferredWholeFn
    preferred_shared: PreferredSharedFn
    allocation_errors: tuple[type[Exception], ...] = ()
    # Builds caches ahead of the first request; the manager runs it on a daemon thread once
    # the node is registered. None: nothing worth warming.
    warm: Callable[[], None] | None = None

    @classmethod
    def create(cls, config: Config, snapshot: Snapshot) -> ServingContext:
        """The production context: NVIDIA-compatible allocation and the topology allocator."""
        from deviceplugin import allocate, allocator

        whole = allocator.Allocator.from_snapshot(snapshot)
        # Up to 12 GPUs the allocator builds every table in its constructor (~0.1 s); beyond,
        # one size takes 0.2-1.9 s on its first request (hgx-16): build them all in the
        # background instead.
        return cls(
            config=config,
            snapshot=snapshot,
            allocate=allocate.IndexedAllocate(),
            preferred_whole=whole.preferred,
            preferred_shared=allocator.preferred_shared_ordered,
            allocation_errors=(allocate.AllocationError,),
            warm=whole.warm if len(snapshot.gpus) > EAGER_ALLOCATOR_GPUS else None,
        )


def socket_name(resource_name: str) -> str:
    """NVIDIA's socket base name: ``nvidia.com/gpu`` -> ``nvidia-gpu.sock``."""
    short = resource_name.removeprefix(RESOURCE_PREFIX + "/").replace("/", "-")
    return f"nvidia-{short}.sock"


def check_socket_path(path: str) -> None:
    """Raise ServeError when ``path`` cannot be a Unix socket we bind (length, directory)."""
    size = len(os.fsencode(path))
    if size > MAX_UNIX_PATH:
        raise ServeError(
            f"socket path {path!r} is {size} bytes; AF_UNIX allows at most {MAX_UNIX_PATH}: "
            "use a shorter kubelet socket directory"
        )
    check_socket_dir(os.path.dirname(path) or ".")


def socket_dir_unusable(directory: str) -> str | None:
    """Why plugin sockets cannot be created in ``directory`` (missing, not a directory, not
    writable), or None."""
    if not os.path.exists(directory):
        return f"plugin socket directory {directory!r} does not exist"
    if not os.path.isdir(directory):
        return f"plugin socket directory {directory!r} is not a directory"
    if not os.access(directory, os.W_OK | os.X_OK):
        return f"plugin socket directory {directory!r} is not writable"
    return None


def check_socket_dir(directory: str) -> None:
    """Raise ServeError when sockets cannot be created in ``directory``; warn (once per
    directory) when others than its owner may write there."""
    problem = socket_dir_unusable(directory)
    if problem is not None:
        raise ServeError(problem)
    warn_if_shared(os.path.realpath(directory))


@functools.cache
def warn_if_shared(directory: str) -> None:
    """Log a WARNING, once per directory per process, when group or others may write in it.

    Whoever can write in the directory can delete our socket and put their own in its place,
    which the kubelet would then dial as us. The kubelet's directory is root-owned 0755.
    """
    try:
        mode = stat.S_IMODE(os.stat(directory).st_mode)
    except OSError:
        return
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        log.warning(
            "plugin socket directory %s is writable by %s (mode %04o): another user could "
            "replace our sockets; the kubelet's device-plugins directory is normally 0755 root",
            directory,
            "others" if mode & stat.S_IWOTH else "its group",
            mode,
        )


def bind_privately(server: grpc.Server, path: str) -> None:
    """Make ``server`` listen on the Unix socket ``path``, never reachable with a looser mode
    than SOCKET_MODE.

    gRPC binds and listens inside ``add_insecure_port``, so a chmod afterwards leaves a window
    in which, under a permissive umask, anyone could connect. The umask is process-wide (other
    threads create files too), so instead the socket is created in a fresh 0700 directory
    beside ``path`` (same filesystem; only we can reach anything inside), chmod-ed there and
    renamed into place: the rename is atomic, so ``path`` only ever holds the 0600 socket.
    Raises OSError or RuntimeError (gRPC's bind failure); nothing is left behind then.
    """
    directory = os.path.dirname(path) or "."
    # ".b" + 8 random characters + "/s" keeps the temporary path shorter than any
    # "nvidia-<name>.sock" target, so it never exceeds AF_UNIX's limit when the target fits.
    private = tempfile.mkdtemp(prefix=".b", dir=directory)
    try:
        os.chmod(private, 0o700)  # mkdtemp asks for 0700; a default ACL must not widen it
        temporary = os.path.join(private, "s")
        server.add_insecure_port(f"unix:{temporary}")
        os.chmod(temporary, SOCKET_MODE)
        os.rename(temporary, path)
    finally:
        with contextlib.suppress(OSError):
            for leftover in os.listdir(private):  # only after a failure
                os.unlink(os.path.join(private, leftover))
        with contextlib.suppress(OSError):
            os.rmdir(private)


def device_to_proto(device: Device) -> api_pb2.Device:
    """A resource-map device as ListAndWatch reports it."""
    message = api_pb2.Device(ID=device.id, health=HEALTHY if device.healthy else UNHEALTHY)
    node = device.numa_node
    if node is not None and node >= 0:
        message.topology.nodes.append(api_pb2.NUMANode(ID=node))
    return message


def devices_response(resource: Resource) -> api_pb2.ListAndWatchResponse:
    """The full device list of a resource."""
    return api_pb2.ListAndWatchResponse(devices=[device_to_proto(d) for d in resource.devices])


def advertised_state(resource: Resource) -> tuple[tuple[str, bool, int | None], ...]:
    """What the kubelet can see of a resource; a push is due only when this changes."""
    return tuple((d.id, d.healthy, d.numa_node) for d in resource.devices)


def fill_allocation(
    message: api_pb2.ContainerAllocateResponse, allocation: AllocationLike
) -> api_pb2.ContainerAllocateResponse:
    """Write a ContainerAllocation into a ContainerAllocateResponse in place.

    In place rather than building sub-messages and copying them in: Allocate is on the pod
    start path and the copies cost more than the allocation itself.
    """
    # Item by item: the protobuf map's update() goes through the slow generic Mapping path.
    envs = message.envs
    for key, value in allocation.envs.items():
        envs[key] = value
    for m in allocation.mounts:
        message.mounts.add(
            container_path=m.container_path, host_path=m.host_path, read_only=m.read_only
        )
    for d in allocation.devices:
        message.devices.add(
            container_path=d.container_path, host_path=d.host_path, permissions=d.permissions
        )
    annotations = message.annotations
    for key, value in allocation.annotations.items():
        annotations[key] = value
    for name in allocation.cdi_devices:
        message.cdi_devices.add(name=name)
    return message


Message = TypeVar("Message")


def request_problem(
    resource: Resource,
    containers: Sequence[Message],
    ids_of: Callable[[Message], tuple[Sequence[str], ...]],
) -> str | None:
    """Why a request has too many parts to be a kubelet's, or None; checked before any work.

    ``containers`` are the request's container requests and ``ids_of`` gives one's ID lists
    (Allocate's ``devices_ids``; GetPreferredAllocation's ``available_deviceIDs`` and
    ``must_include_deviceIDs``), as protobuf repeated fields. Everything is counted with
    ``len()``, which builds nothing: a refused request never costs a Python object per ID
    (1,000,000 of them took the plugin from 67 to 175 MiB). Only a request within the counts
    has its IDs read, once, and then checked with :func:`long_id_problem` (GetPreferredAllocation
    checks only the IDs it does not know, see :meth:`PreferredQuery.id_problem`).
    """
    if len(containers) > MAX_CONTAINER_REQUESTS:
        return (f"{len(containers)} container requests; at most {MAX_CONTAINER_REQUESTS} "
                "are accepted in one call")
    # Replicas share a physical device, and a stale list may name old IDs: allow the total
    # twice over, which no kubelet request reaches (it sends one container per call).
    limit = 2 * len(resource.devices)
    total = 0
    for group in map(ids_of, containers):
        count = sum(map(len, group))
        if count > limit:
            return (f"{count} device IDs in one container request; {resource.name} has "
                    f"{len(resource.devices)} devices")
        total += count
    if total > max(limit, MAX_CONTAINER_REQUESTS):
        return (f"{total} device IDs in one call; {resource.name} has "
                f"{len(resource.devices)} devices")
    return None


def allocate_ids(
    request: api_pb2.ContainerAllocateRequest,
) -> tuple[Sequence[str], ...]:
    """An Allocate container request's ID list (for :func:`request_problem`)."""
    return (request.devices_ids,)


def preferred_request_ids(
    request: api_pb2.ContainerPreferredAllocationRequest,
) -> tuple[Sequence[str], ...]:
    """A GetPreferredAllocation container request's ID lists (for :func:`request_problem`)."""
    return (request.available_deviceIDs, request.must_include_deviceIDs)


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


@dataclass(frozen=True)
class GpuRun:
    """One physical GPU's devices: positions ``start:stop`` of :attr:`RequestIndex.ordered`."""

    uuid: str
    start: int
    stop: int
    healthy: int  # how many of them are Healthy


@dataclass(frozen=True)
class RequestIndex:
    """One resource version's devices as GetPreferredAllocation needs them, built once.

    Resources are immutable and replaced whole on every change (health included), so an index
    is valid for exactly the resource object it was built from. With it, a request naming all
    8,192 replicas of a time-sliced node costs a few C-speed passes (one set lookup per
    device, then slices) instead of sorting with a Python key and a Python loop per device.
    """

    resource: Resource
    known: Mapping[str, Device]
    # The devices in the allocator's pick order (each GPU's devices contiguous), their IDs,
    # and 1 for each Healthy one, 0 otherwise (summed over the requested ones per GPU).
    ordered: tuple[Device, ...]
    ordered_ids: tuple[str, ...]
    healthy: tuple[int, ...]
    runs: tuple[GpuRun, ...]
    whole_gpus: bool

    @classmethod
    def of(cls, resource: Resource) -> RequestIndex:
        """Index ``resource`` (linear in its devices; sorting dominates)."""
        from deviceplugin.allocator import device_order

        ordered = tuple(sorted(resource.devices, key=device_order))
        healthy = tuple(int(d.healthy) for d in ordered)
        runs: list[GpuRun] = []
        start = 0
        for position in range(1, len(ordered) + 1):
            if position == len(ordered) or ordered[position].gpu.uuid != ordered[start].gpu.uuid:
                uuid = ordered[start].gpu.uuid
                runs.append(GpuRun(uuid, start, position, sum(healthy[start:position])))
                start = position
        return cls(
            resource=resource,
            known={d.id: d for d in resource.devices},
            ordered=ordered,
            ordered_ids=tuple(d.id for d in ordered),
            healthy=healthy,
            runs=tuple(runs),
            whole_gpus=is_whole_gpu_resource(resource),
        )

    def present(self, available: AbstractSet[str]) -> list[bool]:
        """For each device in pick order, whether ``available`` names it."""
        return list(map(available.__contains__, self.ordered_ids))

    def in_pick_order(
        self, available: Iterable[str], present: Sequence[bool] | None = None
    ) -> list[Device]:
        """The devices of ``available`` (known IDs) in the allocator's pick order.

        ``present`` is :meth:`present` of them when the caller has it already.
        """
        flags = self.present(set(available)) if present is None else present
        return list(compress(self.ordered, flags))

    def in_use(
        self, available: Iterable[str], present: Sequence[bool] | None = None
    ) -> dict[str, int]:
        """:func:`in_use_counts` for ``available`` (known IDs); ``present`` as above."""
        flags = self.present(set(available)) if present is None else present
        healthy = self.healthy
        return {
            run.uuid: run.healthy
            - sum(compress(healthy[run.start:run.stop], flags[run.start:run.stop]))
            for run in self.runs
        }


@dataclass
class PreferredQuery:
    """One GetPreferredAllocation container request, its IDs read out of the message once."""

    requested: Sequence[str]  # the available IDs as sent (the message's repeated field)
    available_set: set[str]
    must_include: list[str]  # distinct
    size: int
    # Filled by :meth:`unknown`: the available IDs the resource does not have, and (shared
    # resources) RequestIndex.present of the available IDs, which unknown IDs do not change.
    _unknown: set[str] | None = None
    _present: list[bool] | None = None
    _index: RequestIndex | None = None
    _available: list[str] | None = None

    @classmethod
    def of(cls, available: Sequence[str], must_include: Iterable[str], size: int
           ) -> PreferredQuery:
        """Read the ID lists into sets; call it only on counted lists."""
        return cls(available, set(available), list(dict.fromkeys(must_include)), size)

    @property
    def available(self) -> list[str]:
        """The available IDs, distinct, in request order: only whole GPUs (few) need it."""
        if self._available is None:
            self._available = list(dict.fromkeys(self.requested))
        return self._available

    def unknown(self, index: RequestIndex) -> set[str]:
        """The available IDs ``index``'s resource does not have (stale or bogus)."""
        if self._index is not index:
            self._index, self._unknown, self._present = index, None, None
        if self._unknown is None:
            if index.whole_gpus:
                self._unknown = self.available_set.difference(index.known)
            else:
                # Thousands of replicas: count the known ones while marking them.
                present = self.present(index)
                all_known = present.count(True) == len(self.available_set)
                self._unknown = set() if all_known else self.available_set.difference(index.known)
        return self._unknown

    def present(self, index: RequestIndex) -> list[bool]:
        """``index.present`` of the available IDs, computed once."""
        if self._index is not index:
            self._index, self._unknown, self._present = index, None, None
        if self._present is None:
            self._present = index.present(self.available_set)
        return self._present

    def id_problem(self, index: RequestIndex) -> str | None:
        """A device ID too long to be one (only unknown IDs can be), or None."""
        return long_id_problem(chain(self.unknown(index), self.must_include))


def long_id_problem(ids: Iterable[str]) -> str | None:
    """Why one of ``ids`` cannot be a device ID (its length), or None."""
    longest = max(map(len, ids), default=0)
    if longest > MAX_DEVICE_ID_BYTES:
        return f"a device ID of {longest} characters; IDs are at most {MAX_DEVICE_ID_BYTES}"
    return None


def impossible_request(
    available: Collection[str],
    must_include: Sequence[str],
    size: int,
    offered: AbstractSet[str] | None = None,
) -> str | None:
    """Why no preferred set exists for the request (deduplicated, known IDs), or None.

    ``offered`` is ``set(available)`` when the caller has it already.
    """
    if size <= 0:
        return f"allocation size {size} is not positive"
    if size > len(available):
        return f"allocation size {size} exceeds the {len(available)} available devices"
    if offered is None:
        offered = set(available)
    missing = [i for i in must_include if i not in offered]
    if missing:
        return f"must-include devices not available: {', '.join(missing)}"
    if len(must_include) > size:
        return f"{len(must_include)} must-include devices exceed allocation size {size}"
    return None


def preferred_ids(
    resource: Resource,
    context: ServingContext,
    available: Iterable[str],
    must_include: Iterable[str],
    size: int,
    index: RequestIndex | None = None,
) -> list[str]:
    """The preferred allocation for one container, or [] when the request is impossible.

    An impossible request (NVIDIA answers it with an empty list too) is logged as a warning
    naming the resource and why: the kubelet then falls back to its own choice. ``index`` is
    :meth:`RequestIndex.of` ``resource`` when the caller keeps one.
    """
    query = PreferredQuery.of(list(available), must_include, size)
    return preferred_for(resource, context, query, index)


def preferred_for(
    resource: Resource,
    context: ServingContext,
    query: PreferredQuery,
    index: RequestIndex | None = None,
) -> list[str]:
    """:func:`preferred_ids` for a request already read."""
    if index is None or index.resource is not resource:
        index = RequestIndex.of(resource)
    available_set, must, size = query.available_set, query.must_include, query.size
    # A stale id (the map changed since the kubelet's last list) is simply not available.
    unknown = query.unknown(index)
    if unknown:
        available_set = available_set - unknown
    problem = impossible_request(available_set, must, size, available_set)
    if problem is not None:
        log.warning("GetPreferredAllocation for %s: no preferred set: %s",
                    resource.name, problem)
        return []
    try:
        if index.whole_gpus:
            offered = query.available
            if unknown:
                offered = [i for i in offered if i not in unknown]
            chosen = context.preferred_whole(offered, must, size)
        else:
            policy = context.config.flags.plugin.shared_devices_allocation_policy
            present = query.present(index)
            devices = index.in_pick_order(available_set, present)
            counts = index.in_use(available_set, present)
            chosen = context.preferred_shared(devices, must, size, policy, counts)
    except Exception:  # the kubelet falls back to its own choice; never fail the pod
        log.exception("preferred allocation failed for %s", resource.name)
        return []
    chosen = list(chosen)
    # Never hand back fewer, padding or unknown devices, whatever the allocator did.
    if len(chosen) != size or len(set(chosen)) != size or not set(chosen) <= available_set:
        log.error("allocator returned an invalid set for %s: %s", resource.name, chosen)
        return []
    return chosen


class PluginServer:
    """Serves ``v1beta1.DevicePlugin`` for one resource on ``<dir>/nvidia-<name>.sock``."""

    def __init__(self, resource: Resource, context: ServingContext, socket_dir: str) -> None:
        self.name = resource.name
        self.socket_path = os.path.join(socket_dir, socket_name(resource.name))
        self._cond = threading.Condition()
        # (resource, context) swapped as one tuple: handlers read it with a single attribute
        # load (atomic in CPython), no lock on the Allocate path.
        self._state: tuple[Resource, ServingContext] = (resource, context)
        self._version = 0
        self._streams = 0
        self._server: grpc.Server | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._inode: int | None = None
        self._closed = False
        self._lifecycle = threading.Lock()
        # Incremented on every (re)start so the registration loop knows to register again.
        self.generation = 0

    @property
    def endpoint(self) -> str:
        """The socket's base name, as sent in RegisterRequest.endpoint."""
        return os.path.basename(self.socket_path)

    @property
    def resource(self) -> Resource:
        """The resource currently served."""
        return self._state[0]

    @property
    def context(self) -> ServingContext:
        """The serving context currently used."""
        return self._state[1]

    @property
    def state(self) -> tuple[Resource, ServingContext]:
        """The resource and context, read together."""
        return self._state

    @property
    def serving(self) -> bool:
        """True between a successful start and stop."""
        return self._server is not None

    def start(self) -> None:
        """Bind the socket and serve. Raises ServeError with a clear reason on failure."""
        with self._lifecycle:
            if self._server is not None:
                return
            with self._cond:
                self._closed = False
            self._start_locked()

    def _start_locked(self) -> None:
        check_socket_path(self.socket_path)
        self._remove_stale_socket()
        executor = ThreadPoolExecutor(max_workers=MAX_WORKERS, thread_name_prefix=self.endpoint)
        server = grpc.server(executor, options=GRPC_OPTIONS)
        api_pb2_grpc.add_DevicePluginServicer_to_server(_Servicer(self), server)
        try:
            bind_privately(server, self.socket_path)
        except (RuntimeError, OSError) as err:
            server.stop(None)
            executor.shutdown(wait=False)
            raise ServeError(f"cannot listen on {self.socket_path}: {err}") from err
        server.start()
        try:
            self._inode = os.stat(self.socket_path).st_ino
        except OSError as err:
            server.stop(None)
            executor.shutdown(wait=False)
            raise ServeError(f"socket {self.socket_path} vanished right after bind: {err}") from err
        self._server, self._executor = server, executor
        self.generation += 1
        log.info("serving %s on %s", self.name, self.socket_path)

    def _remove_stale_socket(self) -> None:
        try:
            st = os.lstat(self.socket_path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ServeError(f"{self.socket_path} exists and is not a socket; not removing it")
        os.unlink(self.socket_path)

    def stop(self) -> None:
        """Stop serving: end every stream, stop gRPC, remove our socket. Idempotent."""
        with self._lifecycle:
            with self._cond:
                self._closed = True
                self._cond.notify_all()
            self._stop_locked()

    def _stop_locked(self) -> None:
        server, executor = self._server, self._executor
        self._server = self._executor = None
        if server is not None:
            server.stop(STOP_GRACE_S).wait()
        if executor is not None:
            executor.shutdown(wait=True)
        if self._inode is not None and self._socket_inode() == self._inode:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)
        self._inode = None

    def restart(self) -> None:
        """Rebind after our socket was removed (the kubelet wipes the directory on start)."""
        with self._lifecycle:
            # Not "self._server is None": a rebind that failed (the kubelet wiped the socket
            # again between our bind and our stat) leaves no server, and must be retried on
            # the next tick rather than leave the resource unserved for good.
            if self._closed or self.generation == 0:
                return
            with self._cond:
                self._closed = True
                self._cond.notify_all()
            self._stop_locked()
            with self._cond:
                self._closed = False
            log.info("our socket %s was removed; restarting %s", self.socket_path, self.name)
            self._start_locked()

    def _socket_inode(self) -> int | None:
        try:
            st = os.lstat(self.socket_path)
        except OSError:
            return None
        return st.st_ino if stat.S_ISSOCK(st.st_mode) else None

    def intact(self) -> bool:
        """True while our socket file is still the one we bound."""
        return self._inode is not None and self._socket_inode() == self._inode

    def update(self, resource: Resource, context: ServingContext | None = None) -> bool:
        """Serve a new version of the resource; wake ListAndWatch when the list changed.

        Returns True when the kubelet-visible device list changed.
        """
        if resource.name != self.name:
            raise ValueError(f"server for {self.name} cannot serve {resource.name}")
        with self._cond:
            old_resource, old_context = self._state
            changed = advertised_state(resource) != advertised_state(old_resource)
            self._state = (resource, context or old_context)
            if changed:
                self._version += 1
                self._cond.notify_all()
        return changed

    def wake(self) -> None:
        """Wake streams so they re-check whether their client or the server went away."""
        with self._cond:
            self._cond.notify_all()

    @property
    def active_streams(self) -> int:
        """ListAndWatch streams currently open."""
        with self._cond:
            return self._streams

    def wait_streams(self, count: int, timeout: float) -> bool:
        """Wait until exactly ``count`` ListAndWatch streams are open (tests, status)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._streams == count, timeout=timeout)

    def stream(self, is_active: Callable[[], bool]) -> Iterator[api_pb2.ListAndWatchResponse]:
        """The ListAndWatch stream: the full list now and after every change, until stopped."""
        with self._cond:
            self._streams += 1
            self._cond.notify_all()
        try:
            yield from self._watch(is_active)
        finally:
            with self._cond:
                self._streams -= 1
                self._cond.notify_all()

    def _watch(self, is_active: Callable[[], bool]) -> Iterator[api_pb2.ListAndWatchResponse]:
        seen = -1

        def due() -> bool:
            return self._closed or not is_active() or self._version != seen

        while True:
            with self._cond:
                self._cond.wait_for(due, timeout=STREAM_RECHECK_S)
                if self._closed or not is_active():
                    return
                if self._version == seen:
                    continue
                seen, resource = self._version, self._state[0]
            yield devices_response(resource)


class _Servicer(api_pb2_grpc.DevicePluginServicer):
    """The five RPCs, reading the server's current resource and context."""

    def __init__(self, server: PluginServer) -> None:
        self._server = server
        self._request_index: RequestIndex | None = None

    def GetDevicePluginOptions(
        self, request: api_pb2.Empty, context: grpc.ServicerContext
    ) -> api_pb2.DevicePluginOptions:
        return api_pb2.DevicePluginOptions(
            pre_start_required=False, get_preferred_allocation_available=True
        )

    def ListAndWatch(
        self, request: api_pb2.Empty, context: grpc.ServicerContext
    ) -> Iterator[api_pb2.ListAndWatchResponse]:
        log.debug("ListAndWatch opened for %s", self._server.name)
        context.add_callback(self._server.wake)
        yield from self._server.stream(context.is_active)
        log.debug("ListAndWatch closed for %s", self._server.name)

    def GetPreferredAllocation(
        self, request: api_pb2.PreferredAllocationRequest, context: grpc.ServicerContext
    ) -> api_pb2.PreferredAllocationResponse:
        resource, serving = self._server.state
        requests = request.container_requests
        problem = request_problem(resource, requests, preferred_request_ids)
        index = self._index(resource)
        queries: list[PreferredQuery] = []
        if problem is None:
            # Counted, so reading the IDs is bounded; each list is read out of the message
            # once (every pass over a repeated field makes new str objects).
            queries = [
                PreferredQuery.of(r.available_deviceIDs, r.must_include_deviceIDs,
                                  r.allocation_size)
                for r in requests
            ]
            problem = next(filter(None, (q.id_problem(index) for q in queries)), None)
        if problem is not None:
            log.warning("GetPreferredAllocation for %s refused: %s", resource.name, problem)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        response = api_pb2.PreferredAllocationResponse()
        for query in queries:
            ids = preferred_for(resource, serving, query, index)
            response.container_responses.add(deviceIDs=ids)
        return response

    def _index(self, resource: Resource) -> RequestIndex:
        """The request index of ``resource``, rebuilt when the served resource changed."""
        index = self._request_index
        if index is None or index.resource is not resource:
            # A race only builds the same index twice; the attribute swap is atomic.
            index = RequestIndex.of(resource)
            self._request_index = index
        return index

    def Allocate(
        self, request: api_pb2.AllocateRequest, context: grpc.ServicerContext
    ) -> api_pb2.AllocateResponse:
        resource, serving = self._server.state
        requests = request.container_requests
        problem = request_problem(resource, requests, allocate_ids)
        containers: list[tuple[str, ...]] = []
        if problem is None:
            # Counted, so reading is bounded. Each ID list read out of the message once: every
            # pass over a repeated field builds new str objects, and Allocate is on the pod
            # start path.
            containers = [tuple(r.devices_ids) for r in requests]
            problem = next(filter(None, map(long_id_problem, containers)), None)
        if problem is not None:
            log.warning("Allocate for %s refused: %s", resource.name, problem)
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f'invalid allocation request for "{resource.name}": invalid request: {problem}',
            )
        allocate, config = serving.allocate, serving.config
        response = api_pb2.AllocateResponse()
        add = response.container_responses.add
        for ids in containers:
            try:
                allocation = allocate(resource, ids, config)
            except serving.allocation_errors as err:
                log.warning("Allocate for %s refused: %s", resource.name, err)
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
            fill_allocation(add(), allocation)
        return response

    def PreStartContainer(
        self, request: api_pb2.PreStartContainerRequest, context: grpc.ServicerContext
    ) -> api_pb2.PreStartContainerResponse:
        return api_pb2.PreStartContainerResponse()
