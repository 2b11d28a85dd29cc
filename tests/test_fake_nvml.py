"""The fake beneath pynvml: error mapping, events across threads, faults, install/uninstall."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pynvml
import pytest

from gpus.fake import FakeNvml, install
from gpus.nvml import (
    EVENT_DOUBLE_BIT_ECC,
    EVENT_SINGLE_BIT_ECC,
    EVENT_XID,
    Nvml,
    NvmlError,
)
from gpus.nvmlevents import EventWatcher, NvmlEvent

FakeFactory = Callable[..., FakeNvml]


@pytest.fixture
def nvml() -> object:
    """An initialised Nvml session (install a fake first)."""
    session = Nvml()
    yield session
    session.shutdown()


def test_pynvml_calls_go_through_the_fake(fake_nvml: FakeFactory) -> None:
    fake = fake_nvml("dgx-a100")
    pynvml.nvmlInit()
    try:
        assert pynvml.nvmlDeviceGetCount() == 8
        handle = pynvml.nvmlDeviceGetHandleByIndex(3)
        assert pynvml.nvmlDeviceGetUUID(handle) == fake.uuids()[3]
        v1 = pynvml.nvmlDeviceGetMemoryInfo(handle)
        v2 = pynvml.nvmlDeviceGetMemoryInfo(handle, version=pynvml.nvmlMemory_v2)
        assert v1.total == v2.total == 42949672960
        assert pynvml.nvmlDeviceGetPciInfo(handle).busId == "00000000:4E:00.0"
        assert pynvml.nvmlDeviceGetHandleByPciBusId("0000:4e:00.0").contents is not None
        assert pynvml.nvmlSystemGetCudaDriverVersion_v2() == 12020
        assert pynvml.nvmlErrorString(pynvml.NVML_ERROR_GPU_IS_LOST) == "GPU is lost"
    finally:
        pynvml.nvmlShutdown()


def test_calls_before_init_are_uninitialized(fake_nvml: FakeFactory) -> None:
    fake_nvml("t4")
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        pynvml.nvmlDeviceGetCount()


def test_memory_info_v2_checks_version(fake_nvml: FakeFactory) -> None:
    fake_nvml("t4")
    with Nvml():
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        with pytest.raises(pynvml.NVMLError_ArgumentVersionMismatch):
            pynvml.nvmlDeviceGetMemoryInfo(handle, version=0x01000028)


def test_unimplemented_function_is_function_not_found(fake_nvml: FakeFactory) -> None:
    fake_nvml("t4")
    with Nvml():
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        with pytest.raises(pynvml.NVMLError_FunctionNotFound):
            pynvml.nvmlDeviceGetFanSpeed(handle)  # not in the fake


def test_fail_maps_to_nvml_error_naming_call(fake_nvml: FakeFactory) -> None:
    fake = fake_nvml("dgx-a100")
    fake.fail("nvmlDeviceGetUUID", "NVML_ERROR_GPU_IS_LOST", count=1)
    with Nvml() as nvml:
        with pytest.raises(NvmlError) as info:
            nvml.read_snapshot(skip_lost=False)
        err = info.value
        assert err.call == "nvmlDeviceGetUUID"
        assert err.name == "NVML_ERROR_GPU_IS_LOST"
        assert err.code == pynvml.NVML_ERROR_GPU_IS_LOST
        assert str(err) == "nvmlDeviceGetUUID: NVML_ERROR_GPU_IS_LOST (GPU is lost)"
        assert len(nvml.read_snapshot().gpus) == 8  # count=1: the next read works


def test_fail_covers_version_suffixes_until_cleared(fake_nvml: FakeFactory) -> None:
    fake = fake_nvml("t4")
    fake.fail("nvmlDeviceGetCount", pynvml.NVML_ERROR_UNKNOWN)
    with Nvml() as nvml:
        for _ in range(3):
            with pytest.raises(NvmlError, match="nvmlDeviceGetCount: NVML_ERROR_UNKNOWN"):
                nvml.read_snapshot()
        fake.clear_faults()
        assert len(nvml.read_snapshot().gpus) == 4


def test_bad_fault_arguments_change_nothing(fake_nvml: FakeFactory) -> None:
    fake = fake_nvml("t4")
    with pytest.raises(ValueError, match="unknown NVML error"):
        fake.fail("nvmlDeviceGetCount", "NVML_ERROR_NO_SUCH_THING")
    with pytest.raises(ValueError, match="not an NVML function"):
        fake.fail("getCount", "NVML_ERROR_UNKNOWN")
    with pytest.raises(ValueError, match="count must be"):
        fake.fail("nvmlDeviceGetCount", "NVML_ERROR_UNKNOWN", count=0)
    with pytest.raises(ValueError, match="no GPU with index 9"):
        fake.inject_xid(9, 48)
    with pytest.raises(ValueError, match="no GPU or MIG device"):
        fake.lose_gpu("GPU-nope")
    assert fake.status()["failures"] == {} and fake.status()["lost"] == []
    with Nvml() as nvml:
        assert len(nvml.read_snapshot().gpus) == 4


def test_exception_inside_callback_becomes_unknown(
    fake_nvml: FakeFactory, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    fake = fake_nvml("t4")

    def boom(*args: object) -> int:
        raise RuntimeError("bug in the fake")

    monkeypatch.setattr(fake.functions, "nvmlDeviceGetName", boom)
    with Nvml() as nvml, pytest.raises(NvmlError) as info:
        nvml.read_snapshot()
    assert info.value.call == "nvmlDeviceGetName"
    assert info.value.name == "NVML_ERROR_UNKNOWN"
    assert "bug in the fake" in caplog.text


def test_init_failure(fake_nvml: FakeFactory) -> None:
    fake = fake_nvml("t4")
    fake.fail_init()
    with pytest.raises(NvmlError) as info:
        Nvml().init()
    assert info.value.call == "nvmlInit"
    assert info.value.name == "NVML_ERROR_DRIVER_NOT_LOADED"
    assert "kernel driver is not loaded" in str(info.value)
    fake.clear_faults()
    with Nvml() as nvml:
        assert len(nvml.read_snapshot().gpus) == 4


def test_lose_gpu_affects_that_gpu_only(fake_nvml: FakeFactory) -> None:
    fake = fake_nvml("dgx-a100-mig")
    uuids = fake.uuids()
    mig_of_lost = fake.mig_uuids(1)[0]
    fake.lose_gpu(1)
    with Nvml() as nvml:
        with pytest.raises(NvmlError) as info:
            nvml.probe(uuids[1])
        assert info.value.name == "NVML_ERROR_GPU_IS_LOST"
        with pytest.raises(NvmlError, match="GPU_IS_LOST"):
            nvml.probe(mig_of_lost)
        for uuid in uuids[:1] + uuids[2:]:
            nvml.probe(uuid)
        snap = nvml.read_snapshot()
        assert [g.index for g in snap.gpus] == [0, 2, 3, 4, 5, 6, 7]
        assert len(snap.links) == 7
        with pytest.raises(NvmlError, match="GPU_IS_LOST"):
            nvml.read_snapshot(skip_lost=False)
        fake.restore_gpu(uuids[1])
        nvml.probe(uuids[1])
        assert len(nvml.read_snapshot().gpus) == 8


def test_xid_delivered_across_threads(fake_nvml: FakeFactory) -> None:
    fake = fake_nvml("dgx-a100")
    uuids = fake.uuids()
    got: list[NvmlEvent | None] = []
    ready = threading.Event()
    with Nvml() as nvml, EventWatcher(nvml, uuids) as watcher:
        assert watcher.registration_errors == {}

        def waiter() -> None:
            ready.set()
            got.append(watcher.wait(10_000))

        thread = threading.Thread(target=waiter)
        thread.start()
        ready.wait(5)
        fake.inject_xid(uuids[2], 48)
        thread.join(10)
        assert not thread.is_alive()
    assert got == [NvmlEvent(uuids[2], EVENT_XID, 48, None, None)]


def test_wait_times_out_with_none(fake_nvml: FakeFactory) -> None:
    fake = fake_nvml("t4")
    with Nvml() as nvml, EventWatcher(nvml, fake.uuids()) as watcher:
        assert watcher.wait(1) is None


def test_mig_xid_carries_gi_ci(fake_nvml: FakeFactory) -> None:
    fake = fake_nvml("dgx-a100-mig")
    mig_uuid = fake.mig_uuids(5)[1]  # 2c.3g.20gb: second compute instance of a split GI
    with Nvml() as nvml:
        snap = nvml.read_snapshot()
        mig = next(m for m in snap.gpus[5].mig_devices if m.uuid == mig_uuid)
        with EventWatcher(nvml, [mig_uuid]) as watcher:
            assert watcher.watched == [fake.uuids()[5]]  # MIG UUIDs register their parent
            fake.inject_xid(mig_uuid, 94)
            event = watcher.wait(1000)
    assert event == NvmlEvent(
        fake.uuids()[5], EVENT_XID, 94, mig.gpu_instance_id, mig.compute_instance_id
    )
    assert event is not None and event.compute_instance_id == 1


def test_ecc_events_and_masks(fake_nvml: FakeFactory) -> None:
    fake = fake_nvml("t4")
    uuid = fake.uuids()[0]
    with Nvml() as nvml:
        with EventWatcher(nvml, [uuid], event_types=EVENT_XID) as xid_only:
            assert fake.inject_ecc(0) == 0  # nobody registered for ECC
            assert xid_only.wait(1) is None
        with EventWatcher(nvml, [uuid]) as watcher:
            fake.inject_ecc(0, double_bit=False)
            fake.inject_ecc(uuid)
            first, second = watcher.wait(1000), watcher.wait(1000)
    assert first is not None and first.event_type == EVENT_SINGLE_BIT_ECC
    assert second is not None and second.event_type == EVENT_DOUBLE_BIT_ECC


def test_lost_gpu_reports_xid_79_and_fails_registration(fake_nvml: FakeFactory) -> None:
    fake = fake_nvml("t4")
    uuids = fake.uuids()
    with Nvml() as nvml:
        with EventWatcher(nvml, uuids) as watcher:
            fake.lose_gpu(2)
            event = watcher.wait(1000)
        assert event is not None and (event.gpu_uuid, event.xid) == (uuids[2], 79)
        with EventWatcher(nvml, uuids) as watcher:
            assert set(watcher.registration_errors) == {uuids[2]}
            assert watcher.registration_errors[uuids[2]].name == "NVML_ERROR_GPU_IS_LOST"
            assert len(watcher.watched) == 3


def start_blocked_waiter(watcher: EventWatcher, errors: list[NvmlError]) -> threading.Thread:
    """A started thread blocked in ``watcher.wait``; the NvmlError it ends with joins ``errors``."""
    ready = threading.Event()

    def waiter() -> None:
        ready.set()
        try:
            watcher.wait(10_000)
        except NvmlError as exc:
            errors.append(exc)

    thread = threading.Thread(target=waiter)
    thread.start()
    ready.wait(5)
    return thread


def test_event_wait_failure_wakes_a_blocked_waiter(fake_nvml: FakeFactory) -> None:
    fake = fake_nvml("t4")
    errors: list[NvmlError] = []
    with Nvml() as nvml, EventWatcher(nvml, fake.uuids()) as watcher:
        thread = start_blocked_waiter(watcher, errors)
        fake.fail_event_wait("NVML_ERROR_UNKNOWN")
        thread.join(10)
        assert not thread.is_alive()
    assert [(e.call, e.name) for e in errors] == [("nvmlEventSetWait", "NVML_ERROR_UNKNOWN")]


def test_uninstall_restores_pynvml_state() -> None:
    before_lib = pynvml.nvmlLib
    before_cache = dict(pynvml._nvmlGetFunctionPointer_cache)
    before_refcount = pynvml._nvmlLib_refcount
    with install("t4") as fake:
        assert pynvml.nvmlLib is fake.lib
        with Nvml() as nvml:
            nvml.read_snapshot()
        assert pynvml._nvmlGetFunctionPointer_cache
    assert pynvml.nvmlLib is before_lib
    assert pynvml._nvmlGetFunctionPointer_cache == before_cache
    assert pynvml._nvmlLib_refcount == before_refcount
    assert not fake.installed


def test_nested_install_restores_outer(fake_nvml: FakeFactory) -> None:
    outer = fake_nvml("t4")
    inner = install("dgx-a100")
    with Nvml() as nvml:
        assert len(nvml.read_snapshot().gpus) == 8
    inner.uninstall()
    assert pynvml.nvmlLib is outer.lib
    with Nvml() as nvml:
        assert len(nvml.read_snapshot().gpus) == 4


def test_uninstall_wakes_waiters() -> None:
    fake = install("t4")
    errors: list[NvmlError] = []
    nvml = Nvml()
    nvml.init()
    watcher = EventWatcher(nvml, fake.uuids())
    thread = start_blocked_waiter(watcher, errors)
    fake.uninstall()
    thread.join(10)
    assert not thread.is_alive()
    assert errors and errors[0].name == "NVML_ERROR_UNINITIALIZED"


# Recorded from a real NVIDIA H100 80GB HBM3 (driver 580.159.04, MIG disabled):
# constant -> (id, slices, instances, SMs, CE, DEC, ENC, JPEG, OFA, memorySizeMB, name).
REAL_H100_GI_PROFILES = {
    0: (19, 1, 7, 16, 1, 1, 0, 1, 0, 9984, "MIG 1g.10gb"),
    1: (14, 2, 3, 32, 2, 2, 0, 2, 0, 20096, "MIG 2g.20gb"),
    2: (9, 3, 2, 60, 3, 3, 0, 3, 0, 40448, "MIG 3g.40gb"),
    3: (5, 4, 1, 64, 4, 4, 0, 4, 0, 40448, "MIG 4g.40gb"),
    4: (0, 7, 1, 132, 8, 7, 0, 7, 1, 81152, "MIG 7g.80gb"),
    7: (20, 1, 1, 16, 1, 1, 0, 1, 1, 9984, "MIG 1g.10gb+me"),
    9: (15, 1, 4, 26, 1, 1, 0, 1, 0, 20096, "MIG 1g.20gb"),
}


def test_h100_answers_like_the_real_one(fake_nvml: FakeFactory) -> None:
    fake_nvml("dgx-h100")
    with Nvml():
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        for constant in range(pynvml.NVML_GPU_INSTANCE_PROFILE_COUNT):
            want = REAL_H100_GI_PROFILES.get(constant)
            if want is None:
                with pytest.raises(pynvml.NVMLError_NotSupported):
                    pynvml.nvmlDeviceGetGpuInstanceProfileInfo(handle, constant)
                continue
            info = pynvml.nvmlDeviceGetGpuInstanceProfileInfo(handle, constant)
            got = (
                info.id,
                info.sliceCount,
                info.instanceCount,
                info.multiprocessorCount,
                info.copyEngineCount,
                info.decoderCount,
                info.encoderCount,
                info.jpegCount,
                info.ofaCount,
                info.memorySizeMB,
                info.name,
            )
            assert got == want
        with pytest.raises(pynvml.NVMLError_InvalidArgument):
            pynvml.nvmlDeviceGetGpuInstanceProfileInfo(
                handle, pynvml.NVML_GPU_INSTANCE_PROFILE_COUNT
            )
        assert pynvml.nvmlDeviceGetMigMode(handle) == [0, 0]
        assert pynvml.nvmlDeviceGetMaxMigDeviceCount(handle) == 0
        with pytest.raises(pynvml.NVMLError_NotFound):
            pynvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, 0)
        assert pynvml.nvmlDeviceGetBrand(handle) == pynvml.NVML_BRAND_NVIDIA
        pci = pynvml.nvmlDeviceGetPciInfo(handle)
        assert (pci.pciDeviceId, pci.pciSubSystemId) == (0x233010DE, 0x16C110DE)
        assert pynvml.nvmlDeviceGetSupportedEventTypes(handle) == 0xFF9F


def test_driver_root_has_mig_minors_and_device_nodes(tmp_path: Path) -> None:
    from deviceplugin.allocate import read_mig_minors
    from gpus.fake import load_profile, write_driver_root

    profile = load_profile("a100-mig-1g")
    write_driver_root(profile, tmp_path / "driver", tmp_path / "dev-root")
    minors = read_mig_minors(str(tmp_path / "driver"))
    # The driver's numbering: config 1, monitor 2, 15 GI slots of 9 minors per GPU.
    assert minors["config"] == 1 and minors["monitor"] == 2
    assert minors["gpu0/gi0/access"] == 3 and minors["gpu0/gi0/ci7/access"] == 11
    assert minors["gpu1/gi0/access"] == 138
    assert len(minors) == 2 + 8 * 15 * 9
    dev = tmp_path / "dev-root" / "dev"
    assert sorted(p.name for p in dev.iterdir() if p.is_file())[:3] == [
        "nvidia-uvm", "nvidia-uvm-tools", "nvidia0"
    ]
    assert (dev / "nvidiactl").is_file() and not (dev / "nvidia-modeset").exists()
    gi = profile.gpus[0].gpu_instances[0]
    assert (dev / "nvidia-caps" / f"nvidia-cap{minors[f'gpu0/gi{gi.id}/access']}").is_file()
