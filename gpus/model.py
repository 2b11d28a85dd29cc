"""The node's GPUs as plain immutable data: what NVML said, read once.

Everything downstream (the device plugin's resource map, GFD's labels, the allocator) is a pure
function of a :class:`Snapshot`, so the same fixtures test all of them and nothing but
``gpus.nvml`` ever talks to NVML.
"""

from __future__ import annotations

from dataclasses import field
from enum import IntEnum

from gpus.records import record

# NVML reports memory in bytes; labels, profiles and the fake speak MiB.
MIB = 1 << 20


class TopologyLevel(IntEnum):
    """NVML's ``nvmlGpuTopologyLevel_t``: the closest common ancestor of two GPUs.

    Values are NVML's own, so a reader can convert with ``TopologyLevel(value)``.
    """

    INTERNAL = 0  # same board (e.g. the two GPUs of a dual-GPU card)
    SINGLE = 10  # one PCIe switch
    MULTIPLE = 20  # several PCIe switches, no host bridge
    HOSTBRIDGE = 30  # the same host bridge
    NODE = 40  # the same NUMA node / CPU, across host bridges
    SYSTEM = 50  # across CPUs (SMP interconnect)


def sysfs_bus_id(bus_id: str) -> str:
    """NVML's "00000000:07:00.0" as sysfs spells it: "0000:07:00.0".

    sysfs prints the domain with at least four hex digits, so a domain above 0xffff (as on some
    multi-segment hosts: NVML "00010000:06:00.0") keeps its digits ("10000:06:00.0") instead of
    being cut to four and colliding with domain 0.
    """
    domain, _, rest = bus_id.strip().lower().partition(":")
    try:
        return f"{int(domain, 16):04x}:{rest}"
    except ValueError:
        return f"{domain}:{rest}"  # not a bus id NVML would give: leave it for the caller's error


@record
class Link:
    """How two GPUs are connected: their PCIe common ancestor and NVLink count."""

    level: TopologyLevel
    nvlinks: int = 0


@record(shared_init=True)
class SystemInfo:
    """Node-wide versions."""

    driver_version: str  # e.g. "535.129.03"
    cuda_driver_version: int  # NVML's integer form, e.g. 12020 for CUDA 12.2
    nvml_version: str = ""


@record
class MigDevice:
    """One MIG device (a GPU instance + compute instance pair) on a MIG-enabled GPU."""

    uuid: str  # "MIG-..."
    index: int  # position among the parent's MIG devices (nvmlDeviceGetMigDeviceHandleByIndex)
    parent_index: int
    parent_uuid: str
    gpu_instance_id: int
    compute_instance_id: int
    profile: str  # NVIDIA's name: "1g.5gb", "3g.20gb", "1c.2g.10gb", "1g.10gb+me"
    memory_bytes: int
    gpu_instance_slices: int
    compute_instance_slices: int
    multiprocessors: int = 0
    copy_engines: int = 0
    decoders: int = 0
    encoders: int = 0
    jpeg_decoders: int = 0
    ofa_engines: int = 0


FABRIC_STATE_COMPLETED = 3  # NVML_GPU_FABRIC_STATE_COMPLETED
NVML_SUCCESS = 0
ZERO_UUID = "00000000-0000-0000-0000-000000000000"


@record
class GpuFabric:
    """``nvmlDeviceGetGpuFabricInfo(V)``: the GPU's place in a multi-node NVLink fabric.

    ``error`` is the NVML error name when the query failed with something other than
    NOT_SUPPORTED / FUNCTION_NOT_FOUND (which mean "no fabric": ``GPU.fabric`` is None).
    """

    cluster_uuid: str = ZERO_UUID  # 8-4-4-4-12, lower case
    clique_id: int = 0
    state: int = 0  # NVML_GPU_FABRIC_STATE_*
    status: int = NVML_SUCCESS  # the nvmlReturn_t of the GPU's fabric registration
    error: str = ""

    @property
    def attached(self) -> bool:
        """go-nvlib's IsFabricAttached: registration completed, succeeded, in a real cluster.

        A zero cluster UUID is what single-node NVSwitch systems report: not an IMEX domain.
        """
        return (not self.error and self.state == FABRIC_STATE_COMPLETED
                and self.status == NVML_SUCCESS and self.cluster_uuid != ZERO_UUID)


@record
class GPU:
    """One physical GPU as NVML reports it."""

    index: int
    uuid: str  # "GPU-..."
    name: str  # "NVIDIA A100-SXM4-40GB"
    memory_bytes: int
    compute_capability: tuple[int, int]  # (8, 0)
    architecture: str  # lower-case NVML architecture: "ampere", "hopper", ... or "unknown"
    brand: str  # "Nvidia", "Tesla", ... (NVML brand without the prefix), or "unknown"
    minor: int  # /dev/nvidia<minor>
    pci_bus_id: str  # as NVML reports it: "00000000:07:00.0"
    pci_device_id: int = 0  # NVML's combined id: device << 16 | vendor (e.g. 0x20B010DE)
    pci_class: int | None = None  # sysfs class >> 8: 0x0302 (3D controller), 0x0300 (VGA)
    numa_node: int | None = None  # from sysfs; None when absent or negative
    mig_capable: bool = False
    mig_enabled: bool = False
    mig_devices: tuple[MigDevice, ...] = ()
    fabric: GpuFabric | None = None  # None: the GPU (or driver) has no fabric info

    @property
    def sysfs_bus_id(self) -> str:
        """The bus id as sysfs spells it ("0000:07:00.0"); see :func:`sysfs_bus_id`."""
        return sysfs_bus_id(self.pci_bus_id)


@record(shared_init=True)
class VgpuInfo:
    """Whether the node is a vGPU guest, from NVIDIA PCI functions' config space (not NVML).

    ``error`` says why it could not be told (e.g. a config space cut to 64 bytes for an
    unprivileged reader); ``present`` is then False but means "unknown".
    """

    present: bool
    host_driver_version: str = ""
    host_driver_branch: str = ""
    error: str = ""


@record(shared_init=True)
class Snapshot:
    """Everything read from NVML in one pass.

    ``links[i][j]`` describes GPUs at positions ``i`` and ``j`` of ``gpus`` (not NVML indices,
    though the two coincide for a full read); the diagonal is ``Link(INTERNAL)``.
    """

    system: SystemInfo
    gpus: tuple[GPU, ...] = ()
    links: tuple[tuple[Link, ...], ...] = field(default=())
    vgpu: VgpuInfo | None = None  # None: not read (hand-built snapshots)

    def link(self, i: int, j: int) -> Link:
        """The link between the GPUs at positions ``i`` and ``j``."""
        return self.links[i][j]

    def gpu_by_uuid(self, uuid: str) -> GPU | None:
        """The GPU with this UUID, or None."""
        for gpu in self.gpus:
            if gpu.uuid == uuid:
                return gpu
        return None
