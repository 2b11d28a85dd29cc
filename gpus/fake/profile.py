"""Machine profiles: YAML descriptions of real node shapes that the fake NVML serves.

A profile names its GPUs' models (figures in ``gpus/profiles/_models.yaml``), their PCI bus ids,
NUMA nodes, MIG layouts and the topology between them. The loader validates everything and
reports errors as ``<file>: <field path>: <reason>``. The format is documented in
``docs/profiles.md``.
"""

from __future__ import annotations

import functools
import math
import os
import re
import uuid as uuidlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pynvml
import yaml

from gpus.model import MIB, sysfs_bus_id

PROFILES_DIR = Path(__file__).resolve().parent.parent / "profiles"
MODELS_FILE = PROFILES_DIR / "_models.yaml"
# Limits: a profile is data from outside (a ConfigMap, a path on the command line), and the
# fake turns it into NVML answers and O(GPUs^2) topology matrices, so everything is bounded.
# The shipped profiles are at most a few KiB.
MAX_PROFILE_BYTES = 1 << 20
# Real nodes have at most a few dozen GPUs (16 on an HGX-16, 72 per NVL72 rack across 18 nodes).
MAX_GPUS = 64
# GPU instance profiles go up to 8 slices (NVML_GPU_INSTANCE_PROFILE_8_SLICE): at most 8 compute
# slices, so at most 8 MIG devices per GPU.
MAX_MIG_SLICES = 8
# GPU instance ids the driver's mig-minors file has slots for (gpu<g>/gi0..gi14).
MAX_GPU_INSTANCE_ID = 14
# /dev/nvidia<minor>: the driver numbers GPUs 0..254; minor 255 is /dev/nvidiactl.
MAX_MINOR = 254
MAX_NUMA_NODE = 1023  # Linux's MAX_NUMNODES at its largest (CONFIG_NODES_SHIFT=10)
MAX_EXTENDS_DEPTH = 8
# The C types NVML reports values in.
C_INT_MAX = (1 << 31) - 1
C_UINT_MAX = (1 << 32) - 1
C_ULLONG_MAX = (1 << 64) - 1
# Buffer sizes of the string calls (NUL included), as pynvml allocates them.
DRIVER_VERSION_BUFFER = 80  # NVML_SYSTEM_DRIVER_VERSION_BUFFER_SIZE (NVML version too)
NAME_BUFFER = 96  # NVML_DEVICE_NAME_V2_BUFFER_SIZE (GPU instance profile names too)
UUID_BUFFER = 96  # NVML_DEVICE_UUID_V2_BUFFER_SIZE
NVLINK_MAX_LINKS = 18  # NVML_NVLINK_MAX_LINKS of the NVML the shipped driver versions carry
_UUID = re.compile(r"^GPU-[A-Za-z0-9._-]+$")
# libyaml's loader when PyYAML was built with it: parsing is ~7x faster, which is most of the
# fake backend's start-up cost; same safe constructors, same results.
_SAFE_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

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
_BUS_ID = re.compile(
    r"^(?:([0-9A-Fa-f]{4}|[0-9A-Fa-f]{8}):)?([0-9A-Fa-f]{2}):([0-9A-Fa-f]{2})\.([0-7])$"
)
_MIG_NAME = re.compile(r"^(?:(\d+)c\.)?(\d+g\..+)$")
# GPU instance ids NVML hands out on 7-slice GPUs, by (compute slices, memory eighths): the fake
# takes the first free one so ids look like a real A100/H100's.
_GI_ID_POOLS: dict[tuple[int, int], tuple[int, ...]] = {
    (7, 8): (0,),
    (4, 4): (1,),
    (3, 4): (1, 2),
    (2, 2): (3, 4, 5),
    (1, 2): (3, 4, 5, 6),
    (1, 1): (7, 8, 9, 10, 11, 12, 13),
}


class ProfileError(ValueError):
    """A profile that cannot be loaded: message is ``<file>: <field path>: <reason>``."""


@dataclass(frozen=True)
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


@dataclass(frozen=True)
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


@dataclass(frozen=True)
class ComputeInstance:
    """A compute instance inside a GPU instance: one MIG device."""

    id: int
    slices: int


@dataclass(frozen=True)
class GpuInstance:
    """A GPU instance on a MIG-enabled GPU."""

    id: int
    profile: MigProfile
    placement_start: int
    compute_instances: tuple[ComputeInstance, ...]


# nvmlGpuFabricState_t by the names profiles use.
FABRIC_STATES = {"not_supported": 0, "not_started": 1, "in_progress": 2, "completed": 3}


@dataclass(frozen=True)
class FabricSpec:
    """What ``nvmlDeviceGetGpuFabricInfo(V)`` answers for a GPU on an NVLink fabric."""

    cluster_uuid: str  # canonical 8-4-4-4-12
    clique_id: int
    state: int  # NVML_GPU_FABRIC_STATE_*
    status: int  # nvmlReturn_t of the fabric registration (0: success)


@dataclass(frozen=True)
class VgpuSpec:
    """A vGPU guest: the host driver the hypervisor reports in each GPU's PCI config space."""

    host_driver_version: str  # e.g. "550.54.16", at most 10 bytes (NVIDIA's record)
    host_driver_branch: str  # e.g. "r550_00", at most 10 bytes


VGPU_FIELD_BYTES = 10  # the host driver record holds 10 bytes of version and 10 of branch


@dataclass(frozen=True)
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


@dataclass(frozen=True)
class NvSwitchSpec:
    """NVSwitches every GPU's NVLinks go to (round robin over the switches)."""

    bus_ids: tuple[str, ...]
    pci_device_id: int


@dataclass(frozen=True)
class Topology:
    """Pairwise PCIe common-ancestor levels and direct NVLink counts (symmetric matrices)."""

    levels: tuple[tuple[int, ...], ...]
    nvlinks: tuple[tuple[int, ...], ...]
    nvswitch: NvSwitchSpec | None = None


@dataclass(frozen=True)
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


def list_profiles() -> list[str]:
    """Names of the shipped profiles."""
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml") if not p.name.startswith("_"))


def load_profile(name_or_path: str | Path, *, max_bytes: int = MAX_PROFILE_BYTES) -> Profile:
    """Load and validate a shipped profile by name, or any profile file by path.

    A file (or a file it ``extends``) larger than ``max_bytes`` is refused before it is read.
    """
    path = _resolve(name_or_path)
    raw = _load_raw(path, (), max_bytes)
    return _Builder(str(path), raw).build()


def _resolve(name_or_path: str | Path) -> Path:
    text = str(name_or_path)
    if isinstance(name_or_path, Path) or "/" in text or text.endswith((".yaml", ".yml")):
        path = Path(text)
        if not path.is_file():
            raise ProfileError(f"{text}: no such profile file")
        return path
    path = PROFILES_DIR / f"{text}.yaml"
    if text.startswith("_") or not path.is_file():
        raise ProfileError(
            f"{text}: unknown profile (shipped: {', '.join(list_profiles())}; "
            "'fake-nvml list' describes them; or give a path to a .yaml file)"
        )
    return path


def _read_text(path: Path, max_bytes: int) -> str:
    """The file's text; ProfileError for a file over ``max_bytes``, checked before reading."""
    too_big = f"{path}: larger than the {max_bytes} bytes a profile may have"
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        if size > max_bytes:
            raise ProfileError(f"{too_big} ({size} bytes)")
        # The size can lie (a file still growing, /proc): never read more than the limit.
        data = file.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ProfileError(too_big)
    return data.decode()


def _read_yaml(path: Path, max_bytes: int = MAX_PROFILE_BYTES) -> dict[str, Any]:
    try:
        data = yaml.load(_read_text(path, max_bytes), Loader=_SAFE_LOADER)
    # Not UTF-8, nested deeper than the parser recurses, or too big even within the size limit:
    # still the profile's fault.
    except (OSError, UnicodeDecodeError, RecursionError, MemoryError, yaml.YAMLError) as exc:
        raise ProfileError(f"{path}: cannot read: {exc}") from exc
    if not isinstance(data, dict):
        raise ProfileError(f"{path}: top level must be a mapping")
    return data


def _shipped_models() -> Mapping[str, Any]:
    """The raw shipped model table, parsed once per version of ``_models.yaml``."""
    try:
        mtime_ns = MODELS_FILE.stat().st_mtime_ns
    except OSError as exc:
        raise ProfileError(f"{MODELS_FILE}: cannot read: {exc}") from exc
    return _parse_models(MODELS_FILE, mtime_ns)


@functools.lru_cache(maxsize=2)
def _parse_models(path: Path, mtime_ns: int) -> Mapping[str, Any]:
    """``models`` of a model table file; cached by (path, mtime), callers must not mutate it."""
    models: Mapping[str, Any] = _read_yaml(path).get("models", {})
    return models


def _load_raw(path: Path, seen: tuple[Path, ...], max_bytes: int) -> dict[str, Any]:
    """Read a profile, resolving ``extends`` (the child's top-level keys win)."""
    if path.resolve() in seen:
        raise ProfileError(f"{path}: extends: cycle through {', '.join(map(str, seen))}")
    if len(seen) >= MAX_EXTENDS_DEPTH:
        raise ProfileError(f"{path}: extends: more than {MAX_EXTENDS_DEPTH} levels")
    data = _read_yaml(path, max_bytes)
    parent_ref = data.pop("extends", None)
    if parent_ref is None:
        return data
    if not isinstance(parent_ref, str):
        raise ProfileError(f"{path}: extends: must be a profile name or path")
    try:
        parent_path = _resolve(parent_ref)
    except ProfileError as exc:
        raise ProfileError(f"{path}: extends: {exc}") from exc
    merged = _load_raw(parent_path, (*seen, path.resolve()), max_bytes)
    merged.pop("name", None)
    merged.pop("description", None)
    merged.update(data)
    return merged


class _Builder:
    """Turns a raw profile mapping into a :class:`Profile`, naming the field of every error."""

    def __init__(self, source: str, raw: dict[str, Any]) -> None:
        self.source = source
        self.raw = raw

    def fail(self, field: str, reason: str) -> ProfileError:
        """An error for ``field``."""
        return ProfileError(f"{self.source}: {field}: {reason}")

    def get(
        self,
        data: Mapping[str, Any],
        key: str,
        field: str,
        kind: type | tuple[type, ...],
        default: Any = ...,
    ) -> Any:
        """``data[key]`` checked against ``kind`` (bool is not an int here)."""
        if key not in data or data[key] is None:
            if default is ...:
                raise self.fail(field, "required")
            return default
        value = data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds:
            raise self.fail(field, f"expected {_kind_names(kinds)}, got {value!r}")
        if not isinstance(value, kinds):
            raise self.fail(field, f"expected {_kind_names(kinds)}, got {value!r}")
        return value

    def get_int(
        self,
        data: Mapping[str, Any],
        key: str,
        field: str,
        bounds: tuple[int, int, str],
        default: Any = ...,
    ) -> Any:
        """An integer ``data[key]`` within ``bounds`` = (low, high, what NVML reports it as)."""
        value = self.get(data, key, field, int, default)
        low, high, ctype = bounds
        if isinstance(value, int) and not low <= value <= high:
            raise self.fail(field, f"{value} is out of range {low}..{high} ({ctype})")
        return value

    def get_str(
        self, data: Mapping[str, Any], key: str, field: str, buffer: int, default: Any = ...
    ) -> Any:
        """A string ``data[key]`` that fits, NUL included, in NVML's ``buffer`` bytes."""
        value = self.get(data, key, field, str, default)
        if isinstance(value, str):
            self.check_length(value, field, buffer)
        return value

    def check_length(self, text: str, field: str, buffer: int) -> None:
        """Refuse a string NVML could not return in a ``buffer``-byte buffer."""
        if len(text.encode()) >= buffer:
            raise self.fail(field, f"longer than the {buffer - 1} bytes NVML can return")

    def check_keys(self, data: Mapping[str, Any], allowed: Iterable[str], field: str) -> None:
        """Reject unknown keys (typos would otherwise be silently ignored)."""
        unknown = sorted(set(map(str, data)) - set(allowed))
        if unknown:
            prefix = f"{field}." if field else ""
            raise self.fail(
                f"{prefix}{unknown[0]}", f"unknown field (allowed: {', '.join(allowed)})"
            )

    def build(self) -> Profile:
        """Validate and build the profile."""
        raw = self.raw
        self.check_keys(
            raw,
            (
                "name",
                "description",
                "driver_version",
                "cuda_driver_version",
                "nvml_version",
                "machine",
                "models",
                "defaults",
                "gpus",
                "mig",
                "topology",
                "vgpu",
            ),
            "",
        )
        name = self.get(raw, "name", "name", str)
        driver = self.get_str(raw, "driver_version", "driver_version", DRIVER_VERSION_BUFFER)
        # Bounded before the models: a huge gpus list must not cost anything.
        self.get(raw, "gpus", "gpus", list)
        if len(raw["gpus"]) > MAX_GPUS:
            raise self.fail(
                "gpus", f"{len(raw['gpus'])} GPUs, more than the {MAX_GPUS} a node can have"
            )
        models = self.models()
        gpus = self.gpus(name, models)
        return Profile(
            name=name,
            description=self.get(raw, "description", "description", str, ""),
            source=self.source,
            driver_version=driver,
            cuda_driver_version=self.get_int(
                raw, "cuda_driver_version", "cuda_driver_version", _C_INT
            ),
            nvml_version=self.get_str(
                raw, "nvml_version", "nvml_version", DRIVER_VERSION_BUFFER, f"12.{driver}"
            ),
            machine=self.get(raw, "machine", "machine", str, name),
            gpus=gpus,
            topology=self.topology(gpus),
            vgpu=self.vgpu(),
        )

    def vgpu(self) -> VgpuSpec | None:
        """The optional ``vgpu`` section: the host driver a vGPU guest sees."""
        raw = self.get(self.raw, "vgpu", "vgpu", dict, None)
        if raw is None:
            return None
        self.check_keys(raw, ("host_driver_version", "host_driver_branch"), "vgpu")
        values = []
        for key in ("host_driver_version", "host_driver_branch"):
            text = self.get(raw, key, f"vgpu.{key}", str)
            if not text.isascii() or not text.isprintable() or not text:
                raise self.fail(f"vgpu.{key}", "expected printable ASCII text")
            if len(text) > VGPU_FIELD_BYTES:
                raise self.fail(f"vgpu.{key}", f"longer than the {VGPU_FIELD_BYTES} bytes of "
                                "the PCI capability record")
            values.append(text)
        return VgpuSpec(host_driver_version=values[0], host_driver_branch=values[1])

    def fabric(self, data: Mapping[str, Any], field: str) -> FabricSpec | None:
        """A GPU's ``fabric`` (``defaults`` may give it to every GPU)."""
        raw = self.get(data, "fabric", field, dict, None)
        if raw is None:
            return None
        self.check_keys(raw, ("cluster_uuid", "clique_id", "state", "status"), field)
        text = self.get(raw, "cluster_uuid", f"{field}.cluster_uuid", str)
        try:
            cluster = str(uuidlib.UUID(text))
        except ValueError:
            raise self.fail(f"{field}.cluster_uuid", f"{text!r} is not a UUID") from None
        state = self.get(raw, "state", f"{field}.state", str, "completed")
        if state not in FABRIC_STATES:
            raise self.fail(f"{field}.state", f"unknown {state!r} (one of "
                            f"{', '.join(FABRIC_STATES)})")
        status = self.get(raw, "status", f"{field}.status", str, "success")
        code = 0 if status == "success" else getattr(pynvml, status, None)
        if not isinstance(code, int) or not (status == "success"
                                             or status.startswith("NVML_ERROR_")):
            raise self.fail(f"{field}.status", f"{status!r} is not success or an NVML_ERROR_ name")
        return FabricSpec(
            cluster_uuid=cluster,
            clique_id=self.get_int(raw, "clique_id", f"{field}.clique_id", _C_UINT),
            state=FABRIC_STATES[state],
            status=code,
        )

    # -- models ---------------------------------------------------------------------------------

    def models(self) -> dict[str, Model]:
        """The shipped models plus any the profile defines."""
        shipped = _shipped_models()
        extra = self.get(self.raw, "models", "models", dict, {})
        raw_models = {**shipped, **extra}
        built: dict[str, Model] = {}
        for key in raw_models:
            built[str(key)] = self.model(str(key), raw_models)
        return built

    def model(self, key: str, raw_models: Mapping[str, Any]) -> Model:
        """Build one model (``mig_table`` borrows another model's MIG profiles)."""
        field = f"models.{key}"
        data = raw_models[key]
        if not isinstance(data, dict):
            raise self.fail(field, "must be a mapping")
        self.check_keys(
            data,
            (
                "name",
                "memory_bytes",
                "compute_capability",
                "architecture",
                "brand",
                "pci_device_id",
                "pci_subsystem_id",
                "pci_class",
                "nvlinks",
                "mig_slices",
                "mig",
                "mig_table",
            ),
            field,
        )
        cc = self.get(data, "compute_capability", f"{field}.compute_capability", list)
        if len(cc) != 2 or not all(
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= C_INT_MAX for v in cc
        ):
            raise self.fail(
                f"{field}.compute_capability", f"expected [major, minor], each 0..{C_INT_MAX}"
            )
        arch = self.get(data, "architecture", f"{field}.architecture", str)
        if arch not in (*ARCHITECTURES, "unknown"):
            raise self.fail(
                f"{field}.architecture", f"unknown {arch!r} (one of {', '.join(ARCHITECTURES)})"
            )
        brand = self.get(data, "brand", f"{field}.brand", str)
        if brand not in BRANDS:
            raise self.fail(f"{field}.brand", f"unknown {brand!r} (one of {', '.join(BRANDS)})")
        memory = self.get(data, "memory_bytes", f"{field}.memory_bytes", int)
        if memory <= 0 or memory % MIB or memory > C_ULLONG_MAX:
            raise self.fail(
                f"{field}.memory_bytes",
                f"must be a positive whole number of MiB up to {C_ULLONG_MAX} "
                "(NVML reports it as an unsigned long long)",
            )
        mig_raw = data.get("mig")
        mig_field = f"{field}.mig"
        table_ref = data.get("mig_table")
        if table_ref is not None:
            if table_ref not in raw_models or not isinstance(raw_models[table_ref], dict):
                raise self.fail(f"{field}.mig_table", f"unknown model {table_ref!r}")
            mig_raw = raw_models[table_ref].get("mig")
            mig_field = f"models.{table_ref}.mig"
        name = self.get_str(data, "name", f"{field}.name", NAME_BUFFER)
        mig_profiles = self.mig_table(mig_raw or [], mig_field)
        for mig in mig_profiles:
            # A MIG device's name is "<GPU name> MIG <c>c.<profile>".
            self.check_length(f"{name} MIG 8c.{mig.name}", f"{field}.name", NAME_BUFFER)
        return Model(
            key=key,
            name=name,
            memory_bytes=memory,
            compute_capability=(cc[0], cc[1]),
            architecture=arch,
            brand=brand,
            pci_device_id=self.get_int(data, "pci_device_id", f"{field}.pci_device_id", _C_UINT),
            pci_subsystem_id=self.get_int(
                data, "pci_subsystem_id", f"{field}.pci_subsystem_id", _C_UINT, 0
            ),
            pci_class=self.get_int(data, "pci_class", f"{field}.pci_class", _PCI_CLASS, 0x030200),
            nvlinks=self.get_int(data, "nvlinks", f"{field}.nvlinks", _NVLINKS, 0),
            mig_slices=self.get_int(
                data, "mig_slices", f"{field}.mig_slices", _MIG_SLICES, 7 if mig_raw else 0
            ),
            mig_profiles=mig_profiles,
        )

    def mig_table(self, rows: Any, field: str) -> tuple[MigProfile, ...]:
        """A model's GPU instance profiles."""
        if not isinstance(rows, list):
            raise self.fail(field, "must be a list")
        out = []
        for i, row in enumerate(rows):
            f = f"{field}[{i}]"
            if not isinstance(row, dict):
                raise self.fail(f, "must be a mapping")
            self.check_keys(row, MigProfile.__dataclass_fields__, f)
            profile = self.get(row, "profile", f"{f}.profile", str)
            if profile not in GI_PROFILES:
                raise self.fail(
                    f"{f}.profile", f"unknown {profile!r} (one of {', '.join(GI_PROFILES)})"
                )
            ints = {
                k: self.get_int(row, k, f"{f}.{k}", bounds, 0 if k in _ENGINE_FIELDS else ...)
                for k, bounds in _MIG_PROFILE_BOUNDS.items()
            }
            # nvmlGpuInstanceProfileInfo_v2_t.name is "MIG <name>".
            name = self.get(row, "name", f"{f}.name", str)
            self.check_length(f"MIG {name}", f"{f}.name", NAME_BUFFER)
            out.append(MigProfile(profile=profile, name=name, **ints))
        return tuple(out)

    # -- GPUs -----------------------------------------------------------------------------------

    def gpus(self, profile_name: str, models: Mapping[str, Model]) -> tuple[GpuSpec, ...]:
        """Every GPU entry, with defaults and MIG layouts applied."""
        entries = self.get(self.raw, "gpus", "gpus", list)
        if not entries:
            raise self.fail("gpus", "at least one GPU is required")
        defaults = self.get(self.raw, "defaults", "defaults", dict, {})
        mig_overrides = self.get(self.raw, "mig", "mig", dict, {})
        for key in mig_overrides:
            if key != "all" and not (isinstance(key, int) and 0 <= key < len(entries)):
                raise self.fail(
                    f"mig.{key}", f"expected 'all' or a GPU index 0..{len(entries) - 1}"
                )
        out: list[GpuSpec] = []
        bus_ids: set[str] = set()
        for index, entry in enumerate(entries):
            field = f"gpus[{index}]"
            if not isinstance(entry, dict):
                raise self.fail(field, "must be a mapping")
            data = {**defaults, **entry}
            self.check_keys(
                data,
                ("model", "bus_id", "numa_node", "minor", "uuid", "mig", "pci_class", "fabric"),
                field,
            )
            model_key = self.get(data, "model", f"{field}.model", str)
            if model_key not in models:
                raise self.fail(
                    f"{field}.model",
                    f"unknown model {model_key!r} (known: {', '.join(sorted(models))})",
                )
            model = models[model_key]
            bus_id = self.bus_id(
                self.get(data, "bus_id", f"{field}.bus_id", str), f"{field}.bus_id"
            )
            if bus_id in bus_ids:
                raise self.fail(f"{field}.bus_id", f"duplicate bus id {bus_id}")
            bus_ids.add(bus_id)
            numa = self.get_int(data, "numa_node", f"{field}.numa_node", _NUMA, None)
            mig_field, mig_value = f"{field}.mig", data.get("mig")
            for key in ("all", index):
                if key in mig_overrides:
                    mig_field, mig_value = f"mig.{key}", mig_overrides[key]
            uuid = self.uuid(data, field, profile_name, index)
            minor = self.get_int(data, "minor", f"{field}.minor", _MINOR, index)
            for other in out:
                if other.uuid == uuid:
                    raise self.fail(f"{field}.uuid", f"duplicate UUID {uuid} (GPU {other.index})")
                if other.minor == minor:
                    raise self.fail(
                        f"{field}.minor", f"duplicate minor number {minor} (GPU {other.index})"
                    )
            enabled, instances = self.mig_layout(model, mig_value, mig_field)
            out.append(
                GpuSpec(
                    index=index,
                    uuid=uuid,
                    model=model,
                    bus_id=bus_id,
                    minor=minor,
                    numa_node=numa if numa is None or numa >= 0 else None,
                    pci_class=self.get_int(
                        data, "pci_class", f"{field}.pci_class", _PCI_CLASS, model.pci_class
                    ),
                    mig_enabled=enabled,
                    gpu_instances=instances,
                    fabric=self.fabric(data, f"{field}.fabric"),
                )
            )
        return tuple(out)

    def uuid(self, data: Mapping[str, Any], field: str, profile_name: str, index: int) -> str:
        """A GPU's UUID: given ("GPU-" and characters a UUID list can carry) or derived."""
        seed = f"fake-nvml/{profile_name}/{index}"
        uuid: str = self.get_str(
            data,
            "uuid",
            f"{field}.uuid",
            UUID_BUFFER,
            f"GPU-{uuidlib.uuid5(uuidlib.NAMESPACE_URL, seed)}",
        )
        # NVIDIA_VISIBLE_DEVICES and device IDs are comma-separated lists of these.
        if not _UUID.match(uuid):
            raise self.fail(f"{field}.uuid", f"{uuid!r} is not like GPU-<letters, digits, -._>")
        return uuid

    def bus_id(self, text: str, field: str) -> str:
        """Normalise a bus id to NVML's form ("00000000:07:00.0"); the domain defaults to 0."""
        match = _BUS_ID.match(text)
        if not match:
            raise self.fail(field, f"{text!r} is not a PCI bus id like 00000000:07:00.0")
        domain, bus, dev, fn = match.groups()
        return f"{int(domain or '0', 16):08X}:{bus.upper()}:{dev.upper()}.{fn}"

    def mig_layout(
        self, model: Model, value: Any, field: str
    ) -> tuple[bool, tuple[GpuInstance, ...]]:
        """(MIG enabled, GPU instances) from ``disabled``/null or a list of instances."""
        if value is None or value == "disabled":
            return False, ()
        if not isinstance(value, list):
            raise self.fail(field, "expected 'disabled' or a list of MIG instances")
        if not model.mig_capable:
            raise self.fail(field, f"{model.name} is not MIG capable")
        layout = _MigLayout(model)
        for i, item in enumerate(value):
            self.mig_item(layout, item, f"{field}[{i}]")
        return True, tuple(layout.instances)

    def mig_item(self, layout: _MigLayout, item: Any, field: str) -> None:
        """One list entry: "[<c>c.]<name>" or {profile, count, compute, gi}."""
        if isinstance(item, str):
            match = _MIG_NAME.match(item)
            if not match:
                raise self.fail(
                    field, f"{item!r} is not a MIG profile name like 1g.5gb or 1c.3g.20gb"
                )
            profile = self.mig_profile(layout.model, match.group(2), field)
            compute = [int(match.group(1))] if match.group(1) else [profile.slices]
            self.add_instance(layout, profile, compute, None, field)
            return
        if not isinstance(item, dict):
            raise self.fail(field, "expected a profile name or a mapping")
        self.check_keys(item, ("profile", "count", "compute", "gi"), field)
        profile = self.mig_profile(
            layout.model, self.get(item, "profile", f"{field}.profile", str), f"{field}.profile"
        )
        count = self.get(item, "count", f"{field}.count", int, 1)
        compute = self.get(item, "compute", f"{field}.compute", list, [profile.slices])
        gi = self.get_int(item, "gi", f"{field}.gi", _GI_ID, None)
        if not 1 <= count <= MAX_MIG_SLICES or (gi is not None and count != 1):
            raise self.fail(
                f"{field}.count", f"must be 1..{MAX_MIG_SLICES} (and 1 when gi is given)"
            )
        for _ in range(count):
            self.add_instance(layout, profile, compute, gi, field)

    def mig_profile(self, model: Model, name: str, field: str) -> MigProfile:
        """The model's GPU instance profile called ``name``."""
        profile = model.mig_profile(name)
        if profile is None:
            known = ", ".join(p.name for p in model.mig_profiles)
            raise self.fail(field, f"{model.name} has no MIG profile {name!r} (has: {known})")
        return profile

    def add_instance(
        self,
        layout: _MigLayout,
        profile: MigProfile,
        compute: list[Any],
        gi: int | None,
        field: str,
    ) -> None:
        """Add a GPU instance, checking that it fits."""
        if not compute or not all(
            isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in compute
        ):
            raise self.fail(field, "compute: expected a non-empty list of compute slice counts")
        if sum(compute) > profile.slices:
            raise self.fail(
                field,
                f"compute instances use {sum(compute)} slices, {profile.name} has {profile.slices}",
            )
        reason = layout.add(profile, compute, gi)
        if reason:
            raise self.fail(field, reason)

    # -- topology -------------------------------------------------------------------------------

    def topology(self, gpus: tuple[GpuSpec, ...]) -> Topology:
        """Pairwise levels and NVLink counts from the compact ``topology`` section."""
        data = self.get(self.raw, "topology", "topology", dict, {})
        self.check_keys(data, ("pcie", "default", "nvlink", "nvswitch"), "topology")
        n = len(gpus)
        default = self.get(data, "default", "topology.default", str, "numa")
        if default != "numa" and default not in TOPOLOGY_LEVELS:
            raise self.fail(
                "topology.default", f"expected 'numa' or one of {', '.join(TOPOLOGY_LEVELS)}"
            )
        levels = [
            [0 if i == j else self.default_level(default, gpus[i], gpus[j]) for j in range(n)]
            for i in range(n)
        ]
        pcie = self.get(data, "pcie", "topology.pcie", dict, {})
        for level_name, groups in pcie.items():
            field = f"topology.pcie.{level_name}"
            if level_name not in TOPOLOGY_LEVELS:
                raise self.fail(field, f"unknown level (one of {', '.join(TOPOLOGY_LEVELS)})")
            for group in self.groups(groups, n, field):
                for i in group:
                    for j in group:
                        if i != j:
                            levels[i][j] = min(levels[i][j], TOPOLOGY_LEVELS[level_name])
        nvlinks = self.nvlinks(data, gpus)
        switch = self.nvswitch(data, gpus, nvlinks)
        return Topology(
            levels=tuple(map(tuple, levels)), nvlinks=tuple(map(tuple, nvlinks)), nvswitch=switch
        )

    @staticmethod
    def default_level(default: str, a: GpuSpec, b: GpuSpec) -> int:
        """The level of a pair no group mentions."""
        if default != "numa":
            return TOPOLOGY_LEVELS[default]
        same = a.numa_node is not None and a.numa_node == b.numa_node
        return TOPOLOGY_LEVELS["node" if same else "system"]

    def groups(self, groups: Any, n: int, field: str) -> list[list[int]]:
        """A list of lists of GPU indices."""
        if not isinstance(groups, list):
            raise self.fail(field, "expected a list of GPU index lists")
        for k, group in enumerate(groups):
            if not isinstance(group, list) or not all(
                isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n for i in group
            ):
                raise self.fail(f"{field}[{k}]", f"expected a list of GPU indices 0..{n - 1}")
        return groups

    def nvlinks(self, data: Mapping[str, Any], gpus: tuple[GpuSpec, ...]) -> list[list[int]]:
        """Direct GPU-to-GPU NVLink counts from "i-j: count" entries."""
        n = len(gpus)
        counts = [[0] * n for _ in range(n)]
        raw = self.get(data, "nvlink", "topology.nvlink", dict, {})
        for key, count in raw.items():
            field = f"topology.nvlink.{key}"
            match = re.fullmatch(r"(\d+)-(\d+)", str(key))
            if not match:
                raise self.fail(field, "keys are GPU index pairs like 0-1")
            i, j = int(match.group(1)), int(match.group(2))
            if i == j or i >= n or j >= n:
                raise self.fail(field, f"expected two different GPU indices 0..{n - 1}")
            if not isinstance(count, int) or isinstance(count, bool) or count < 1:
                raise self.fail(field, "expected a positive link count")
            counts[i][j] = counts[j][i] = count
        for gpu in gpus:
            used = sum(counts[gpu.index])
            if used > gpu.model.nvlinks:
                raise self.fail(
                    "topology.nvlink",
                    f"GPU {gpu.index} ({gpu.model.name}) has "
                    f"{gpu.model.nvlinks} NVLinks, the profile uses {used}",
                )
        return counts

    def nvswitch(
        self, data: Mapping[str, Any], gpus: tuple[GpuSpec, ...], nvlinks: list[list[int]]
    ) -> NvSwitchSpec | None:
        """The NVSwitch fabric, if any (exclusive with direct links)."""
        raw = self.get(data, "nvswitch", "topology.nvswitch", dict, None)
        if raw is None:
            return None
        self.check_keys(raw, ("bus_ids", "pci_device_id"), "topology.nvswitch")
        if any(any(row) for row in nvlinks):
            raise self.fail("topology.nvswitch", "cannot be combined with direct topology.nvlink")
        bus_ids = self.get(raw, "bus_ids", "topology.nvswitch.bus_ids", list)
        if not bus_ids:
            raise self.fail("topology.nvswitch.bus_ids", "at least one switch is required")
        ids = tuple(
            self.bus_id(str(b), f"topology.nvswitch.bus_ids[{k}]") for k, b in enumerate(bus_ids)
        )
        clash = set(ids) & {g.bus_id for g in gpus}
        if clash:
            raise self.fail("topology.nvswitch.bus_ids", f"{sorted(clash)[0]} is also a GPU")
        dev_id = self.get(raw, "pci_device_id", "topology.nvswitch.pci_device_id", int)
        if dev_id not in NVSWITCH_PCI_DEVICE_IDS:
            raise self.fail(
                "topology.nvswitch.pci_device_id", f"{dev_id:#010x} is not a known NVSwitch"
            )
        return NvSwitchSpec(bus_ids=ids, pci_device_id=dev_id)


_ENGINE_FIELDS = ("copy_engines", "decoders", "encoders", "jpeg", "ofa")
# (low, high, what NVML reports the value as) for Builder.get_int.
_C_INT = (0, C_INT_MAX, "NVML reports it as an int")
_C_UINT = (0, C_UINT_MAX, "NVML reports it as an unsigned int")
_PCI_CLASS = (0, 0xFFFFFF, "a 24-bit PCI class code")
_NVLINKS = (0, NVLINK_MAX_LINKS, "NVML_NVLINK_MAX_LINKS")
_MIG_SLICES = (0, MAX_MIG_SLICES, "GPU instance profiles have at most 8 slices")
_GI_ID = (0, MAX_GPU_INSTANCE_ID, "the driver's GPU instance ids")
_MINOR = (0, MAX_MINOR, "/dev/nvidia<minor>; 255 is nvidiactl")
_NUMA = (-C_INT_MAX - 1, MAX_NUMA_NODE, "Linux NUMA node ids; negative is none")
_MIG_PROFILE_BOUNDS = {
    "id": _C_UINT,
    "slices": (1, MAX_MIG_SLICES, "GPU instance profiles have 1..8 slices"),
    "instances": (1, MAX_MIG_SLICES, "at most one instance per slice"),
    "memory_mib": (1, C_ULLONG_MAX // MIB, "NVML reports bytes as an unsigned long long"),
    "multiprocessors": _C_UINT,
    **{k: _C_UINT for k in _ENGINE_FIELDS},
}


class _MigLayout:
    """GPU instances being placed on one GPU, with NVML's capacity rules."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self.instances: list[GpuInstance] = []

    def add(self, profile: MigProfile, compute: list[int], gi: int | None) -> str | None:
        """Place an instance; returns why it does not fit, or None."""
        same = sum(1 for g in self.instances if g.profile.id == profile.id)
        if same >= profile.instances:
            return f"{profile.name}: at most {profile.instances} instance(s) per GPU"
        slices = sum(g.profile.slices for g in self.instances) + profile.slices
        if slices > self.model.mig_slices:
            return (
                f"{profile.name} does not fit: {slices} of {self.model.mig_slices} compute slices"
            )
        eighths = sum(self.model.memory_eighths(g.profile) for g in self.instances)
        eighths += self.model.memory_eighths(profile)
        if eighths > 8:
            return f"{profile.name} does not fit: {eighths} of 8 memory slices"
        used = {g.id for g in self.instances}
        if gi is None:
            gi = self.free_id(profile, used)
        elif gi in used:
            return f"gi {gi} is already used on this GPU"
        start = sum(g.profile.slices for g in self.instances)
        cis = tuple(ComputeInstance(id=k, slices=c) for k, c in enumerate(compute))
        self.instances.append(
            GpuInstance(id=gi, profile=profile, placement_start=start, compute_instances=cis)
        )
        return None

    def free_id(self, profile: MigProfile, used: set[int]) -> int:
        """The first free id from the pool a real GPU would use, else the smallest free id."""
        pool: tuple[int, ...] = ()
        if self.model.mig_slices == 7:
            pool = _GI_ID_POOLS.get((profile.slices, self.model.memory_eighths(profile)), ())
        for candidate in pool:
            if candidate not in used:
                return candidate
        candidate = 1
        while candidate in used:
            candidate += 1
        return candidate


def _kind_names(kinds: tuple[type, ...]) -> str:
    names = {
        int: "an integer",
        str: "a string",
        list: "a list",
        dict: "a mapping",
        bool: "a boolean",
    }
    return " or ".join(names.get(k, k.__name__) for k in kinds)
