"""NVML telemetry: the fake's moving values through real pynvml, and gpus.telemetry's reader."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import pynvml
import pytest

from gpus.fake import FakeNvml, FakeProcess
from gpus.model import Snapshot
from gpus.nvml import Nvml
from gpus.telemetry import DeviceSample, Sample, TelemetryReader


def reading(fake_nvml: Callable[..., FakeNvml], profile: str,
            steps: int = 1) -> tuple[FakeNvml, Nvml, Snapshot, TelemetryReader]:
    fake = fake_nvml(profile)
    nvml = Nvml()
    nvml.init()
    snapshot = nvml.read_snapshot(fake.use_scratch_sysfs())
    return fake, nvml, snapshot, TelemetryReader()


T = TypeVar("T")


def known(value: T | None) -> T:
    """``value``, which NVML must have reported: None fails here, not as a TypeError later."""
    assert value is not None, "NVML reported no value"
    return value


def first_gpu(sample: Sample) -> DeviceSample:
    return sample.devices[0]


def test_values_are_plausible_and_deterministic(fake_nvml: Callable[..., FakeNvml]) -> None:
    fake, nvml, snap, reader = reading(fake_nvml, "dgx-h100")
    first = reader.read(snap)
    again = TelemetryReader().read(snap)
    gpu = first_gpu(first)
    assert [d.uuid for d in first.devices] == [g.uuid for g in snap.gpus]
    assert 0 <= known(gpu.gpu_util) <= 100 and 0 <= known(gpu.mem_copy_util) <= 100
    assert 20 <= known(gpu.gpu_temp_c) <= 90 and gpu.memory_temp_c is not None
    power_w = known(gpu.power_w)
    assert 70.0 <= power_w <= 710.0 and power_w != int(power_w)
    assert gpu.sm_clock_mhz and gpu.mem_clock_mhz
    assert known(gpu.fb_used_mib) + known(gpu.fb_free_mib) + known(gpu.fb_reserved_mib) <= 81559
    assert known(gpu.fb_reserved_mib) > 0
    assert first.devices == again.devices  # same step, same values
    nvml.shutdown()


def test_counters_only_grow_and_gauges_move(fake_nvml: Callable[..., FakeNvml]) -> None:
    fake, nvml, snap, reader = reading(fake_nvml, "dgx-a100")
    seen = []
    for _ in range(5):
        seen.append(first_gpu(reader.read(snap)))
        fake.advance_telemetry(7)
    energy = [known(s.energy_mj) for s in seen]
    assert energy == sorted(energy) and energy[-1] > energy[0]
    nvlink = [known(s.nvlink_bandwidth_total) for s in seen]
    assert nvlink == sorted(nvlink)
    assert len({s.gpu_util for s in seen}) > 1
    nvml.shutdown()


def test_unsupported_values_are_none_never_zero(fake_nvml: Callable[..., FakeNvml]) -> None:
    fake, nvml, snap, reader = reading(fake_nvml, "t4")
    reader.read(snap)
    fake.advance_telemetry()
    gpu = first_gpu(reader.read(snap))
    # a T4: GDDR6 (no memory temperature), no row remapping, no NVLink, no GPM
    assert gpu.memory_temp_c is None and gpu.remapped_correctable is None
    assert gpu.remap_failure is None and gpu.nvlink_bandwidth_total is None
    assert gpu.gr_engine_active is None and gpu.tensor_active is None
    assert gpu.gpu_temp_c is not None and gpu.ecc_dbe_volatile == 0
    assert reader.read(snap).errors == {}  # unsupported is not an error
    nvml.shutdown()


def test_gpm_ratios_on_hopper_from_the_second_read(fake_nvml: Callable[..., FakeNvml]) -> None:
    fake, nvml, snap, reader = reading(fake_nvml, "dgx-h100")
    assert first_gpu(reader.read(snap)).gr_engine_active is None  # GPM needs two samples
    fake.advance_telemetry()
    gpu = first_gpu(reader.read(snap))
    assert gpu.gr_engine_active == pytest.approx(known(gpu.gpu_util) / 100)
    assert 0 <= known(gpu.tensor_active) <= 1 and gpu.pcie_rx_bytes is not None
    reader.close()
    nvml.shutdown()


def test_mig_gpus_have_per_instance_gpm_but_no_device_utilisation(
    fake_nvml: Callable[..., FakeNvml],
) -> None:
    fake, nvml, snap, reader = reading(fake_nvml, "h100-mig-mixed")
    reader.read(snap)
    fake.advance_telemetry()
    sample = reader.read(snap)
    gpu = first_gpu(sample)
    # NVML: utilisation rates are not supported on a MIG-enabled GPU; GPM is
    assert gpu.gpu_util is None and gpu.gr_engine_active is not None
    assert sample.errors == {}
    migs = [d for d in sample.devices if d.gpu_instance_id is not None]
    assert len(migs) == 3 * len(snap.gpus)
    assert all(m.gr_engine_active == 0.0 and m.power_w is None for m in migs)
    reader.close()
    nvml.shutdown()


def test_one_failing_call_omits_its_values_and_is_counted(
    fake_nvml: Callable[..., FakeNvml],
) -> None:
    fake, nvml, snap, reader = reading(fake_nvml, "dgx-a100")
    fake.fail("nvmlDeviceGetPowerUsage", "NVML_ERROR_UNKNOWN", count=1)
    sample = reader.read(snap)
    assert first_gpu(sample).power_w is None
    assert all(d.power_w is not None for d in sample.devices[1:])
    assert first_gpu(sample).gpu_temp_c is not None
    assert sample.errors == {("nvmlDeviceGetPowerUsage", "NVML_ERROR_UNKNOWN"): 1}
    later = reader.read(snap)
    assert first_gpu(later).power_w is not None
    assert later.errors == sample.errors  # cumulative, not cleared
    nvml.shutdown()


def test_a_lost_gpu_gives_no_sample_and_comes_back(fake_nvml: Callable[..., FakeNvml]) -> None:
    fake, nvml, snap, reader = reading(fake_nvml, "dgx-a100")
    fake.lose_gpu(2)
    sample = reader.read(snap)
    assert sample.lost == (snap.gpus[2].uuid,)
    assert snap.gpus[2].uuid not in {d.uuid for d in sample.devices}
    assert len(sample.devices) == len(snap.gpus) - 1
    fake.restore_gpu(2)
    back = reader.read(snap)
    assert back.lost == () and back.device(snap.gpus[2].uuid) is not None
    nvml.shutdown()


def test_injected_ecc_and_xid_bump_their_counters(fake_nvml: Callable[..., FakeNvml]) -> None:
    fake, nvml, snap, reader = reading(fake_nvml, "dgx-a100")
    before = first_gpu(reader.read(snap))
    fake.inject_ecc(0, double_bit=True)
    fake.inject_xid(0, 63)
    fake.inject_xid(0, 64)
    after = first_gpu(reader.read(snap))
    assert after.ecc_dbe_volatile == known(before.ecc_dbe_volatile) + 1
    assert after.ecc_dbe_aggregate == known(before.ecc_dbe_aggregate) + 1
    assert after.remapped_uncorrectable == known(before.remapped_uncorrectable) + 2
    assert (after.remap_pending, after.remap_failure) == (1, 1)
    nvml.shutdown()


def test_processes_with_memory_and_sm_utilisation(fake_nvml: Callable[..., FakeNvml]) -> None:
    fake, nvml, snap, reader = reading(fake_nvml, "dgx-a100")
    fake.set_processes(0, [FakeProcess(101, 2048, 30), FakeProcess(202, 1024, 15)])
    gpu = first_gpu(reader.read(snap))
    assert [(p.pid, p.used_memory_mib, p.sm_util) for p in known(gpu.processes)] == [
        (101, 2048, 30), (202, 1024, 15)]
    assert gpu.gpu_util == 45 and gpu.fb_used_mib == 3072
    assert reader.read(snap).devices[1].processes == ()
    nvml.shutdown()


def test_processes_and_telemetry_through_the_control_socket(
    fake_nvml: Callable[..., FakeNvml],
    sockdir: str,
) -> None:
    import os

    from gpus.fake.control import ControlError, send

    path = os.path.join(sockdir, "ctl.sock")
    fake = fake_nvml("t4", control_socket=path)
    nvml = Nvml()
    nvml.init()
    snap = nvml.read_snapshot(fake.use_scratch_sysfs())
    reply = send(path, {"op": "processes", "gpu": 1,
                        "processes": [{"pid": 42, "used_mib": 300, "sm_util": 20}]})
    assert reply["ok"], reply
    assert send(path, {"op": "advance", "steps": 3})["step"] == 3
    with pytest.raises(ControlError, match="unknown process keys"):
        send(path, {"op": "processes", "gpu": 1, "processes": [{"pid": 1, "x": 2}]})
    gpu = TelemetryReader().read(snap).devices[1]
    assert [(p.pid, p.used_memory_mib, p.sm_util) for p in known(gpu.processes)] == [(42, 300, 20)]
    nvml.shutdown()


def test_mig_processes_are_per_instance(fake_nvml: Callable[..., FakeNvml]) -> None:
    fake, nvml, snap, reader = reading(fake_nvml, "a100-mig-mixed")
    gpu = next(g for g in snap.gpus if g.mig_devices)
    mig = gpu.mig_devices[0]
    fake.set_processes(mig.uuid, [FakeProcess(7, 512, 40)])
    sample = reader.read(snap)
    mine = sample.device(mig.uuid)
    assert mine is not None and mine.gpu_instance_id == mig.gpu_instance_id
    assert [(p.pid, p.used_memory_mib) for p in known(mine.processes)] == [(7, 512)]
    assert mine.fb_used_mib == 512
    parent = sample.device(gpu.uuid)
    assert parent is not None and [p.pid for p in known(parent.processes)] == [7]
    nvml.shutdown()


def test_a_failing_process_call_names_the_nvml_error(fake_nvml: Callable[..., FakeNvml]) -> None:
    fake, nvml, snap, reader = reading(fake_nvml, "dgx-a100")
    fake.fail("nvmlDeviceGetComputeRunningProcesses", pynvml.NVML_ERROR_NO_PERMISSION, count=1)
    sample = reader.read(snap)
    assert first_gpu(sample).processes is None
    assert sample.errors == {
        ("nvmlDeviceGetComputeRunningProcesses", "NVML_ERROR_NO_PERMISSION"): 1}
    nvml.shutdown()


def test_wanted_fields_limit_the_calls(fake_nvml: Callable[..., FakeNvml]) -> None:
    fake, nvml, snap, _ = reading(fake_nvml, "dgx-a100")
    reader = TelemetryReader(wanted={"gpu_temp_c"})
    fake.fail("nvmlDeviceGetPowerUsage", "NVML_ERROR_UNKNOWN")
    gpu = first_gpu(reader.read(snap))
    assert gpu.gpu_temp_c is not None and gpu.power_w is None and gpu.processes is None
    assert reader.read(snap).errors == {}  # never called
    nvml.shutdown()


def test_bad_process_is_refused(fake_nvml: Callable[..., FakeNvml]) -> None:
    fake = fake_nvml("t4")
    with pytest.raises(ValueError, match="implausible"):
        fake.set_processes(0, [FakeProcess(0, 1)])
