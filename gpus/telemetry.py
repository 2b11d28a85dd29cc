"""NVML telemetry, read in one place: one :class:`Sample` per read of every GPU and MIG device.

The same code runs on the real driver and on the fake NVML beneath pynvml. Rules:

- a value NVML does not support (NOT_SUPPORTED, FUNCTION_NOT_FOUND, a field's own
  NOT_SUPPORTED) is None, never 0, and that call is not asked again for that device;
- any other failing call leaves its values None and is counted by (call, NVML error name) in
  :attr:`Sample.errors`; it never fails the whole sample;
- a GPU answering GPU_IS_LOST gives no device samples (listed in :attr:`Sample.lost`) and is
  read again on the next sample, so it comes back on recovery.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import field
from types import MappingProxyType
from typing import Any

import pynvml

from gpus.model import GPU, MIB, Snapshot
from gpus.nvmlcall import NvmlError, _call
from gpus.records import record

log = logging.getLogger(__name__)

_ABSENT = (pynvml.NVML_ERROR_NOT_SUPPORTED, pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
ALL_NVLINKS = 0xFFFFFFFF
MEMORY_TEMP_MAX_C = 200  # DCGM treats larger readings as errors

# GPM metric -> (Sample attribute, divisor): ratios are NVML percent / 100 (as DCGM); PCIe
# rates are NVML MiB/s turned into the bytes/s dcgm-exporter's help text promises.
GPM_METRICS: dict[int, tuple[str, float]] = {
    pynvml.NVML_GPM_METRIC_GRAPHICS_UTIL: ("gr_engine_active", 100.0),
    pynvml.NVML_GPM_METRIC_ANY_TENSOR_UTIL: ("tensor_active", 100.0),
    pynvml.NVML_GPM_METRIC_DRAM_BW_UTIL: ("dram_active", 100.0),
    pynvml.NVML_GPM_METRIC_PCIE_TX_PER_SEC: ("pcie_tx_bytes", 1.0 / MIB),
    pynvml.NVML_GPM_METRIC_PCIE_RX_PER_SEC: ("pcie_rx_bytes", 1.0 / MIB),
}


@record
class ProcessSample:
    """A process on a device: NVML's pid, memory and SM share (None: not reported)."""

    pid: int
    used_memory_mib: int | None = None
    sm_util: int | None = None


@record
class DeviceSample:
    """One GPU's or one MIG device's values; None means NVML has no value (omit, never 0)."""

    uuid: str  # the device's own UUID (GPU- or MIG-)
    gpu_uuid: str  # the GPU (the parent of a MIG device)
    gpu_instance_id: int | None = None  # set on MIG devices
    gpu_util: int | None = None  # %
    mem_copy_util: int | None = None  # %
    enc_util: int | None = None  # %
    dec_util: int | None = None  # %
    sm_clock_mhz: int | None = None
    mem_clock_mhz: int | None = None
    gpu_temp_c: int | None = None
    memory_temp_c: int | None = None
    power_w: float | None = None
    energy_mj: int | None = None  # counter since the driver loaded
    pcie_replays: int | None = None  # counter
    fb_used_mib: int | None = None
    fb_free_mib: int | None = None
    fb_reserved_mib: int | None = None
    nvlink_bandwidth_total: int | None = None  # counter: RX + TX data, all links (NVML KiB)
    ecc_sbe_volatile: int | None = None
    ecc_dbe_volatile: int | None = None
    ecc_sbe_aggregate: int | None = None
    ecc_dbe_aggregate: int | None = None
    remapped_correctable: int | None = None
    remapped_uncorrectable: int | None = None
    remap_pending: int | None = None  # 0/1
    remap_failure: int | None = None  # 0/1
    gr_engine_active: float | None = None  # GPM ratios 0..1 (Hopper and later)
    tensor_active: float | None = None
    dram_active: float | None = None
    pcie_tx_bytes: float | None = None  # GPM, bytes/s
    pcie_rx_bytes: float | None = None
    # None: NVML gave no process list; () : it did, and nothing runs
    processes: tuple[ProcessSample, ...] | None = None

    def value(self, name: str) -> float | int | None:
        """A value by attribute name."""
        result: float | int | None = getattr(self, name)
        return result


_EMPTY_ERRORS: Mapping[tuple[str, str], int] = MappingProxyType({})


@record
class Sample:
    """Every device's values from one read."""

    taken_at: float  # the sampler's clock (monotonic seconds) when the read began
    duration_s: float
    devices: tuple[DeviceSample, ...] = ()
    lost: tuple[str, ...] = ()  # GPU UUIDs that answered GPU_IS_LOST
    # (NVML call, error name) -> failures so far (cumulative, for a counter)
    errors: Mapping[tuple[str, str], int] = field(default_factory=lambda: _EMPTY_ERRORS)

    def device(self, uuid: str) -> DeviceSample | None:
        """The sample of a GPU or MIG device by UUID."""
        return next((d for d in self.devices if d.uuid == uuid), None)


class _Lost(Exception):
    """GPU_IS_LOST from any call: abandon this GPU for this sample."""


class TelemetryReader:
    """Reads :class:`Sample`\\ s for the devices of a Snapshot. Not thread-safe: one sampler
    thread owns it. ``wanted``: the DeviceSample attributes to read (None: all), so calls for
    fields nobody exports are never made."""

    def __init__(self, wanted: Iterable[str] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.wanted = None if wanted is None else frozenset(wanted)
        self._clock = clock
        self._errors: dict[tuple[str, str], int] = {}
        self._unsupported: set[tuple[str, str]] = set()  # (device uuid, call)
        self._gpm: dict[tuple[str, int | None], Any] = {}  # device -> previous GPM sample
        self._last_process_ts: dict[str, int] = {}

    def _want(self, *names: str) -> bool:
        return self.wanted is None or any(n in self.wanted for n in names)

    # -- calling --------------------------------------------------------------------------------

    def _try(self, uuid: str, call: str, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)``; None when unsupported (remembered) or failing (counted)."""
        if (uuid, call) in self._unsupported:
            return None
        try:
            return _call(call, fn, *args)
        except NvmlError as exc:
            if exc.code == pynvml.NVML_ERROR_GPU_IS_LOST:
                raise _Lost from None
            if exc.code in _ABSENT:
                self._unsupported.add((uuid, call))
                return None
            self._count(call, exc.name)
            log.debug("%s: %s", uuid, exc)
            return None

    def _count(self, call: str, name: str) -> None:
        key = (call, name)
        self._errors[key] = self._errors.get(key, 0) + 1

    # -- reading --------------------------------------------------------------------------------

    def read(self, snapshot: Snapshot) -> Sample:
        """One sample of every GPU (and MIG device) of ``snapshot``."""
        start = self._clock()
        devices: list[DeviceSample] = []
        lost: list[str] = []
        for gpu in snapshot.gpus:
            try:
                devices.extend(self._read_gpu(gpu))
            except _Lost:
                lost.append(gpu.uuid)
                self._forget(gpu.uuid)
        return Sample(start, self._clock() - start, tuple(devices), tuple(lost),
                      MappingProxyType(dict(self._errors)))

    def _forget(self, gpu_uuid: str) -> None:
        for key in [k for k in self._gpm if k[0] == gpu_uuid]:
            self._free_gpm(self._gpm.pop(key))

    def close(self) -> None:
        """Free GPM buffers (call before NVML shuts down)."""
        for sample in self._gpm.values():
            self._free_gpm(sample)
        self._gpm.clear()

    @staticmethod
    def _free_gpm(sample: Any) -> None:
        try:
            _call("nvmlGpmSampleFree", pynvml.nvmlGpmSampleFree, sample)
        except NvmlError as exc:
            log.debug("freeing a GPM sample: %s", exc)

    def _handle(self, uuid: str) -> Any:
        try:
            return _call("nvmlDeviceGetHandleByUUID", pynvml.nvmlDeviceGetHandleByUUID, uuid)
        except NvmlError as exc:
            if exc.code == pynvml.NVML_ERROR_GPU_IS_LOST:
                raise _Lost from None
            raise

    def _read_gpu(self, gpu: GPU) -> list[DeviceSample]:
        try:
            handle = self._handle(gpu.uuid)
        except NvmlError as exc:
            self._count(exc.call, exc.name)
            return []
        values: dict[str, Any] = {}
        u = gpu.uuid
        if self._want("gpu_util", "mem_copy_util"):
            rates = self._try(u, "nvmlDeviceGetUtilizationRates",
                              pynvml.nvmlDeviceGetUtilizationRates, handle)
            if rates is not None:
                values["gpu_util"], values["mem_copy_util"] = int(rates.gpu), int(rates.memory)
        for name, call, fn in (
                ("enc_util", "nvmlDeviceGetEncoderUtilization",
                 pynvml.nvmlDeviceGetEncoderUtilization),
                ("dec_util", "nvmlDeviceGetDecoderUtilization",
                 pynvml.nvmlDeviceGetDecoderUtilization)):
            if self._want(name):
                result = self._try(u, call, fn, handle)
                values[name] = None if result is None else int(result[0])
        for name, clock in (("sm_clock_mhz", pynvml.NVML_CLOCK_SM),
                            ("mem_clock_mhz", pynvml.NVML_CLOCK_MEM)):
            if self._want(name):
                values[name] = self._try(f"{u}/{clock}", "nvmlDeviceGetClockInfo",
                                         pynvml.nvmlDeviceGetClockInfo, handle, clock)
        if self._want("gpu_temp_c"):
            values["gpu_temp_c"] = self._try(u, "nvmlDeviceGetTemperature",
                                             pynvml.nvmlDeviceGetTemperature, handle,
                                             pynvml.NVML_TEMPERATURE_GPU)
        if self._want("power_w"):
            milliwatts = self._try(u, "nvmlDeviceGetPowerUsage",
                                   pynvml.nvmlDeviceGetPowerUsage, handle)
            values["power_w"] = None if milliwatts is None else milliwatts / 1000.0
        if self._want("energy_mj"):
            values["energy_mj"] = self._try(u, "nvmlDeviceGetTotalEnergyConsumption",
                                            pynvml.nvmlDeviceGetTotalEnergyConsumption, handle)
        if self._want("pcie_replays"):
            values["pcie_replays"] = self._try(u, "nvmlDeviceGetPcieReplayCounter",
                                               pynvml.nvmlDeviceGetPcieReplayCounter, handle)
        values.update(self._memory(u, handle))
        values.update(self._field_values(u, handle))
        values.update(self._ecc(u, handle))
        values.update(self._remapped(u, handle))
        gpm_supported = self._gpm_supported(u, handle)
        if gpm_supported:
            values.update(self._gpm_metrics((u, None), handle, None))
        values["processes"] = self._processes(u, handle, with_util=True)
        samples = [DeviceSample(uuid=u, gpu_uuid=u, **values)]
        for mig in gpu.mig_devices:
            samples.append(self._read_mig(gpu, handle, mig.uuid, mig.gpu_instance_id,
                                          gpm_supported))
        return samples

    def _read_mig(self, gpu: GPU, parent: Any, uuid: str, gi: int,
                  gpm_supported: bool) -> DeviceSample:
        values: dict[str, Any] = {}
        try:
            handle = self._handle(uuid)
        except NvmlError as exc:
            self._count(exc.call, exc.name)
            return DeviceSample(uuid=uuid, gpu_uuid=gpu.uuid, gpu_instance_id=gi)
        values.update(self._memory(uuid, handle))
        if gpm_supported:
            values.update(self._gpm_metrics((gpu.uuid, gi), parent, gi))
        values["processes"] = self._processes(uuid, handle, with_util=False)
        return DeviceSample(uuid=uuid, gpu_uuid=gpu.uuid, gpu_instance_id=gi, **values)

    def _memory(self, uuid: str, handle: Any) -> dict[str, Any]:
        if not self._want("fb_used_mib", "fb_free_mib", "fb_reserved_mib"):
            return {}
        info = self._try(uuid, "nvmlDeviceGetMemoryInfo_v2",
                         lambda h: pynvml.nvmlDeviceGetMemoryInfo(h, pynvml.nvmlMemory_v2),
                         handle)
        if info is not None:
            return {"fb_used_mib": int(info.used) // MIB, "fb_free_mib": int(info.free) // MIB,
                    "fb_reserved_mib": int(info.reserved) // MIB}
        # drivers before 510 have only v1, where "used" includes the reservation
        info = self._try(uuid, "nvmlDeviceGetMemoryInfo", pynvml.nvmlDeviceGetMemoryInfo, handle)
        if info is None:
            return {}
        return {"fb_used_mib": int(info.used) // MIB, "fb_free_mib": int(info.free) // MIB}

    def _field_values(self, uuid: str, handle: Any) -> dict[str, Any]:
        fields: list[Any] = []
        if self._want("memory_temp_c"):
            fields.append(pynvml.NVML_FI_DEV_MEMORY_TEMP)
        if self._want("nvlink_bandwidth_total"):
            fields += [(pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX, ALL_NVLINKS),
                       (pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX, ALL_NVLINKS)]
        if not fields:
            return {}
        values = self._try(uuid, "nvmlDeviceGetFieldValues", pynvml.nvmlDeviceGetFieldValues,
                           handle, fields)
        if values is None:
            return {}
        result: dict[str, Any] = {}
        by_id = {}
        for value in values:
            if value.nvmlReturn == pynvml.NVML_SUCCESS:
                by_id[int(value.fieldId)] = value
            elif value.nvmlReturn not in _ABSENT:
                self._count(f"nvmlDeviceGetFieldValues[{int(value.fieldId)}]",
                            NvmlError("", int(value.nvmlReturn)).name)
        temp = by_id.get(pynvml.NVML_FI_DEV_MEMORY_TEMP)
        if temp is not None:
            celsius = _field_number(temp)
            result["memory_temp_c"] = int(celsius) if celsius <= MEMORY_TEMP_MAX_C else None
        rx = by_id.get(pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX)
        tx = by_id.get(pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX)
        if rx is not None and tx is not None:
            result["nvlink_bandwidth_total"] = int(_field_number(rx) + _field_number(tx))
        return result

    def _ecc(self, uuid: str, handle: Any) -> dict[str, Any]:
        result: dict[str, Any] = {}
        corrected, uncorrected = (pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED,
                                  pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED)
        for name, kind, counter in (
                ("ecc_sbe_volatile", corrected, pynvml.NVML_VOLATILE_ECC),
                ("ecc_dbe_volatile", uncorrected, pynvml.NVML_VOLATILE_ECC),
                ("ecc_sbe_aggregate", corrected, pynvml.NVML_AGGREGATE_ECC),
                ("ecc_dbe_aggregate", uncorrected, pynvml.NVML_AGGREGATE_ECC)):
            if self._want(name):
                result[name] = self._try(f"{uuid}/{kind}/{counter}", "nvmlDeviceGetTotalEccErrors",
                                         pynvml.nvmlDeviceGetTotalEccErrors, handle, kind, counter)
        return result

    def _remapped(self, uuid: str, handle: Any) -> dict[str, Any]:
        names = ("remapped_correctable", "remapped_uncorrectable", "remap_pending",
                 "remap_failure")
        if not self._want(*names):
            return {}
        rows = self._try(uuid, "nvmlDeviceGetRemappedRows", pynvml.nvmlDeviceGetRemappedRows,
                         handle)
        return {} if rows is None else {n: int(v) for n, v in zip(names, rows, strict=True)}

    def _gpm_supported(self, uuid: str, handle: Any) -> bool:
        if not self._want(*(name for name, _ in GPM_METRICS.values())):
            return False
        support = self._try(uuid, "nvmlGpmQueryDeviceSupport", pynvml.nvmlGpmQueryDeviceSupport,
                            handle)
        if support is not None and not support.isSupportedDevice:
            self._unsupported.add((uuid, "nvmlGpmQueryDeviceSupport"))
        return bool(support is not None and support.isSupportedDevice)

    def _gpm_metrics(self, key: tuple[str, int | None], handle: Any,
                     gi: int | None) -> dict[str, Any]:
        """Metrics between the previous sample of this device and a new one (none the first
        time: GPM needs two samples)."""
        uuid = key[0] if gi is None else f"{key[0]}/gi{gi}"
        sample = self._try(uuid, "nvmlGpmSampleAlloc", pynvml.nvmlGpmSampleAlloc)
        if sample is None:
            return {}
        if gi is None:
            got = self._try(uuid, "nvmlGpmSampleGet", pynvml.nvmlGpmSampleGet, handle, sample)
        else:
            got = self._try(uuid, "nvmlGpmMigSampleGet", pynvml.nvmlGpmMigSampleGet, handle, gi,
                            sample)
        if got is None:
            self._free_gpm(sample)
            return {}
        previous = self._gpm.get(key)
        self._gpm[key] = sample
        if previous is None:
            return {}
        request = pynvml.c_nvmlGpmMetricsGet_t()
        request.version = pynvml.NVML_GPM_METRICS_GET_VERSION
        request.numMetrics = len(GPM_METRICS)
        request.sample1, request.sample2 = previous, sample
        for k, metric_id in enumerate(GPM_METRICS):
            request.metrics[k].metricId = metric_id
        result = self._try(uuid, "nvmlGpmMetricsGet", pynvml.nvmlGpmMetricsGet, request)
        self._free_gpm(previous)
        if result is None:
            return {}
        values: dict[str, Any] = {}
        for k in range(len(GPM_METRICS)):
            metric = request.metrics[k]
            name, divisor = GPM_METRICS[int(metric.metricId)]
            if metric.nvmlReturn == pynvml.NVML_SUCCESS and self._want(name):
                values[name] = float(metric.value) / divisor
        return values

    def _processes(self, uuid: str, handle: Any,
                   with_util: bool) -> tuple[ProcessSample, ...] | None:
        if not self._want("processes"):
            return None
        procs = self._try(uuid, "nvmlDeviceGetComputeRunningProcesses",
                          pynvml.nvmlDeviceGetComputeRunningProcesses, handle)
        if procs is None:
            return None
        util: dict[int, int] = {}
        if with_util and procs:
            util = self._process_util(uuid, handle)
        memory: dict[int, int] = {}
        for proc in procs:
            used = getattr(proc, "usedGpuMemory", None)
            if used is not None:
                memory[int(proc.pid)] = memory.get(int(proc.pid), 0) + int(used) // MIB
        pids = sorted({int(p.pid) for p in procs})
        return tuple(ProcessSample(pid, memory.get(pid), util.get(pid)) for pid in pids)

    def _process_util(self, uuid: str, handle: Any) -> dict[int, int]:
        """SM utilisation per pid since the last read (NOT_FOUND: no new samples)."""
        call = "nvmlDeviceGetProcessUtilization"
        if (uuid, call) in self._unsupported:
            return {}
        since = self._last_process_ts.get(uuid, 0)
        try:
            samples = _call(call, pynvml.nvmlDeviceGetProcessUtilization, handle, since)
        except NvmlError as exc:
            if exc.code == pynvml.NVML_ERROR_GPU_IS_LOST:
                raise _Lost from None
            if exc.code in _ABSENT:
                self._unsupported.add((uuid, call))
            elif exc.code != pynvml.NVML_ERROR_NOT_FOUND:
                self._count(call, exc.name)
            return {}
        result: dict[int, int] = {}
        for s in samples:
            result[int(s.pid)] = max(result.get(int(s.pid), 0), int(s.smUtil))
            self._last_process_ts[uuid] = max(since, int(s.timeStamp))
        return result


def _field_number(value: Any) -> float:
    """A nvmlFieldValue_t's value by its type."""
    kind = int(value.valueType)
    union = value.value
    readers: dict[int, Callable[[], float]] = {
        pynvml.NVML_VALUE_TYPE_DOUBLE: lambda: float(union.dVal),
        pynvml.NVML_VALUE_TYPE_UNSIGNED_INT: lambda: float(union.uiVal),
        pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG: lambda: float(union.ulVal),
        pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG: lambda: float(union.ullVal),
        pynvml.NVML_VALUE_TYPE_SIGNED_LONG_LONG: lambda: float(union.sllVal),
        pynvml.NVML_VALUE_TYPE_SIGNED_INT: lambda: float(union.siVal),
    }
    return readers.get(kind, lambda: float(union.ullVal))()


__all__ = ["DeviceSample", "ProcessSample", "Sample", "TelemetryReader"]
