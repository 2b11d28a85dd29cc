"""The resource map: Snapshot + Config (+ current health) -> {resource name: devices}.

Recomputed, never patched: a health change or a config reload builds a new map, and the device
plugin's manager applies the difference. GFD labels read the same map, so both daemons agree on
what a node offers.

Two steps, both pure:

1. The MIG strategy turns GPUs and MIG devices into *units* grouped by their unshared resource
   name (``nvidia.com/gpu``, ``nvidia.com/mig-1g.5gb``); invalid layouts become problems.
2. Sharing (time-slicing, or MPS when ``sharing.mps`` has resources: ``Sharing.active``) turns
   the selected units of a resource into ``<uuid>::<n>`` replicas, advertised under the same or
   a new name; the unselected units stay under the unshared name. Each shared Resource says
   which strategy shares it. An MPS entry NVIDIA's MPS server cannot run (MIG devices, more
   replicas than an MPS server takes clients) is a problem and its devices are not advertised
   at all: never as whole GPUs under the name pods expect replicas from.

See docs/mig.md and docs/sharing.md for the rules, and how they differ from NVIDIA's.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import field

from gpus.config import (
    MPS_NOT_FOR_MIG,
    RESOURCE_PREFIX,
    Config,
    Mps,
    ReplicatedResource,
    SharingStrategy,
    TimeSlicing,
)
from gpus.model import GPU, MigDevice, Snapshot
from gpus.records import record

HEALTHY = "Healthy"
UNHEALTHY = "Unhealthy"

GPU_RESOURCE = f"{RESOURCE_PREFIX}/gpu"
MIG_RESOURCE_PREFIX = f"{RESOURCE_PREFIX}/mig-"

# The clients one MPS server takes per GPU (NVIDIA's mps-control-daemon: 48 from compute
# capability 7.5, else 16; its code calls the cut-off "Volta" but compares with 7.5).
MPS_MAX_CLIENTS = 48
MPS_MAX_CLIENTS_BEFORE_7_5 = 16


def mps_max_clients(gpu: GPU) -> int:
    """How many MPS clients (replicas) ``gpu`` takes."""
    return MPS_MAX_CLIENTS if gpu.compute_capability >= (7, 5) else MPS_MAX_CLIENTS_BEFORE_7_5


@record
class Device:
    """One advertised device: a whole GPU, a MIG device, or a time-slicing replica of either."""

    id: str  # what the kubelet sees: "GPU-…", "MIG-…", or "<uuid>::<n>" for replicas
    uuid: str  # the physical GPU's or MIG device's UUID (id without the replica suffix)
    gpu: GPU  # the physical GPU (the parent, for MIG devices)
    mig: MigDevice | None = None
    replica: int | None = None
    healthy: bool = True

    @property
    def numa_node(self) -> int | None:
        """NUMA node for ListAndWatch topology; MIG devices and replicas inherit the GPU's."""
        return self.gpu.numa_node

    @property
    def index(self) -> str:
        """NVIDIA's device index, "<gpu>" or "<gpu>:<mig index>" (--device-id-strategy=index)."""
        if self.mig is not None:
            return f"{self.gpu.index}:{self.mig.index}"
        return str(self.gpu.index)

    @property
    def health(self) -> str:
        """The kubelet's health string: ``Healthy`` or ``Unhealthy``."""
        return HEALTHY if self.healthy else UNHEALTHY


@record
class Resource:
    """One advertised resource: what one gRPC server serves."""

    name: str  # "nvidia.com/gpu", "nvidia.com/mig-1g.5gb", "nvidia.com/gpu.shared"
    devices: tuple[Device, ...]
    replicas: int = 1  # 1 when not shared
    fail_requests_greater_than_one: bool = False
    # The name these devices would have unshared ("" = same as name): "nvidia.com/gpu" for
    # "nvidia.com/gpu.shared". GFD adds "-SHARED" to the product only when not renamed.
    unshared_name: str = ""
    # How the replicas are shared: Allocate adds MPS's pipe and shm, GFD and the exporter
    # label it. NONE for unshared resources.
    sharing: SharingStrategy = SharingStrategy.NONE

    @property
    def shared(self) -> bool:
        """True when devices are replicas (time-slicing or MPS)."""
        return self.replicas > 1

    @property
    def mps(self) -> bool:
        """True when the replicas are clients of an MPS server (see mpsdaemon/)."""
        return self.shared and self.sharing == SharingStrategy.MPS

    @property
    def renamed(self) -> bool:
        """True when shared devices are advertised under a name other than their own."""
        return bool(self.unshared_name) and self.unshared_name != self.name

    @property
    def short_name(self) -> str:
        """The name without ``nvidia.com/`` ("gpu", "mig-1g.5gb")."""
        return resource_short_name(self.name)


@record
class ResourceMap:
    """All resources of a node plus the problems found while building them."""

    resources: Mapping[str, Resource] = field(default_factory=dict)
    # Human-readable problems (invalid MIG layouts for the strategy, unknown devices in the
    # sharing config...). Each names the GPUs and the reason; the daemons log and expose them.
    problems: tuple[str, ...] = ()


def resource_short_name(name: str) -> str:
    """``nvidia.com/mig-1g.5gb`` -> ``mig-1g.5gb`` (the socket and label suffix)."""
    return name.split("/", 1)[1] if "/" in name else name


def mig_resource_name(profile: str) -> str:
    """The mixed-strategy resource of a MIG profile.

    ``1g.10gb+me`` -> ``nvidia.com/mig-1g.10gb.me`` ("+" is not allowed in resource names).
    """
    return MIG_RESOURCE_PREFIX + profile.replace("+", ".")


# --------------------------------------------------------------------------------------------
# Step 1: MIG strategy -> units per unshared resource name.


@record
class _Unit:
    """A device before sharing: a whole GPU or one MIG device."""

    gpu: GPU
    mig: MigDevice | None = None

    @property
    def uuid(self) -> str:
        return self.mig.uuid if self.mig is not None else self.gpu.uuid

    @property
    def sort_key(self) -> tuple[int, int]:
        return (self.gpu.index, self.mig.index if self.mig is not None else -1)


_Units = dict[str, list[_Unit]]


def _name_gpu(gpu: GPU) -> str:
    return f"GPU {gpu.index} ({gpu.uuid})"


def _name_gpus(gpus: Sequence[GPU]) -> str:
    return ", ".join(_name_gpu(gpu) for gpu in gpus)


def _have(gpus: Sequence[GPU]) -> str:
    return "has" if len(gpus) == 1 else "have"


def _layout(gpu: GPU) -> str:
    """A GPU's MIG profiles in device order, repeats counted: "1g.5gb x7", "3g.20gb, 1g.5gb"."""
    counts: dict[str, int] = {}
    for mig in sorted(gpu.mig_devices, key=lambda m: m.index):
        counts[mig.profile] = counts.get(mig.profile, 0) + 1
    return ", ".join(p if n == 1 else f"{p} x{n}" for p, n in counts.items())


def _mig_units(gpus: Sequence[GPU]) -> list[_Unit]:
    return [_Unit(gpu, mig) for gpu in gpus for mig in sorted(gpu.mig_devices,
                                                                key=lambda m: m.index)]


def _units_none(snapshot: Snapshot) -> tuple[_Units, list[str]]:
    return {GPU_RESOURCE: [_Unit(gpu) for gpu in snapshot.gpus]}, []


def _empty_mig_problems(strategy: str, gpus: Sequence[GPU]) -> list[str]:
    return [f"mig-strategy {strategy}: {_name_gpu(gpu)} has MIG enabled but no MIG devices; "
            "it is not advertised (create MIG devices or disable MIG)"
            for gpu in gpus if gpu.mig_enabled and not gpu.mig_devices]


def _units_mixed(snapshot: Snapshot) -> tuple[_Units, list[str]]:
    units: _Units = {}
    for gpu in snapshot.gpus:
        if not gpu.mig_enabled:
            units.setdefault(GPU_RESOURCE, []).append(_Unit(gpu))
    for unit in _mig_units([gpu for gpu in snapshot.gpus if gpu.mig_enabled]):
        assert unit.mig is not None
        units.setdefault(mig_resource_name(unit.mig.profile), []).append(unit)
    return units, _empty_mig_problems("mixed", snapshot.gpus)


def _single_plan(snapshot: Snapshot) -> tuple[list[_Unit], list[str]]:
    """What ``nvidia.com/gpu`` holds under the single strategy, and what is wrong.

    nvidia.com/gpu must mean one kind of device. If every MIG device on the node has the same
    profile, it means that MIG device; otherwise (several profiles, or no MIG device at all) it
    means a whole MIG-disabled GPU. Everything else is reported, never served.
    """
    enabled = [gpu for gpu in snapshot.gpus if gpu.mig_enabled]
    disabled = [gpu for gpu in snapshot.gpus if not gpu.mig_enabled]
    if not enabled:
        return [_Unit(gpu) for gpu in disabled], []
    problems = _empty_mig_problems("single", enabled)
    mig_units = _mig_units(enabled)
    profiles = sorted({unit.mig.profile for unit in mig_units if unit.mig is not None})
    if len(profiles) == 1:
        if disabled:
            problems.append(
                f"mig-strategy single: {_name_gpus(disabled)} {_have(disabled)} MIG disabled "
                f"while other GPUs have MIG enabled; not advertised (nvidia.com/gpu is the MIG "
                f"profile {profiles[0]} on this node)")
        return mig_units, problems
    if profiles:
        per_gpu = "; ".join(f"{_name_gpu(gpu)}: {_layout(gpu)}"
                            for gpu in enabled if gpu.mig_devices)
        served = ("no MIG device is advertised, only the MIG-disabled GPUs, whole" if disabled
                  else "nothing is advertised")
        problems.append(
            f"mig-strategy single needs one MIG profile on the node, found "
            f"{', '.join(profiles)} ({per_gpu}); {served} "
            "(use mig-strategy mixed, or repartition)")
    if disabled:
        problems.append(
            f"mig-strategy single: {_name_gpus(disabled)} {_have(disabled)} MIG disabled while "
            f"{_name_gpus(enabled)} {_have(enabled)} MIG enabled; the MIG-disabled GPUs are "
            "advertised whole because no single MIG profile is usable")
    return [_Unit(gpu) for gpu in disabled], problems


def mig_single_problems(snapshot: Snapshot) -> tuple[str, ...]:
    """Why this node's layout is invalid for mig-strategy single (empty when it is valid).

    GFD labels the product ``<model>-MIG-INVALID`` when this is not empty.
    """
    return tuple(_single_plan(snapshot)[1])


def _units_single(snapshot: Snapshot) -> tuple[_Units, list[str]]:
    units, problems = _single_plan(snapshot)
    return {GPU_RESOURCE: units}, problems


_STRATEGIES = {"none": _units_none, "single": _units_single, "mixed": _units_mixed}


# --------------------------------------------------------------------------------------------
# Step 2: sharing (time-slicing or MPS).


@record
class _Shared:
    """One sharing entry applied: its units become replicas under ``name``."""

    name: str
    unshared_name: str
    units: tuple[_Unit, ...]
    replicas: int


def _matches(unit: _Unit, ref: str) -> bool:
    """Does a devices entry (GPU index, "<gpu>:<mig>", GPU or MIG UUID) select this unit?

    A GPU index or GPU UUID selects the whole GPU, or all of its MIG devices.
    """
    if ref.isdigit():
        return unit.gpu.index == int(ref)
    if ":" in ref and ref.replace(":", "", 1).isdigit():
        gpu_index, mig_index = (int(part) for part in ref.split(":"))
        return unit.mig is not None and (unit.gpu.index, unit.mig.index) == (gpu_index,
                                                                             mig_index)
    if ref.startswith("GPU-"):
        return unit.gpu.uuid == ref
    if ref.startswith("MIG-GPU-"):  # the old "MIG-GPU-<uuid>/<gi>/<ci>" form
        return unit.mig is not None and ref == (
            f"MIG-{unit.gpu.uuid}/{unit.mig.gpu_instance_id}/{unit.mig.compute_instance_id}")
    return unit.mig is not None and unit.mig.uuid == ref


def _select(units: Sequence[_Unit], devices: int | tuple[str, ...] | None,
            label: str) -> tuple[list[_Unit], list[str]]:
    """The units a ``devices`` selection picks (in unit order) and problems with it."""
    if devices is None:
        return list(units), []
    if isinstance(devices, int):
        problems = []
        if devices > len(units):
            problems.append(f"{label}: devices asks for {devices} but the node has "
                            f"{len(units)}; all {len(units)} are shared")
        return list(units[:devices]), problems
    problems = [f"{label}: devices entry {ref!r} matches no device of this resource; ignored"
                for ref in devices if not any(_matches(unit, ref) for unit in units)]
    return [unit for unit in units if any(_matches(unit, ref) for ref in devices)], problems


def _apply_entry(units: _Units, section: TimeSlicing | Mps, label: str,
                 entry: ReplicatedResource, taken: set[str]) -> tuple[_Shared | None, list[str]]:
    available = units.get(entry.name, [])
    if not available:
        offered = ", ".join(sorted(name for name, found in units.items() if found)) or "nothing"
        return None, [f"{label}: no such resource on this node (it offers {offered}); ignored"]
    name = section.shared_name(entry)
    if name != entry.name and (units.get(name) or name in taken):
        return None, [f"{label}: cannot advertise replicas as {name}: that resource already "
                      f"exists on this node; {entry.name} is not shared"]
    selected, problems = _select(available, entry.devices, label)
    if name == entry.name and len(selected) < len(available):
        problems.append(f"{label}: devices selection ignored, all {len(available)} devices are "
                        f"shared: the unselected devices would need to stay under {entry.name}, "
                        "so the replicas need another name (set rename or renameByDefault)")
        selected = list(available)
    if not selected:
        return None, problems
    return _Shared(name, entry.name, tuple(selected), entry.replicas), problems


def _mps_refusal(applied: _Shared, label: str) -> str | None:
    """Why an MPS server cannot serve ``applied`` (None when it can): MIG devices (mig-strategy
    single makes nvidia.com/gpu MIG devices), or more replicas than a GPU takes MPS clients."""
    not_advertised = f"{applied.name} is not advertised"
    migs = [unit for unit in applied.units if unit.mig is not None]
    if migs:
        return (f"{label}: {MPS_NOT_FOR_MIG} ({', '.join(unit.uuid for unit in migs)}); "
                f"{not_advertised}")
    over = [unit.gpu for unit in applied.units if applied.replicas > mps_max_clients(unit.gpu)]
    if not over:
        return None
    gpus = ", ".join(f"{_name_gpu(gpu)} with compute capability "
                     f"{gpu.compute_capability[0]}.{gpu.compute_capability[1]} takes at most "
                     f"{mps_max_clients(gpu)}" for gpu in over)
    return (f"{label}: {applied.replicas} replicas exceed the MPS clients per GPU: {gpus} "
            f"({MPS_MAX_CLIENTS} from compute capability 7.5, else "
            f"{MPS_MAX_CLIENTS_BEFORE_7_5}); {not_advertised}")


def _device(unit: _Unit, unhealthy: Collection[str], replica: int | None = None) -> Device:
    sick = unit.gpu.uuid in unhealthy or unit.uuid in unhealthy
    device_id = unit.uuid if replica is None else f"{unit.uuid}::{replica}"
    return Device(id=device_id, uuid=unit.uuid, gpu=unit.gpu, mig=unit.mig, replica=replica,
                  healthy=not sick)


def build_resource_map(snapshot: Snapshot, config: Config,
                       unhealthy: Collection[str] = ()) -> ResourceMap:
    """Everything the node advertises under ``config``, with health applied.

    ``unhealthy`` holds GPU or MIG UUIDs; a GPU UUID also marks its MIG devices and all their
    replicas unhealthy. Pure and deterministic: resources sorted by name, devices by GPU index,
    MIG index, then replica. A resource with no devices is omitted. Raises ValueError only for
    an unknown MIG strategy (a Config built without validation).
    """
    strategy = config.flags.mig_strategy
    if strategy not in _STRATEGIES:
        raise ValueError(f"unknown MIG strategy {strategy!r}")
    unhealthy = frozenset(unhealthy)
    units, problems = _STRATEGIES[strategy](snapshot)
    for found in units.values():
        found.sort(key=lambda unit: unit.sort_key)
    sharing_strategy = config.sharing.strategy
    section = config.sharing.active
    key = "mps" if sharing_strategy == SharingStrategy.MPS else "timeSlicing"
    shared: list[_Shared] = []
    taken: set[str] = set()
    withheld: set[str] = set()  # units of refused MPS entries: not advertised at all
    for index, entry in enumerate(section.resources):
        label = f"sharing.{key}.resources[{index}] ({entry.name})"
        applied, entry_problems = _apply_entry(units, section, label, entry, taken)
        problems.extend(entry_problems)
        if applied is None:
            continue
        refusal = (_mps_refusal(applied, label) if sharing_strategy == SharingStrategy.MPS
                   else None)
        if refusal is not None:
            problems.append(refusal)
            withheld.update(unit.uuid for unit in applied.units)
            continue
        shared.append(applied)
        taken.add(applied.name)
    resources: dict[str, Resource] = {}
    shared_uuids = {unit.uuid for applied in shared for unit in applied.units} | withheld
    for name, found in units.items():
        devices = tuple(_device(unit, unhealthy) for unit in found
                        if unit.uuid not in shared_uuids)
        if devices:
            resources[name] = Resource(name=name, devices=devices)
    for applied in shared:
        devices = tuple(_device(unit, unhealthy, replica) for unit in applied.units
                        for replica in range(applied.replicas))
        resources[applied.name] = Resource(
            name=applied.name, devices=devices, replicas=applied.replicas,
            fail_requests_greater_than_one=section.fail_requests_greater_than_one,
            unshared_name=applied.unshared_name, sharing=sharing_strategy)
    return ResourceMap(resources=dict(sorted(resources.items())), problems=tuple(problems))
