"""The fake NVML's MIG calls: MIG mode, MIG device handles, GPU and compute instances."""

from __future__ import annotations

import ctypes
from ctypes import c_uint, c_void_p
from typing import Any

import pynvml

from gpus.fake.lib_ctypes import PTR, SUCCESS, handle_value, put, struct_at
from gpus.fake.state import FakeMig, FakeState, NvmlReturn

# symbol -> argument types (return type is nvmlReturn_t = c_int).
SIGNATURES: dict[str, tuple[Any, ...]] = {
    "nvmlDeviceGetMigMode": (PTR, PTR, PTR),
    "nvmlDeviceGetMaxMigDeviceCount": (PTR, PTR),
    "nvmlDeviceGetMigDeviceHandleByIndex": (PTR, c_uint, PTR),
    "nvmlDeviceIsMigDeviceHandle": (PTR, PTR),
    "nvmlDeviceGetDeviceHandleFromMigDeviceHandle": (PTR, PTR),
    "nvmlDeviceGetGpuInstanceId": (PTR, PTR),
    "nvmlDeviceGetComputeInstanceId": (PTR, PTR),
    "nvmlDeviceGetAttributes": (PTR, PTR),
    "nvmlDeviceGetAttributes_v2": (PTR, PTR),
    "nvmlDeviceGetGpuInstanceProfileInfo": (PTR, c_uint, PTR),
    "nvmlDeviceGetGpuInstanceProfileInfoV": (PTR, c_uint, PTR),
    "nvmlDeviceGetGpuInstanceById": (PTR, c_uint, PTR),
    "nvmlGpuInstanceGetInfo": (PTR, PTR),
    "nvmlGpuInstanceGetComputeInstanceById": (PTR, c_uint, PTR),
    "nvmlComputeInstanceGetInfo_v2": (PTR, PTR),
}


class MigFunctions:
    """MIG NVML calls. Called with the state lock held."""

    s: FakeState

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
        put(current, c_uint, mode)
        put(pending, c_uint, mode)
        return SUCCESS

    def nvmlDeviceGetMaxMigDeviceCount(self, handle: int, out: int) -> int:  # noqa: N802
        """Number of MIG device slots."""
        gpu = self.s.gpu(handle)
        if not gpu.spec.model.mig_capable:
            raise NvmlReturn(pynvml.NVML_ERROR_NOT_SUPPORTED)
        # A real H100 with MIG disabled answers 0 here.
        put(out, c_uint, len(gpu.mig_slots))
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
        put(out, c_void_p, mig.handle)
        return SUCCESS

    def nvmlDeviceIsMigDeviceHandle(self, handle: int, out: int) -> int:  # noqa: N802
        """1 for a MIG device handle."""
        put(out, c_uint, int(isinstance(self.s.device(handle), FakeMig)))
        return SUCCESS

    def nvmlDeviceGetDeviceHandleFromMigDeviceHandle(self, handle: int, out: int) -> int:  # noqa: N802
        """The parent GPU of a MIG device."""
        dev = self.s.device(handle)
        if not isinstance(dev, FakeMig):
            raise NvmlReturn(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        put(out, c_void_p, dev.gpu.handle)
        return SUCCESS

    def _mig(self, handle: int) -> FakeMig:
        dev = self.s.device(handle)
        if not isinstance(dev, FakeMig):
            raise NvmlReturn(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return dev

    def nvmlDeviceGetGpuInstanceId(self, handle: int, out: int) -> int:  # noqa: N802
        """A MIG device's GPU instance id."""
        put(out, c_uint, self._mig(handle).gpu_instance.spec.id)
        return SUCCESS

    def nvmlDeviceGetComputeInstanceId(self, handle: int, out: int) -> int:  # noqa: N802
        """A MIG device's compute instance id."""
        put(out, c_uint, self._mig(handle).compute_instance.id)
        return SUCCESS

    def nvmlDeviceGetAttributes_v2(self, handle: int, out: int) -> int:  # noqa: N802
        """nvmlDeviceAttributes_t of a MIG device (SMs scale with the compute slices)."""
        mig = self._mig(handle)
        gi = mig.gpu_instance.spec.profile
        attrs = struct_at(out, pynvml.c_nvmlDeviceAttributes)
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
        info = struct_at(out, pynvml.c_nvmlGpuInstanceProfileInfo_t)
        self._fill_gi_profile(info, handle, profile)
        return SUCCESS

    def nvmlDeviceGetGpuInstanceProfileInfoV(self, handle: int, profile: int, out: int) -> int:  # noqa: N802
        """nvmlGpuInstanceProfileInfo_v2_t (checks the version, adds the name)."""
        info = struct_at(out, pynvml.c_nvmlGpuInstanceProfileInfo_v2_t)
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
        put(out, c_void_p, gi.handle)
        return SUCCESS

    def nvmlGpuInstanceGetInfo(self, handle: int, out: int) -> int:  # noqa: N802
        """nvmlGpuInstanceInfo_t."""
        gi = self.s.gpu_instance(handle)
        info = struct_at(out, pynvml.c_nvmlGpuInstanceInfo_t)
        info.device = handle_value(gi.gpu.handle)
        info.id, info.profileId = gi.spec.id, gi.spec.profile.id
        info.placement.start, info.placement.size = gi.spec.placement_start, gi.spec.profile.slices
        return SUCCESS

    def nvmlGpuInstanceGetComputeInstanceById(self, handle: int, ci_id: int, out: int) -> int:  # noqa: N802
        """A compute instance handle."""
        ci = self.s.gpu_instance(handle).compute_instances.get(ci_id)
        if ci is None:
            raise NvmlReturn(pynvml.NVML_ERROR_NOT_FOUND)
        put(out, c_void_p, ci.handle)
        return SUCCESS

    def nvmlComputeInstanceGetInfo_v2(self, handle: int, out: int) -> int:  # noqa: N802
        """nvmlComputeInstanceInfo_t (profileId = the compute-instance profile constant)."""
        ci = self.s.compute_instance(handle)
        info = struct_at(out, pynvml.c_nvmlComputeInstanceInfo_t)
        info.device = handle_value(ci.gpu_instance.gpu.handle)
        info.gpuInstance = ctypes.cast(c_void_p(ci.gpu_instance.handle), pynvml.c_nvmlGpuInstance_t)
        info.id = ci.spec.id
        info.profileId = {1: 0, 2: 1, 3: 2, 4: 3, 7: 4, 8: 5, 6: 6}.get(ci.spec.slices, 0)
        info.placement.start, info.placement.size = 0, ci.spec.slices
        return SUCCESS
