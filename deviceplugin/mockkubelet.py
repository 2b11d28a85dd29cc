"""A small stand-in for the kubelet's device manager, for local runs, the demo and tests.

It serves ``v1beta1.Registration`` on ``<dir>/kubelet.sock``, validates Register like the
kubelet (API version, vendor-domain resource name), dials each plugin back on its socket, follows
its ListAndWatch stream, and can allocate devices the way the kubelet does (GetPreferredAllocation,
then Allocate). :meth:`MockKubelet.restart` behaves like a kubelet restart: every socket in the
directory is deleted (plugins' included) and ``kubelet.sock`` is recreated, and nothing
reconnects by itself.

With ``pod_resources_socket`` it also serves the kubelet's PodResources v1 API (``List``,
``GetAllocatableResources``, ``Get``) on that socket (the kubelet's is
``/var/lib/kubelet/pod-resources/kubelet.sock``), answering from its own bookkeeping: every
allocation made on behalf of a pod is recorded until :meth:`MockKubelet.free_pod`, and the
allocatable devices are those the plugins last listed in ListAndWatch. Allocations survive
:meth:`MockKubelet.restart`, as the kubelet's checkpoint keeps them.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import stat
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc

from gpus.runtime.version import add_version_flag
from protos.deviceplugin.v1beta1 import api_pb2, api_pb2_grpc
from protos.podresources.v1 import api_pb2 as pr_pb2
from protos.podresources.v1 import api_pb2_grpc as pr_pb2_grpc

log = logging.getLogger(__name__)

KUBELET_SOCKET = "kubelet.sock"
POD_RESOURCES_SOCKET = "/var/lib/kubelet/pod-resources/kubelet.sock"  # the kubelet's path
SUPPORTED_VERSIONS = ("v1beta1",)
DIAL_TIMEOUT_S = 10.0  # what the kubelet allows a plugin to answer when it dials back
RPC_TIMEOUT_S = 10.0


class MockKubeletError(RuntimeError):
    """The mock kubelet cannot listen; the message says where and why."""


@dataclass(frozen=True)
class DeviceInfo:
    """One device as the kubelet saw it in ListAndWatch."""

    id: str
    health: str
    numa_nodes: tuple[int, ...] = ()


@dataclass(frozen=True)
class AllocationOutcome:
    """What an allocation through the kubelet's path returned."""

    resource: str
    preferred: tuple[str, ...]  # GetPreferredAllocation's answer (may be empty)
    allocated: tuple[str, ...]  # the IDs sent to Allocate
    response: api_pb2.ContainerAllocateResponse


@dataclass(frozen=True)
class PodAllocation:
    """Devices of one resource allocated to one container of one pod (what List reports)."""

    namespace: str
    pod: str
    container: str
    resource: str
    device_ids: tuple[str, ...]


@dataclass(frozen=True)
class PodResourcesFault:
    """How the PodResources server misbehaves (tests of its clients): every call first waits
    ``delay_s`` (cut short when the mock stops), then fails with ``error`` if set."""

    delay_s: float = 0.0
    error: grpc.StatusCode | None = None


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
        self._allocations: list[PodAllocation] = []
        self._fault = PodResourcesFault()
        self._pr_calls = 0
        self._stopping = threading.Event()  # cuts a faulty PodResources delay short
        self._server: grpc.Server | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._pr_server: grpc.Server | None = None
        self._pr_executor: ThreadPoolExecutor | None = None

    # lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Listen on ``<dir>/kubelet.sock``; MockKubeletError when that cannot be done."""
        if self._server is not None:
            return
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)
        except OSError as err:
            raise MockKubeletError(f"cannot replace {self.socket_path}: {err.strerror}") from err
        executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="mock-kubelet")
        server = grpc.server(executor)
        api_pb2_grpc.add_RegistrationServicer_to_server(_Registration(self), server)
        try:
            server.add_insecure_port(f"unix:{self.socket_path}")
        except RuntimeError as err:  # gRPC's bind failure carries no errno
            server.stop(None)
            executor.shutdown(wait=False)
            raise MockKubeletError(f"cannot listen on {self.socket_path}: {err}") from err
        server.start()
        self._stopping.clear()
        self._server, self._executor = server, executor
        log.info("mock kubelet listening on %s", self.socket_path)
        if self.pod_resources_socket is not None:
            try:
                self._start_pod_resources(self.pod_resources_socket)
            except MockKubeletError:
                self.stop()
                raise

    def _start_pod_resources(self, path: str) -> None:
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        except OSError as err:
            raise MockKubeletError(f"cannot replace {path}: {err.strerror}") from err
        executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="mock-pod-resources")
        server = grpc.server(executor)
        pr_pb2_grpc.add_PodResourcesListerServicer_to_server(_PodResources(self), server)
        try:
            server.add_insecure_port(f"unix:{path}")
        except RuntimeError as err:
            server.stop(None)
            executor.shutdown(wait=False)
            raise MockKubeletError(f"cannot listen on {path}: {err}") from err
        server.start()
        self._pr_server, self._pr_executor = server, executor
        log.info("mock kubelet serving PodResources on %s", path)

    def stop(self) -> None:
        """Stop like a graceful kubelet: close plugin streams and remove its sockets."""
        self._stopping.set()
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
            with self._cond:
                self._allocations.append(
                    PodAllocation(namespace, pod, container, resource, tuple(chosen)))
        return AllocationOutcome(resource, preferred, chosen, response.container_responses[0])

    # pods (PodResources) ---------------------------------------------------------------------

    def pod_allocations(self) -> list[PodAllocation]:
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

    def set_pod_resources_fault(self, fault: PodResourcesFault) -> None:
        """Make every later PodResources call slow or failing (``PodResourcesFault()`` heals)."""
        with self._cond:
            self._fault = fault

    def pod_resources_call(self) -> PodResourcesFault:
        """Count a PodResources call as received; the fault it is to suffer."""
        with self._cond:
            self._pr_calls += 1
            self._cond.notify_all()
            return self._fault

    def wait_for_pod_resources_calls(self, count: int, timeout: float) -> bool:
        """Wait until ``count`` PodResources calls have been received in all."""
        with self._cond:
            return self._cond.wait_for(lambda: self._pr_calls >= count, timeout=timeout)

    def stopping(self) -> threading.Event:
        """Set while the mock is stopped; a faulty delay waits on it."""
        return self._stopping

    def all_devices(self) -> dict[str, list[DeviceInfo]]:
        """The latest ListAndWatch list of every connected resource."""
        with self._cond:
            return {name: list(p.devices) for name, p in sorted(self._plugins.items())}


class _Registration(api_pb2_grpc.RegistrationServicer):
    def __init__(self, kubelet: MockKubelet) -> None:
        self._kubelet = kubelet

    def Register(
        self, request: api_pb2.RegisterRequest, context: grpc.ServicerContext
    ) -> api_pb2.Empty:
        refusal = self._kubelet.handle_register(request)
        if refusal is not None:
            log.warning("refused registration of %s: %s", request.resource_name, refusal)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, refusal)
        log.info("registered %s (endpoint %s)", request.resource_name, request.endpoint)
        return api_pb2.Empty()


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


class _PodResources(pr_pb2_grpc.PodResourcesListerServicer):
    """The kubelet's PodResources v1 server, answering from the mock's own bookkeeping."""

    def __init__(self, kubelet: MockKubelet) -> None:
        self._kubelet = kubelet

    def _misbehave(self, context: grpc.ServicerContext) -> None:
        fault = self._kubelet.pod_resources_call()
        if fault.delay_s > 0:
            self._kubelet.stopping().wait(fault.delay_s)
        if fault.error is not None:
            context.abort(fault.error, f"injected fault: {fault.error.name}")

    def List(
        self, request: pr_pb2.ListPodResourcesRequest, context: grpc.ServicerContext
    ) -> pr_pb2.ListPodResourcesResponse:
        self._misbehave(context)
        pods = pod_resources(self._kubelet.pod_allocations(), self._kubelet.all_devices())
        return pr_pb2.ListPodResourcesResponse(pod_resources=pods)

    def GetAllocatableResources(
        self, request: pr_pb2.AllocatableResourcesRequest, context: grpc.ServicerContext
    ) -> pr_pb2.AllocatableResourcesResponse:
        self._misbehave(context)
        devices = self._kubelet.all_devices()
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
            a for a in self._kubelet.pod_allocations()
            if (a.namespace, a.pod) == (request.pod_namespace, request.pod_name)
        ]
        if not mine:
            context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"pod {request.pod_name} in namespace {request.pod_namespace} not found",
            )
        (pod,) = pod_resources(mine, self._kubelet.all_devices())
        return pr_pb2.GetPodResourcesResponse(pod_resources=pod)


# command line --------------------------------------------------------------------------------


def format_devices(resource: str, devices: Sequence[DeviceInfo]) -> str:
    """One ListAndWatch update as printable lines."""
    healthy = sum(d.health == "Healthy" for d in devices)
    lines = [f"[ListAndWatch] {resource}: {len(devices)} devices, {healthy} healthy"]
    for d in devices:
        numa = f" numa={','.join(map(str, d.numa_nodes))}" if d.numa_nodes else ""
        lines.append(f"    {d.id} {d.health}{numa}")
    return "\n".join(lines)


def format_allocation(outcome: AllocationOutcome) -> str:
    """An allocation outcome as printable lines."""
    r = outcome.response
    lines = [
        f"[GetPreferredAllocation] {outcome.resource}: {', '.join(outcome.preferred) or '(none)'}",
        f"[Allocate] {outcome.resource}: {', '.join(outcome.allocated)}",
    ]
    lines += [f"    env {k}={v}" for k, v in sorted(r.envs.items())]
    lines += [f"    mount {m.host_path} -> {m.container_path}" for m in r.mounts]
    lines += [
        f"    device {d.host_path} -> {d.container_path} ({d.permissions})" for d in r.devices
    ]
    lines += [f"    annotation {k}={v}" for k, v in sorted(r.annotations.items())]
    lines += [f"    cdi {c.name}" for c in r.cdi_devices]
    return "\n".join(lines)


def _parse_allocation(text: str) -> tuple[str, int]:
    name, eq, count = text.rpartition("=")
    if not eq or not name or not count.isdigit() or int(count) < 1:
        raise argparse.ArgumentTypeError(f"expected RESOURCE=N with N >= 1, got {text!r}")
    return name, int(count)


def build_parser() -> argparse.ArgumentParser:
    """The mock-kubelet command line."""
    parser = argparse.ArgumentParser(
        prog="mock-kubelet", description="Serve a stand-in kubelet registration socket."
    )
    parser.add_argument("--dir", required=True, help="directory for kubelet.sock and plugins")
    parser.add_argument(
        "--allocate",
        action="append",
        default=[],
        type=_parse_allocation,
        metavar="RESOURCE=N",
        help="once RESOURCE registers, allocate N devices and print the responses (each "
        "on behalf of a pod default/mock-pod-<k>, container main, as PodResources reports)",
    )
    parser.add_argument(
        "--pod-resources-socket",
        metavar="PATH",
        help="also serve the PodResources v1 API on PATH (the kubelet's is "
        f"{POD_RESOURCES_SOCKET}); its directory must exist",
    )
    parser.add_argument(
        "--restart-after", type=float, metavar="S", help="simulate a kubelet restart after S s"
    )
    parser.add_argument("--exit-after", type=float, metavar="S", help="exit after S seconds")
    add_version_flag(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the mock kubelet until SIGINT/SIGTERM (or --exit-after)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if not os.path.isdir(args.dir):
        print(f"mock-kubelet: --dir {args.dir!r} is not a directory", file=sys.stderr)
        return 2
    if not os.access(args.dir, os.W_OK | os.X_OK):
        print(f"mock-kubelet: --dir {args.dir!r} is not writable: {KUBELET_SOCKET} cannot be "
              "created there", file=sys.stderr)
        return 2
    if args.pod_resources_socket is not None:
        parent = os.path.dirname(os.path.abspath(args.pod_resources_socket))
        if not os.path.isdir(parent):
            print(f"mock-kubelet: --pod-resources-socket {args.pod_resources_socket!r}: "
                  f"directory {parent!r} does not exist", file=sys.stderr)
            return 2
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    kubelet = MockKubelet(
        args.dir,
        on_update=lambda r, d: print(format_devices(r, d), flush=True),
        pod_resources_socket=args.pod_resources_socket,
    )
    try:
        kubelet.start()
    except MockKubeletError as err:
        print(f"mock-kubelet: {err}", file=sys.stderr)
        return 2
    try:
        for number, (resource, count) in enumerate(args.allocate, start=1):
            if not kubelet.wait_for_registration(resource, timeout=60):
                print(f"mock-kubelet: {resource} did not register", file=sys.stderr)
                continue
            try:
                outcome = kubelet.allocate(resource, count, pod=f"mock-pod-{number}")
                print(format_allocation(outcome), flush=True)
            except (grpc.RpcError, ValueError) as err:
                print(f"mock-kubelet: allocation of {resource} failed: {err}", file=sys.stderr)
        if args.restart_after is not None and not done.wait(args.restart_after):
            print("[restart] deleting sockets and recreating kubelet.sock", flush=True)
            kubelet.restart()
        done.wait(args.exit_after)
    except MockKubeletError as err:  # the restart could not listen again
        print(f"mock-kubelet: {err}", file=sys.stderr)
        return 2
    finally:
        kubelet.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
