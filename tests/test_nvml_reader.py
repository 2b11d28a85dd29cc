"""gpus.nvml reads every shipped profile through pynvml + the fake, and gets the profile back."""

from __future__ import annotations

from collections.abc import Callable

import pynvml
import pytest

from gpus.config import Config, Flags, MigStrategy
from gpus.fake import list_profiles, load_profile
from gpus.fake.profile import Profile
from gpus.model import Snapshot, TopologyLevel
from gpus.nvml import Nvml, mig_memory_gb, mig_profile_name
from gpus.resources import GPU_RESOURCE, build_resource_map

SnapshotFactory = Callable[..., Snapshot]
PROFILES = list_profiles()


def expected_mig_names(profile: Profile, index: int) -> list[str]:
    """MIG profile names the profile asks for on GPU ``index``, in slot order."""
    names = []
    for gi in profile.gpus[index].gpu_instances:
        for ci in gi.compute_instances:
            prefix = "" if ci.slices == gi.profile.slices else f"{ci.slices}c."
            names.append(prefix + gi.profile.name)
    return names


def expected_nvlinks(profile: Profile, i: int, j: int) -> int:
    topo = profile.topology
    if topo.nvswitch is not None:
        return min(profile.gpus[i].model.nvlinks, profile.gpus[j].model.nvlinks)
    return topo.nvlinks[i][j]


def test_shipped_profiles_are_all_there() -> None:
    for name in (
        "dgx-a100",
        "dgx-a100-mig",
        "dgx-h100",
        "dgx1-v100",
        "t4",
        "hetero",
        "hgx-16",
        "a100-mig-1g",
        "a100-mig-mixed",
        "a100-mig-7g",
        "a100-mig-me",
        "a100-mig-empty",
        "a100-mig-partial",
        "h100-mig",
        "h100-mig-mixed",
        "h100-mig-7g",
        "h100-mig-me",
        "hgx-16-pcie",
    ):
        assert name in PROFILES


@pytest.mark.parametrize("name", PROFILES)
def test_snapshot_matches_profile(name: str, fake_snapshot: SnapshotFactory) -> None:
    profile = load_profile(name)
    snap = fake_snapshot(name)
    assert snap.system.driver_version == profile.driver_version
    assert snap.system.cuda_driver_version == profile.cuda_driver_version
    assert snap.system.nvml_version == profile.nvml_version
    assert len(snap.gpus) == len(profile.gpus)
    for gpu, spec in zip(snap.gpus, profile.gpus, strict=True):
        assert gpu.index == spec.index
        assert gpu.uuid == spec.uuid and gpu.uuid.startswith("GPU-")
        assert gpu.name == spec.model.name
        assert gpu.memory_bytes == spec.model.memory_bytes
        assert gpu.compute_capability == spec.model.compute_capability
        assert gpu.architecture == spec.model.architecture
        assert gpu.pci_bus_id == spec.bus_id
        assert gpu.sysfs_bus_id == spec.sysfs_bus_id
        assert gpu.pci_device_id == spec.model.pci_device_id
        assert gpu.pci_class == 0x0302
        assert gpu.numa_node == spec.numa_node
        assert gpu.minor == spec.minor
        assert gpu.mig_capable == spec.model.mig_capable
        assert gpu.mig_enabled == spec.mig_enabled
        assert [m.profile for m in gpu.mig_devices] == expected_mig_names(profile, spec.index)
        for mig in gpu.mig_devices:
            assert mig.uuid.startswith("MIG-")
            assert mig.parent_uuid == gpu.uuid and mig.parent_index == gpu.index
            assert 0 < mig.memory_bytes < gpu.memory_bytes
            assert mig.multiprocessors > 0
    n = len(snap.gpus)
    for i in range(n):
        assert snap.link(i, i).level == TopologyLevel.INTERNAL
        for j in range(n):
            assert snap.link(i, j) == snap.link(j, i)
            if i != j:
                assert snap.link(i, j).level == profile.topology.levels[i][j]
                assert snap.link(i, j).nvlinks == expected_nvlinks(profile, i, j)


def test_dgx_a100_figures(fake_snapshot: SnapshotFactory) -> None:
    snap = fake_snapshot("dgx-a100")
    assert [g.pci_bus_id[9:11] for g in snap.gpus] == [
        "07",
        "0F",
        "47",
        "4E",
        "87",
        "90",
        "B7",
        "BD",
    ]
    gpu = snap.gpus[0]
    assert gpu.name == "NVIDIA A100-SXM4-40GB"
    assert gpu.memory_bytes == 42949672960
    assert gpu.pci_device_id == 0x20B010DE
    assert gpu.brand == "Nvidia"
    assert gpu.mig_capable and not gpu.mig_enabled
    assert snap.link(0, 1).level == TopologyLevel.MULTIPLE
    assert snap.link(0, 7).nvlinks == 12  # every pair over the NVSwitch fabric


def test_t4_has_no_nvlink_and_no_mig(fake_snapshot: SnapshotFactory) -> None:
    snap = fake_snapshot("t4")
    assert {g.name for g in snap.gpus} == {"Tesla T4"}
    assert snap.gpus[0].memory_bytes == 15360 * 2**20
    assert snap.gpus[0].brand == "Tesla"
    assert not any(g.mig_capable for g in snap.gpus)
    assert all(link.nvlinks == 0 for row in snap.links for link in row)


def test_dgx1_cube_mesh_is_exact(fake_snapshot: SnapshotFactory) -> None:
    snap = fake_snapshot("dgx1-v100")
    want = {
        (0, 1): 1,
        (0, 2): 1,
        (0, 3): 2,
        (0, 4): 2,
        (1, 2): 2,
        (1, 3): 1,
        (1, 5): 2,
        (2, 3): 2,
        (2, 6): 1,
        (3, 7): 1,
        (4, 5): 1,
        (4, 6): 1,
        (4, 7): 2,
        (5, 6): 2,
        (5, 7): 1,
        (6, 7): 2,
    }
    for i in range(8):
        for j in range(i + 1, 8):
            assert snap.link(i, j).nvlinks == want.get((i, j), 0), (i, j)
            same_half = (i < 4) == (j < 4)
            if j == i + 1 and i % 2 == 0:
                level = TopologyLevel.SINGLE
            elif same_half:
                level = TopologyLevel.HOSTBRIDGE
            else:
                level = TopologyLevel.SYSTEM
            assert snap.link(i, j).level == level, (i, j)


def test_dgx_a100_mig_layouts(fake_snapshot: SnapshotFactory) -> None:
    snap = fake_snapshot("dgx-a100-mig")
    profiles = [[m.profile for m in g.mig_devices] for g in snap.gpus]
    assert profiles[0] == ["1g.5gb"] * 7
    assert profiles[4] == ["1g.5gb+me", "3g.20gb"]
    assert profiles[5] == ["1c.3g.20gb", "2c.3g.20gb", "1g.10gb", "2g.10gb"]
    assert snap.gpus[6].mig_enabled and profiles[6] == []
    one_g = snap.gpus[0].mig_devices[0]
    assert one_g.memory_bytes == 4864 * 2**20
    assert (one_g.gpu_instance_slices, one_g.compute_instance_slices) == (1, 1)
    assert (one_g.multiprocessors, one_g.copy_engines, one_g.decoders) == (14, 1, 0)
    assert len({(m.gpu_instance_id, m.compute_instance_id) for m in snap.gpus[0].mig_devices}) == 7
    split = snap.gpus[5].mig_devices[:2]
    assert split[0].gpu_instance_id == split[1].gpu_instance_id
    assert [m.compute_instance_id for m in split] == [0, 1]
    assert [m.multiprocessors for m in split] == [14, 28]
    seven = snap.gpus[2].mig_devices[0]
    assert (seven.multiprocessors, seven.jpeg_decoders, seven.ofa_engines) == (98, 1, 1)


def test_h100_mig_names(fake_snapshot: SnapshotFactory) -> None:
    snap = fake_snapshot("h100-mig")
    assert snap.gpus[0].name == "NVIDIA H100 80GB HBM3"
    assert snap.gpus[0].memory_bytes == 81559 * 2**20
    assert [m.profile for m in snap.gpus[0].mig_devices] == ["1g.10gb"] * 7


# The H100 MIG profiles and what the reader must name their devices (NVIDIA's H100 80GB names).
H100_LAYOUTS = {
    "h100-mig-mixed": ["3g.40gb", "2g.20gb", "1g.10gb"],
    "h100-mig-7g": ["7g.80gb"],
    "h100-mig-me": ["1g.10gb+me"],
}


@pytest.mark.parametrize(("name", "layout"), sorted(H100_LAYOUTS.items()), ids=sorted(H100_LAYOUTS))
def test_h100_mig_profiles_read_back_with_nvidia_names(
    name: str, layout: list[str], fake_snapshot: SnapshotFactory
) -> None:
    snap = fake_snapshot(name)
    assert len(snap.gpus) == 8
    for gpu in snap.gpus:
        assert gpu.name == "NVIDIA H100 80GB HBM3" and gpu.mig_enabled
        assert [m.profile for m in gpu.mig_devices] == layout
        assert all(m.parent_uuid == gpu.uuid for m in gpu.mig_devices)


@pytest.mark.parametrize(
    ("name", "mixed", "single"),
    [
        pytest.param(
            "h100-mig-mixed",
            {"nvidia.com/mig-3g.40gb": 8, "nvidia.com/mig-2g.20gb": 8, "nvidia.com/mig-1g.10gb": 8},
            {},  # three profiles on the node: the single strategy refuses them
            id="h100-mig-mixed",
        ),
        pytest.param(
            "h100-mig-7g", {"nvidia.com/mig-7g.80gb": 8}, {GPU_RESOURCE: 8}, id="h100-mig-7g"
        ),
        pytest.param(
            "h100-mig-me", {"nvidia.com/mig-1g.10gb.me": 8}, {GPU_RESOURCE: 8}, id="h100-mig-me"
        ),
    ],
)
def test_h100_mig_profiles_resource_map(
    name: str, mixed: dict[str, int], single: dict[str, int], fake_snapshot: SnapshotFactory
) -> None:
    snap = fake_snapshot(name)

    def counts(strategy: str) -> dict[str, int]:
        result = build_resource_map(snap, Config(flags=Flags(mig_strategy=MigStrategy(strategy))))
        return {resource: len(r.devices) for resource, r in result.resources.items()}

    assert counts("mixed") == mixed
    assert counts("single") == single
    assert counts("none") == {GPU_RESOURCE: 8}


def test_hgx_16_pcie_is_two_cube_meshes(fake_snapshot: SnapshotFactory) -> None:
    """Two DGX-1 cube-meshes, one per socket: no NVLink between the halves."""
    snap = fake_snapshot("hgx-16-pcie")
    dgx1 = fake_snapshot("dgx1-v100")
    assert len(snap.gpus) == 16
    for i in range(16):
        for j in range(16):
            if i == j:
                continue
            link = snap.link(i, j)
            if (i < 8) == (j < 8):
                want = dgx1.link(i % 8, j % 8)
                # The DGX-1 puts its quads on two sockets; here a whole half shares one.
                level = TopologyLevel.NODE if want.level == TopologyLevel.SYSTEM else want.level
                assert (link.level, link.nvlinks) == (level, want.nvlinks), (i, j)
            else:
                assert (link.level, link.nvlinks) == (TopologyLevel.SYSTEM, 0), (i, j)


@pytest.mark.parametrize(
    ("total", "mig", "gb"),
    [
        (40960, 4864, 5),
        (40960, 9856, 10),
        (40960, 19968, 20),
        (40960, 40192, 40),
        (81559, 9984, 10),
        (81559, 40448, 40),
        (81559, 81152, 80),
        (81920, 9728, 10),
        (81559, 20096, 20),
        (81920, 19968, 20),
        (81920, 40192, 40),
        (81920, 80640, 80),
        # Exactly n.5 GB: Go's math.Round goes away from zero, Python's round() to even.
        (12288, 4608, 5),  # 3/8 of 12 GB = 4.5 (round() would say 4)
        (20480, 2560, 3),  # 1/8 of 20 GB = 2.5 (round() would say 2)
        (12288, 1536, 2),  # 1/8 of 12 GB = 1.5
        (4096, 512, 1),  # 1/8 of 4 GB = 0.5 (round() would say 0)
    ],
)
def test_mig_memory_rule(total: int, mig: int, gb: int) -> None:
    assert mig_memory_gb(total, mig) == gb


def test_mig_names_of_a_real_h100_80gb() -> None:
    """NVIDIA's names for every H100 80GB HBM3 GPU instance profile (81559 MiB total)."""
    profiles = [
        (pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE, 1, 9984, "1g.10gb"),
        (pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV1, 1, 9984, "1g.10gb+me"),
        (pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV2, 1, 20096, "1g.20gb"),
        (pynvml.NVML_GPU_INSTANCE_PROFILE_2_SLICE, 2, 20096, "2g.20gb"),
        (pynvml.NVML_GPU_INSTANCE_PROFILE_3_SLICE, 3, 40448, "3g.40gb"),
        (pynvml.NVML_GPU_INSTANCE_PROFILE_4_SLICE, 4, 40448, "4g.40gb"),
        (pynvml.NVML_GPU_INSTANCE_PROFILE_7_SLICE, 7, 81152, "7g.80gb"),
    ]
    for constant, slices, mig_mib, name in profiles:
        assert mig_profile_name(constant, slices, slices, 81559, mig_mib) == name


def test_mig_names_of_a_real_a100_40gb() -> None:
    """NVIDIA's names for every A100-SXM4-40GB GPU instance profile (40960 MiB total)."""
    profiles = [
        (pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE, 1, 4864, "1g.5gb"),
        (pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV1, 1, 4864, "1g.5gb+me"),
        (pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV2, 1, 9856, "1g.10gb"),
        (pynvml.NVML_GPU_INSTANCE_PROFILE_2_SLICE, 2, 9856, "2g.10gb"),
        (pynvml.NVML_GPU_INSTANCE_PROFILE_3_SLICE, 3, 19968, "3g.20gb"),
        (pynvml.NVML_GPU_INSTANCE_PROFILE_4_SLICE, 4, 19968, "4g.20gb"),
        (pynvml.NVML_GPU_INSTANCE_PROFILE_7_SLICE, 7, 40192, "7g.40gb"),
    ]
    for constant, slices, mig_mib, name in profiles:
        assert mig_profile_name(constant, slices, slices, 40960, mig_mib) == name


def test_mig_profile_name_suffixes() -> None:
    assert (
        mig_profile_name(pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV1, 1, 1, 40960, 4864)
        == "1g.5gb+me"
    )
    assert (
        mig_profile_name(pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE_GFX, 1, 1, 40960, 4864)
        == "1g.5gb+gfx"
    )
    assert (
        mig_profile_name(pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE_NO_ME, 1, 1, 40960, 4864)
        == "1g.5gb-me"
    )
    assert (
        mig_profile_name(pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE_ALL_ME, 1, 1, 40960, 4864)
        == "1g.5gb+me.all"
    )
    assert (
        mig_profile_name(pynvml.NVML_GPU_INSTANCE_PROFILE_3_SLICE, 3, 1, 40960, 19968)
        == "1c.3g.20gb"
    )


def test_model_tables_follow_nvidia_naming() -> None:
    """Every MIG profile name in the model tables is what the naming rule derives."""
    for name in ("dgx-a100", "dgx-h100", "hgx-16", "hetero"):
        for gpu in load_profile(name).gpus:
            model = gpu.model
            for p in model.mig_profiles:
                derived = mig_profile_name(
                    p.constant, p.slices, p.slices, model.memory_mib, p.memory_mib
                )
                assert derived == p.name, (model.key, p)


def test_missing_sysfs_gives_none(fake_nvml: Callable[..., object], tmp_path: object) -> None:
    fake_nvml("t4")
    with Nvml() as nvml:
        snap = nvml.read_snapshot(str(tmp_path))
    assert snap.gpus[0].pci_class is None and snap.gpus[0].numa_node is None


def test_negative_numa_is_none(
    fake_nvml: Callable[..., object], sysfs_root: Callable[..., str]
) -> None:
    fake_nvml("t4")
    root = sysfs_root("t4")
    spec = load_profile("t4").gpus[0]
    path = f"{root}/sys/bus/pci/devices/{spec.sysfs_bus_id}/numa_node"
    with open(path, "w") as f:
        f.write("-1\n")
    with Nvml() as nvml:
        snap = nvml.read_snapshot(root)
    assert snap.gpus[0].numa_node is None and snap.gpus[1].numa_node == 0


def test_probe(fake_nvml: Callable[..., object]) -> None:
    from gpus.fake import FakeNvml

    fake = fake_nvml("dgx-a100-mig")
    assert isinstance(fake, FakeNvml)
    with Nvml() as nvml:
        nvml.probe(fake.uuids()[0])
        nvml.probe(fake.mig_uuids(0)[0])


def test_sysfs_bus_id_keeps_domains_above_ffff() -> None:
    from gpus.model import sysfs_bus_id

    assert sysfs_bus_id("00000000:07:00.0") == "0000:07:00.0"
    assert sysfs_bus_id("00000001:B7:00.0") == "0001:b7:00.0"
    # A second PCI segment beyond 0xffff must not collide with domain 0 (it did: NVLinks were
    # credited to the wrong GPU and NUMA was read from the wrong device).
    assert sysfs_bus_id("00010000:06:00.0") == "10000:06:00.0"
    assert sysfs_bus_id("00010000:06:00.0") != sysfs_bus_id("00000000:06:00.0")
