"""The mock kubelet's device manager: the Registration server and a client of each plugin.

Part of :mod:`deviceplugin.mockkubelet` (import the names from there; its docstring tells the
whole story). :class:`MockKubelet` validates Register like the kubelet, dials each plugin back,
follows its ListAndWatch stream and allocates like the kubelet; it also owns the PodResources
server (:mod:`deviceplugin.mockkubelet_podresources`), fed by the allocations it makes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc

from deviceplugin.mockkubelet_base import (
    DIAL_TIMEOUT_S,
    KUBELET_SOCKET,
    RPC_TIMEOUT_S,
    SUPPORTED_VERSIONS,
    AllocationOutcome,
    DeviceInfo,
    MockKubeletError,
    PodAllocation,
    PodResourcesFault,
    listen,
)
from deviceplugin.mockkubelet_podresources import PodBook, PodResourcesServicer
from protos.deviceplugin.v1beta1 import api_pb2, api_pb2_grpc
from protos.podresources.v1 import api_pb2_grpc as pr_pb2_grpc

# The facade's name: the mock's log lines kept their logger when it was split in modules.
log = logging.getLogger("deviceplugin.mockkubelet")


@dataclass
class _Plugin:
    resource: str
    endpoint: str
    channel: grpc.Channel
    stub: api_pb2_grpc.DevicePluginStub
    devices: list[DeviceInfo] = field(default_factory=list)
    updates: int = 0
    connected: bool = False
    stream: grpc.Future | None = None
    thread: threading.Thread | None = None


class MockKubelet:
    """A registration server plus a device-manager client for each registered plugin.

    ``on_update(resource, devices)`` is called (from the stream's thread) for every
    ListAndWatch response; the CLI prints them.
    """

    def __init__(
        self,
        directory: str,
        on_update: Callable[[str, list[DeviceInfo]], None] | None = None,
        pod_resources_socket: str | None = None,
    ) -> None:
        self.directory = directory
        self.socket_path = os.path.join(directory, KUBELET_SOCKET)
        self.pod_resources_socket = pod_resources_socket
        self._on_update = on_update
        self._cond = threading.Condition()
        self._plugins: dict[str, _Plugin] = {}
        self._registrations: list[api_pb2.RegisterRequest] = []
        self._pods = PodBook()
        self._server: grpc.Server | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._pr_server: grpc.Server | None = None
        self._pr_executor: ThreadPoolExecutor | None = None

    # lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Listen on ``<dir>/kubelet.sock``; MockKubeletError when that cannot be done."""
        if self._server is not None:
            return
        # Looked up on each call, not bound now: tests replace handle_register on a running mock.
        registration = _Registration(lambda request: self.handle_register(request))
        self._server, self._executor = listen(
            self.socket_path,
            lambda server: api_pb2_grpc.add_RegistrationServicer_to_server(registration, server),
            "mock-kubelet",
        )
        self._pods.stopping.clear()
        log.info("mock kubelet listening on %s", self.socket_path)
        if self.pod_resources_socket is not None:
            try:
                self._start_pod_resources(self.pod_resources_socket)
            except MockKubeletError:
                self.stop()
                raise

    def _start_pod_resources(self, path: str) -> None:
        servicer = PodResourcesServicer(self._pods, lambda: self.all_devices())
        self._pr_server, self._pr_executor = listen(
            path,
            lambda server: pr_pb2_grpc.add_PodResourcesListerServicer_to_server(servicer, server),
            "mock-pod-resources",
        )
        log.info("mock kubelet serving PodResources on %s", path)

    def stop(self) -> None:
        """Stop like a graceful kubelet: close plugin streams and remove its sockets."""
        self._pods.stopping.set()
        for server, executor in ((self._pr_server, self._pr_executor),
                                 (self._server, self._executor)):
            if server is not None:
                server.stop(0.2).wait()
            if executor is not None:
                executor.shutdown(wait=True)
        pr_server, self._pr_server = self._pr_server, None
        self._server = self._executor = self._pr_executor = None
        self._disconnect_all()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        if pr_server is not None and self.pod_resources_socket is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.pod_resources_socket)

    def restart(self) -> None:
        """Restart like the kubelet: stop, delete every socket in the directory, listen again."""
        self.stop()
        for name in os.listdir(self.directory):
            path = os.path.join(self.directory, name)
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(os.lstat(path).st_mode):
                    os.unlink(path)
        self.start()

    def __enter__(self) -> MockKubelet:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _disconnect_all(self) -> None:
        with self._cond:
            plugins, self._plugins = list(self._plugins.values()), {}
            self._cond.notify_all()
        for plugin in plugins:
            self._disconnect(plugin)

    @staticmethod
    def _disconnect(plugin: _Plugin) -> None:
        if plugin.stream is not None:
            plugin.stream.cancel()
        plugin.channel.close()
        if plugin.thread is not None and plugin.thread is not threading.current_thread():
            plugin.thread.join(timeout=5)

    # registration ----------------------------------------------------------------------------

    def handle_register(self, request: api_pb2.RegisterRequest) -> str | None:
        """Validate a registration; on success connect to the plugin. Returns the refusal."""
        if request.version not in SUPPORTED_VERSIONS:
            return f"unsupported API version {request.version!r}"
        name = request.resource_name
        domain, slash, short = name.partition("/")
        if not slash or not domain or not short or domain.endswith("kubernetes.io"):
            return f"invalid extended resource name {name!r}: it needs a vendor domain"
        if os.sep in request.endpoint:
            return f"endpoint {request.endpoint!r} must be a socket name in {self.directory}"
        with self._cond:
            self._registrations.append(request)
            old = self._plugins.pop(name, None)
            self._cond.notify_all()
        if old is not None:
            self._disconnect(old)
        # The kubelet returns from Register first and talks to the plugin in the background.
        threading.Thread(
            target=self._connect, args=(request,), name=f"mock-kubelet-{name}", daemon=True
        ).start()
        return None

    def _connect(self, request: api_pb2.RegisterRequest) -> None:
        path = os.path.join(self.directory, request.endpoint)
        channel = grpc.insecure_channel(f"unix:{path}")
        plugin = _Plugin(
            request.resource_name, request.endpoint, channel, api_pb2_grpc.DevicePluginStub(channel)
        )
        with self._cond:
            if self._server is None:
                channel.close()
                return
            self._plugins[plugin.resource] = plugin
        try:
            # wait_for_ready rather than channel_ready_future: closing the channel (stop,
            # restart) then simply fails this call instead of a background poller thread.
            plugin.stub.GetDevicePluginOptions(
                api_pb2.Empty(), timeout=DIAL_TIMEOUT_S, wait_for_ready=True
            )
        except (grpc.RpcError, ValueError) as err:
            log.warning("cannot reach plugin %s at %s: %s", plugin.resource, path, err)
            return
        plugin.thread = threading.current_thread()
        self._follow(plugin)

    def _follow(self, plugin: _Plugin) -> None:
        try:
            stream = plugin.stub.ListAndWatch(api_pb2.Empty())
        except ValueError:  # stop() or restart() closed the channel after the dial-back
            return
        plugin.stream = stream
        with self._cond:
            plugin.connected = True
            self._cond.notify_all()
        try:
            for response in stream:
                devices = [
                    DeviceInfo(d.ID, d.health, tuple(n.ID for n in d.topology.nodes))
                    for d in response.devices
                ]
                with self._cond:
                    plugin.devices = devices
                    plugin.updates += 1
                    self._cond.notify_all()
                if self._on_update is not None:
                    self._on_update(plugin.resource, devices)
        except grpc.RpcError as err:
            if isinstance(err, grpc.Call) and err.code() != grpc.StatusCode.CANCELLED:
                log.info("ListAndWatch for %s ended: %s", plugin.resource, err.code().name)
        finally:
            with self._cond:
                plugin.connected = False
                self._cond.notify_all()

    # queries ---------------------------------------------------------------------------------

    def registrations(self, resource: str | None = None) -> list[api_pb2.RegisterRequest]:
        """Every accepted Register request so far (optionally for one resource)."""
        with self._cond:
            return [r for r in self._registrations if resource in (None, r.resource_name)]

    def resources(self) -> list[str]:
        """Resources currently connected."""
        with self._cond:
            return sorted(self._plugins)

    def devices(self, resource: str) -> list[DeviceInfo]:
        """The latest device list of a resource ([] if none yet)."""
        with self._cond:
            plugin = self._plugins.get(resource)
            return list(plugin.devices) if plugin else []

    def wait_for_registration_request(
        self, resource: str, timeout: float, count: int = 1
    ) -> bool:
        """Wait until ``resource`` called Register ``count`` times (no dial-back needed)."""
        with self._cond:
            return self._cond.wait_for(
                lambda: len([r for r in self._registrations if r.resource_name == resource])
                >= count,
                timeout=timeout,
            )

    def wait_for_registration(self, resource: str, timeout: float, count: int = 1) -> bool:
        """Wait until ``resource`` registered ``count`` times and its first list arrived."""

        def ready() -> bool:
            plugin = self._plugins.get(resource)
            registered = sum(r.resource_name == resource for r in self._registrations)
            return registered >= count and plugin is not None and plugin.updates > 0

        with self._cond:
            return self._cond.wait_for(ready, timeout=timeout)

    def wait_for_devices(
        self,
        resource: str,
        predicate: Callable[[list[DeviceInfo]], bool],
        timeout: float,
    ) -> list[DeviceInfo] | None:
        """Wait until the latest list of ``resource`` satisfies ``predicate``; None on timeout."""

        def check() -> bool:
            plugin = self._plugins.get(resource)
            return plugin is not None and plugin.updates > 0 and predicate(list(plugin.devices))

        with self._cond:
            if not self._cond.wait_for(check, timeout=timeout):
                return None
            return list(self._plugins[resource].devices)

    def wait_disconnected(self, resource: str, timeout: float) -> bool:
        """Wait until the plugin's ListAndWatch stream has ended."""
        with self._cond:
            return self._cond.wait_for(
                lambda: resource not in self._plugins or not self._plugins[resource].connected,
                timeout=timeout,
            )

    def stub(self, resource: str) -> api_pb2_grpc.DevicePluginStub:
        """The DevicePlugin client of a registered resource (KeyError if not registered)."""
        with self._cond:
            return self._plugins[resource].stub

    # allocation ------------------------------------------------------------------------------

    def allocate(
        self,
        resource: str,
        count: int,
        must_include: Sequence[str] = (),
        *,
        pod: str | None = None,
        namespace: str = "default",
        container: str = "main",
    ) -> AllocationOutcome:
        """Allocate ``count`` healthy devices like the kubelet: preferred set, then Allocate.

        With ``pod`` the allocation is made on behalf of that pod's container: it is recorded
        (PodResources List reports it) and its devices are not offered again until
        :meth:`free_pod`. Without, nothing is recorded (the plugin's side alone is exercised).
        Raises grpc.RpcError from Allocate, or ValueError when too few devices are available.
        """
        stub = self.stub(resource)
        held = {i for a in self.pod_allocations() if a.resource == resource for i in a.device_ids}
        available = [
            d.id for d in self.devices(resource) if d.health == "Healthy" and d.id not in held
        ]
        if count > len(available):
            raise ValueError(
                f"{resource}: {count} requested, {len(available)} healthy devices available"
            )
        preferred_response = stub.GetPreferredAllocation(
            api_pb2.PreferredAllocationRequest(
                container_requests=[
                    api_pb2.ContainerPreferredAllocationRequest(
                        available_deviceIDs=available,
                        must_include_deviceIDs=list(must_include),
                        allocation_size=count,
                    )
                ]
            ),
            timeout=RPC_TIMEOUT_S,
        )
        preferred = tuple(preferred_response.container_responses[0].deviceIDs)
        # The kubelet falls back to its own pick when the plugin has no preference.
        chosen = preferred or tuple(
            dict.fromkeys([*must_include, *available]).keys()
        )[:count]
        response = stub.Allocate(
            api_pb2.AllocateRequest(
                container_requests=[api_pb2.ContainerAllocateRequest(devices_ids=list(chosen))]
            ),
            timeout=RPC_TIMEOUT_S,
        )
        if pod is not None:
            self._pods.record(PodAllocation(namespace, pod, container, resource, tuple(chosen)))
        return AllocationOutcome(resource, preferred, chosen, response.container_responses[0])

    # pods (PodResources) ---------------------------------------------------------------------

    def pod_allocations(self) -> list[PodAllocation]:
        """Every recorded allocation, oldest first."""
        return self._pods.allocations()

    def free_pod(self, namespace: str, pod: str) -> bool:
        """Forget a pod's allocations (the pod ended); False if it held none."""
        return self._pods.free_pod(namespace, pod)

    def set_pod_resources_fault(self, fault: PodResourcesFault) -> None:
        """Make every later PodResources call slow or failing (``PodResourcesFault()`` heals)."""
        self._pods.set_fault(fault)

    def wait_for_pod_resources_calls(self, count: int, timeout: float) -> bool:
        """Wait until ``count`` PodResources calls have been received in all."""
        return self._pods.wait_for_calls(count, timeout)

    def all_devices(self) -> dict[str, list[DeviceInfo]]:
        """The latest ListAndWatch list of every connected resource."""
        with self._cond:
            return {name: list(p.devices) for name, p in sorted(self._plugins.items())}


class _Registration(api_pb2_grpc.RegistrationServicer):
    """The kubelet's Registration server: ``handle_register`` validates and returns a refusal."""

    def __init__(self, handle_register: Callable[[api_pb2.RegisterRequest], str | None]) -> None:
        self._handle_register = handle_register

    def Register(
        self, request: api_pb2.RegisterRequest, context: grpc.ServicerContext
    ) -> api_pb2.Empty:
        refusal = self._handle_register(request)
        if refusal is not None:
            log.warning("refused registration of %s: %s", request.resource_name, refusal)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, refusal)
        log.info("registered %s (endpoint %s)", request.resource_name, request.endpoint)
        return api_pb2.Empty()
