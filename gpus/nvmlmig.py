"""Reading MIG devices through NVML, and NVIDIA's MIG profile names.

Part of the one NVML reader: :class:`gpus.nvml.Nvml` calls :func:`mig_mode` and
:func:`read_mig_devices` for each GPU, and :mod:`gpus.nvml` re-exports the profile-name
functions. NVML failures are :class:`gpus.nvmlcall.NvmlError` naming the call.
"""

from __future__ import annotations

import math
from typing import Any

import pynvml

from gpus.model import MIB, MigDevice
from gpus.nvmlcall import NvmlError, _call, _text
from gpus.records import record

# Name suffix of each GPU instance profile constant (NVIDIA's MIG profile naming).
_GI_SUFFIXES: dict[int, str] = {
    pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV1: "+me",
    pynvml.NVML_GPU_INSTANCE_PROFILE_2_SLICE_REV1: "+me",
    pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE_GFX: "+gfx",
    pynvml.NVML_GPU_INSTANCE_PROFILE_2_SLICE_GFX: "+gfx",
    pynvml.NVML_GPU_INSTANCE_PROFILE_3_SLICE_GFX: "+gfx",
    pynvml.NVML_GPU_INSTANCE_PROFILE_4_SLICE_GFX: "+gfx",
    pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE_NO_ME: "-me",
    pynvml.NVML_GPU_INSTANCE_PROFILE_2_SLICE_NO_ME: "-me",
    pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE_ALL_ME: "+me.all",
    pynvml.NVML_GPU_INSTANCE_PROFILE_2_SLICE_ALL_ME: "+me.all",
}


def mig_memory_gb(total_mib: int, mig_mib: int) -> int:
    """The memory figure in a MIG profile name (NVIDIA's rule, as in go-nvlib).

    The product is rounded like Go's ``math.Round``, halves away from zero: Python's
    ``round()`` rounds halves to even and would name a 4.5 GB profile ``4gb`` where NVIDIA
    says ``5gb``. Both factors are positive, so ``floor(x + 0.5)`` is that rule.
    """
    fraction = math.ceil(mig_mib / total_mib * 8) / 8
    return math.floor(fraction * math.ceil(total_mib / 1024) + 0.5)


def mig_profile_name(
    gi_profile: int, gi_slices: int, ci_slices: int, total_mib: int, mig_mib: int
) -> str:
    """NVIDIA's MIG profile name: ``[<c>c.]<g>g.<mem>gb[+me|+gfx|-me|+me.all]``."""
    name = f"{gi_slices}g.{mig_memory_gb(total_mib, mig_mib)}gb{_GI_SUFFIXES.get(gi_profile, '')}"
    return name if ci_slices == gi_slices else f"{ci_slices}c.{name}"


@record
class _GiProfile:
    constant: int
    slices: int
    memory_mib: int


def mig_mode(handle: Any) -> tuple[bool, bool]:
    """(MIG capable, MIG enabled now)."""
    try:
        current, _pending = _call("nvmlDeviceGetMigMode", pynvml.nvmlDeviceGetMigMode, handle)
    except NvmlError as exc:
        if exc.code in (pynvml.NVML_ERROR_NOT_SUPPORTED, pynvml.NVML_ERROR_FUNCTION_NOT_FOUND):
            return False, False
        raise
    return True, current == pynvml.NVML_DEVICE_MIG_ENABLE


def read_mig_devices(handle: Any, index: int, uuid: str, memory: int) -> tuple[MigDevice, ...]:
    """Every MIG device of the GPU ``handle`` (NVML index ``index``, UUID ``uuid``, ``memory``
    bytes), in slot order; empty slots are skipped."""
    total_mib = int(memory) // MIB
    profiles = _gi_profiles(handle)
    slots = _call(
        "nvmlDeviceGetMaxMigDeviceCount", pynvml.nvmlDeviceGetMaxMigDeviceCount, handle
    )
    devices = []
    for slot in range(slots):
        try:
            mig = _call(
                "nvmlDeviceGetMigDeviceHandleByIndex",
                pynvml.nvmlDeviceGetMigDeviceHandleByIndex,
                handle,
                slot,
            )
        except NvmlError as exc:
            if exc.code == pynvml.NVML_ERROR_NOT_FOUND:
                continue  # an empty slot
            raise
        devices.append(_read_mig(handle, mig, slot, index, uuid, total_mib, profiles))
    return tuple(devices)


def _gi_profiles(handle: Any) -> dict[int, _GiProfile]:
    """GPU instance profile id -> (constant, slices, memory) for every profile the GPU has."""
    found: dict[int, _GiProfile] = {}
    for constant in range(pynvml.NVML_GPU_INSTANCE_PROFILE_COUNT):
        try:
            info = _call(
                "nvmlDeviceGetGpuInstanceProfileInfo",
                pynvml.nvmlDeviceGetGpuInstanceProfileInfo,
                handle,
                constant,
            )
        except NvmlError as exc:
            if exc.code in (
                pynvml.NVML_ERROR_NOT_SUPPORTED,
                pynvml.NVML_ERROR_INVALID_ARGUMENT,
            ):
                continue
            raise
        found.setdefault(
            int(info.id), _GiProfile(constant, int(info.sliceCount), int(info.memorySizeMB))
        )
    return found


def _read_mig(
    parent: Any,
    mig: Any,
    slot: int,
    parent_index: int,
    parent_uuid: str,
    total_mib: int,
    profiles: dict[int, _GiProfile],
) -> MigDevice:
    gi_id = _call("nvmlDeviceGetGpuInstanceId", pynvml.nvmlDeviceGetGpuInstanceId, mig)
    ci_id = _call("nvmlDeviceGetComputeInstanceId", pynvml.nvmlDeviceGetComputeInstanceId, mig)
    attrs = _call("nvmlDeviceGetAttributes", pynvml.nvmlDeviceGetAttributes, mig)
    gi = _call(
        "nvmlDeviceGetGpuInstanceById", pynvml.nvmlDeviceGetGpuInstanceById, parent, gi_id
    )
    gi_info = _call("nvmlGpuInstanceGetInfo", pynvml.nvmlGpuInstanceGetInfo, gi)
    profile = profiles.get(int(gi_info.profileId))
    if profile is None:
        raise NvmlError(
            "nvmlDeviceGetGpuInstanceProfileInfo",
            pynvml.NVML_ERROR_NOT_FOUND,
            f"no GPU instance profile with id {gi_info.profileId}",
        )
    ci_slices = int(attrs.computeInstanceSliceCount)
    return MigDevice(
        uuid=_text(_call("nvmlDeviceGetUUID", pynvml.nvmlDeviceGetUUID, mig)),
        index=slot,
        parent_index=parent_index,
        parent_uuid=parent_uuid,
        gpu_instance_id=int(gi_id),
        compute_instance_id=int(ci_id),
        profile=mig_profile_name(
            profile.constant, profile.slices, ci_slices, total_mib, profile.memory_mib
        ),
        memory_bytes=int(
            _call("nvmlDeviceGetMemoryInfo", pynvml.nvmlDeviceGetMemoryInfo, mig).total
        ),
        gpu_instance_slices=profile.slices,
        compute_instance_slices=ci_slices,
        multiprocessors=int(attrs.multiprocessorCount),
        copy_engines=int(attrs.sharedCopyEngineCount),
        decoders=int(attrs.sharedDecoderCount),
        encoders=int(attrs.sharedEncoderCount),
        jpeg_decoders=int(attrs.sharedJpegCount),
        ofa_engines=int(attrs.sharedOfaCount),
    )
