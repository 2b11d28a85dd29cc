"""Which pods hold which GPUs: the kubelet's PodResources API turned into an immutable mapping.

dcgm-exporter asks the kubelet on every scrape and keeps one pod per device. Here a
:class:`AttributionRefresher` asks on its own thread (on an interval, and at once on
:meth:`~AttributionRefresher.request_refresh`), and a scrape only reads
:meth:`~AttributionRefresher.current`: an immutable :class:`Attribution` that maps every device
key to *every* pod holding it.

Device ids, as NVIDIA's device plugin hands them to the kubelet, become :class:`DeviceKey`\\ s:

- ``GPU-<uuid>`` (or the GPU index with ``--device-id-strategy=index``): the whole GPU;
- ``MIG-<uuid>`` (or ``<gpu>:<mig>``): its parent GPU and GPU instance id, through the resolver
  the caller builds from its :class:`gpus.model.Snapshot` (:func:`resolver_from_snapshot`);
- ``<id>::<n>``, a time-slicing or MPS replica: the device ``<id>`` (every sharing pod is kept).

Resources: every ``nvidia.com/`` resource is read, so renamed sharing resources
(``nvidia.com/gpu.shared``, any ``rename``) are attributed without configuration, where
dcgm-exporter reads only ``nvidia.com/gpu`` and ``nvidia.com/mig-*``. ``--nvidia-resource-names``
keeps its dcgm-exporter meaning: more resource names to read (e.g. a rename outside
``nvidia.com``). Ids that match no device on this node are skipped and reported.

The mapping functions are pure (proto response in, mapping out); sockets live in
:class:`PodResourcesClient` only.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import grpc

from gpus.model import Snapshot
from gpus.records import record
from protos.podresources.v1 import api_pb2 as pr_pb2
from protos.podresources.v1 import api_pb2_grpc as pr_pb2_grpc

log = logging.getLogger(__name__)

POD_RESOURCES_SOCKET = "/var/lib/kubelet/pod-resources/kubelet.sock"
NVIDIA_DOMAIN = "nvidia.com/"
REPLICA_SEPARATOR = "::"
DEFAULT_TIMEOUT_S = 2.0  # per kubelet call; far below any refresh interval
DEFAULT_INTERVAL_S = 5.0
DEFAULT_KEEP_LAST_GOOD_S = 300.0  # how long a failing kubelet's last answer is still served


@dataclass(frozen=True, order=True)
class PodRef:
    """A container holding a device, and the resource it holds it through."""

    namespace: str
    pod: str
    container: str
    resource: str


@dataclass(frozen=True, order=True)
class DeviceKey:
    """A device as series name it: a GPU, or one GPU instance of a MIG-enabled GPU."""

    gpu_uuid: str
    gpu_instance_id: int | None = None  # None: the whole GPU


Resolver = Callable[[str], "DeviceKey | None"]
_EMPTY: Mapping[DeviceKey, tuple[PodRef, ...]] = MappingProxyType({})


@record
class Attribution:
    """Device -> every container holding it (sorted, no repeats); immutable."""

    pods: Mapping[DeviceKey, tuple[PodRef, ...]] = field(default_factory=lambda: _EMPTY)
    # Device ids of read resources that match no device here (e.g. a GPU this node lost).
    unresolved: tuple[str, ...] = ()

    def pods_of(self, key: DeviceKey) -> tuple[PodRef, ...]:
        """The containers holding ``key`` (empty if none)."""
        return self.pods.get(key, ())


def split_replica(device_id: str) -> tuple[str, str | None]:
    """``GPU-x::3`` -> (``GPU-x``, ``3``); an id without a replica suffix -> (id, None)."""
    base, sep, replica = device_id.partition(REPLICA_SEPARATOR)
    return (base, replica) if sep else (device_id, None)


def resolver_from_snapshot(snapshot: Snapshot) -> Resolver:
    """Device id (without replica suffix) -> DeviceKey, for the devices of ``snapshot``.

    Knows GPU and MIG UUIDs, the index forms of ``--device-id-strategy=index`` (``"0"``,
    ``"0:1"``) and old drivers' ``MIG-GPU-<uuid>/<gi>/<ci>`` MIG ids. Built once per snapshot,
    so a lookup is one dict access (dcgm-exporter asks NVML per id and scrape).
    """
    table: dict[str, DeviceKey] = {}
    for gpu in snapshot.gpus:
        whole = DeviceKey(gpu.uuid)
        table[gpu.uuid] = table[str(gpu.index)] = whole
        for mig in gpu.mig_devices:
            key = DeviceKey(gpu.uuid, mig.gpu_instance_id)
            table[mig.uuid] = table[f"{gpu.index}:{mig.index}"] = key
    known_gpus = {gpu.uuid for gpu in snapshot.gpus}

    def resolve(device_id: str) -> DeviceKey | None:
        key = table.get(device_id)
        if key is None and device_id.startswith("MIG-GPU-"):
            key = _old_mig_id(device_id, known_gpus)
        return key

    return resolve


def _old_mig_id(device_id: str, known_gpus: set[str]) -> DeviceKey | None:
    """``MIG-GPU-<uuid>/<gi>/<ci>`` (drivers before R470) -> the parent GPU and instance."""
    parent, _, rest = device_id[len("MIG-"):].partition("/")
    gi, _, _ = rest.partition("/")
    if parent in known_gpus and gi.isdigit():
        return DeviceKey(parent, int(gi))
    return None


@record
class ResourceFilter:
    """Which resources are read: every ``nvidia.com/`` one, plus ``extra`` names
    (``--nvidia-resource-names``)."""

    extra: frozenset[str] = frozenset()

    @classmethod
    def from_flag(cls, value: str | Iterable[str] | None) -> ResourceFilter:
        """From ``--nvidia-resource-names`` (comma-separated, or already split)."""
        if value is None:
            return cls()
        names = value.split(",") if isinstance(value, str) else value
        return cls(frozenset(n.strip() for n in names if n.strip()))

    def accepts(self, resource: str) -> bool:
        """Whether devices of ``resource`` are attributed."""
        return resource.startswith(NVIDIA_DOMAIN) or resource in self.extra


def attribution_from_list(
    response: pr_pb2.ListPodResourcesResponse,
    resolve: Resolver,
    accepts: Callable[[str], bool] = ResourceFilter().accepts,
) -> Attribution:
    """A List answer -> the mapping. Pure: no I/O, deterministic order."""
    holders: dict[DeviceKey, set[PodRef]] = {}
    unresolved: set[str] = set()
    for pod in response.pod_resources:
        for container in pod.containers:
            for devices in container.devices:
                if not accepts(devices.resource_name):
                    continue
                ref = PodRef(pod.namespace, pod.name, container.name, devices.resource_name)
                for device_id in devices.device_ids:
                    key = resolve(split_replica(device_id)[0])
                    if key is None:
                        unresolved.add(device_id)
                    else:
                        holders.setdefault(key, set()).add(ref)
    pods = {key: tuple(sorted(refs)) for key, refs in sorted(holders.items())}
    return Attribution(MappingProxyType(pods), tuple(sorted(unresolved)))


def allocatable_from_response(
    response: pr_pb2.AllocatableResourcesResponse,
    resolve: Resolver,
    accepts: Callable[[str], bool] = ResourceFilter().accepts,
) -> frozenset[DeviceKey]:
    """The devices the kubelet can hand out (of read resources) that exist here."""
    keys = (
        resolve(split_replica(device_id)[0])
        for devices in response.devices
        if accepts(devices.resource_name)
        for device_id in devices.device_ids
    )
    return frozenset(k for k in keys if k is not None)


# the kubelet client ------------------------------------------------------------------------


class KubeletUnreachable(RuntimeError):
    """The PodResources socket is missing or not a socket; no call was made."""


class PodResourcesClient:
    """PodResources v1 calls over the kubelet's Unix socket, each bounded by ``timeout_s``.

    One channel is reused while calls succeed and replaced after a failure, so a restarted
    kubelet is reached on the next call rather than after gRPC's reconnect backoff.
    """

    def __init__(self, socket_path: str = POD_RESOURCES_SOCKET,
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.socket_path = socket_path
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._channel: grpc.Channel | None = None
        self._stub: pr_pb2_grpc.PodResourcesListerStub | None = None

    def _connect(self) -> pr_pb2_grpc.PodResourcesListerStub:
        try:
            mode = os.stat(self.socket_path).st_mode
        except OSError as err:
            self.close()
            raise KubeletUnreachable(f"{self.socket_path}: {err.strerror}") from None
        if not stat.S_ISSOCK(mode):
            self.close()
            raise KubeletUnreachable(f"{self.socket_path}: not a socket")
        with self._lock:
            if self._stub is None:
                self._channel = grpc.insecure_channel(f"unix:{self.socket_path}")
                self._stub = pr_pb2_grpc.PodResourcesListerStub(self._channel)
            return self._stub

    def _call(self, method: str, request: object) -> object:
        stub = self._connect()
        try:
            return getattr(stub, method)(request, timeout=self.timeout_s)
        except grpc.RpcError:
            self.close()
            raise

    def list(self) -> pr_pb2.ListPodResourcesResponse:
        """``List``; raises KubeletUnreachable or grpc.RpcError."""
        response = self._call("List", pr_pb2.ListPodResourcesRequest())
        assert isinstance(response, pr_pb2.ListPodResourcesResponse)
        return response

    def allocatable(self) -> pr_pb2.AllocatableResourcesResponse:
        """``GetAllocatableResources``; raises KubeletUnreachable or grpc.RpcError."""
        response = self._call("GetAllocatableResources", pr_pb2.AllocatableResourcesRequest())
        assert isinstance(response, pr_pb2.AllocatableResourcesResponse)
        return response

    def close(self) -> None:
        """Drop the channel (the next call opens a new one)."""
        with self._lock:
            channel, self._channel, self._stub = self._channel, None, None
        if channel is not None:
            channel.close()


# the refresher -----------------------------------------------------------------------------


@record
class Health:
    """How the last refresh went. ``kind`` is stable (logs and counters key on it); ``detail``
    is the error's text."""

    kind: str  # "ok", "no-socket", "timeout", "unavailable", "error:<GRPC CODE>", "internal"
    detail: str = ""

    @property
    def ok(self) -> bool:
        """Whether the last refresh succeeded."""
        return self.kind == "ok"


NEVER = Health("pending", "no refresh yet")


@record
class Current:
    """What a scrape reads: the mapping, when it was fetched, and how the last refresh went."""

    attribution: Attribution
    fetched_at: float | None  # the refresher's clock when the kubelet gave this answer
    health: Health
    generation: int  # bumped whenever the mapping changes

    def age(self, now: float) -> float | None:
        """Seconds since the kubelet gave this mapping; None if it never answered."""
        return None if self.fetched_at is None else max(0.0, now - self.fetched_at)

    @property
    def stale(self) -> bool:
        """The mapping is a failing kubelet's last good answer (not the latest refresh)."""
        return not self.health.ok and self.fetched_at is not None


@record
class RefreshCounters:
    """Plain counts since start (phase 2 exports them as metrics)."""

    refreshes: int = 0
    failures: int = 0
    failures_by_kind: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    state_changes: int = 0
    mapping_changes: int = 0
    expired: int = 0  # last good mappings dropped for age


def classify(error: BaseException) -> Health:
    """An exception from a fetch -> its Health."""
    if isinstance(error, KubeletUnreachable):
        return Health("no-socket", str(error))
    if isinstance(error, grpc.RpcError) and isinstance(error, grpc.Call):
        code = error.code()
        detail = f"{code.name}: {error.details()}"
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return Health("timeout", detail)
        if code == grpc.StatusCode.UNAVAILABLE:
            return Health("unavailable", detail)
        return Health(f"error:{code.name}", detail)
    return Health("internal", f"{type(error).__name__}: {error}")


class AttributionRefresher:
    """Keeps :meth:`current` fresh from ``fetch`` (e.g. ``PodResourcesClient.list``).

    A failing fetch keeps the last good mapping for ``keep_last_good_s`` seconds (then an empty
    one), logs once per change of :class:`Health` kind, and counts. Nothing here raises into
    the caller, and :meth:`current` never waits on the kubelet.
    """

    def __init__(
        self,
        fetch: Callable[[], pr_pb2.ListPodResourcesResponse],
        resolve: Resolver,
        accepts: Callable[[str], bool] = ResourceFilter().accepts,
        interval_s: float = DEFAULT_INTERVAL_S,
        keep_last_good_s: float = DEFAULT_KEEP_LAST_GOOD_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fetch = fetch
        self._resolve = resolve
        self._accepts = accepts
        self.interval_s = interval_s
        self.keep_last_good_s = keep_last_good_s
        self._clock = clock
        self._current = Current(Attribution(), None, NEVER, 0)
        self._counters = RefreshCounters()
        self._refresh_lock = threading.Lock()  # one refresh at a time
        self._changed = threading.Condition()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # reading (the scrape path) ---------------------------------------------------------------

    def current(self) -> Current:
        """The latest mapping; one attribute read, never blocks."""
        return self._current

    def counters(self) -> RefreshCounters:
        """The counts so far."""
        return self._counters

    # refreshing ------------------------------------------------------------------------------

    def refresh_now(self) -> Current:
        """Fetch and rebuild the mapping on this thread; returns what :meth:`current` now is."""
        with self._refresh_lock:
            try:
                attribution = attribution_from_list(self._fetch(), self._resolve, self._accepts)
            except Exception as error:  # any failure keeps serving; classify says which
                self._failed(classify(error), error)
            else:
                self._succeeded(attribution)
            with self._changed:
                self._changed.notify_all()
            return self._current

    def _succeeded(self, attribution: Attribution) -> None:
        previous = self._current
        self._note_health(previous.health, Health("ok"))
        changed = attribution != previous.attribution
        self._current = Current(attribution, self._clock(), Health("ok"),
                                previous.generation + changed)
        self._count(mapping_changes=int(changed))

    def _failed(self, health: Health, error: BaseException) -> None:
        previous = self._current
        self._note_health(previous.health, health, error)
        by_kind = dict(self._counters.failures_by_kind)
        by_kind[health.kind] = by_kind.get(health.kind, 0) + 1
        self._count(failures=1, failures_by_kind=MappingProxyType(by_kind))
        attribution, fetched_at = previous.attribution, previous.fetched_at
        age = previous.age(self._clock())
        if age is not None and age > self.keep_last_good_s:
            if attribution.pods:
                log.warning("PodResources: dropping the last good pod mapping, %.0f s old "
                            "(limit %.0f s): series go out without pod labels",
                            age, self.keep_last_good_s)
                self._count(expired=1)
            attribution, fetched_at = Attribution(), None
        changed = attribution != previous.attribution
        self._current = Current(attribution, fetched_at, health, previous.generation + changed)
        if changed:
            self._count(mapping_changes=1)

    def _note_health(self, before: Health, after: Health,
                     error: BaseException | None = None) -> None:
        self._count(refreshes=1)
        if before.kind == after.kind:
            return
        self._count(state_changes=1)
        if after.ok:
            if before is NEVER:
                log.info("PodResources: the kubelet answers")
            else:
                log.info("PodResources: the kubelet answers again (was %s)", before.kind)
            return
        keeping = ("keeping the last good pod mapping for up to "
                   f"{self.keep_last_good_s:.0f} s" if self._current.fetched_at is not None
                   else "series go out without pod labels")
        log.warning("PodResources: %s (%s); %s", after.kind, after.detail, keeping,
                    exc_info=error if after.kind == "internal" else None)

    def _count(self, failures_by_kind: Mapping[str, int] | None = None,
               **increments: int) -> None:
        # Replaced whole, so a reader on another thread sees one consistent set of counts.
        counters = self._counters
        values: dict[str, Any] = {
            name: getattr(counters, name) + step for name, step in increments.items()}
        if failures_by_kind is not None:
            values["failures_by_kind"] = failures_by_kind
        self._counters = dataclasses.replace(counters, **values)

    def wait_for(self, predicate: Callable[[Current], bool], timeout: float) -> Current | None:
        """Wait until a refresh leaves :meth:`current` satisfying ``predicate``; None on timeout."""
        with self._changed:
            if self._changed.wait_for(lambda: predicate(self._current), timeout=timeout):
                return self._current
        return None

    # the thread ------------------------------------------------------------------------------

    def request_refresh(self) -> None:
        """Refresh soon, on the refresher's thread (e.g. a device list changed)."""
        self._wake.set()

    def start(self) -> None:
        """Refresh now and then every ``interval_s`` on a daemon thread."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="pod-attribution", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread; a fetch in flight is bounded by the client's timeout."""
        self._stop.set()
        self._wake.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            try:
                self.refresh_now()
            except Exception:  # a bug here must not end attribution for the daemon's life
                log.exception("PodResources: refresh failed unexpectedly")
            self._wake.wait(self.interval_s)
