"""Is this node a vGPU guest? Read as NVIDIA's GFD does, from PCI config space in sysfs.

For every NVIDIA PCI function (``vendor`` 0x10de) under ``<root>/sys/bus/pci/devices``, walk the
config space's capability list (status register bit 0x10 at offset 0x06 says there is one; the
first pointer is at 0x34; each entry is id, next, length) to the vendor-specific capability
(id 0x09). On a vGPU guest it starts with the signature "VF" (bytes 3-4) followed by records
(id, length, data) from byte 5; record 0 holds the host driver's version (10 bytes) and branch
(10 bytes), NUL padded.

Unlike NVIDIA's reader, nothing here fails the pass: a malformed capability list ends the walk,
and a config space too short to hold capabilities (sysfs gives unprivileged readers only the
first 64 bytes) is reported in ``VgpuInfo.error`` so the labels can say nothing rather than a
wrong "false".
"""

from __future__ import annotations

import logging
import os

from gpus.model import VgpuInfo
from gpus.records import record

log = logging.getLogger(__name__)

NVIDIA_VENDOR = "0x10de"
CONFIG_MIN_BYTES = 256  # the whole conventional config space; capabilities live in 0x40..0xff
CONFIG_MAX_BYTES = 4096  # the extended config space: never read more
STATUS_OFFSET = 0x06
STATUS_CAPABILITY_LIST = 0x10
CAPABILITY_POINTER = 0x34
CAP_VENDOR_SPECIFIC = 0x09
VGPU_SIGNATURE = b"VF"
RECORDS_START = 5
HOST_DRIVER_RECORD = 0
FIELD_BYTES = 10


@record(shared_init=True)
class HostDriver:
    """The host driver record of a vGPU capability."""

    version: str
    branch: str


def vendor_capability(config: bytes) -> bytes | None:
    """The vendor-specific capability (id 0x09) of a config space, or None.

    A loop, an 0xff id (a broken chain) or a pointer past the data ends the walk.
    """
    if len(config) <= CAPABILITY_POINTER or not config[STATUS_OFFSET] & STATUS_CAPABILITY_LIST:
        return None
    visited: set[int] = set()
    pos = config[CAPABILITY_POINTER]
    while pos and pos not in visited and pos + 2 < len(config):
        cap_id, following, length = config[pos], config[pos + 1], config[pos + 2]
        if cap_id == 0xFF:
            return None
        if cap_id == CAP_VENDOR_SPECIFIC:
            return config[pos : pos + length]
        visited.add(pos)
        pos = following
    return None


def is_vgpu(capability: bytes | None) -> bool:
    """True when a vendor capability carries the vGPU signature."""
    return capability is not None and capability[3:5] == VGPU_SIGNATURE


def host_driver(capability: bytes) -> HostDriver | None:
    """The host driver record of a vGPU capability (records chained from byte 5), or None."""
    pos = RECORDS_START
    while pos + 1 < len(capability) and capability[pos] != HOST_DRIVER_RECORD:
        step = capability[pos + 1]
        if step == 0:
            return None  # a zero-length record would loop forever
        pos += step
    end = pos + 2 + 2 * FIELD_BYTES
    if pos >= len(capability) or capability[pos] != HOST_DRIVER_RECORD or end > len(capability):
        return None
    data = capability[pos + 2 : end]
    return HostDriver(version=_text(data[:FIELD_BYTES]), branch=_text(data[FIELD_BYTES:]))


def _text(field: bytes) -> str:
    return field.strip(b"\0").decode("ascii", errors="replace").strip()


def _read(path: str, limit: int) -> bytes:
    with open(path, "rb") as handle:
        return handle.read(limit)


def read_vgpu(sysfs_root: str = "/") -> VgpuInfo:
    """What the NVIDIA PCI functions under ``<sysfs_root>/sys/bus/pci/devices`` say."""
    devices = os.path.join(sysfs_root, "sys", "bus", "pci", "devices")
    try:
        entries = sorted(os.listdir(devices))
    except OSError as err:
        return VgpuInfo(present=False, error=f"cannot list {devices}: {err.strerror or err}")
    short: list[str] = []
    for entry in entries:
        directory = os.path.join(devices, entry)
        try:
            if _read(os.path.join(directory, "vendor"), 16).decode().strip().lower() \
                    != NVIDIA_VENDOR:
                continue
            config = _read(os.path.join(directory, "config"), CONFIG_MAX_BYTES)
        except (OSError, UnicodeDecodeError) as err:
            log.debug("PCI function %s: %s", entry, err)
            continue
        if len(config) < CONFIG_MIN_BYTES:
            short.append(f"{entry} ({len(config)} bytes)")
            continue
        capability = vendor_capability(config)
        if not is_vgpu(capability):
            continue
        assert capability is not None
        record = host_driver(capability)
        if record is None:
            return VgpuInfo(present=True, error=f"{entry}: vGPU capability without a host "
                            "driver record")
        return VgpuInfo(present=True, host_driver_version=record.version,
                        host_driver_branch=record.branch)
    if short:
        return VgpuInfo(present=False, error="PCI config space too short to read capabilities "
                        f"for {', '.join(short)}: reading it whole needs a privileged container")
    return VgpuInfo(present=False)
