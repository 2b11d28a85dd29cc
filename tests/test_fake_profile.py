"""Profile loading: the compact format, and clear errors (file, field path, reason)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pynvml
import pytest

from gpus.fake import ProfileError, install, load_profile

HEADER = """
name: custom
driver_version: "550.54.15"
cuda_driver_version: 12040
"""


def write(tmp_path: Path, body: str, name: str = "p.yaml") -> Path:
    path = tmp_path / name
    path.write_text(HEADER + textwrap.dedent(body))
    return path


def test_compact_format(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        models:
          A30:
            name: NVIDIA A30
            memory_bytes: 25769803776
            compute_capability: [8, 0]
            architecture: ampere
            brand: nvidia
            pci_device_id: 0x20B710DE
            nvlinks: 4
            mig_slices: 4
            mig:
              - {profile: 1_SLICE, id: 14, name: 1g.6gb, slices: 1, instances: 4,
                 memory_mib: 5836, multiprocessors: 14}
        gpus:
          - {model: A30, bus_id: "3b:00.0", numa_node: -1,
             mig: [{profile: 1g.6gb, count: 2, gi: null}]}
          - {model: A100-SXM4-40GB, bus_id: "0000:5e:00.0", uuid: GPU-fixed, minor: 7,
             mig: [{profile: 3g.20gb, gi: 2, compute: [1, 1, 1]}]}
        topology:
          pcie: {single: [[0, 1]]}
          nvlink: {0-1: 4}
    """,
    )
    profile = load_profile(path)
    assert profile.name == "custom" and profile.nvml_version == "12.550.54.15"
    a30, a100 = profile.gpus
    assert a30.bus_id == "00000000:3B:00.0" and a30.numa_node is None and a30.minor == 0
    assert [gi.id for gi in a30.gpu_instances] == [1, 2]  # no A100-style id pools on A30
    assert a100.uuid == "GPU-fixed" and a100.minor == 7
    assert a100.gpu_instances[0].id == 2
    assert [ci.id for ci in a100.gpu_instances[0].compute_instances] == [0, 1, 2]
    assert profile.topology.levels[0][1] == 10 and profile.topology.nvlinks[1][0] == 4


def test_uuids_are_stable_and_distinct() -> None:
    a, b = load_profile("dgx-a100"), load_profile("dgx-a100")
    assert [g.uuid for g in a.gpus] == [g.uuid for g in b.gpus]
    assert len({g.uuid for g in a.gpus} | {g.uuid for g in load_profile("dgx-h100").gpus}) == 16


@pytest.mark.parametrize(
    ("body", "field", "reason"),
    [
        ("gpus: []\n", "gpus", "at least one GPU"),
        ("gpu: []\n", "gpu", "unknown field"),
        ("gpus: [{model: A200, bus_id: '07:00.0'}]\n", "gpus[0].model", "unknown model 'A200'"),
        ("gpus: [{model: T4}]\n", "gpus[0].bus_id", "required"),
        ("gpus: [{model: T4, bus_id: '7:0.0'}]\n", "gpus[0].bus_id", "not a PCI bus id"),
        (
            "gpus: [{model: T4, bus_id: '07:00.0'}, {model: T4, bus_id: '0000:07:00.0'}]\n",
            "gpus[1].bus_id",
            "duplicate bus id",
        ),
        (
            "gpus: [{model: T4, bus_id: '07:00.0', numa_node: zero}]\n",
            "gpus[0].numa_node",
            "expected an integer",
        ),
        (
            "gpus: [{model: T4, bus_id: '07:00.0', mig: [1g.5gb]}]\n",
            "gpus[0].mig",
            "not MIG capable",
        ),
        (
            "gpus: [{model: A100-SXM4-40GB, bus_id: '07:00.0', mig: [5g.25gb]}]\n",
            "gpus[0].mig[0]",
            "has no MIG profile '5g.25gb'",
        ),
        (
            "gpus: [{model: A100-SXM4-40GB, bus_id: '07:00.0',"
            " mig: [{profile: 1g.5gb, count: 8}]}]\n",
            "gpus[0].mig[0]",
            "at most 7 instance(s)",
        ),
        (
            "gpus: [{model: A100-SXM4-40GB, bus_id: '07:00.0', mig: [3g.20gb, 3g.20gb, 1g.5gb]}]\n",
            "gpus[0].mig[2]",
            "does not fit: 9 of 8 memory slices",
        ),
        (
            "gpus: [{model: A100-SXM4-40GB, bus_id: '07:00.0', mig: [4c.3g.20gb]}]\n",
            "gpus[0].mig[0]",
            "use 4 slices, 3g.20gb has 3",
        ),
        (
            "gpus: [{model: A100-SXM4-40GB, bus_id: '07:00.0', mig: yes}]\n",
            "gpus[0].mig",
            "expected 'disabled' or a list",
        ),
        (
            "gpus: [{model: T4, bus_id: '07:00.0'}]\nmig: {3: []}\n",
            "mig.3",
            "expected 'all' or a GPU",
        ),
        (
            "gpus: [{model: T4, bus_id: '07:00.0'}, {model: T4, bus_id: '08:00.0'}]\n"
            "topology: {nvlink: {0-1: 1}}\n",
            "topology.nvlink",
            "has 0 NVLinks",
        ),
        (
            "gpus: [{model: T4, bus_id: '07:00.0'}]\ntopology: {nvlink: {a-b: 1}}\n",
            "topology.nvlink.a-b",
            "GPU index pairs",
        ),
        (
            "gpus: [{model: T4, bus_id: '07:00.0'}]\ntopology: {pcie: {near: [[0]]}}\n",
            "topology.pcie.near",
            "unknown level",
        ),
        (
            "gpus: [{model: T4, bus_id: '07:00.0'}]\ntopology: {pcie: {single: [[0, 5]]}}\n",
            "topology.pcie.single[0]",
            "GPU indices 0..0",
        ),
        (
            "gpus: [{model: V100-SXM2-16GB, bus_id: '07:00.0'},"
            " {model: V100-SXM2-16GB, bus_id: '08:00.0'}]\n"
            "topology: {nvlink: {0-1: 1},"
            " nvswitch: {pci_device_id: 0x1AF110DE, bus_ids: ['c0:00.0']}}\n",
            "topology.nvswitch",
            "cannot be combined",
        ),
        (
            "gpus: [{model: T4, bus_id: '07:00.0'}]\n"
            "topology: {nvswitch: {pci_device_id: 0x12345678, bus_ids: ['c0:00.0']}}\n",
            "topology.nvswitch.pci_device_id",
            "not a known NVSwitch",
        ),
        (
            "models: {X: {name: X}}\ngpus: [{model: X, bus_id: '07:00.0'}]\n",
            "models.X.compute_capability",
            "required",
        ),
    ],
)
def test_errors_name_file_field_and_reason(
    tmp_path: Path, body: str, field: str, reason: str
) -> None:
    path = write(tmp_path, body)
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    message = str(info.value)
    assert message.startswith(f"{path}: {field}: "), message
    assert reason in message


def test_yaml_and_file_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ProfileError, match=r"bad\.yaml: cannot read"):
        load_profile(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just a string\n")
    with pytest.raises(ProfileError, match="top level must be a mapping"):
        load_profile(scalar)
    with pytest.raises(ProfileError, match="unknown profile"):
        load_profile("_models")


def test_extends_and_cycles(tmp_path: Path) -> None:
    child = tmp_path / "child.yaml"
    child.write_text("name: child\nextends: dgx-h100\nmig: {2: [{profile: 1g.10gb+me}]}\n")
    profile = load_profile(child)
    assert len(profile.gpus) == 8 and profile.description == ""
    assert profile.gpus[2].mig_enabled and not profile.gpus[1].mig_enabled
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(f"name: a\nextends: {b}\n")
    b.write_text(f"name: b\nextends: {a}\n")
    with pytest.raises(ProfileError, match="extends: cycle"):
        load_profile(a)


def test_bad_profile_installs_nothing(tmp_path: Path) -> None:
    before = pynvml.nvmlLib
    with pytest.raises(ProfileError):
        install(write(tmp_path, "gpus: []\n"))
    assert pynvml.nvmlLib is before


def test_h100_mig_profiles_load() -> None:
    """The shipped H100 MIG layouts: every GPU gets the layout, with the H100 table's figures."""
    want = {
        "h100-mig-mixed": [("3g.40gb", 40448), ("2g.20gb", 20096), ("1g.10gb", 9984)],
        "h100-mig-7g": [("7g.80gb", 81152)],
        "h100-mig-me": [("1g.10gb+me", 9984)],
    }
    for name, layout in want.items():
        profile = load_profile(name)
        assert len(profile.gpus) == 8, name
        for gpu in profile.gpus:
            assert gpu.model.name == "NVIDIA H100 80GB HBM3"
            got = [(gi.profile.name, gi.profile.memory_mib) for gi in gpu.gpu_instances]
            assert got == layout, (name, gpu.index)


def test_h100_layout_that_does_not_fit(tmp_path: Path) -> None:
    """Two 3g.40gb take all eight H100 memory slices: a 1g.10gb more is refused, by name."""
    path = tmp_path / "full.yaml"
    path.write_text("name: full\nextends: dgx-h100\nmig: {all: [3g.40gb, 3g.40gb, 1g.10gb]}\n")
    before = pynvml.nvmlLib
    with pytest.raises(ProfileError, match=r"full\.yaml: .*1g\.10gb does not fit"):
        install(path)
    assert pynvml.nvmlLib is before
