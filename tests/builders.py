"""Builders of test data: GPUs, MIG devices, snapshots and machine profiles (no tests here).

Every builder takes the facts a test cares about and fills the rest with an A100-SXM4-40GB on
driver 535.129.03 / CUDA 12.2, the machine most tests describe. Test files pin their own
spelling (UUID scheme, PCI bus offset, model) by passing it, so each test keeps its data.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TypedDict, Unpack

from gpus.fake import Profile, load_profile
from gpus.model import GPU, GpuFabric, Link, MigDevice, Snapshot, SystemInfo

MIB = 1 << 20
GIB = 1 << 30
A100 = "NVIDIA A100-SXM4-40GB"
DRIVER = "535.129.03"
CUDA = 12020


def gpu(
    index: int = 0,
    *,
    uuid: str | None = None,
    name: str = A100,
    memory_bytes: int = 40 * GIB,
    compute_capability: tuple[int, int] = (8, 0),
    architecture: str = "ampere",
    brand: str = "Nvidia",
    minor: int | None = None,
    bus: int | None = None,
    pci_bus_id: str | None = None,
    pci_class: int | None = None,
    numa_node: int | None = None,
    mig_capable: bool = False,
    mig_enabled: bool | None = None,
    migs: Iterable[MigDevice] = (),
    fabric: GpuFabric | None = None,
) -> GPU:
    """GPU ``index``: UUID ``GPU-<index>``, minor ``index``, PCI bus ``bus`` (default ``index``,
    hex) unless given; MIG is enabled when it has ``migs`` unless ``mig_enabled`` says."""
    devices = tuple(migs)
    return GPU(
        index=index,
        uuid=f"GPU-{index}" if uuid is None else uuid,
        name=name,
        memory_bytes=memory_bytes,
        compute_capability=compute_capability,
        architecture=architecture,
        brand=brand,
        minor=index if minor is None else minor,
        pci_bus_id=pci_bus_id or f"00000000:{index if bus is None else bus:02X}:00.0",
        pci_class=pci_class,
        numa_node=numa_node,
        mig_capable=mig_capable,
        mig_enabled=bool(devices) if mig_enabled is None else mig_enabled,
        mig_devices=devices,
        fabric=fabric,
    )


class Engines(TypedDict, total=False):
    """A MIG device's engine counts (each 0 unless given)."""

    multiprocessors: int
    copy_engines: int
    decoders: int
    encoders: int
    jpeg_decoders: int
    ofa_engines: int


def mig_device(
    parent: int,
    index: int,
    *,
    uuid: str | None = None,
    parent_uuid: str | None = None,
    profile: str = "1g.5gb",
    memory_bytes: int = 5 * GIB,
    gpu_instance_id: int | None = None,
    compute_instance_id: int = 0,
    gpu_instance_slices: int = 1,
    compute_instance_slices: int = 1,
    **engines: Unpack[Engines],
) -> MigDevice:
    """MIG device ``index`` of GPU ``parent``: UUID ``MIG-<parent>-<index>``, parent UUID
    ``GPU-<parent>``, GPU instance ``index + 1``, compute instance 0, a 1g.5gb unless given."""
    return MigDevice(
        uuid=f"MIG-{parent}-{index}" if uuid is None else uuid,
        index=index,
        parent_index=parent,
        parent_uuid=f"GPU-{parent}" if parent_uuid is None else parent_uuid,
        gpu_instance_id=index + 1 if gpu_instance_id is None else gpu_instance_id,
        compute_instance_id=compute_instance_id,
        profile=profile,
        memory_bytes=memory_bytes,
        gpu_instance_slices=gpu_instance_slices,
        compute_instance_slices=compute_instance_slices,
        **engines,
    )


def snapshot(
    *gpus: GPU,
    driver: str = DRIVER,
    cuda: int = CUDA,
    links: Sequence[Sequence[Link]] = (),
) -> Snapshot:
    """A snapshot of ``gpus`` on driver ``driver`` / CUDA ``cuda`` (NVML's integer form)."""
    return Snapshot(
        system=SystemInfo(driver_version=driver, cuda_driver_version=cuda),
        gpus=tuple(gpus),
        links=tuple(tuple(row) for row in links),
    )


def profile(name_or_path: str | Path) -> Profile:
    """A machine profile of ``gpus/profiles`` by name, or a profile file by path."""
    return load_profile(name_or_path)


def write_profile(directory: Path, lines: Sequence[str], name: str = "p.yaml") -> Path:
    """Write a profile file of ``lines`` into ``directory`` and return its path."""
    path = directory / name
    path.write_text("\n".join(lines) + "\n")
    return path
