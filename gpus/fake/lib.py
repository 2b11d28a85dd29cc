"""The fake ``libnvidia-ml``: NVML C functions as ctypes CFUNCTYPE pointers over :class:`FakeState`.

An instance of :class:`FakeNvmlLib` is installed as ``pynvml.nvmlLib``, so pynvml's own wrappers
(ctypes structs, ``byref``, version-suffixed symbols, error mapping) run unchanged. Every pointer
argument is declared ``c_void_p`` and cast to the struct pynvml passes, so pynvml's exact ctypes
types never trip an ArgumentError. A symbol the fake lacks is simply not an attribute: pynvml turns
the AttributeError into NVML_ERROR_FUNCTION_NOT_FOUND, as with an old driver.
"""

from __future__ import annotations

import ctypes
import logging
import uuid as uuidlib
from collections.abc import Callable
from ctypes import CFUNCTYPE, POINTER, c_char_p, c_int, c_uint, c_ulonglong, c_void_p
from typing import Any

import pynvml

from gpus.fake.profile import ARCHITECTURES, BRANDS
from gpus.fake.state import (
    NOT_APPLICABLE,
    SUPPORTED_EVENTS,
    FakeEventSet,
    FakeGpu,
    FakeMig,
    FakeState,
    GpmRecord,
    NvmlReturn,
)
from gpus.fake.telemetry import ArchFigures, Telemetry, figures
from gpus.model import MIB, sysfs_bus_id

log = logging.getLogger(__name__)

SUCCESS = pynvml.NVML_SUCCESS
_P = c_void_p  # every pointer argument

# symbol -> argument types (return type is nvmlReturn_t = c_int).
SIGNATURES: dict[str, tuple[Any, ...]] = {
    "nvmlInit": (),
    "nvmlInit_v2": (),
    "nvmlInitWithFlags": (c_uint,),
    "nvmlShutdown": (),
    "nvmlSystemGetDriverVersion": (_P, c_uint),
    "nvmlSystemGetNVMLVersion": (_P, c_uint),
    "nvmlSystemGetCudaDriverVersion": (_P,),
    "nvmlSystemGetCudaDriverVersion_v2": (_P,),
    "nvmlDeviceGetCount": (_P,),
    "nvmlDeviceGetCount_v2": (_P,),
    "nvmlDeviceGetHandleByIndex": (c_uint, _P),
    "nvmlDeviceGetHandleByIndex_v2": (c_uint, _P),
    "nvmlDeviceGetHandleByUUID": (c_char_p, _P),
    "nvmlDeviceGetHandleByPciBusId": (c_char_p, _P),
    "nvmlDeviceGetHandleByPciBusId_v2": (c_char_p, _P),
    "nvmlDeviceGetUUID": (_P, _P, c_uint),
    "nvmlDeviceGetName": (_P, _P, c_uint),
    "nvmlDeviceGetIndex": (_P, _P),
    "nvmlDeviceGetMinorNumber": (_P, _P),
    "nvmlDeviceGetMemoryInfo": (_P, _P),
    "nvmlDeviceGetMemoryInfo_v2": (_P, _P),
    "nvmlDeviceGetCudaComputeCapability": (_P, _P, _P),
    "nvmlDeviceGetArchitecture": (_P, _P),
    "nvmlDeviceGetBrand": (_P, _P),
    "nvmlDeviceGetPciInfo_v3": (_P, _P),
    "nvmlDeviceGetMigMode": (_P, _P, _P),
    "nvmlDeviceGetComputeMode": (_P, _P),
    "nvmlDeviceSetComputeMode": (_P, c_uint),
    "nvmlDeviceGetMaxMigDeviceCount": (_P, _P),
    "nvmlDeviceGetMigDeviceHandleByIndex": (_P, c_uint, _P),
    "nvmlDeviceIsMigDeviceHandle": (_P, _P),
    "nvmlDeviceGetDeviceHandleFromMigDeviceHandle": (_P, _P),
    "nvmlDeviceGetGpuInstanceId": (_P, _P),
    "nvmlDeviceGetComputeInstanceId": (_P, _P),
    "nvmlDeviceGetAttributes": (_P, _P),
    "nvmlDeviceGetAttributes_v2": (_P, _P),
    "nvmlDeviceGetGpuInstanceProfileInfo": (_P, c_uint, _P),
    "nvmlDeviceGetGpuInstanceProfileInfoV": (_P, c_uint, _P),
    "nvmlDeviceGetGpuInstanceById": (_P, c_uint, _P),
    "nvmlGpuInstanceGetInfo": (_P, _P),
    "nvmlGpuInstanceGetComputeInstanceById": (_P, c_uint, _P),
    "nvmlComputeInstanceGetInfo_v2": (_P, _P),
    "nvmlDeviceGetTopologyCommonAncestor": (_P, _P, _P),
    "nvmlDeviceGetNvLinkState": (_P, c_uint, _P),
    "nvmlDeviceGetNvLinkRemotePciInfo_v2": (_P, c_uint, _P),
    "nvmlDeviceGetGpuFabricInfo": (_P, _P),
    "nvmlDeviceGetGpuFabricInfoV": (_P, _P),
    "nvmlEventSetCreate": (_P,),
    "nvmlEventSetFree": (_P,),
    "nvmlDeviceRegisterEvents": (_P, c_ulonglong, _P),
    "nvmlDeviceGetSupportedEventTypes": (_P, _P),
    "nvmlEventSetWait": (_P, _P, c_uint),
    "nvmlEventSetWait_v2": (_P, _P, c_uint),
    # telemetry (gpus/fake/telemetry.py)
    "nvmlDeviceGetUtilizationRates": (_P, _P),
    "nvmlDeviceGetEncoderUtilization": (_P, _P, _P),
    "nvmlDeviceGetDecoderUtilization": (_P, _P, _P),
    "nvmlDeviceGetClockInfo": (_P, c_uint, _P),
    "nvmlDeviceGetTemperature": (_P, c_uint, _P),
    "nvmlDeviceGetPowerUsage": (_P, _P),
    "nvmlDeviceGetTotalEnergyConsumption": (_P, _P),
    "nvmlDeviceGetPcieReplayCounter": (_P, _P),
    "nvmlDeviceGetTotalEccErrors": (_P, c_uint, c_uint, _P),
    "nvmlDeviceGetRemappedRows": (_P, _P, _P, _P, _P),
    "nvmlDeviceGetFieldValues": (_P, c_int, _P),
    "nvmlDeviceGetComputeRunningProcesses_v3": (_P, _P, _P),
    "nvmlDeviceGetProcessUtilization": (_P, _P, _P, c_ulonglong),
    "nvmlGpmQueryDeviceSupport": (_P, _P),
    "nvmlGpmSampleAlloc": (_P,),
    "nvmlGpmSampleFree": (_P,),
    "nvmlGpmSampleGet": (_P, _P),
    "nvmlGpmMigSampleGet": (_P, c_uint, _P),
    "nvmlGpmMetricsGet": (_P,),
}

_COMPUTE_MODES = frozenset({
    pynvml.NVML_COMPUTEMODE_DEFAULT, pynvml.NVML_COMPUTEMODE_EXCLUSIVE_THREAD,
    pynvml.NVML_COMPUTEMODE_PROHIBITED, pynvml.NVML_COMPUTEMODE_EXCLUSIVE_PROCESS,
})
_ARCH_CODES = {name: getattr(pynvml, f"NVML_DEVICE_ARCH_{name.upper()}") for name in ARCHITECTURES}
_BRAND_CODES = {name: getattr(pynvml, f"NVML_BRAND_{name.upper()}") for name in BRANDS}


def _fits(ctype: Any, value: int) -> int:
    """``value`` if the C integer type holds it; ctypes would silently wrap it otherwise.

    The loader bounds every profile value; this catches a value it missed (or a Profile built
    in code) as NVML_ERROR_UNKNOWN instead of a wrong answer such as 2^70 bytes read as 0.
    """
    if ctype(value).value != value:
        log.error("fake NVML: %d does not fit the C type %s", value, ctype.__name__)
        raise NvmlReturn(pynvml.NVML_ERROR_UNKNOWN)
    return value


def _out(pointer: int | None, ctype: Any, value: Any) -> None:
    """Write ``value`` through an output pointer of C type ``ctype``."""
    if not pointer:
        raise NvmlReturn(pynvml.NVML_ERROR_INVALID_ARGUMENT)
    if ctype is not c_void_p:
        value = _fits(ctype, value)
    ctypes.cast(pointer, POINTER(ctype))[0] = value


def _struct(pointer: int | None, struct_type: Any) -> Any:
    """The struct an output pointer points to."""
    if not pointer:
        raise NvmlReturn(pynvml.NVML_ERROR_INVALID_ARGUMENT)
    return ctypes.cast(pointer, POINTER(struct_type)).contents


def _write_str(buffer: int | None, size: int, text: str) -> int:
    """Copy ``text`` NUL-terminated into a caller's buffer, as NVML does."""
    data = text.encode() + b"\0"
    if not buffer:
        raise NvmlReturn(pynvml.NVML_ERROR_INVALID_ARGUMENT)
    if len(data) > size:
        raise NvmlReturn(pynvml.NVML_ERROR_INSUFFICIENT_SIZE)
    ctypes.memmove(buffer, data, len(data))
    return SUCCESS


def _handle_value(handle: int) -> Any:
    """A device/instance handle as the pointer type pynvml's structs hold."""
    return ctypes.cast(c_void_p(handle), pynvml.c_nvmlDevice_t)


class FakeNvmlLib:
    """The object installed as ``pynvml.nvmlLib``: one CFUNCTYPE attribute per NVML symbol."""

    def __init__(self, state: FakeState) -> None:
        self._state = state
        self._impl = NvmlFunctions(state)
        self._error_strings: dict[int, ctypes.Array[ctypes.c_char]] = {}
        # Keep every callback object alive for as long as the lib exists.
        self._callbacks: dict[str, Any] = {}
        for name, argtypes in SIGNATURES.items():
            self._callbacks[name] = CFUNCTYPE(c_int, *argtypes)(self._shim(name))
            setattr(self, name, self._callbacks[name])
        # pynvml sets restype = c_char_p on this one, so it returns a pointer, not an int.
        error_string = CFUNCTYPE(c_void_p, c_int)(self._error_string)
        self._callbacks["nvmlErrorString"] = error_string
        self.nvmlErrorString = error_string

    @property
    def functions(self) -> NvmlFunctions:
        """The Python implementations (tests may patch their methods)."""
        return self._impl

    def _shim(self, name: str) -> Callable[..., int]:
        """The Python body of one C function: faults, lock, and never a stray exception."""
        state = self._state

        def call(*args: Any) -> int:
            try:
                with state.lock:
                    code = state.precheck(name)
                    if code:
                        return code
                    result: int = getattr(self._impl, name)(*args)
                    return result
            except NvmlReturn as ret:
                return ret.code
            except Exception:
                log.exception("fake NVML: %s raised; returning NVML_ERROR_UNKNOWN", name)
                return int(pynvml.NVML_ERROR_UNKNOWN)

        call.__name__ = name
        return call

    def _error_string(self, code: int) -> int | None:
        try:
            buffer = self._error_strings.get(code)
            if buffer is None:
                text = pynvml.NVMLError._errcode_to_string.get(code, f"Unknown NVML error {code}")
                buffer = ctypes.create_string_buffer(text.encode())
                self._error_strings[code] = buffer
            return ctypes.addressof(buffer)
        except Exception:
            log.exception("fake NVML: nvmlErrorString(%r) raised", code)
            return None


class TelemetryFunctions:
    """The telemetry calls: utilisation, clocks, temperatures, power, energy, errors,
    processes and GPM, from :class:`gpus.fake.telemetry.Telemetry`. Called with the lock held.

    Whole-GPU calls on a MIG handle answer NOT_SUPPORTED (``FakeState.gpu``) as NVML does;
    memory, processes and GPM (``nvmlGpmMigSampleGet``) have per-instance values.
    """

    s: FakeState

    def _fig(self, gpu: FakeGpu) -> ArchFigures:
        return figures(gpu.spec.model.architecture)

    def _util(self, gpu: FakeGpu, step: int | None = None) -> int:
        migs = [m.uuid for m in gpu.mig_slots if m is not None]
        return self.s.telemetry.gpu_util(gpu.spec.uuid, migs, step)

    def _catch_up(self) -> None:
        by_uuid = {g.spec.uuid: g for g in self.s.gpus}

        def power_of(uuid: str, step: int) -> tuple[int, int, bool]:
            gpu = by_uuid[uuid]
            util = self._util(gpu, step)
            return (self.s.telemetry.power_mw(uuid, util, self._fig(gpu)), util,
                    gpu.spec.model.nvlinks > 0)

        self.s.telemetry.catch_up(power_of)

    def _counters_of(self, handle: int) -> Any:
        gpu = self.s.gpu(handle)
        self._catch_up()
        return self.s.telemetry.counters[gpu.spec.uuid]

    def nvmlDeviceGetUtilizationRates(self, handle: int, out: int) -> int:  # noqa: N802
        """nvmlUtilization_t: GPU and memory-copy utilisation in percent (NOT_SUPPORTED on
        a MIG-enabled GPU, as NVML documents: GPM is the per-instance source there)."""
        gpu = self.s.gpu(handle)
        if gpu.spec.mig_enabled:
            raise NvmlReturn(pynvml.NVML_ERROR_NOT_SUPPORTED)
        util = self._util(gpu)
        info = _struct(out, pynvml.c_nvmlUtilization_t)
        info.gpu, info.memory = util, util * 3 // 5
        return SUCCESS

    def _codec(self, handle: int, util: int, out: int, period: int) -> int:
        self.s.gpu(handle)
        _out(out, c_uint, util)
        _out(period, c_uint, 167000)  # NVML's sampling period in microseconds
        return SUCCESS

    def nvmlDeviceGetEncoderUtilization(self, handle: int, out: int, period: int) -> int:  # noqa: N802
        """Encoder utilisation: 0 (no video work in the fake)."""
        return self._codec(handle, 0, out, period)

    def nvmlDeviceGetDecoderUtilization(self, handle: int, out: int, period: int) -> int:  # noqa: N802
        """Decoder utilisation: a little, following the load."""
        gpu = self.s.gpu(handle)
        return self._codec(handle, self._util(gpu) // 10, out, period)

    def nvmlDeviceGetClockInfo(self, handle: int, clock: int, out: int) -> int:  # noqa: N802
        """MHz of the SM (and graphics) clock, boosting with load, or the memory clock."""
        gpu = self.s.gpu(handle)
        fig = self._fig(gpu)
        if clock in (pynvml.NVML_CLOCK_SM, pynvml.NVML_CLOCK_GRAPHICS):
            _out(out, c_uint, self.s.telemetry.sm_clock(self._util(gpu), fig))
        elif clock == pynvml.NVML_CLOCK_MEM:
            _out(out, c_uint, fig.mem_clock)
        else:
            raise NvmlReturn(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return SUCCESS

    def nvmlDeviceGetTemperature(self, handle: int, sensor: int, out: int) -> int:  # noqa: N802
        """The GPU die temperature in C."""
        gpu = self.s.gpu(handle)
        if sensor != pynvml.NVML_TEMPERATURE_GPU:
            raise NvmlReturn(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        _out(out, c_uint, self.s.telemetry.gpu_temp(gpu.spec.uuid, self._util(gpu)))
        return SUCCESS

    def nvmlDeviceGetPowerUsage(self, handle: int, out: int) -> int:  # noqa: N802
        """Power draw in mW."""
        gpu = self.s.gpu(handle)
        milliwatts = self.s.telemetry.power_mw(gpu.spec.uuid, self._util(gpu), self._fig(gpu))
        _out(out, c_uint, milliwatts)
        return SUCCESS

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: int, out: int) -> int:  # noqa: N802
        """mJ since the driver loaded (only grows)."""
        _out(out, c_ulonglong, self._counters_of(handle).energy_mj)
        return SUCCESS

    def nvmlDeviceGetPcieReplayCounter(self, handle: int, out: int) -> int:  # noqa: N802
        """PCIe replays so far."""
        _out(out, c_uint, self._counters_of(handle).pcie_replays)
        return SUCCESS

    def nvmlDeviceGetTotalEccErrors(self, handle: int, error_type: int, counter: int,  # noqa: N802
                                    out: int) -> int:
        """Corrected/uncorrected, volatile/aggregate ECC error counts."""
        counters = self._counters_of(handle)
        if error_type not in (pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED,
                              pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED) or counter not in (
                pynvml.NVML_VOLATILE_ECC, pynvml.NVML_AGGREGATE_ECC):
            raise NvmlReturn(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        key = (error_type == pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED,
               counter == pynvml.NVML_AGGREGATE_ECC)
        _out(out, c_ulonglong, counters.ecc.get(key, 0))
        return SUCCESS

    def nvmlDeviceGetRemappedRows(self, handle: int, corr: int, unc: int, pending: int,  # noqa: N802
                                  failure: int) -> int:
        """Row remapping (Ampere and later; NOT_SUPPORTED before, as on a V100 or T4)."""
        gpu = self.s.gpu(handle)
        if not self._fig(gpu).row_remapping:
            raise NvmlReturn(pynvml.NVML_ERROR_NOT_SUPPORTED)
        counters = self._counters_of(handle)
        _out(corr, c_uint, counters.remapped_correctable)
        _out(unc, c_uint, counters.remapped_uncorrectable)
        _out(pending, c_uint, int(counters.remap_pending))
        _out(failure, c_uint, int(counters.remap_failure))
        return SUCCESS

    def nvmlDeviceGetFieldValues(self, handle: int, count: int, values: int) -> int:  # noqa: N802
        """Memory temperature and NVLink throughput; other fields answer NOT_SUPPORTED
        in their own ``nvmlReturn`` (the call itself succeeds, as NVML's does)."""
        gpu = self.s.gpu(handle)
        if not values or count <= 0:
            raise NvmlReturn(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        array = ctypes.cast(values, POINTER(pynvml.c_nvmlFieldValue_t))
        fig, counters = self._fig(gpu), self._counters_of(handle)
        util = self._util(gpu)
        for k in range(count):
            value = array[k]
            value.timestamp = self.s.telemetry.step * 1_000_000
            value.nvmlReturn = SUCCESS
            value.valueType = pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG
            if value.fieldId == pynvml.NVML_FI_DEV_MEMORY_TEMP and fig.memory_temp:
                value.valueType = pynvml.NVML_VALUE_TYPE_UNSIGNED_INT
                value.value.uiVal = self.s.telemetry.gpu_temp(gpu.spec.uuid, util) + 6
            elif value.fieldId == pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX and \
                    gpu.spec.model.nvlinks:
                value.value.ullVal = counters.nvlink_rx_kib
            elif value.fieldId == pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX and \
                    gpu.spec.model.nvlinks:
                value.value.ullVal = counters.nvlink_tx_kib
            else:
                value.nvmlReturn = pynvml.NVML_ERROR_NOT_SUPPORTED
        return SUCCESS

    def nvmlDeviceGetComputeRunningProcesses_v3(self, handle: int, count: int,  # noqa: N802
                                                infos: int) -> int:
        """The processes on a GPU (its MIG devices' too) or on one MIG device."""
        dev = self.s.device(handle)
        procs = self._processes(dev)
        capacity = _struct(count, c_uint).value
        _out(count, c_uint, len(procs))
        if not procs:
            return SUCCESS
        if capacity < len(procs) or not infos:
            raise NvmlReturn(pynvml.NVML_ERROR_INSUFFICIENT_SIZE)
        array = ctypes.cast(infos, POINTER(pynvml.c_nvmlProcessInfo_v3_t))
        for k, (proc, gi, ci) in enumerate(procs):
            array[k].pid, array[k].usedGpuMemory = proc.pid, proc.used_mib * MIB
            array[k].gpuInstanceId, array[k].computeInstanceId = gi, ci
        return SUCCESS

    def _processes(self, dev: FakeGpu | FakeMig) -> list[tuple[Any, int, int]]:
        telemetry = self.s.telemetry
        if isinstance(dev, FakeMig):
            return [(p, dev.gpu_instance.spec.id, dev.compute_instance.id)
                    for p in telemetry.processes.get(dev.uuid, [])]
        found = [(p, NOT_APPLICABLE, NOT_APPLICABLE)
                 for p in telemetry.processes.get(dev.spec.uuid, [])]
        for mig in dev.mig_slots:
            if mig is not None:
                found += self._processes(mig)
        return found

    def nvmlDeviceGetProcessUtilization(self, handle: int, samples: int, count: int,  # noqa: N802
                                        since: int) -> int:
        """Per-process SM utilisation samples newer than ``since`` (microseconds);
        NOT_FOUND when there are none, as NVML answers; NOT_SUPPORTED in MIG mode."""
        gpu = self.s.gpu(handle)
        if gpu.spec.mig_enabled:
            raise NvmlReturn(pynvml.NVML_ERROR_NOT_SUPPORTED)
        timestamp = (self.s.telemetry.step + 1) * 1_000_000
        procs = [p for p, _, _ in self._processes(gpu)] if timestamp > since else []
        if not procs:
            raise NvmlReturn(pynvml.NVML_ERROR_NOT_FOUND)
        capacity = _struct(count, c_uint).value
        _out(count, c_uint, len(procs))
        if not samples or capacity < len(procs):
            raise NvmlReturn(pynvml.NVML_ERROR_INSUFFICIENT_SIZE)
        array = ctypes.cast(samples, POINTER(pynvml.c_nvmlProcessUtilizationSample_t))
        for k, proc in enumerate(procs):
            array[k].pid, array[k].timeStamp = proc.pid, timestamp
            array[k].smUtil, array[k].memUtil = proc.sm_util, proc.sm_util // 2
            array[k].encUtil = array[k].decUtil = 0
        return SUCCESS

    # -- GPM (Hopper and later) -----------------------------------------------------------------

    def nvmlGpmQueryDeviceSupport(self, handle: int, out: int) -> int:  # noqa: N802
        """Whether the GPU supports GPM (checks the struct version like NVML)."""
        gpu = self.s.gpu(handle)
        info = _struct(out, pynvml.c_nvmlGpmSupport_t)
        if info.version != pynvml.NVML_GPM_SUPPORT_VERSION:
            raise NvmlReturn(pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH)
        info.isSupportedDevice = int(self._fig(gpu).gpm)
        return SUCCESS

    def nvmlGpmSampleAlloc(self, out: int) -> int:  # noqa: N802
        """A new (empty) sample buffer."""
        record = GpmRecord(handle=0)
        record.handle = self.s.new_handle(record)
        self.s.gpm_samples[record.handle] = record
        _out(out, c_void_p, record.handle)
        return SUCCESS

    def _gpm_record(self, handle: int) -> GpmRecord:
        record = self.s.gpm_samples.get(handle or 0)
        if record is None:
            raise NvmlReturn(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return record

    def nvmlGpmSampleFree(self, handle: int) -> int:  # noqa: N802
        """Free a sample buffer."""
        record = self._gpm_record(handle)
        del self.s.gpm_samples[record.handle]
        self.s.objects.pop(record.handle, None)
        return SUCCESS

    def _gpm_fill(self, gpu: FakeGpu, gi: int | None, sample: int) -> int:
        if not self._fig(gpu).gpm:
            raise NvmlReturn(pynvml.NVML_ERROR_NOT_SUPPORTED)
        record = self._gpm_record(sample)
        record.gpu_uuid, record.gpu_instance_id = gpu.spec.uuid, gi
        record.step = self.s.telemetry.step
        record.timestamp_ns = (record.step + 1) * 1_000_000_000
        return SUCCESS

    def nvmlGpmSampleGet(self, handle: int, sample: int) -> int:  # noqa: N802
        """Record a whole-GPU sample."""
        return self._gpm_fill(self.s.gpu(handle), None, sample)

    def nvmlGpmMigSampleGet(self, handle: int, gi: int, sample: int) -> int:  # noqa: N802
        """Record a sample of one GPU instance."""
        gpu = self.s.gpu(handle)
        if gi not in gpu.gpu_instances:
            raise NvmlReturn(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return self._gpm_fill(gpu, gi, sample)

    def nvmlGpmMetricsGet(self, out: int) -> int:  # noqa: N802
        """Metrics between two samples of the same device, from the later one's load."""
        request = _struct(out, pynvml.c_nvmlGpmMetricsGet_t)
        if request.version != pynvml.NVML_GPM_METRICS_GET_VERSION:
            raise NvmlReturn(pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH)
        first = self._gpm_record(ctypes.cast(request.sample1, c_void_p).value or 0)
        second = self._gpm_record(ctypes.cast(request.sample2, c_void_p).value or 0)
        if first.gpu_uuid is None or (first.gpu_uuid, first.gpu_instance_id) != (
                second.gpu_uuid, second.gpu_instance_id):
            raise NvmlReturn(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        gpu = next(g for g in self.s.gpus if g.spec.uuid == second.gpu_uuid)
        util = self._util(gpu, second.step)
        if second.gpu_instance_id is not None:
            gi = gpu.gpu_instances[second.gpu_instance_id]
            migs = [m for m in gpu.mig_slots if m is not None and m.gpu_instance is gi]
            util = min(100, sum(p.sm_util for m in migs
                                for p in self.s.telemetry.processes.get(m.uuid, [])))
        values = {
            pynvml.NVML_GPM_METRIC_GRAPHICS_UTIL: float(util),
            pynvml.NVML_GPM_METRIC_SM_UTIL: float(util),
            pynvml.NVML_GPM_METRIC_ANY_TENSOR_UTIL: util * 0.6,
            pynvml.NVML_GPM_METRIC_DRAM_BW_UTIL: util * 0.45,
            pynvml.NVML_GPM_METRIC_PCIE_TX_PER_SEC: util * 12.5,
            pynvml.NVML_GPM_METRIC_PCIE_RX_PER_SEC: util * 20.25,
        }
        for k in range(min(request.numMetrics, pynvml.NVML_GPM_METRIC_MAX)):
            metric = request.metrics[k]
            value = values.get(metric.metricId)
            metric.nvmlReturn = SUCCESS if value is not None else pynvml.NVML_ERROR_NOT_SUPPORTED
            metric.value = value or 0.0
        return SUCCESS


class NvmlFunctions(TelemetryFunctions):
    """Python bodies of the NVML functions; each returns NVML_SUCCESS or raises NvmlReturn.

    Called with the state lock held.
    """

    def __init__(self, state: FakeState) -> None:
        self.s = state

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
        return _write_str(buf, size, self.s.profile.driver_version)

    def nvmlSystemGetNVMLVersion(self, buf: int, size: int) -> int:  # noqa: N802
        """The NVML version string."""
        return _write_str(buf, size, self.s.profile.nvml_version)

    def nvmlSystemGetCudaDriverVersion(self, out: int) -> int:  # noqa: N802
        """CUDA driver version as an integer (12020)."""
        _out(out, c_int, self.s.profile.cuda_driver_version)
        return SUCCESS

    def nvmlSystemGetCudaDriverVersion_v2(self, out: int) -> int:  # noqa: N802
        """CUDA driver version as an integer."""
        return self.nvmlSystemGetCudaDriverVersion(out)

    # -- enumeration ----------------------------------------------------------------------------

    def nvmlDeviceGetCount(self, out: int) -> int:  # noqa: N802
        """Number of GPUs."""
        _out(out, c_uint, len(self.s.gpus))
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
        _out(out, c_void_p, gpu.handle)
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
        _out(out, c_void_p, found.handle)
        return SUCCESS

    def nvmlDeviceGetHandleByPciBusId(self, bus_id: bytes | None, out: int) -> int:  # noqa: N802
        """A GPU's handle by PCI bus id (either spelling)."""
        wanted = sysfs_bus_id((bus_id or b"").decode(errors="replace"))
        for gpu in self.s.gpus:
            if gpu.spec.sysfs_bus_id == wanted:
                self.s.device(gpu.handle)
                _out(out, c_void_p, gpu.handle)
                return SUCCESS
        raise NvmlReturn(pynvml.NVML_ERROR_NOT_FOUND)

    def nvmlDeviceGetHandleByPciBusId_v2(self, bus_id: bytes | None, out: int) -> int:  # noqa: N802
        """A GPU's handle by PCI bus id."""
        return self.nvmlDeviceGetHandleByPciBusId(bus_id, out)

    # -- identity -------------------------------------------------------------------------------

    def nvmlDeviceGetUUID(self, handle: int, buf: int, size: int) -> int:  # noqa: N802
        """GPU-... or MIG-..."""
        dev = self.s.device(handle)
        return _write_str(buf, size, dev.uuid if isinstance(dev, FakeMig) else dev.spec.uuid)

    def nvmlDeviceGetName(self, handle: int, buf: int, size: int) -> int:  # noqa: N802
        """Product name; MIG devices: "<name> MIG <profile>"."""
        dev = self.s.device(handle)
        if isinstance(dev, FakeMig):
            return _write_str(buf, size, f"{dev.gpu.spec.model.name} MIG {dev.name_suffix}")
        return _write_str(buf, size, dev.spec.model.name)

    def nvmlDeviceGetIndex(self, handle: int, out: int) -> int:  # noqa: N802
        """NVML index."""
        _out(out, c_uint, self.s.gpu(handle).spec.index)
        return SUCCESS

    def nvmlDeviceGetMinorNumber(self, handle: int, out: int) -> int:  # noqa: N802
        """/dev/nvidia<minor>."""
        _out(out, c_uint, self.s.gpu(handle).spec.minor)
        return SUCCESS

    def nvmlDeviceGetMemoryInfo(self, handle: int, out: int) -> int:  # noqa: N802
        """nvmlMemory_t (v1): all free."""
        info = _struct(out, pynvml.c_nvmlMemory_t)
        total = self._memory_bytes(handle)
        used = self._used_bytes(handle, total)
        # v1 counts the driver's reservation as used, as NVML does
        info.total, info.used = total, used + Telemetry.reserved_bytes(total)
        info.free = total - info.used
        return SUCCESS

    def nvmlDeviceGetMemoryInfo_v2(self, handle: int, out: int) -> int:  # noqa: N802
        """nvmlMemory_v2_t: checks the struct version like NVML."""
        info = _struct(out, pynvml.c_nvmlMemory_v2_t)
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
            return _fits(c_ulonglong, dev.gpu_instance.spec.profile.memory_mib * MIB)
        return _fits(c_ulonglong, dev.spec.model.memory_bytes)

    def _gpu_of(self, handle: int) -> FakeGpu:
        dev = self.s.device(handle)
        return dev.gpu if isinstance(dev, FakeMig) else dev

    def nvmlDeviceGetCudaComputeCapability(self, handle: int, major: int, minor: int) -> int:  # noqa: N802
        """Compute capability (MIG devices: the parent's)."""
        cc = self._gpu_of(handle).spec.model.compute_capability
        _out(major, c_int, cc[0])
        _out(minor, c_int, cc[1])
        return SUCCESS

    def nvmlDeviceGetArchitecture(self, handle: int, out: int) -> int:  # noqa: N802
        """nvmlDeviceArchitecture_t."""
        arch = self._gpu_of(handle).spec.model.architecture
        _out(out, c_uint, _ARCH_CODES.get(arch, pynvml.NVML_DEVICE_ARCH_UNKNOWN))
        return SUCCESS

    def nvmlDeviceGetBrand(self, handle: int, out: int) -> int:  # noqa: N802
        """nvmlBrandType_t."""
        _out(out, c_uint, _BRAND_CODES[self._gpu_of(handle).spec.model.brand])
        return SUCCESS

    def nvmlDeviceGetPciInfo_v3(self, handle: int, out: int) -> int:  # noqa: N802
        """nvmlPciInfo_t."""
        gpu = self.s.gpu(handle)
        _fill_pci(
            _struct(out, pynvml.nvmlPciInfo_t),
            gpu.spec.bus_id,
            gpu.spec.model.pci_device_id,
            gpu.spec.model.pci_subsystem_id,
        )
        return SUCCESS

    # -- MIG ------------------------------------------------------------------------------------

    def nvmlDeviceGetComputeMode(self, handle: int, out: int) -> int:  # noqa: N802
        """The GPU's compute mode (NVML_COMPUTEMODE_*); MIG devices: NOT_SUPPORTED."""
        dev = self.s.device(handle)
        if isinstance(dev, FakeMig):
            raise NvmlReturn(pynvml.NVML_ERROR_NOT_SUPPORTED)
        _out(out, c_uint, dev.compute_mode)
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

    def nvmlDeviceGetMigMode(self, handle: int, current: int, pending: int) -> int:  # noqa: N802
        """Current and pending MIG mode; NOT_SUPPORTED on GPUs without MIG."""
        gpu = self.s.gpu(handle)
        if not gpu.spec.model.mig_capable:
            raise NvmlReturn(pynvml.NVML_ERROR_NOT_SUPPORTED)
        mode = (
            pynvml.NVML_DEVICE_MIG_ENABLE
            if gpu.spec.mig_enabled
            else pynvml.NVML_DEVICE_MIG_DISABLE
        )
        _out(current, c_uint, mode)
        _out(pending, c_uint, mode)
        return SUCCESS

    def nvmlDeviceGetMaxMigDeviceCount(self, handle: int, out: int) -> int:  # noqa: N802
        """Number of MIG device slots."""
        gpu = self.s.gpu(handle)
        if not gpu.spec.model.mig_capable:
            raise NvmlReturn(pynvml.NVML_ERROR_NOT_SUPPORTED)
        # A real H100 with MIG disabled answers 0 here.
        _out(out, c_uint, len(gpu.mig_slots))
        return SUCCESS

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle: int, index: int, out: int) -> int:  # noqa: N802
        """A MIG device by slot; NOT_FOUND for an empty slot."""
        gpu = self.s.gpu(handle)
        if not gpu.spec.model.mig_capable:
            raise NvmlReturn(pynvml.NVML_ERROR_NOT_SUPPORTED)
        if not gpu.spec.mig_enabled:
            raise NvmlReturn(pynvml.NVML_ERROR_NOT_FOUND)  # what a real H100 answers
        if index >= len(gpu.mig_slots):
            raise NvmlReturn(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        mig = gpu.mig_slots[index]
        if mig is None:
            raise NvmlReturn(pynvml.NVML_ERROR_NOT_FOUND)
        _out(out, c_void_p, mig.handle)
        return SUCCESS

    def nvmlDeviceIsMigDeviceHandle(self, handle: int, out: int) -> int:  # noqa: N802
        """1 for a MIG device handle."""
        _out(out, c_uint, int(isinstance(self.s.device(handle), FakeMig)))
        return SUCCESS

    def nvmlDeviceGetDeviceHandleFromMigDeviceHandle(self, handle: int, out: int) -> int:  # noqa: N802
        """The parent GPU of a MIG device."""
        dev = self.s.device(handle)
        if not isinstance(dev, FakeMig):
            raise NvmlReturn(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        _out(out, c_void_p, dev.gpu.handle)
        return SUCCESS

    def _mig(self, handle: int) -> FakeMig:
        dev = self.s.device(handle)
        if not isinstance(dev, FakeMig):
            raise NvmlReturn(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return dev

    def nvmlDeviceGetGpuInstanceId(self, handle: int, out: int) -> int:  # noqa: N802
        """A MIG device's GPU instance id."""
        _out(out, c_uint, self._mig(handle).gpu_instance.spec.id)
        return SUCCESS

    def nvmlDeviceGetComputeInstanceId(self, handle: int, out: int) -> int:  # noqa: N802
        """A MIG device's compute instance id."""
        _out(out, c_uint, self._mig(handle).compute_instance.id)
        return SUCCESS

    def nvmlDeviceGetAttributes_v2(self, handle: int, out: int) -> int:  # noqa: N802
        """nvmlDeviceAttributes_t of a MIG device (SMs scale with the compute slices)."""
        mig = self._mig(handle)
        gi = mig.gpu_instance.spec.profile
        attrs = _struct(out, pynvml.c_nvmlDeviceAttributes)
        attrs.multiprocessorCount = gi.multiprocessors * mig.compute_instance.slices // gi.slices
        attrs.sharedCopyEngineCount = gi.copy_engines
        attrs.sharedDecoderCount = gi.decoders
        attrs.sharedEncoderCount = gi.encoders
        attrs.sharedJpegCount = gi.jpeg
        attrs.sharedOfaCount = gi.ofa
        attrs.gpuInstanceSliceCount = gi.slices
        attrs.computeInstanceSliceCount = mig.compute_instance.slices
        attrs.memorySizeMB = gi.memory_mib
        return SUCCESS

    def nvmlDeviceGetAttributes(self, handle: int, out: int) -> int:  # noqa: N802
        """Same struct as v2."""
        return self.nvmlDeviceGetAttributes_v2(handle, out)

    def _gi_profile(self, handle: int, profile: int) -> Any:
        gpu = self.s.gpu(handle)
        if not gpu.spec.model.mig_capable:
            raise NvmlReturn(pynvml.NVML_ERROR_NOT_SUPPORTED)
        if profile >= pynvml.NVML_GPU_INSTANCE_PROFILE_COUNT:
            raise NvmlReturn(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        found = next((p for p in gpu.spec.model.mig_profiles if p.constant == profile), None)
        if found is None:
            raise NvmlReturn(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return found

    def _fill_gi_profile(self, info: Any, handle: int, profile: int) -> None:
        p = self._gi_profile(handle, profile)
        info.id, info.isP2pSupported, info.sliceCount = p.id, 0, p.slices
        info.instanceCount, info.multiprocessorCount = p.instances, p.multiprocessors
        info.copyEngineCount, info.decoderCount, info.encoderCount = (
            p.copy_engines,
            p.decoders,
            p.encoders,
        )
        info.jpegCount, info.ofaCount, info.memorySizeMB = p.jpeg, p.ofa, p.memory_mib

    def nvmlDeviceGetGpuInstanceProfileInfo(self, handle: int, profile: int, out: int) -> int:  # noqa: N802
        """nvmlGpuInstanceProfileInfo_t (v1)."""
        self._fill_gi_profile(_struct(out, pynvml.c_nvmlGpuInstanceProfileInfo_t), handle, profile)
        return SUCCESS

    def nvmlDeviceGetGpuInstanceProfileInfoV(self, handle: int, profile: int, out: int) -> int:  # noqa: N802
        """nvmlGpuInstanceProfileInfo_v2_t (checks the version, adds the name)."""
        info = _struct(out, pynvml.c_nvmlGpuInstanceProfileInfo_v2_t)
        if info.version != pynvml.nvmlGpuInstanceProfileInfo_v2:
            raise NvmlReturn(pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH)
        self._fill_gi_profile(info, handle, profile)
        info.name = f"MIG {self._gi_profile(handle, profile).name}".encode()
        return SUCCESS

    def nvmlDeviceGetGpuInstanceById(self, handle: int, gi_id: int, out: int) -> int:  # noqa: N802
        """A GPU instance handle."""
        gpu = self.s.gpu(handle)
        if not gpu.spec.mig_enabled:
            raise NvmlReturn(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        gi = gpu.gpu_instances.get(gi_id)
        if gi is None:
            raise NvmlReturn(pynvml.NVML_ERROR_NOT_FOUND)
        _out(out, c_void_p, gi.handle)
        return SUCCESS

    def nvmlGpuInstanceGetInfo(self, handle: int, out: int) -> int:  # noqa: N802
        """nvmlGpuInstanceInfo_t."""
        gi = self.s.gpu_instance(handle)
        info = _struct(out, pynvml.c_nvmlGpuInstanceInfo_t)
        info.device = _handle_value(gi.gpu.handle)
        info.id, info.profileId = gi.spec.id, gi.spec.profile.id
        info.placement.start, info.placement.size = gi.spec.placement_start, gi.spec.profile.slices
        return SUCCESS

    def nvmlGpuInstanceGetComputeInstanceById(self, handle: int, ci_id: int, out: int) -> int:  # noqa: N802
        """A compute instance handle."""
        ci = self.s.gpu_instance(handle).compute_instances.get(ci_id)
        if ci is None:
            raise NvmlReturn(pynvml.NVML_ERROR_NOT_FOUND)
        _out(out, c_void_p, ci.handle)
        return SUCCESS

    def nvmlComputeInstanceGetInfo_v2(self, handle: int, out: int) -> int:  # noqa: N802
        """nvmlComputeInstanceInfo_t (profileId = the compute-instance profile constant)."""
        ci = self.s.compute_instance(handle)
        info = _struct(out, pynvml.c_nvmlComputeInstanceInfo_t)
        info.device = _handle_value(ci.gpu_instance.gpu.handle)
        info.gpuInstance = ctypes.cast(c_void_p(ci.gpu_instance.handle), pynvml.c_nvmlGpuInstance_t)
        info.id = ci.spec.id
        info.profileId = {1: 0, 2: 1, 3: 2, 4: 3, 7: 4, 8: 5, 6: 6}.get(ci.spec.slices, 0)
        info.placement.start, info.placement.size = 0, ci.spec.slices
        return SUCCESS

    # -- topology -------------------------------------------------------------------------------

    def nvmlDeviceGetTopologyCommonAncestor(self, h1: int, h2: int, out: int) -> int:  # noqa: N802
        """nvmlGpuTopologyLevel_t between two GPUs."""
        a, b = self.s.gpu(h1), self.s.gpu(h2)
        _out(out, c_uint, self.s.profile.topology.levels[a.spec.index][b.spec.index])
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
        _out(out, c_uint, pynvml.NVML_FEATURE_ENABLED if active else pynvml.NVML_FEATURE_DISABLED)
        return SUCCESS

    def nvmlDeviceGetNvLinkRemotePciInfo_v2(self, handle: int, link: int, out: int) -> int:  # noqa: N802
        """PCI info of the far end of a link (another GPU or an NVSwitch)."""
        remote = self._link(handle, link)
        if remote is None:
            raise NvmlReturn(pynvml.NVML_ERROR_NOT_SUPPORTED)
        _fill_pci(_struct(out, pynvml.nvmlPciInfo_t), remote[0], remote[1], 0)
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
        self._fill_fabric(_struct(out, pynvml.c_nvmlGpuFabricInfo_t), handle)
        return SUCCESS

    def nvmlDeviceGetGpuFabricInfoV(self, handle: int, out: int) -> int:  # noqa: N802
        """nvmlGpuFabricInfo_v2_t or _v3_t, by the version the caller set (as NVML checks)."""
        version = _struct(out, ctypes.c_uint).value
        structs = {pynvml.nvmlGpuFabricInfo_v2: pynvml.c_nvmlGpuFabricInfo_v2_t,
                   pynvml.nvmlGpuFabricInfo_v3: pynvml.c_nvmlGpuFabricInfo_v3_t}
        struct_type = structs.get(version)
        if struct_type is None:
            raise NvmlReturn(pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH)
        info = _struct(out, struct_type)
        self._fill_fabric(info, handle)
        info.healthMask = 0
        return SUCCESS

    # -- events ---------------------------------------------------------------------------------

    def nvmlEventSetCreate(self, out: int) -> int:  # noqa: N802
        """A new event set."""
        event_set = FakeEventSet(handle=0, cond=self.s.new_condition())
        event_set.handle = self.s.new_handle(event_set)
        self.s.event_sets[event_set.handle] = event_set
        _out(out, c_void_p, event_set.handle)
        return SUCCESS

    def nvmlEventSetFree(self, handle: int) -> int:  # noqa: N802
        """Free an event set, waking its waiters."""
        event_set = self.s.event_set(handle)
        event_set.freed = True
        event_set.cond.notify_all()
        del self.s.event_sets[event_set.handle]
        return SUCCESS

    def nvmlDeviceGetSupportedEventTypes(self, handle: int, out: int) -> int:  # noqa: N802
        """The event types the fake delivers."""
        self.s.gpu(handle)
        _out(out, c_ulonglong, SUPPORTED_EVENTS)
        return SUCCESS

    def nvmlDeviceRegisterEvents(self, handle: int, types: int, set_handle: int) -> int:  # noqa: N802
        """Register a GPU for event types (MIG handles: NOT_SUPPORTED, as in NVML)."""
        gpu = self.s.gpu(handle)
        event_set = self.s.event_set(set_handle)
        if types & ~SUPPORTED_EVENTS:
            raise NvmlReturn(pynvml.NVML_ERROR_NOT_SUPPORTED)
        index = gpu.spec.index
        event_set.registrations[index] = event_set.registrations.get(index, 0) | types
        self.s.registered.notify_all()
        return SUCCESS

    def nvmlEventSetWait_v2(self, handle: int, out: int, timeout_ms: int) -> int:  # noqa: N802
        """Block until an event (NVML_ERROR_TIMEOUT after ``timeout_ms``)."""
        event_set = self.s.event_set(handle)
        data = _struct(out, pynvml.c_nvmlEventData_t)
        event = self.s.wait(event_set, timeout_ms)
        data.device = _handle_value(event.gpu_handle)
        data.eventType, data.eventData = event.event_type, event.data
        data.gpuInstanceId, data.computeInstanceId = (
            event.gpu_instance_id,
            event.compute_instance_id,
        )
        return SUCCESS

    def nvmlEventSetWait(self, handle: int, out: int, timeout_ms: int) -> int:  # noqa: N802
        """Same as v2 (the data struct already carries GI/CI ids)."""
        return self.nvmlEventSetWait_v2(handle, out, timeout_ms)


def _fill_pci(info: Any, bus_id: str, device_id: int, subsystem_id: int) -> None:
    """Fill an nvmlPciInfo_t from an NVML-form bus id."""
    domain, bus, rest = bus_id.split(":")
    device = rest.split(".")[0]
    info.busIdLegacy = f"{domain[-4:]}:{bus}:{rest}".encode()
    info.busId = bus_id.encode()
    info.domain, info.bus, info.device = int(domain, 16), int(bus, 16), int(device, 16)
    info.pciDeviceId, info.pciSubSystemId = device_id, subsystem_id


__all__ = ["FakeNvmlLib", "NvmlFunctions", "SIGNATURES", "NOT_APPLICABLE"]
