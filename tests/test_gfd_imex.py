"""The IMEX labeler (gpu.clique) and the fabric info behind it: reader, fake NVML, profiles."""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from pathlib import Path

import builders
import pynvml
import pytest

from gfd.imex import CLIQUE_LABEL, imex_labels, imex_problems
from gfd.labels import label_problems, node_labels
from gpus.config import Config
from gpus.fake import FakeNvml, ProfileError, list_profiles, load_profile
from gpus.model import GPU, ZERO_UUID, GpuFabric, Snapshot
from gpus.nvml import Nvml

Reader = Callable[..., Snapshot]
CLUSTER = "3d5c6e2a-8f3b-4c71-9d2e-5b8a1f0c7e44"
OTHER = "9b2f0d1e-7c6a-4e58-b3a4-1d0e9f8c2b77"
COMPLETED, IN_PROGRESS = pynvml.NVML_GPU_FABRIC_STATE_COMPLETED, \
    pynvml.NVML_GPU_FABRIC_STATE_IN_PROGRESS
WITH_FABRIC = {"gb200-nvl": "6f1c3a52-9d4e-4b8a-a0f7-2c5e8d1b3a90.32766",
               "h100-nvswitch-fabric": "1b4e28ba-2fa1-41d2-883f-0016d3cca427.7"}


def gpu(index: int, fabric: GpuFabric | None) -> GPU:
    return builders.gpu(index, name="NVIDIA GB200", memory_bytes=builders.GIB,
                        compute_capability=(10, 0), architecture="blackwell",
                        pci_bus_id=f"00000000:0{index}:00.0", fabric=fabric)


def snap(*fabrics: GpuFabric | None) -> Snapshot:
    return builders.snapshot(*(gpu(i, f) for i, f in enumerate(fabrics)),
                             driver="570.124.06", cuda=12080)


def fab(cluster: str = CLUSTER, clique: int = 7, state: int = COMPLETED, status: int = 0,
        error: str = "") -> GpuFabric:
    return GpuFabric(cluster_uuid=cluster, clique_id=clique, state=state, status=status,
                     error=error)


# --------------------------------------------------------------------------- the labeler


def test_one_cluster_one_clique_gives_the_label() -> None:
    assert imex_labels(snap(fab(), fab())) == {CLIQUE_LABEL: f"{CLUSTER}.7"}


@pytest.mark.parametrize("other", [
    pytest.param(fab(clique=8), id="clique"),
    pytest.param(fab(cluster=OTHER), id="cluster"),
])
def test_gpus_that_disagree_give_no_label_and_a_warning(other: GpuFabric) -> None:
    snapshot = snap(fab(), other)
    assert imex_labels(snapshot) == {}
    problems = imex_problems(snapshot)
    assert len(problems) == 1 and "disagree" in problems[0] and "GPUs 1" in problems[0]
    assert problems[0] in label_problems(snapshot, Config())


@pytest.mark.parametrize("detached", [
    pytest.param(None, id="not-supported"),
    pytest.param(fab(state=IN_PROGRESS, clique=9), id="in-progress"),
    pytest.param(fab(status=pynvml.NVML_ERROR_UNKNOWN, clique=9), id="status-error"),
    pytest.param(fab(cluster=ZERO_UUID, clique=9), id="zero-cluster"),
])
def test_gpus_not_attached_are_left_out(detached: GpuFabric | None) -> None:
    snapshot = snap(fab(), detached)
    assert imex_labels(snapshot) == {CLIQUE_LABEL: f"{CLUSTER}.7"}
    assert imex_problems(snapshot) == ()
    assert imex_labels(snap(detached)) == {}  # alone: not attached, no label, no warning
    assert imex_problems(snap(detached)) == ()


def test_a_failed_query_gives_no_label_and_says_why() -> None:
    snapshot = snap(fab(), fab(error="NVML_ERROR_UNKNOWN"))
    assert imex_labels(snapshot) == {}
    assert any("NVML_ERROR_UNKNOWN" in p for p in imex_problems(snapshot))


def test_node_labels_carry_the_clique() -> None:
    labels = node_labels(snap(fab(), fab()), Config())
    assert labels[CLIQUE_LABEL] == f"{CLUSTER}.7"


# --------------------------------------------------------------------------- profiles


@pytest.mark.parametrize("profile", list_profiles())
def test_clique_only_on_profiles_with_a_fabric(profile: str, fake_snapshot: Reader) -> None:
    labels = node_labels(fake_snapshot(profile), Config())
    if profile in WITH_FABRIC:
        assert labels[CLIQUE_LABEL] == WITH_FABRIC[profile]
    else:
        assert CLIQUE_LABEL not in labels


def test_gb200_profile_is_four_blackwell_gpus(fake_snapshot: Reader) -> None:
    snapshot = fake_snapshot("gb200-nvl")
    assert len(snapshot.gpus) == 4
    assert {g.compute_capability for g in snapshot.gpus} == {(10, 0)}
    labels = node_labels(snapshot, Config())
    assert labels["nvidia.com/gpu.family"] == "blackwell"
    assert labels["nvidia.com/gpu.count"] == "4"


def _profile(tmp_path: Path, *gpus: str, defaults: str = "") -> Path:
    lines = ["name: p", 'driver_version: "570.124.06"', "cuda_driver_version: 12080",
             f"defaults: {{model: H100-SXM5-80GB{defaults}}}", "gpus:"]
    lines += [f'  - {{bus_id: "00000000:{i + 1:02X}:00.0"{extra}}}' for i, extra in enumerate(gpus)]
    return builders.write_profile(tmp_path, lines)


def test_reader_through_pynvml(tmp_path: Path, fake_snapshot: Reader) -> None:
    path = _profile(
        tmp_path,
        f", fabric: {{cluster_uuid: {CLUSTER}, clique_id: 3}}",
        f", fabric: {{cluster_uuid: {CLUSTER}, clique_id: 3, state: in_progress}}",
        f", fabric: {{cluster_uuid: {CLUSTER}, clique_id: 3, status: NVML_ERROR_UNKNOWN}}",
        "")
    gpus = fake_snapshot(path).gpus
    assert gpus[0].fabric == GpuFabric(CLUSTER, 3, COMPLETED, 0)
    assert gpus[1].fabric == GpuFabric(CLUSTER, 3, IN_PROGRESS, 0)
    assert gpus[2].fabric == GpuFabric(CLUSTER, 3, COMPLETED, pynvml.NVML_ERROR_UNKNOWN)
    assert gpus[3].fabric is None  # NVML_ERROR_NOT_SUPPORTED
    assert [g.fabric.attached for g in gpus[:3] if g.fabric] == [True, False, False]


def test_old_driver_without_the_v_call_falls_back_to_v1(
        fake_nvml: Callable[..., FakeNvml], sysfs_root: Callable[..., str]) -> None:
    fake = fake_nvml("h100-nvswitch-fabric")
    fake.fail("nvmlDeviceGetGpuFabricInfoV", "NVML_ERROR_FUNCTION_NOT_FOUND")
    with Nvml() as nvml:
        snapshot = nvml.read_snapshot(sysfs_root(fake))
    assert imex_labels(snapshot) == {CLIQUE_LABEL: WITH_FABRIC["h100-nvswitch-fabric"]}
    fake.fail("nvmlDeviceGetGpuFabricInfo", "NVML_ERROR_FUNCTION_NOT_FOUND")  # neither call
    with Nvml() as nvml:
        snapshot = nvml.read_snapshot(sysfs_root(fake))
    assert all(g.fabric is None for g in snapshot.gpus)
    assert imex_labels(snapshot) == {} and imex_problems(snapshot) == ()


def test_other_fabric_errors_keep_the_snapshot(
        fake_nvml: Callable[..., FakeNvml], sysfs_root: Callable[..., str]) -> None:
    fake = fake_nvml("gb200-nvl")
    fake.fail("nvmlDeviceGetGpuFabricInfoV", "NVML_ERROR_UNKNOWN", count=1)
    with Nvml() as nvml:
        snapshot = nvml.read_snapshot(sysfs_root(fake))
    assert len(snapshot.gpus) == 4
    assert snapshot.gpus[0].fabric == GpuFabric(error="NVML_ERROR_UNKNOWN")
    assert imex_labels(snapshot) == {}
    assert "GPU 0" in imex_problems(snapshot)[0]


def test_fake_checks_the_struct_version(fake_nvml: Callable[..., FakeNvml]) -> None:
    fake_nvml("gb200-nvl")
    pynvml.nvmlInit()
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        v3 = pynvml.c_nvmlGpuFabricInfo_v3_t()
        pynvml.nvmlDeviceGetGpuFabricInfoV(handle, ctypes.byref(v3))
        assert (v3.state, v3.cliqueId) == (COMPLETED, 32766)
        wrong = pynvml.c_nvmlGpuFabricInfo_v2_t()
        wrong.version = 0x01000024
        with pytest.raises(pynvml.NVMLError) as err:
            pynvml.nvmlDeviceGetGpuFabricInfoV(handle, ctypes.byref(wrong))
        assert err.value.value == pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH
    finally:
        pynvml.nvmlShutdown()


@pytest.mark.parametrize(("fabric", "message"), [
    ("{cluster_uuid: nope, clique_id: 1}", "gpus[0].fabric.cluster_uuid: 'nope' is not a UUID"),
    (f"{{cluster_uuid: {CLUSTER}, clique_id: 1, state: done}}", "gpus[0].fabric.state: unknown"),
    (f"{{cluster_uuid: {CLUSTER}, clique_id: 1, status: oops}}", "gpus[0].fabric.status:"),
    (f"{{cluster_uuid: {CLUSTER}, clique_id: -1}}", "gpus[0].fabric.clique_id: -1 is out of"),
    (f"{{cluster_uuid: {CLUSTER}, clique: 1}}", "gpus[0].fabric.clique: unknown field"),
])
def test_profile_fabric_errors(tmp_path: Path, fabric: str, message: str) -> None:
    with pytest.raises(ProfileError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_profile(_profile(tmp_path, f", fabric: {fabric}"))
