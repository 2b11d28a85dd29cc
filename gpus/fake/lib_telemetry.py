"""The fake NVML's telemetry and GPM calls, served from :mod:`gpus.fake.telemetry`."""

from __future__ import annotations

import ctypes
from ctypes import POINTER, c_int, c_uint, c_ulonglong, c_void_p
from typing import Any

import pynvml

from gpus.fake.lib_ctypes import PTR, SUCCESS, put, struct_at
from gpus.fake.state import NOT_APPLICABLE, FakeGpu, FakeMig, FakeState, GpmRecord, NvmlReturn
from gpus.fake.telemetry import ArchFigures, figures
from gpus.model import MIB

# symbol -> argument types (return type is nvmlReturn_t = c_int).
SIGNATURES: dict[str, tuple[Any, ...]] = {
    "nvmlDeviceGetUtilizationRates": (PTR, PTR),
    "nvmlDeviceGetEncoderUtilization": (PTR, PTR, PTR),
    "nvmlDeviceGetDecoderUtilization": (PTR, PTR, PTR),
    "nvmlDeviceGetClockInfo": (PTR, c_uint, PTR),
    "nvmlDeviceGetTemperature": (PTR, c_uint, PTR),
    "nvmlDeviceGetPowerUsage": (PTR, PTR),
    "nvmlDeviceGetTotalEnergyConsumption": (PTR, PTR),
    "nvmlDeviceGetPcieReplayCounter": (PTR, PTR),
    "nvmlDeviceGetTotalEccErrors": (PTR, c_uint, c_uint, PTR),
    "nvmlDeviceGetRemappedRows": (PTR, PTR, PTR, PTR, PTR),
    "nvmlDeviceGetFieldValues": (PTR, c_int, PTR),
    "nvmlDeviceGetComputeRunningProcesses_v3": (PTR, PTR, PTR),
    "nvmlDeviceGetProcessUtilization": (PTR, PTR, PTR, c_ulonglong),
    "nvmlGpmQueryDeviceSupport": (PTR, PTR),
    "nvmlGpmSampleAlloc": (PTR,),
    "nvmlGpmSampleFree": (PTR,),
    "nvmlGpmSampleGet": (PTR, PTR),
    "nvmlGpmMigSampleGet": (PTR, c_uint, PTR),
    "nvmlGpmMetricsGet": (PTR,),
}


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
        info = struct_at(out, pynvml.c_nvmlUtilization_t)
        info.gpu, info.memory = util, util * 3 // 5
        return SUCCESS

    def _codec(self, handle: int, util: int, out: int, period: int) -> int:
        self.s.gpu(handle)
        put(out, c_uint, util)
        put(period, c_uint, 167000)  # NVML's sampling period in microseconds
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
            put(out, c_uint, self.s.telemetry.sm_clock(self._util(gpu), fig))
        elif clock == pynvml.NVML_CLOCK_MEM:
            put(out, c_uint, fig.mem_clock)
        else:
            raise NvmlReturn(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return SUCCESS

    def nvmlDeviceGetTemperature(self, handle: int, sensor: int, out: int) -> int:  # noqa: N802
        """The GPU die temperature in C."""
        gpu = self.s.gpu(handle)
        if sensor != pynvml.NVML_TEMPERATURE_GPU:
            raise NvmlReturn(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        put(out, c_uint, self.s.telemetry.gpu_temp(gpu.spec.uuid, self._util(gpu)))
        return SUCCESS

    def nvmlDeviceGetPowerUsage(self, handle: int, out: int) -> int:  # noqa: N802
        """Power draw in mW."""
        gpu = self.s.gpu(handle)
        milliwatts = self.s.telemetry.power_mw(gpu.spec.uuid, self._util(gpu), self._fig(gpu))
        put(out, c_uint, milliwatts)
        return SUCCESS

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: int, out: int) -> int:  # noqa: N802
        """mJ since the driver loaded (only grows)."""
        put(out, c_ulonglong, self._counters_of(handle).energy_mj)
        return SUCCESS

    def nvmlDeviceGetPcieReplayCounter(self, handle: int, out: int) -> int:  # noqa: N802
        """PCIe replays so far."""
        put(out, c_uint, self._counters_of(handle).pcie_replays)
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
        put(out, c_ulonglong, counters.ecc.get(key, 0))
        return SUCCESS

    def nvmlDeviceGetRemappedRows(self, handle: int, corr: int, unc: int, pending: int,  # noqa: N802
                                  failure: int) -> int:
        """Row remapping (Ampere and later; NOT_SUPPORTED before, as on a V100 or T4)."""
        gpu = self.s.gpu(handle)
        if not self._fig(gpu).row_remapping:
            raise NvmlReturn(pynvml.NVML_ERROR_NOT_SUPPORTED)
        counters = self._counters_of(handle)
        put(corr, c_uint, counters.remapped_correctable)
        put(unc, c_uint, counters.remapped_uncorrectable)
        put(pending, c_uint, int(counters.remap_pending))
        put(failure, c_uint, int(counters.remap_failure))
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
        capacity = struct_at(count, c_uint).value
        put(count, c_uint, len(procs))
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
        capacity = struct_at(count, c_uint).value
        put(count, c_uint, len(procs))
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
        info = struct_at(out, pynvml.c_nvmlGpmSupport_t)
        if info.version != pynvml.NVML_GPM_SUPPORT_VERSION:
            raise NvmlReturn(pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH)
        info.isSupportedDevice = int(self._fig(gpu).gpm)
        return SUCCESS

    def nvmlGpmSampleAlloc(self, out: int) -> int:  # noqa: N802
        """A new (empty) sample buffer."""
        record = GpmRecord(handle=0)
        record.handle = self.s.new_handle(record)
        self.s.gpm_samples[record.handle] = record
        put(out, c_void_p, record.handle)
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
        request = struct_at(out, pynvml.c_nvmlGpmMetricsGet_t)
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
