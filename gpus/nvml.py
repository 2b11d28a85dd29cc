"""The NVML reader: reads a :class:`gpus.model.Snapshot` (``Nvml.read_snapshot``) and probes.

Every ``pynvml.NVMLError`` becomes an :class:`NvmlError` naming the NVML call. The same code runs
against the real driver and against the fake NVML installed beneath pynvml (``gpus.fake``).
The reader spans sibling modules it imports: :mod:`gpus.nvmlcall` (the call wrapper and
:class:`NvmlError`, re-exported here) and :mod:`gpus.nvmlmig` (MIG devices and NVIDIA's MIG
profile names, re-exported here); :mod:`gpus.nvmlevents` and :mod:`gpus.telemetry` build on it.
"""

from __future__ import annotations

import ctypes
import logging
import uuid as uuidlib
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import pynvml

from gpus.model import (
    GPU,
    GpuFabric,
    Link,
    Snapshot,
    SystemInfo,
    TopologyLevel,
    sysfs_bus_id,
)
from gpus.nvmlcall import NvmlError as NvmlError
from gpus.nvmlcall import _call, _text
from gpus.nvmlcall import error_name as error_name
from gpus.nvmlmig import mig_memory_gb as mig_memory_gb
from gpus.nvmlmig import mig_mode, read_mig_devices
from gpus.nvmlmig import mig_profile_name as mig_profile_name
from gpus.vgpu import read_vgpu

log = logging.getLogger(__name__)

NOT_APPLICABLE = 0xFFFFFFFF

EVENT_XID: int = pynvml.nvmlEventTypeXidCriticalError
EVENT_SINGLE_BIT_ECC: int = pynvml.nvmlEventTypeSingleBitEccError
EVENT_DOUBLE_BIT_ECC: int = pynvml.nvmlEventTypeDoubleBitEccError
DEFAULT_EVENTS = EVENT_XID | EVENT_SINGLE_BIT_ECC | EVENT_DOUBLE_BIT_ECC

# Compute modes (nvmlComputeMode_t) the MPS control daemon switches between.
COMPUTE_MODE_DEFAULT: int = pynvml.NVML_COMPUTEMODE_DEFAULT
COMPUTE_MODE_EXCLUSIVE_PROCESS: int = pynvml.NVML_COMPUTEMODE_EXCLUSIVE_PROCESS

# NVSwitch PCI device ids (device << 16 | vendor): a link to one reaches every GPU on the fabric.
NVSWITCH_PCI_DEVICE_IDS = frozenset({0x1AC010DE, 0x1AC110DE, 0x1AC210DE, 0x1AF110DE, 0x22A310DE})

_ARCHITECTURES: dict[int, str] = {
    pynvml.NVML_DEVICE_ARCH_KEPLER: "kepler",
    pynvml.NVML_DEVICE_ARCH_MAXWELL: "maxwell",
    pynvml.NVML_DEVICE_ARCH_PASCAL: "pascal",
    pynvml.NVML_DEVICE_ARCH_VOLTA: "volta",
    pynvml.NVML_DEVICE_ARCH_TURING: "turing",
    pynvml.NVML_DEVICE_ARCH_AMPERE: "ampere",
    pynvml.NVML_DEVICE_ARCH_ADA: "ada",
    pynvml.NVML_DEVICE_ARCH_HOPPER: "hopper",
    pynvml.NVML_DEVICE_ARCH_BLACKWELL: "blackwell",
}
_BRANDS: dict[int, str] = {
    pynvml.NVML_BRAND_QUADRO: "Quadro",
    pynvml.NVML_BRAND_TESLA: "Tesla",
    pynvml.NVML_BRAND_NVS: "NVS",
    pynvml.NVML_BRAND_GRID: "Grid",
    pynvml.NVML_BRAND_GEFORCE: "GeForce",
    pynvml.NVML_BRAND_TITAN: "Titan",
    pynvml.NVML_BRAND_NVIDIA_VAPPS: "NvidiaVApps",
    pynvml.NVML_BRAND_NVIDIA_VPC: "NvidiaVPC",
    pynvml.NVML_BRAND_NVIDIA_VCS: "NvidiaVCS",
    pynvml.NVML_BRAND_NVIDIA_VWS: "NvidiaVWS",
    pynvml.NVML_BRAND_NVIDIA_CLOUD_GAMING: "NvidiaCloudGaming",
    pynvml.NVML_BRAND_QUADRO_RTX: "QuadroRTX",
    pynvml.NVML_BRAND_NVIDIA_RTX: "NvidiaRTX",
    pynvml.NVML_BRAND_NVIDIA: "Nvidia",
    pynvml.NVML_BRAND_GEFORCE_RTX: "GeForceRTX",
    pynvml.NVML_BRAND_TITAN_RTX: "TitanRTX",
}
_INIT_HINTS = {
    pynvml.NVML_ERROR_LIBRARY_NOT_FOUND: (
        "NVIDIA driver not found: cannot load libnvidia-ml.so.1 "
        "(is the driver installed and its root mounted?)"
    ),
    pynvml.NVML_ERROR_DRIVER_NOT_LOADED: "the NVIDIA kernel driver is not loaded",
}


def _handle_key(handle: Any) -> int:
    """A handle's address, usable as a dict key."""
    return ctypes.cast(handle, ctypes.c_void_p).value or 0


def normalize_bus_id(bus_id: str | bytes) -> str:
    """A bus id in NVML's form: "00000000:07:00.0" (upper case, 8-digit domain)."""
    domain, _, rest = _text(bus_id).strip().upper().partition(":")
    return f"{int(domain, 16):08X}:{rest}" if rest else domain


def read_sysfs(sysfs_root: str, bus_id: str) -> tuple[int | None, int | None]:
    """(PCI class >> 8, NUMA node) from sysfs; None when absent, unreadable or negative."""
    directory = Path(sysfs_root) / "sys" / "bus" / "pci" / "devices" / sysfs_bus_id(bus_id)
    pci_class = numa = None
    try:
        pci_class = int((directory / "class").read_text().strip(), 16) >> 8
    except (OSError, ValueError):
        log.debug("no PCI class for %s under %s", bus_id, sysfs_root)
    try:
        value = int((directory / "numa_node").read_text().strip())
        numa = value if value >= 0 else None
    except (OSError, ValueError):
        log.debug("no NUMA node for %s under %s", bus_id, sysfs_root)
    return pci_class, numa


class Nvml:
    """An NVML session: ``init()``/``shutdown()`` (or ``with``), then reads."""

    def __init__(self) -> None:
        self._initialized = False

    def init(self) -> None:
        """Initialise NVML; a missing driver gives a one-line NvmlError saying so."""
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            raise NvmlError.from_pynvml(
                "nvmlInit", exc, _INIT_HINTS.get(int(exc.value), "")
            ) from None
        self._initialized = True

    def shutdown(self) -> None:
        """Release NVML (once per init)."""
        if not self._initialized:
            return
        self._initialized = False
        _call("nvmlShutdown", pynvml.nvmlShutdown)

    def __enter__(self) -> Nvml:
        self.init()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.shutdown()

    # -- snapshot -------------------------------------------------------------------------------

    def read_snapshot(self, sysfs_root: str = "/", skip_lost: bool = True, *,
                      vgpu: bool = True) -> Snapshot:
        """Read versions, every GPU (with MIG devices) and the pairwise topology once.

        A GPU that answers NVML_ERROR_GPU_IS_LOST is left out (logged) so one GPU off the bus
        does not hide the others; ``GPU.index`` keeps NVML's index. ``vgpu=False`` leaves
        ``Snapshot.vgpu`` None (not read): only GFD labels it, and reading it opens two files
        of every PCI function on the node.
        """
        system = SystemInfo(
            driver_version=_text(
                _call("nvmlSystemGetDriverVersion", pynvml.nvmlSystemGetDriverVersion)
            ),
            cuda_driver_version=_call(
                "nvmlSystemGetCudaDriverVersion", pynvml.nvmlSystemGetCudaDriverVersion
            ),
            nvml_version=_text(_call("nvmlSystemGetNVMLVersion", pynvml.nvmlSystemGetNVMLVersion)),
        )
        count = _call("nvmlDeviceGetCount", pynvml.nvmlDeviceGetCount)
        gpus: list[GPU] = []
        handles: list[Any] = []
        for index in range(count):
            try:
                handle = _call(
                    "nvmlDeviceGetHandleByIndex", pynvml.nvmlDeviceGetHandleByIndex, index
                )
                gpus.append(self._read_gpu(index, handle, sysfs_root))
                handles.append(handle)
            except NvmlError as exc:
                if not (skip_lost and exc.code == pynvml.NVML_ERROR_GPU_IS_LOST):
                    raise
                log.warning("GPU %d left out of the snapshot: %s", index, exc)
        links = self._read_links(handles, gpus)
        # vGPU: sysfs, not NVML, read here so that a Snapshot describes the whole node.
        return Snapshot(system=system, gpus=tuple(gpus), links=links,
                        vgpu=read_vgpu(sysfs_root) if vgpu else None)

    def _read_gpu(self, index: int, handle: Any, sysfs_root: str) -> GPU:
        pci = _call("nvmlDeviceGetPciInfo", pynvml.nvmlDeviceGetPciInfo, handle)
        bus_id = normalize_bus_id(pci.busId)
        pci_class, numa = read_sysfs(sysfs_root, bus_id)
        memory = _call("nvmlDeviceGetMemoryInfo", pynvml.nvmlDeviceGetMemoryInfo, handle).total
        uuid = _text(_call("nvmlDeviceGetUUID", pynvml.nvmlDeviceGetUUID, handle))
        capable, enabled = mig_mode(handle)
        mig_devices = read_mig_devices(handle, index, uuid, memory) if enabled else ()
        return GPU(
            index=index,
            uuid=uuid,
            name=_text(_call("nvmlDeviceGetName", pynvml.nvmlDeviceGetName, handle)),
            memory_bytes=int(memory),
            compute_capability=tuple(
                _call(
                    "nvmlDeviceGetCudaComputeCapability",
                    pynvml.nvmlDeviceGetCudaComputeCapability,
                    handle,
                )
            ),
            architecture=self._optional(
                "nvmlDeviceGetArchitecture",
                pynvml.nvmlDeviceGetArchitecture,
                handle,
                lambda v: _ARCHITECTURES.get(v, "unknown"),
                "unknown",
            ),
            brand=self._optional(
                "nvmlDeviceGetBrand",
                pynvml.nvmlDeviceGetBrand,
                handle,
                lambda v: _BRANDS.get(v, "unknown"),
                "unknown",
            ),
            minor=_call("nvmlDeviceGetMinorNumber", pynvml.nvmlDeviceGetMinorNumber, handle),
            pci_bus_id=bus_id,
            pci_device_id=int(pci.pciDeviceId),
            pci_class=pci_class,
            numa_node=numa,
            mig_capable=capable,
            mig_enabled=enabled,
            mig_devices=mig_devices,
            fabric=self._fabric(handle, index),
        )

    @staticmethod
    def _fabric(handle: Any, index: int) -> GpuFabric | None:
        """The GPU's fabric info: ``...InfoV`` (v2 struct), else the v1 call of older drivers.

        NOT_SUPPORTED (no fabric, e.g. PCIe GPUs) and FUNCTION_NOT_FOUND (old drivers) mean
        None. Any other error is kept in ``GpuFabric.error`` rather than failing the whole
        snapshot: only the IMEX label depends on it (GPU_IS_LOST still propagates).
        """
        absent = (pynvml.NVML_ERROR_NOT_SUPPORTED, pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
        attempts: tuple[tuple[str, Callable[..., Any], type], ...] = (
            ("nvmlDeviceGetGpuFabricInfoV", pynvml.nvmlDeviceGetGpuFabricInfoV,
             pynvml.c_nvmlGpuFabricInfo_v2_t),
            ("nvmlDeviceGetGpuFabricInfo", pynvml.nvmlDeviceGetGpuFabricInfo,
             pynvml.c_nvmlGpuFabricInfo_t),
        )
        for call, fn, struct_type in attempts:
            info = struct_type()
            try:
                _call(call, fn, handle, ctypes.byref(info))
            except NvmlError as exc:
                if exc.code == pynvml.NVML_ERROR_FUNCTION_NOT_FOUND:
                    continue  # a driver without the V call may still have the v1 call
                if exc.code in absent:
                    return None
                if exc.code == pynvml.NVML_ERROR_GPU_IS_LOST:
                    raise
                log.warning("GPU %d: fabric info unavailable: %s", index, exc)
                return GpuFabric(error=exc.name)
            return GpuFabric(
                cluster_uuid=str(uuidlib.UUID(bytes=bytes(info.clusterUuid))),
                clique_id=int(info.cliqueId),
                state=int(info.state),
                status=int(info.status),
            )
        return None

    @staticmethod
    def _optional(
        call: str,
        fn: Callable[[Any], int],
        handle: Any,
        convert: Callable[[int], str],
        default: str,
    ) -> str:
        """A value old drivers may not report (NOT_SUPPORTED / FUNCTION_NOT_FOUND -> default)."""
        try:
            return convert(_call(call, fn, handle))
        except NvmlError as exc:
            if exc.code in (pynvml.NVML_ERROR_NOT_SUPPORTED, pynvml.NVML_ERROR_FUNCTION_NOT_FOUND):
                return default
            raise

    # -- topology -------------------------------------------------------------------------------

    def _read_links(self, handles: list[Any], gpus: list[GPU]) -> tuple[tuple[Link, ...], ...]:
        """Pairwise PCIe levels and NVLink counts.

        A link whose far end is another GPU counts for that pair; a link to an NVSwitch reaches
        every GPU on the fabric, so a pair on the fabric gets min(switch links of either GPU).
        """
        n = len(handles)
        position = {sysfs_bus_id(g.pci_bus_id): k for k, g in enumerate(gpus)}
        direct = [[0] * n for _ in range(n)]
        switch_links = [0] * n
        for i, handle in enumerate(handles):
            for remote_bus, remote_device in self._nvlink_remotes(handle):
                j = position.get(sysfs_bus_id(remote_bus))
                if j is not None and j != i:
                    direct[i][j] += 1
                elif remote_device in NVSWITCH_PCI_DEVICE_IDS:
                    switch_links[i] += 1
        rows = []
        for i in range(n):
            row = []
            for j in range(n):
                if i == j:
                    row.append(Link(TopologyLevel.INTERNAL))
                    continue
                level = _call(
                    "nvmlDeviceGetTopologyCommonAncestor",
                    pynvml.nvmlDeviceGetTopologyCommonAncestor,
                    handles[i],
                    handles[j],
                )
                # Direct counts are symmetric on real hardware; take the larger if not.
                links = max(direct[i][j], direct[j][i]) + min(switch_links[i], switch_links[j])
                row.append(Link(TopologyLevel(level), links))
            rows.append(tuple(row))
        return tuple(rows)

    @staticmethod
    def _nvlink_remotes(handle: Any) -> list[tuple[str, int]]:
        """(remote bus id, remote pciDeviceId) of every active NVLink of a GPU."""
        remotes = []
        for link in range(pynvml.NVML_NVLINK_MAX_LINKS):
            try:
                state = _call(
                    "nvmlDeviceGetNvLinkState", pynvml.nvmlDeviceGetNvLinkState, handle, link
                )
            except NvmlError as exc:
                if exc.code == pynvml.NVML_ERROR_NOT_SUPPORTED and link == 0:
                    return []  # no NVLink on this GPU
                if exc.code in (
                    pynvml.NVML_ERROR_NOT_SUPPORTED,
                    pynvml.NVML_ERROR_INVALID_ARGUMENT,
                ):
                    continue  # beyond this GPU's links
                raise
            if state != pynvml.NVML_FEATURE_ENABLED:
                continue
            pci = _call(
                "nvmlDeviceGetNvLinkRemotePciInfo",
                pynvml.nvmlDeviceGetNvLinkRemotePciInfo,
                handle,
                link,
            )
            remotes.append((normalize_bus_id(pci.busId), int(pci.pciDeviceId)))
        return remotes

    # -- settings -------------------------------------------------------------------------------

    def set_compute_mode(self, uuid: str, mode: int) -> None:
        """Set a GPU's compute mode (what ``nvidia-smi -i <uuid> -c <mode>`` does; needs root).

        The MPS control daemon sets EXCLUSIVE_PROCESS before starting an MPS server and DEFAULT
        after stopping it. Raises NvmlError naming the call.
        """
        handle = _call("nvmlDeviceGetHandleByUUID", pynvml.nvmlDeviceGetHandleByUUID, uuid)
        _call("nvmlDeviceSetComputeMode", pynvml.nvmlDeviceSetComputeMode, handle, mode)

    # -- health ---------------------------------------------------------------------------------

    def probe(self, uuid: str) -> None:
        """Re-query a GPU or MIG device by UUID; raises NvmlError if it does not answer."""
        handle = _call("nvmlDeviceGetHandleByUUID", pynvml.nvmlDeviceGetHandleByUUID, uuid)
        _call("nvmlDeviceGetMemoryInfo", pynvml.nvmlDeviceGetMemoryInfo, handle)

