"""The fake NVML's library, system and device calls: init, versions, enumeration, identity,
memory, PCI, compute mode, topology, NVLinks and the NVLink fabric.
"""

from __future__ import annotations

import ctypes
import uuid as uuidlib
from ctypes import c_char_p, c_int, c_uint, c_ulonglong, c_void_p
from typing import Any

import pynvml

from gpus.fake.lib_ctypes import (
    PTR,
    SUCCESS,
    fill_pci,
    fits,
    put,
    struct_at,
    write_str,
)
from gpus.fake.profile_model import ARCHITECTURES, BRANDS
from gpus.fake.state import FakeGpu, FakeMig, FakeState, NvmlReturn
from gpus.fake.telemetry import Telemetry
from gpus.model import MIB, sysfs_bus_id

# symbol -> argument types (return type is nvmlReturn_t = c_int).
SIGNATURES: dict[str, tuple[Any, ...]] = {
    "nvmlInit": (),
    "nvmlInit_v2": (),
    "nvmlInitWithFlags": (c_uint,),
    "nvmlShutdown": (),
    "nvmlSystemGetDriverVersion": (PTR, c_uint),
    "nvmlSystemGetNVMLVersion": (PTR, c_uint),
    "nvmlSystemGetCudaDriverVersion": (PTR,),
    "nvmlSystemGetCudaDriverVersion_v2": (PTR,),
    "nvmlDeviceGetCount": (PTR,),
    "nvmlDeviceGetCount_v2": (PTR,),
    "nvmlDeviceGetHandleByIndex": (c_uint, PTR),
    "nvmlDeviceGetHandleByIndex_v2": (c_uint, PTR),
    "nvmlDeviceGetHandleByUUID": (c_char_p, PTR),
    "nvmlDeviceGetHandleByPciBusId": (c_char_p, PTR),
    "nvmlDeviceGetHandleByPciBusId_v2": (c_char_p, PTR),
    "nvmlDeviceGetUUID": (PTR, PTR, c_uint),
    "nvmlDeviceGetName": (PTR, PTR, c_uint),
    "nvmlDeviceGetIndex": (PTR, PTR),
    "nvmlDeviceGetMinorNumber": (PTR, PTR),
    "nvmlDeviceGetMemoryInfo": (PTR, PTR),
    "nvmlDeviceGetMemoryInfo_v2": (PTR, PTR),
    "nvmlDeviceGetCudaComputeCapability": (PTR, PTR, PTR),
    "nvmlDeviceGetArchitecture": (PTR, PTR),
    "nvmlDeviceGetBrand": (PTR, PTR),
    "nvmlDeviceGetPciInfo_v3": (PTR, PTR),
    "nvmlDeviceGetComputeMode": (PTR, PTR),
    "nvmlDeviceSetComputeMode": (PTR, c_uint),
    "nvmlDeviceGetTopologyCommonAncestor": (PTR, PTR, PTR),
    "nvmlDeviceGetNvLinkState": (PTR, c_uint, PTR),
    "nvmlDeviceGetNvLinkRemotePciInfo_v2": (PTR, c_uint, PTR),
    "nvmlDeviceGetGpuFabricInfo": (PTR, PTR),
    "nvmlDeviceGetGpuFabricInfoV": (PTR, PTR),
}

_COMPUTE_MODES = frozenset({
    pynvml.NVML_COMPUTEMODE_DEFAULT, pynvml.NVML_COMPUTEMODE_EXCLUSIVE_THREAD,
    pynvml.NVML_COMPUTEMODE_PROHIBITED, pynvml.NVML_COMPUTEMODE_EXCLUSIVE_PROCESS,
})
_ARCH_CODES = {name: getattr(pynvml, f"NVML_DEVICE_ARCH_{name.upper()}") for name in ARCHITECTURES}
_BRAND_CODES = {name: getattr(pynvml, f"NVML_BRAND_{name.upper()}") for name in BRANDS}


class DeviceFunctions:
    """Library, system and whole-device NVML calls. Called with the state lock held."""

    s: FakeState

    # -- library and system ---------------------------------------------------------------------

    def nvmlInit(self) -> int:  # noqa: N802 - NVML's own names
        """Initialise (reference counted, like NVML)."""
        self.s.init_count += 1
        return SUCCESS

    def nvmlInit_v2(self) -> int:  # noqa: N802
        """Initialise."""
        return self.nvmlInit()

    def nvmlInitWithFlags(self, flags: int) -> int:  # noqa: N802
        """Initialise (flags ignored)."""
        return self.nvmlInit()

    def nvmlShutdown(self) -> int:  # noqa: N802
        """Drop one reference."""
        if self.s.init_count == 0:
            raise NvmlReturn(pynvml.NVML_ERROR_UNINITIALIZED)
        self.s.init_count -= 1
        return SUCCESS

    def nvmlSystemGetDriverVersion(self, buf: int, size: int) -> int:  # noqa: N802
        """The driver version string."""
        return write_str(buf, size, self.s.profile.driver_version)

    def nvmlSystemGetNVMLVersion(self, buf: int, size: int) -> int:  # noqa: N802
        """The NVML version string."""
        return write_str(buf, size, self.s.profile.nvml_version)

    def nvmlSystemGetCudaDriverVersion(self, out: int) -> int:  # noqa: N802
        """CUDA driver version as an integer (12020)."""
        put(out, c_int, self.s.profile.cuda_driver_version)
        return SUCCESS

    def nvmlSystemGetCudaDriverVersion_v2(self, out: int) -> int:  # noqa: N802
        """CUDA driver version as an integer."""
        return self.nvmlSystemGetCudaDriverVersion(out)

    # -- enumeration ----------------------------------------------------------------------------

    def nvmlDeviceGetCount(self, out: int) -> int:  # noqa: N802
        """Number of GPUs."""
        put(out, c_uint, len(self.s.gpus))
        return SUCCESS

    def nvmlDeviceGetCount_v2(self, out: int) -> int:  # noqa: N802
        """Number of GPUs."""
        return self.nvmlDeviceGetCount(out)

    def nvmlDeviceGetHandleByIndex(self, index: int, out: int) -> int:  # noqa: N802
        """A GPU's handle; GPU_IS_LOST for a GPU that fell off the bus."""
        if index >= len(self.s.gpus):
            raise NvmlReturn(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        gpu = self.s.gpus[index]
        if gpu.lost:
            raise NvmlReturn(pynvml.NVML_ERROR_GPU_IS_LOST)
        put(out, c_void_p, gpu.handle)
        return SUCCESS

    def nvmlDeviceGetHandleByIndex_v2(self, index: int, out: int) -> int:  # noqa: N802
        """A GPU's handle."""
        return self.nvmlDeviceGetHandleByIndex(index, out)

    def nvmlDeviceGetHandleByUUID(self, uuid: bytes | None, out: int) -> int:  # noqa: N802
        """A GPU's or MIG device's handle by UUID."""
        found = self.s.by_uuid((uuid or b"").decode(errors="replace"))
        if found is None:
            raise NvmlReturn(pynvml.NVML_ERROR_NOT_FOUND)
        self.s.device(found.handle)  # lost check
        put(out, c_void_p, found.handle)
        return SUCCESS

    def nvmlDeviceGetHandleByPciBusId(self, bus_id: bytes | None, out: int) -> int:  # noqa: N802
        """A GPU's handle by PCI bus id (either spelling)."""
        wanted = sysfs_bus_id((bus_id or b"").decode(errors="replace"))
        for gpu in self.s.gpus:
            if gpu.spec.sysfs_bus_id == wanted:
                self.s.device(gpu.handle)
                put(out, c_void_p, gpu.handle)
                return SUCCESS
        raise NvmlReturn(pynvml.NVML_ERROR_NOT_FOUND)

    def nvmlDeviceGetHandleByPciBusId_v2(self, bus_id: bytes | None, out: int) -> int:  # noqa: N802
        """A GPU's handle by PCI bus id."""
        return self.nvmlDeviceGetHandleByPciBusId(bus_id, out)

    # -- identity -------------------------------------------------------------------------------

    def nvmlDeviceGetUUID(self, handle: int, buf: int, size: int) -> int:  # noqa: N802
        """GPU-... or MIG-..."""
        dev = self.s.device(handle)
        return write_str(buf, size, dev.uuid if isinstance(dev, FakeMig) else dev.spec.uuid)

    def nvmlDeviceGetName(self, handle: int, buf: int, size: int) -> int:  # noqa: N802
        """Product name; MIG devices: "<name> MIG <profile>"."""
        dev = self.s.device(handle)
        if isinstance(dev, FakeMig):
            return write_str(buf, size, f"{dev.gpu.spec.model.name} MIG {dev.name_suffix}")
        return write_str(buf, size, dev.spec.model.name)

    def nvmlDeviceGetIndex(self, handle: int, out: int) -> int:  # noqa: N802
        """NVML index."""
        put(out, c_uint, self.s.gpu(handle).spec.index)
        return SUCCESS

    def nvmlDeviceGetMinorNumber(self, handle: int, out: int) -> int:  # noqa: N802
        """/dev/nvidia<minor>."""
        put(out, c_uint, self.s.gpu(handle).spec.minor)
        return SUCCESS

    def nvmlDeviceGetMemoryInfo(self, handle: int, out: int) -> int:  # noqa: N802
        """nvmlMemory_t (v1): all free."""
        info = struct_at(out, pynvml.c_nvmlMemory_t)
        total = self._memory_bytes(handle)
        used = self._used_bytes(handle, total)
        # v1 counts the driver's reservation as used, as NVML does
        info.total, info.used = total, used + Telemetry.reserved_bytes(total)
        info.free = total - info.used
        return SUCCESS

    def nvmlDeviceGetMemoryInfo_v2(self, handle: int, out: int) -> int:  # noqa: N802
        """nvmlMemory_v2_t: checks the struct version like NVML."""
        info = struct_at(out, pynvml.c_nvmlMemory_v2_t)
        if info.version != pynvml.nvmlMemory_v2:
            raise NvmlReturn(pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH)
        total = self._memory_bytes(handle)
        reserved = Telemetry.reserved_bytes(total)
        used = self._used_bytes(handle, total - reserved)
        info.total, info.reserved, info.used = total, reserved, used
        info.free = total - reserved - used
        return SUCCESS

    def _used_bytes(self, handle: int, total: int) -> int:
        """Memory in use on a GPU (its MIG devices' too) or a MIG device."""
        dev = self.s.device(handle)
        telemetry = self.s.telemetry
        if isinstance(dev, FakeMig):
            return telemetry.used_bytes(dev.uuid, total)
        migs = [m for m in dev.mig_slots if m is not None]
        if migs:
            return min(total, sum(
                telemetry.used_bytes(m.uuid, m.gpu_instance.spec.profile.memory_mib * MIB)
                for m in migs))
        return telemetry.used_bytes(dev.spec.uuid, total, wave_uuid=dev.spec.uuid)

    def _memory_bytes(self, handle: int) -> int:
        dev = self.s.device(handle)
        if isinstance(dev, FakeMig):
            return fits(c_ulonglong, dev.gpu_instance.spec.profile.memory_mib * MIB)
        return fits(c_ulonglong, dev.spec.model.memory_bytes)

    def _gpu_of(self, handle: int) -> FakeGpu:
        dev = self.s.device(handle)
        return dev.gpu if isinstance(dev, FakeMig) else dev

    def nvmlDeviceGetCudaComputeCapability(self, handle: int, major: int, minor: int) -> int:  # noqa: N802
        """Compute capability (MIG devices: the parent's)."""
        cc = self._gpu_of(handle).spec.model.compute_capability
        put(major, c_int, cc[0])
        put(minor, c_int, cc[1])
        return SUCCESS

    def nvmlDeviceGetArchitecture(self, handle: int, out: int) -> int:  # noqa: N802
        """nvmlDeviceArchitecture_t."""
        arch = self._gpu_of(handle).spec.model.architecture
        put(out, c_uint, _ARCH_CODES.get(arch, pynvml.NVML_DEVICE_ARCH_UNKNOWN))
        return SUCCESS

    def nvmlDeviceGetBrand(self, handle: int, out: int) -> int:  # noqa: N802
        """nvmlBrandType_t."""
        put(out, c_uint, _BRAND_CODES[self._gpu_of(handle).spec.model.brand])
        return SUCCESS

    def nvmlDeviceGetPciInfo_v3(self, handle: int, out: int) -> int:  # noqa: N802
        """nvmlPciInfo_t."""
        gpu = self.s.gpu(handle)
        fill_pci(
            struct_at(out, pynvml.nvmlPciInfo_t),
            gpu.spec.bus_id,
            gpu.spec.model.pci_device_id,
            gpu.spec.model.pci_subsystem_id,
        )
        return SUCCESS

    # -- compute mode ---------------------------------------------------------------------------

    def nvmlDeviceGetComputeMode(self, handle: int, out: int) -> int:  # noqa: N802
        """The GPU's compute mode (NVML_COMPUTEMODE_*); MIG devices: NOT_SUPPORTED."""
        dev = self.s.device(handle)
        if isinstance(dev, FakeMig):
            raise NvmlReturn(pynvml.NVML_ERROR_NOT_SUPPORTED)
        put(out, c_uint, dev.compute_mode)
        return SUCCESS

    def nvmlDeviceSetComputeMode(self, handle: int, mode: int) -> int:  # noqa: N802
        """Set and record the compute mode (as ``nvidia-smi -c`` does through NVML)."""
        dev = self.s.device(handle)
        if isinstance(dev, FakeMig):
            raise NvmlReturn(pynvml.NVML_ERROR_NOT_SUPPORTED)
        if mode not in _COMPUTE_MODES:
            raise NvmlReturn(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        dev.compute_mode = mode
        self.s.compute_mode_changes.append((dev.spec.uuid, mode))
        return SUCCESS

    # -- topology -------------------------------------------------------------------------------

    def nvmlDeviceGetTopologyCommonAncestor(self, h1: int, h2: int, out: int) -> int:  # noqa: N802
        """nvmlGpuTopologyLevel_t between two GPUs."""
        a, b = self.s.gpu(h1), self.s.gpu(h2)
        put(out, c_uint, self.s.profile.topology.levels[a.spec.index][b.spec.index])
        return SUCCESS

    def _links(self, gpu: FakeGpu) -> list[tuple[str, int]]:
        """(remote bus id, remote pciDeviceId) per active link, in link order."""
        topo = self.s.profile.topology
        if topo.nvswitch is not None:
            switches = topo.nvswitch.bus_ids
            return [
                (switches[k % len(switches)], topo.nvswitch.pci_device_id)
                for k in range(gpu.spec.model.nvlinks)
            ]
        links = []
        for other in self.s.gpus:
            count = topo.nvlinks[gpu.spec.index][other.spec.index]
            links += [(other.spec.bus_id, other.spec.model.pci_device_id)] * count
        return links

    def _link(self, handle: int, link: int) -> tuple[str, int] | None:
        gpu = self.s.gpu(handle)
        if gpu.spec.model.nvlinks == 0:
            raise NvmlReturn(pynvml.NVML_ERROR_NOT_SUPPORTED)
        if link >= gpu.spec.model.nvlinks:
            raise NvmlReturn(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        links = self._links(gpu)
        return links[link] if link < len(links) else None

    def nvmlDeviceGetNvLinkState(self, handle: int, link: int, out: int) -> int:  # noqa: N802
        """Whether a link is active."""
        active = self._link(handle, link) is not None
        put(out, c_uint, pynvml.NVML_FEATURE_ENABLED if active else pynvml.NVML_FEATURE_DISABLED)
        return SUCCESS

    def nvmlDeviceGetNvLinkRemotePciInfo_v2(self, handle: int, link: int, out: int) -> int:  # noqa: N802
        """PCI info of the far end of a link (another GPU or an NVSwitch)."""
        remote = self._link(handle, link)
        if remote is None:
            raise NvmlReturn(pynvml.NVML_ERROR_NOT_SUPPORTED)
        fill_pci(struct_at(out, pynvml.nvmlPciInfo_t), remote[0], remote[1], 0)
        return SUCCESS

    # -- fabric (IMEX) --------------------------------------------------------------------------

    def _fill_fabric(self, info: Any, handle: int) -> None:
        fabric = self.s.gpu(handle).spec.fabric
        if fabric is None:
            raise NvmlReturn(pynvml.NVML_ERROR_NOT_SUPPORTED)  # what a PCIe GPU answers
        raw = uuidlib.UUID(fabric.cluster_uuid).bytes
        ctypes.memmove(info.clusterUuid, raw, len(raw))
        info.status, info.cliqueId, info.state = fabric.status, fabric.clique_id, fabric.state

    def nvmlDeviceGetGpuFabricInfo(self, handle: int, out: int) -> int:  # noqa: N802
        """nvmlGpuFabricInfo_t (v1, deprecated); NOT_SUPPORTED off a fabric."""
        self._fill_fabric(struct_at(out, pynvml.c_nvmlGpuFabricInfo_t), handle)
        return SUCCESS

    def nvmlDeviceGetGpuFabricInfoV(self, handle: int, out: int) -> int:  # noqa: N802
        """nvmlGpuFabricInfo_v2_t or _v3_t, by the version the caller set (as NVML checks)."""
        version = struct_at(out, ctypes.c_uint).value
        structs = {pynvml.nvmlGpuFabricInfo_v2: pynvml.c_nvmlGpuFabricInfo_v2_t,
                   pynvml.nvmlGpuFabricInfo_v3: pynvml.c_nvmlGpuFabricInfo_v3_t}
        struct_type = structs.get(version)
        if struct_type is None:
            raise NvmlReturn(pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH)
        info = struct_at(out, struct_type)
        self._fill_fabric(info, handle)
        info.healthMask = 0
        return SUCCESS
