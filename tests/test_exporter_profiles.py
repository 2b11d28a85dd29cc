"""Every shipped machine profile: the exporter serves dcgm-exporter's default set, names and
label order, for every GPU and (where NVML gives per-instance values) every MIG instance."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest

from exporter.collector import ExporterCollector, Sampler
from exporter.fields import DEFAULT_COLLECTORS
from exporter.http import generate_text
from exporter.series import SeriesOptions
from gpus.fake import list_profiles
from gpus.model import Snapshot
from gpus.nvml import Nvml
from gpus.telemetry import TelemetryReader

# dcgm-exporter's leading labels, in its order (reference A2); MIG series add the instance.
GPU_LABELS = ["gpu", "UUID", "pci_bus_id", "device", "modelName", "Hostname"]
MIG_LABELS = ["gpu", "UUID", "pci_bus_id", "device", "modelName", "GPU_I_PROFILE", "GPU_I_ID",
              "Hostname"]
# Series every NVIDIA datacenter GPU answers (the fake as the real NVML): whole-GPU values.
ALWAYS = ("DCGM_FI_DEV_GPU_TEMP", "DCGM_FI_DEV_POWER_USAGE", "DCGM_FI_DEV_SM_CLOCK",
          "DCGM_FI_DEV_MEM_CLOCK", "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
          "DCGM_FI_DEV_PCIE_REPLAY_COUNTER")
_LINE = re.compile(r"^(\w+)\{(.*)\} (\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def series(text: str) -> list[tuple[str, list[tuple[str, str]]]]:
    """(name, labels in order) of every sample line."""
    found = []
    for line in text.splitlines():
        match = _LINE.match(line)
        if match:
            found.append((match.group(1), _LABEL.findall(match.group(2))))
    return found


@pytest.mark.parametrize("profile", list_profiles())
def test_every_profile_serves_the_default_set_in_dcgm_exporter_form(
        profile: str, fake_snapshot: Callable[..., Snapshot]) -> None:
    snapshot = fake_snapshot(profile)
    with Nvml():
        sampler = Sampler(snapshot, TelemetryReader(), 60.0)
        collector = ExporterCollector(sampler, DEFAULT_COLLECTORS, SeriesOptions("node-1"))
        sampler.sample_now()
        text = generate_text(collector, collector.formats).decode()
    found = series(text)
    assert found, f"{profile}: no series"
    known = {c.name for c in DEFAULT_COLLECTORS}
    assert {name for name, _ in found} <= known, "only names of the collectors file"
    for gpu in snapshot.gpus:
        mine = [(name, labels) for name, labels in found
                if ("UUID", gpu.uuid) in labels and not any(k == "GPU_I_ID" for k, _ in labels)]
        names = {name for name, _ in mine}
        assert set(ALWAYS) <= names, f"{profile} GPU {gpu.index}: {sorted(set(ALWAYS) - names)}"
        for _, labels in mine:
            keys = [key for key, _ in labels]
            assert keys[:len(GPU_LABELS)] == GPU_LABELS
            assert dict(labels)["DCGM_FI_DRIVER_VERSION"] == snapshot.system.driver_version
            assert dict(labels)["device"] == f"nvidia{gpu.index}"
        for mig in gpu.mig_devices:
            # Several compute instances may share one GPU instance (1c.3g and 2c.3g on GI 1).
            on_instance = {m.profile for m in gpu.mig_devices
                           if m.gpu_instance_id == mig.gpu_instance_id}
            per_instance = [labels for _, labels in found
                            if ("GPU_I_ID", str(mig.gpu_instance_id)) in labels
                            and ("UUID", gpu.uuid) in labels]
            # NVML gives each MIG instance its own memory: at least FB_USED per instance.
            assert per_instance, f"{profile} GPU {gpu.index} GI {mig.gpu_instance_id}: none"
            for labels in per_instance:
                assert [k for k, _ in labels][:len(MIG_LABELS)] == MIG_LABELS
                assert dict(labels)["GPU_I_PROFILE"] in on_instance
