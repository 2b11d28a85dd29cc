"""The fake NVML's compute mode: pynvml's getter and setter, recorded changes, faults."""

from __future__ import annotations

from collections.abc import Callable

import pynvml
import pytest

from gpus.fake import FakeNvml

FakeFactory = Callable[..., FakeNvml]
EXCLUSIVE = pynvml.NVML_COMPUTEMODE_EXCLUSIVE_PROCESS
DEFAULT = pynvml.NVML_COMPUTEMODE_DEFAULT


def test_compute_mode_set_through_pynvml_is_read_back_and_recorded(
        fake_nvml: FakeFactory) -> None:
    fake = fake_nvml("dgx-a100")
    pynvml.nvmlInit()
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(2)
        assert pynvml.nvmlDeviceGetComputeMode(handle) == DEFAULT
        pynvml.nvmlDeviceSetComputeMode(handle, EXCLUSIVE)
        assert pynvml.nvmlDeviceGetComputeMode(handle) == EXCLUSIVE
        assert fake.compute_mode(2) == EXCLUSIVE and fake.compute_mode(1) == DEFAULT
        pynvml.nvmlDeviceSetComputeMode(handle, DEFAULT)
        assert fake.compute_mode_changes() == [(fake.uuids()[2], EXCLUSIVE),
                                               (fake.uuids()[2], DEFAULT)]
    finally:
        pynvml.nvmlShutdown()


def test_compute_mode_refusals_change_nothing(fake_nvml: FakeFactory) -> None:
    fake = fake_nvml("dgx-a100-mig")
    pynvml.nvmlInit()
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        with pytest.raises(pynvml.NVMLError_InvalidArgument):
            pynvml.nvmlDeviceSetComputeMode(handle, 7)
        mig = pynvml.nvmlDeviceGetHandleByUUID(fake.mig_uuids(0)[0])
        with pytest.raises(pynvml.NVMLError_NotSupported):
            pynvml.nvmlDeviceSetComputeMode(mig, EXCLUSIVE)
        with pytest.raises(pynvml.NVMLError_NotSupported):
            pynvml.nvmlDeviceGetComputeMode(mig)
        fake.fail("nvmlDeviceSetComputeMode", "NVML_ERROR_NO_PERMISSION", count=1)
        with pytest.raises(pynvml.NVMLError_NoPermission):
            pynvml.nvmlDeviceSetComputeMode(handle, EXCLUSIVE)
        assert fake.compute_mode(0) == DEFAULT and fake.compute_mode_changes() == []
    finally:
        pynvml.nvmlShutdown()
