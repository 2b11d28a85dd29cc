"""One kubelet DevicePlugin gRPC server for one resource, on its own Unix socket.

The server is a thin adapter: it holds the :class:`~deviceplugin.rm.ResourceManager` of the
resource version it serves and turns each RPC into a call on it (protobuf in, plain Python
calls, protobuf out; :class:`~deviceplugin.allocate.AllocationError` -> INVALID_ARGUMENT).
:meth:`PluginServer.update` swaps the manager atomically and wakes every ListAndWatch stream,
so the kubelet sees a new device list at once. What is allocated, and every check of a
request, is the manager's.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import grpc

from deviceplugin.allocate import AllocationError, ContainerAllocation
from deviceplugin.kubelet import plugin_options
from deviceplugin.rm import ResourceManager
from gpus.config import RESOURCE_PREFIX
from gpus.resources import HEALTHY, UNHEALTHY, Device, Resource
from protos.deviceplugin.v1beta1 import api_pb2, api_pb2_grpc

if TYPE_CHECKING:  # prometheus_client: imported only with --metrics-address
    from gpus.runtime.metrics import PluginMetrics

log = logging.getLogger(__name__)

# sockaddr_un.sun_path is 108 bytes including the terminating NUL.
MAX_UNIX_PATH = 107
# ListAndWatch streams each hold a worker for their whole life (the kubelet keeps one open),
# so the pool must leave room for unary calls beside a few streams.
MAX_WORKERS = 16
# A stream re-checks whether its client is still there this often even if no callback fires.
STREAM_RECHECK_S = 1.0
STOP_GRACE_S = 0.5
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


class ServeError(RuntimeError):
    """The server cannot listen on its socket; the message says where and why."""


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
    message: api_pb2.ContainerAllocateResponse, allocation: ContainerAllocation
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


class PluginServer:
    """Serves ``v1beta1.DevicePlugin`` for one resource on ``<dir>/nvidia-<name>.sock``."""

    def __init__(self, manager: ResourceManager, socket_dir: str,
                 metrics: PluginMetrics | None = None) -> None:
        self.name = manager.resource.name
        # One histogram child per RPC, bound once: a call costs one observe (None: metrics off).
        self.metrics = metrics
        self.allocate_seconds = (None if metrics is None
                                 else metrics.rpc_seconds.labels("Allocate", self.name))
        self.preferred_seconds = (None if metrics is None else metrics.rpc_seconds.labels(
            "GetPreferredAllocation", self.name))
        self.socket_path = os.path.join(socket_dir, socket_name(self.name))
        self._cond = threading.Condition()
        # Swapped whole on update: handlers read it with a single attribute load (atomic in
        # CPython), no lock on the Allocate path.
        self._manager = manager
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
        return self._manager.resource

    @property
    def manager(self) -> ResourceManager:
        """The resource manager currently used."""
        return self._manager

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

    def update(self, manager: ResourceManager) -> bool:
        """Serve a new version of the resource (its manager); wake ListAndWatch when the list
        changed.

        Returns True when the kubelet-visible device list changed.
        """
        resource = manager.resource
        if resource.name != self.name:
            raise ValueError(f"server for {self.name} cannot serve {resource.name}")
        with self._cond:
            changed = advertised_state(resource) != advertised_state(self._manager.resource)
            self._manager = manager
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
                seen, resource = self._version, self._manager.resource
            yield devices_response(resource)


class _Servicer(api_pb2_grpc.DevicePluginServicer):
    """The five RPCs, each a call on the server's current resource manager."""

    def __init__(self, server: PluginServer) -> None:
        self._server = server

    def GetDevicePluginOptions(
        self, request: api_pb2.Empty, context: grpc.ServicerContext
    ) -> api_pb2.DevicePluginOptions:
        return plugin_options()

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
        timer = self._server.preferred_seconds
        if timer is None:
            return self._preferred(request, context)
        start = time.perf_counter()
        try:
            return self._preferred(request, context)
        finally:
            timer.observe(time.perf_counter() - start)

    def _preferred(
        self, request: api_pb2.PreferredAllocationRequest, context: grpc.ServicerContext
    ) -> api_pb2.PreferredAllocationResponse:
        try:
            chosen = self._server.manager.preferred(request.container_requests)
        except AllocationError as err:
            log.warning("GetPreferredAllocation for %s refused: %s", self._server.name, err)
            self._refused("GetPreferredAllocation")
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        response = api_pb2.PreferredAllocationResponse()
        add = response.container_responses.add
        for ids in chosen:
            add(deviceIDs=ids)
        return response

    def Allocate(
        self, request: api_pb2.AllocateRequest, context: grpc.ServicerContext
    ) -> api_pb2.AllocateResponse:
        timer = self._server.allocate_seconds
        if timer is None:
            return self._allocate(request, context)
        start = time.perf_counter()
        try:
            return self._allocate(request, context)
        finally:
            timer.observe(time.perf_counter() - start)

    def _refused(self, rpc: str) -> None:
        metrics = self._server.metrics
        if metrics is not None:
            metrics.rpc_errors.labels(rpc, self._server.name).inc()

    def _allocate(
        self, request: api_pb2.AllocateRequest, context: grpc.ServicerContext
    ) -> api_pb2.AllocateResponse:
        try:
            allocations = self._server.manager.allocate(request.container_requests)
        except AllocationError as err:
            log.warning("Allocate for %s refused: %s", self._server.name, err)
            self._refused("Allocate")
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        response = api_pb2.AllocateResponse()
        add = response.container_responses.add
        for allocation in allocations:
            fill_allocation(add(), allocation)
        return response

    def PreStartContainer(
        self, request: api_pb2.PreStartContainerRequest, context: grpc.ServicerContext
    ) -> api_pb2.PreStartContainerResponse:
        return api_pb2.PreStartContainerResponse()
