"""The vGPU labeler and the PCI config-space reader behind it (gpus/vgpu.py), on the fake sysfs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from gfd.labels import label_problems, node_labels
from gfd.vgpu import BRANCH_LABEL, PRESENT_LABEL, VERSION_LABEL, vgpu_labels
from gpus.config import Config
from gpus.fake import ProfileError, list_profiles, load_profile, write_sysfs
from gpus.fake.controller import config_space
from gpus.fake.profile import VgpuSpec
from gpus.model import Snapshot, SystemInfo, VgpuInfo
from gpus.vgpu import host_driver, read_vgpu, vendor_capability

Reader = Callable[..., Snapshot]
HOST = VgpuSpec(host_driver_version="550.54.16", host_driver_branch="r550_00")


def config_of(vgpu: VgpuSpec | None = HOST) -> bytearray:
    return bytearray(config_space(load_profile("t4").gpus[0], vgpu))


def devices(root: Path) -> Path:
    return root / "sys" / "bus" / "pci" / "devices"


# --------------------------------------------------------------------------- config space


def test_vgpu_capability_and_host_driver_record() -> None:
    capability = vendor_capability(bytes(config_of()))
    assert capability is not None and capability[:1] == b"\x09" and capability[3:5] == b"VF"
    record = host_driver(capability)
    assert record is not None and (record.version, record.branch) == ("550.54.16", "r550_00")


def test_capability_without_signature_is_not_vgpu(tmp_path: Path) -> None:
    capability = vendor_capability(bytes(config_of(None)))
    assert capability is not None and capability[3:5] != b"VF"


def test_records_are_followed_to_the_host_driver_record() -> None:
    config = config_of()
    # Put another record (id 7, 4 bytes) before the host driver record.
    cap = config[0x68:0x68 + config[0x6A]]
    records = bytes((7, 4, 0xAA, 0xBB)) + bytes(cap[5:])
    new = bytes(cap[:2]) + bytes((5 + len(records),)) + b"VF" + records
    config[0x68:0x68 + len(new)] = new
    record = host_driver(vendor_capability(bytes(config)) or b"")
    assert record is not None and record.version == "550.54.16"


@pytest.mark.parametrize("damage", [
    pytest.param(lambda c: c.__setitem__(0x06, 0), id="no-capability-list"),
    pytest.param(lambda c: c.__setitem__(0x61, 0x60), id="loop"),
    pytest.param(lambda c: c.__setitem__(0x60, 0xFF), id="broken-chain"),
    pytest.param(lambda c: c.__setitem__(0x34, 0xFE), id="pointer-past-the-end"),
])
def test_malformed_capability_lists_end_the_walk(damage: Callable[[bytearray], None]) -> None:
    config = config_of()
    damage(config)
    assert vendor_capability(bytes(config)) is None


@pytest.mark.parametrize("records", [
    pytest.param(bytes((7, 0, 1, 2)), id="zero-length-record"),
    pytest.param(bytes((0, 22)) + b"550.54", id="truncated"),
    pytest.param(bytes((7, 60)), id="jumps-past-the-end"),
])
def test_bad_records_give_no_host_driver(records: bytes) -> None:
    assert host_driver(bytes((9, 0, 5 + len(records))) + b"VF" + records) is None


# --------------------------------------------------------------------------- sysfs


def test_vgpu_guest_profile(fake_snapshot: Reader) -> None:
    labels = node_labels(fake_snapshot("a100-vgpu"), Config())
    assert labels[PRESENT_LABEL] == "true"
    assert labels[VERSION_LABEL] == "550.54.16"
    assert labels[BRANCH_LABEL] == "r550_00"


@pytest.mark.parametrize("profile", list_profiles())
def test_vgpu_present_on_every_profile(profile: str, fake_snapshot: Reader) -> None:
    labels = node_labels(fake_snapshot(profile), Config())
    assert labels[PRESENT_LABEL] == ("true" if profile == "a100-vgpu" else "false")
    assert (VERSION_LABEL in labels) == (BRANCH_LABEL in labels) == (profile == "a100-vgpu")


def test_short_config_space_says_nothing_and_explains(tmp_path: Path) -> None:
    write_sysfs(load_profile("a100-vgpu"), tmp_path)
    for config in devices(tmp_path).glob("*/config"):
        config.write_bytes(config.read_bytes()[:64])  # what an unprivileged reader gets
    info = read_vgpu(str(tmp_path))
    assert not info.present and "64 bytes" in info.error and "privileged" in info.error
    snapshot = Snapshot(system=SystemInfo("550.54.15", 12040), vgpu=info)
    assert vgpu_labels(snapshot) == {}
    assert any("no vgpu.* labels" in p for p in label_problems(snapshot, Config()))


def test_other_vendors_are_ignored(tmp_path: Path) -> None:
    write_sysfs(load_profile("a100-vgpu"), tmp_path)
    for vendor in devices(tmp_path).glob("*/vendor"):
        vendor.write_text("0x8086\n")
    assert read_vgpu(str(tmp_path)) == VgpuInfo(present=False)


def test_vgpu_without_a_record_is_present_without_versions(tmp_path: Path) -> None:
    write_sysfs(load_profile("a100-vgpu"), tmp_path)
    for path in devices(tmp_path).glob("*/config"):
        config = bytearray(path.read_bytes())
        config[0x6A] = 5  # the capability ends after the signature
        path.write_bytes(bytes(config))
    info = read_vgpu(str(tmp_path))
    assert info.present and info.error
    labels = vgpu_labels(Snapshot(system=SystemInfo("1.2", 0), vgpu=info))
    assert labels == {PRESENT_LABEL: "true"}


def test_no_pci_tree_gives_no_labels(tmp_path: Path) -> None:
    info = read_vgpu(str(tmp_path / "missing"))
    assert info.error and vgpu_labels(Snapshot(system=SystemInfo("1.2", 0), vgpu=info)) == {}


@pytest.mark.parametrize(("vgpu", "message"), [
    ('{host_driver_version: "550.54.16.1234", host_driver_branch: r550}',
     "vgpu.host_driver_version: longer than the 10 bytes"),
    ('{host_driver_version: "550", host_driver_branch: "r5\u00e9"}',
     "vgpu.host_driver_branch: expected printable ASCII"),
    ('{host_driver_version: "550"}', "vgpu.host_driver_branch: required"),
    ('{host_driver_version: "550", host_driver_branch: r5, x: 1}', "vgpu.x: unknown field"),
])
def test_profile_vgpu_errors(tmp_path: Path, vgpu: str, message: str) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(f"name: p\ndriver_version: '550.54.15'\ncuda_driver_version: 12040\n"
                    f"vgpu: {vgpu}\ngpus: [{{model: T4, bus_id: '00000000:02:00.0'}}]\n",
                    encoding="utf-8")
    with pytest.raises(ProfileError, match=message):
        load_profile(path)
