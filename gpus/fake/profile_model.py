"""The data model of a machine profile: frozen dataclasses and the vocabulary profiles use.

Built once per profile load, so its records share even ``__init__`` (``shared_init``,
gpus/records.py): the fake starts with every daemon under test and in the benchmarks."""

from __future__ import annotations

import math

from gpus.model import MIB, sysfs_bus_id
from gpus.records import record

ARCHITECTURES = (
    "kepler",
    "maxwell",
    "pascal",
    "volta",
    "turing",
    "ampere",
    "ada",
    "hopper",
    "blackwell",
)
BRANDS = ("unknown", "quadro", "tesla", "nvs", "grid", "geforce", "titan", "nvidia")
GI_PROFILES = (
    "1_SLICE",
    "2_SLICE",
    "3_SLICE",
    "4_SLICE",
    "7_SLICE",
    "8_SLICE",
    "6_SLICE",
    "1_SLICE_REV1",
    "2_SLICE_REV1",
    "1_SLICE_REV2",
    "1_SLICE_GFX",
    "2_SLICE_GFX",
    "4_SLICE_GFX",
    "1_SLICE_NO_ME",
    "2_SLICE_NO_ME",
    "1_SLICE_ALL_ME",
    "2_SLICE_ALL_ME",
    "3_SLICE_GFX",
)
# nvmlGpuTopologyLevel_t by the names profiles use.
TOPOLOGY_LEVELS = {
    "internal": 0,
    "single": 10,
    "multiple": 20,
    "hostbridge": 30,
    "node": 40,
    "system": 50,
}
# NVSwitch PCI device ids (device << 16 | vendor) by generation: V100 (DGX-2), A100, H100.
NVSWITCH_PCI_DEVICE_IDS = frozenset({0x1AC010DE, 0x1AC110DE, 0x1AC210DE, 0x1AF110DE, 0x22A310DE})


class ProfileError(ValueError):
    """A profile that cannot be loaded: message is ``<file>: <field path>: <reason>``."""


@record(shared_init=True)
class MigProfile:
    """One GPU instance profile of a model (a row of ``nvidia-smi mig -lgip``)."""

    profile: str  # NVML_GPU_INSTANCE_PROFILE_<profile>, e.g. "1_SLICE_REV1"
    id: int  # the profile id NVML reports (19 for A100 1g.5gb)
    name: str  # NVIDIA's name, e.g. "1g.5gb+me"
    slices: int
    instances: int
    memory_mib: int
    multiprocessors: int
    copy_engines: int = 0
    decoders: int = 0
    encoders: int = 0
    jpeg: int = 0
    ofa: int = 0

    @property
    def constant(self) -> int:
        """The NVML_GPU_INSTANCE_PROFILE_* value."""
        return GI_PROFILES.index(self.profile)


@record(shared_init=True)
class Model:
    """A GPU model and the figures NVML reports for it."""

    key: str
    name: str
    memory_bytes: int
    compute_capability: tuple[int, int]
    architecture: str
    brand: str
    pci_device_id: int
    pci_subsystem_id: int = 0
    pci_class: int = 0x030200
    nvlinks: int = 0
    mig_slices: int = 0
    mig_profiles: tuple[MigProfile, ...] = ()

    @property
    def mig_capable(self) -> bool:
        """Whether the model supports MIG."""
        return bool(self.mig_profiles)

    @property
    def memory_mib(self) -> int:
        """Total memory in MiB."""
        return self.memory_bytes // MIB

    def mig_profile(self, name: str) -> MigProfile | None:
        """The GPU instance profile with this name, or None."""
        return next((p for p in self.mig_profiles if p.name == name), None)

    def memory_eighths(self, profile: MigProfile) -> int:
        """How many of the GPU's eight memory slices the profile takes."""
        return math.ceil(profile.memory_mib / self.memory_mib * 8)


@record(shared_init=True)
class ComputeInstance:
    """A compute instance inside a GPU instance: one MIG device."""

    id: int
    slices: int


@record(shared_init=True)
class GpuInstance:
    """A GPU instance on a MIG-enabled GPU."""

    id: int
    profile: MigProfile
    placement_start: int
    compute_instances: tuple[ComputeInstance, ...]


# nvmlGpuFabricState_t by the names profiles use.
FABRIC_STATES = {"not_supported": 0, "not_started": 1, "in_progress": 2, "completed": 3}


@record(shared_init=True)
class FabricSpec:
    """What ``nvmlDeviceGetGpuFabricInfo(V)`` answers for a GPU on an NVLink fabric."""

    cluster_uuid: str  # canonical 8-4-4-4-12
    clique_id: int
    state: int  # NVML_GPU_FABRIC_STATE_*
    status: int  # nvmlReturn_t of the fabric registration (0: success)


@record(shared_init=True)
class VgpuSpec:
    """A vGPU guest: the host driver the hypervisor reports in each GPU's PCI config space."""

    host_driver_version: str  # e.g. "550.54.16", at most 10 bytes (NVIDIA's record)
    host_driver_branch: str  # e.g. "r550_00", at most 10 bytes


VGPU_FIELD_BYTES = 10  # the host driver record holds 10 bytes of version and 10 of branch


@record(shared_init=True)
class GpuSpec:
    """One GPU of a profile."""

    index: int
    uuid: str
    model: Model
    bus_id: str  # NVML form: "00000000:07:00.0"
    minor: int
    numa_node: int | None
    pci_class: int
    mig_enabled: bool = False
    gpu_instances: tuple[GpuInstance, ...] = ()
    fabric: FabricSpec | None = None  # None: the fabric call answers NOT_SUPPORTED

    @property
    def sysfs_bus_id(self) -> str:
        """The bus id as sysfs spells it: "0000:07:00.0"."""
        return sysfs_bus_id(self.bus_id)


@record(shared_init=True)
class NvSwitchSpec:
    """NVSwitches every GPU's NVLinks go to (round robin over the switches)."""

    bus_ids: tuple[str, ...]
    pci_device_id: int


@record(shared_init=True)
class Topology:
    """Pairwise PCIe common-ancestor levels and direct NVLink counts (symmetric matrices)."""

    levels: tuple[tuple[int, ...], ...]
    nvlinks: tuple[tuple[int, ...], ...]
    nvswitch: NvSwitchSpec | None = None


@record(shared_init=True)
class Profile:
    """A machine: system versions, GPUs and their topology."""

    name: str
    description: str
    source: str
    driver_version: str
    cuda_driver_version: int
    nvml_version: str
    gpus: tuple[GpuSpec, ...]
    topology: Topology
    # The machine type GFD would read from the DMI product name; defaults to the profile name.
    machine: str = ""
    vgpu: VgpuSpec | None = None  # a vGPU guest: every GPU's config space carries the record
