"""The fake NVML's runtime state: handles, MIG objects, faults and event queues.

One lock guards everything; each event set has a Condition on that same lock, so a thread blocked
in ``nvmlEventSetWait`` releases it while waiting and injections from other threads wake it.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid as uuidlib
from collections import deque
from dataclasses import dataclass, field

import pynvml

from gpus.fake.profile_model import ComputeInstance, GpuInstance, GpuSpec, Profile, ProfileError
from gpus.fake.telemetry import Telemetry
from gpus.records import record

log = logging.getLogger(__name__)

NOT_APPLICABLE = 0xFFFFFFFF  # NVML's GI/CI id in events that are not about a MIG device
XID_FALLEN_OFF_BUS = 79
# Event types a data-center GPU reports as supported (a real H100 on driver 580 answers 0xFF9F).
SUPPORTED_EVENTS = 0xFF9F
_VERSION_SUFFIX = re.compile(r"(_v\d+|WithFlags|V)$")


class NvmlReturn(Exception):  # noqa: N818 - a return code travelling up, not an error class
    """Raised inside the fake to return ``code`` from the current NVML call."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def error_code(error: str | int) -> int:
    """An NVML error given as a code, "NVML_ERROR_GPU_IS_LOST" or "GPU_IS_LOST"."""
    if isinstance(error, int) and not isinstance(error, bool):
        return error
    if isinstance(error, str):
        name = error.upper()
        name = name if name.startswith("NVML_ERROR_") else f"NVML_ERROR_{name}"
        value = getattr(pynvml, name, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"unknown NVML error {error!r} (e.g. NVML_ERROR_GPU_IS_LOST or 15)")


def base_name(function: str) -> str:
    """An NVML symbol without its version suffix: nvmlEventSetWait_v2 -> nvmlEventSetWait."""
    if function.startswith("nvmlInit"):
        return "nvmlInit"
    return _VERSION_SUFFIX.sub("", function)


@dataclass
class FakeGpu:
    """A GPU at run time."""

    spec: GpuSpec
    handle: int
    lost: bool = False
    compute_mode: int = pynvml.NVML_COMPUTEMODE_DEFAULT  # set through nvmlDeviceSetComputeMode
    mig_slots: list[FakeMig | None] = field(default_factory=list)
    gpu_instances: dict[int, FakeGpuInstance] = field(default_factory=dict)


@dataclass
class FakeGpuInstance:
    """A GPU instance handle's target."""

    gpu: FakeGpu
    spec: GpuInstance
    handle: int
    compute_instances: dict[int, FakeComputeInstance] = field(default_factory=dict)


@dataclass
class FakeComputeInstance:
    """A compute instance handle's target."""

    gpu_instance: FakeGpuInstance
    spec: ComputeInstance
    handle: int


@dataclass
class FakeMig:
    """A MIG device (one compute instance) at run time."""

    gpu: FakeGpu
    gpu_instance: FakeGpuInstance
    compute_instance: ComputeInstance
    slot: int
    uuid: str
    handle: int

    @property
    def name_suffix(self) -> str:
        """NVIDIA's profile name, e.g. "1g.5gb" or "1c.3g.20gb"."""
        gi = self.gpu_instance.spec.profile
        prefix = (
            "" if self.compute_instance.slices == gi.slices else f"{self.compute_instance.slices}c."
        )
        return f"{prefix}{gi.name}"


@dataclass
class GpmRecord:
    """A GPM sample buffer: the device, GPU instance and step it was last filled at."""

    handle: int
    gpu_uuid: str | None = None
    gpu_instance_id: int | None = None
    step: int = 0
    timestamp_ns: int = 0


@record
class PendingEvent:
    """An event waiting in an event set."""

    gpu_handle: int
    event_type: int
    data: int
    gpu_instance_id: int
    compute_instance_id: int


@dataclass
class FakeEventSet:
    """An event set: registered GPUs and the events not yet waited for."""

    handle: int
    cond: threading.Condition
    registrations: dict[int, int] = field(default_factory=dict)  # GPU index -> event mask
    queue: deque[PendingEvent] = field(default_factory=deque)
    freed: bool = False


class FakeState:
    """Everything the fake NVML knows, guarded by ``lock``."""

    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        self.lock = threading.RLock()
        self.init_count = 0
        self.closed = False
        self.failures: dict[str, list[int | None]] = {}  # base name -> [code, remaining]
        self.objects: dict[int, object] = {}
        self.event_sets: dict[int, FakeEventSet] = {}
        # Signalled whenever a GPU is registered for events (see wait_watched).
        self.registered = threading.Condition(self.lock)
        # Every successful nvmlDeviceSetComputeMode, in order: (GPU UUID, mode).
        self.compute_mode_changes: list[tuple[str, int]] = []
        self._next_handle = 0x1000
        self.gpus = [self._build_gpu(spec) for spec in profile.gpus]
        self._check_unique_uuids()
        self.telemetry = Telemetry([gpu.spec.uuid for gpu in self.gpus])
        # GPM samples (nvmlGpmSampleAlloc handles) -> what they recorded
        self.gpm_samples: dict[int, GpmRecord] = {}

    # -- construction ---------------------------------------------------------------------------

    def new_condition(self) -> threading.Condition:
        """A Condition on the state lock (waiting releases the whole lock)."""
        return threading.Condition(self.lock)

    def new_handle(self, obj: object) -> int:
        """A fresh opaque handle for ``obj`` (never 0, so ctypes never sees NULL)."""
        handle = self._next_handle
        self._next_handle += 0x10
        self.objects[handle] = obj
        return handle

    def _build_gpu(self, spec: GpuSpec) -> FakeGpu:
        gpu = FakeGpu(spec=spec, handle=0)
        gpu.handle = self.new_handle(gpu)
        if spec.mig_enabled:
            gpu.mig_slots = [None] * spec.model.mig_slices
        slot = 0
        for gi_spec in spec.gpu_instances:
            gi = FakeGpuInstance(gpu=gpu, spec=gi_spec, handle=0)
            gi.handle = self.new_handle(gi)
            gpu.gpu_instances[gi_spec.id] = gi
            for ci_spec in gi_spec.compute_instances:
                ci = FakeComputeInstance(gpu_instance=gi, spec=ci_spec, handle=0)
                ci.handle = self.new_handle(ci)
                gi.compute_instances[ci_spec.id] = ci
                seed = f"{spec.uuid}/{gi_spec.id}/{ci_spec.id}"
                mig_uuid = f"MIG-{uuidlib.uuid5(uuidlib.NAMESPACE_URL, seed)}"
                mig = FakeMig(
                    gpu=gpu,
                    gpu_instance=gi,
                    compute_instance=ci_spec,
                    slot=slot,
                    uuid=mig_uuid,
                    handle=0,
                )
                mig.handle = self.new_handle(mig)
                gpu.mig_slots[slot] = mig
                slot += 1
        return gpu

    def _check_unique_uuids(self) -> None:
        """Refuse a profile whose devices share a UUID: lookups by UUID would be ambiguous.

        The loader already refuses duplicate GPU UUIDs; this also covers a Profile built in code
        and the MIG UUIDs derived here.
        """
        seen: set[str] = set()
        for gpu in self.gpus:
            for uuid in (gpu.spec.uuid, *(m.uuid for m in gpu.mig_slots if m is not None)):
                if uuid in seen:
                    raise ProfileError(
                        f"{self.profile.source}: gpus[{gpu.spec.index}]: duplicate UUID {uuid}"
                    )
                seen.add(uuid)

    # -- handle resolution (raise NvmlReturn like NVML would answer) ----------------------------

    def target(self, handle: int | None) -> object:
        """Whatever a handle points to; INVALID_ARGUMENT for unknown handles."""
        obj = self.objects.get(handle or 0)
        if obj is None:
            raise NvmlReturn(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return obj

    def device(self, handle: int | None) -> FakeGpu | FakeMig:
        """A GPU or MIG device handle; GPU_IS_LOST when it (or its parent) fell off the bus."""
        obj = self.target(handle)
        if not isinstance(obj, (FakeGpu, FakeMig)):
            raise NvmlReturn(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        parent = obj if isinstance(obj, FakeGpu) else obj.gpu
        if parent.lost:
            raise NvmlReturn(pynvml.NVML_ERROR_GPU_IS_LOST)
        return obj

    def gpu(self, handle: int | None) -> FakeGpu:
        """A whole-GPU handle (MIG handles: NOT_SUPPORTED, as NVML says for GPU-only calls)."""
        obj = self.device(handle)
        if isinstance(obj, FakeMig):
            raise NvmlReturn(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return obj

    def gpu_instance(self, handle: int | None) -> FakeGpuInstance:
        """A GPU instance handle."""
        obj = self.target(handle)
        if not isinstance(obj, FakeGpuInstance):
            raise NvmlReturn(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        if obj.gpu.lost:
            raise NvmlReturn(pynvml.NVML_ERROR_GPU_IS_LOST)
        return obj

    def compute_instance(self, handle: int | None) -> FakeComputeInstance:
        """A compute instance handle."""
        obj = self.target(handle)
        if not isinstance(obj, FakeComputeInstance):
            raise NvmlReturn(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        if obj.gpu_instance.gpu.lost:
            raise NvmlReturn(pynvml.NVML_ERROR_GPU_IS_LOST)
        return obj

    def event_set(self, handle: int | None) -> FakeEventSet:
        """A live event set."""
        obj = self.target(handle)
        if not isinstance(obj, FakeEventSet) or obj.freed:
            raise NvmlReturn(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return obj

    def find(self, gpu: int | str) -> tuple[FakeGpu, FakeMig | None]:
        """A GPU by index or GPU UUID, or a MIG device (and its parent) by MIG UUID."""
        if isinstance(gpu, int) and not isinstance(gpu, bool):
            if 0 <= gpu < len(self.gpus):
                return self.gpus[gpu], None
            raise ValueError(
                f"no GPU with index {gpu} (profile {self.profile.name} has {len(self.gpus)})"
            )
        for candidate in self.gpus:
            if candidate.spec.uuid == gpu:
                return candidate, None
            for mig in candidate.mig_slots:
                if mig is not None and mig.uuid == gpu:
                    return candidate, mig
        raise ValueError(f"no GPU or MIG device {gpu!r} in profile {self.profile.name}")

    def by_uuid(self, uuid: str) -> FakeGpu | FakeMig | None:
        """A GPU or MIG device by UUID."""
        try:
            gpu, mig = self.find(uuid)
        except ValueError:
            return None
        return mig or gpu

    # -- faults ---------------------------------------------------------------------------------

    def precheck(self, function: str) -> int:
        """The error an injected fault or the init state makes ``function`` return, else 0."""
        uninitialized: int = pynvml.NVML_ERROR_UNINITIALIZED
        if self.closed:
            return uninitialized
        code = self.take_failure(function)
        if code:
            return code
        if self.init_count == 0 and base_name(function) not in ("nvmlInit", "nvmlShutdown"):
            return uninitialized
        return 0

    def take_failure(self, function: str) -> int:
        """Consume one use of a failure injected for ``function`` (any version suffix)."""
        for key in (function, base_name(function)):
            entry = self.failures.get(key)
            if entry is None:
                continue
            code, remaining = entry
            if remaining is not None:
                entry[1] = remaining - 1
                if remaining - 1 <= 0:
                    del self.failures[key]
            assert code is not None
            return code
        return 0

    def notify_all_event_sets(self) -> None:
        """Wake every waiter so it re-checks faults and shutdown."""
        for event_set in self.event_sets.values():
            event_set.cond.notify_all()

    # -- events ---------------------------------------------------------------------------------

    def watched(self, gpu: FakeGpu, event_type: int) -> bool:
        """True when some live event set has registered ``gpu`` for ``event_type``."""
        return any(
            not event_set.freed and event_set.registrations.get(gpu.spec.index, 0) & event_type
            for event_set in self.event_sets.values()
        )

    def wait_watched(self, gpu: FakeGpu, event_type: int, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds until :meth:`watched`; the caller holds ``lock``.

        Lets a fault injected while a daemon is still starting reach it instead of being posted
        to nobody (NVML never replays events to a set registered later).
        """
        if self.watched(gpu, event_type):
            return True
        log.info("fake NVML: waiting up to %g s for a daemon to watch GPU %d", timeout,
                 gpu.spec.index)
        return self.registered.wait_for(lambda: self.watched(gpu, event_type), timeout)

    def post(self, gpu: FakeGpu, event_type: int, data: int, gi: int, ci: int) -> int:
        """Queue an event on every set that registered ``gpu`` for it; returns how many."""
        delivered = 0
        for event_set in self.event_sets.values():
            mask = event_set.registrations.get(gpu.spec.index, 0)
            if event_set.freed or not mask & event_type:
                continue
            event_set.queue.append(PendingEvent(gpu.handle, event_type, data, gi, ci))
            event_set.cond.notify_all()
            delivered += 1
        log.debug(
            "fake NVML: event type %#x data %d on GPU %d delivered to %d set(s)",
            event_type,
            data,
            gpu.spec.index,
            delivered,
        )
        return delivered

    def wait(self, event_set: FakeEventSet, timeout_ms: int) -> PendingEvent:
        """Block (lock released) until an event, a fault, shutdown or the timeout."""
        deadline = time.monotonic() + timeout_ms / 1000.0
        while True:
            if self.closed or event_set.freed:
                raise NvmlReturn(pynvml.NVML_ERROR_UNINITIALIZED)
            if event_set.queue:
                return event_set.queue.popleft()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise NvmlReturn(pynvml.NVML_ERROR_TIMEOUT)
            event_set.cond.wait(remaining)
            # A fault injected while this thread waited applies to this wait too.
            code = self.take_failure("nvmlEventSetWait")
            if code:
                raise NvmlReturn(code)
