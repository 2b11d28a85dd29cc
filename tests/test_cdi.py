"""The CDI spec: content, atomic write, and errors."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from deviceplugin.allocate import cdi_device_name
from deviceplugin.cdi import CdiError, build_cdi_spec, write_cdi_spec
from gpus.config import Config, Flags, PluginFlags
from gpus.model import GPU, MigDevice, Snapshot
from gpus.resources import Device, Resource, ResourceMap, build_resource_map

MINORS = {"gpu1/gi3/access": 40, "gpu1/gi3/ci0/access": 41}


def gpu(index: int, migs: int = 0) -> GPU:
    uuid = f"GPU-{index}"
    mig_devices = tuple(
        MigDevice(uuid=f"MIG-{index}-{i}", index=i, parent_index=index, parent_uuid=uuid,
                  gpu_instance_id=3 + i, compute_instance_id=0, profile="3g.20gb",
                  memory_bytes=20 << 30, gpu_instance_slices=3, compute_instance_slices=3)
        for i in range(migs)
    )
    return GPU(index=index, uuid=uuid, name="NVIDIA A100-SXM4-40GB", memory_bytes=40 << 30,
               compute_capability=(8, 0), architecture="ampere", brand="Nvidia", minor=index,
               pci_bus_id=f"00000000:{index:02X}:00.0", mig_enabled=migs > 0,
               mig_devices=mig_devices)


G0, G1 = gpu(0), gpu(1, migs=1)
RESOURCES = ResourceMap(resources={
    "nvidia.com/gpu": Resource("nvidia.com/gpu", (
        Device(id="GPU-0::0", uuid="GPU-0", gpu=G0, replica=0),
        Device(id="GPU-0::1", uuid="GPU-0", gpu=G0, replica=1),
    ), replicas=2),
    "nvidia.com/mig-3g.20gb": Resource("nvidia.com/mig-3g.20gb", (
        Device(id="MIG-1-0", uuid="MIG-1-0", gpu=G1, mig=G1.mig_devices[0]),
    )),
})


def config(spec_dir: Path | str = "/var/run/cdi", strategies: tuple[str, ...] = ("cdi-cri",),
           dev_root: str = "") -> Config:
    return Config(flags=Flags(nvidia_dev_root=dev_root, plugin=PluginFlags(
        device_list_strategy=strategies, cdi_spec_dir=str(spec_dir))))


def only(paths: set[str]) -> Callable[[str], bool]:
    return lambda path: path in paths


def minors(_: str) -> Mapping[str, int]:
    return MINORS


def test_spec_content() -> None:
    spec = build_cdi_spec(RESOURCES, config(), path_exists=only({"/dev/nvidiactl"}),
                          mig_minors=minors)
    assert spec["cdiVersion"] == "0.5.0"
    assert spec["kind"] == "k8s.device-plugin.nvidia.com/gpu"
    assert spec["containerEdits"] == {
        "env": ["NVIDIA_VISIBLE_DEVICES=void"],
        "deviceNodes": [{"path": "/dev/nvidiactl"}],
    }
    by_name = {d["name"]: d["containerEdits"]["deviceNodes"] for d in spec["devices"]}
    assert list(by_name) == ["GPU-0", "0", "MIG-1-0", "1:0"]
    assert by_name["GPU-0"] == by_name["0"] == [{"path": "/dev/nvidia0"}]
    assert by_name["MIG-1-0"] == [{"path": "/dev/nvidia1"},
                                  {"path": "/dev/nvidia-caps/nvidia-cap40"},
                                  {"path": "/dev/nvidia-caps/nvidia-cap41"}]


def test_names_match_what_allocate_hands_out() -> None:
    spec = build_cdi_spec(RESOURCES, config(), path_exists=only(set()), mig_minors=minors)
    names = {f"{spec['kind']}={d['name']}" for d in spec["devices"]}
    assert cdi_device_name("GPU-0") in names and cdi_device_name("1:0") in names


def test_dev_root_sets_host_paths() -> None:
    spec = build_cdi_spec(RESOURCES, config(dev_root="/run/nvidia/driver"),
                          path_exists=only({"/run/nvidia/driver/dev/nvidia-uvm"}),
                          mig_minors=minors)
    assert spec["containerEdits"]["deviceNodes"] == [
        {"path": "/dev/nvidia-uvm", "hostPath": "/run/nvidia/driver/dev/nvidia-uvm"}]
    assert spec["devices"][0]["containerEdits"]["deviceNodes"] == [
        {"path": "/dev/nvidia0", "hostPath": "/run/nvidia/driver/dev/nvidia0"}]


def test_no_cdi_strategy_writes_nothing(tmp_path: Path) -> None:
    assert write_cdi_spec(RESOURCES, config(tmp_path, ("envvar",))) is None
    assert list(tmp_path.iterdir()) == []


def test_write_is_atomic_and_replaces(tmp_path: Path) -> None:
    spec_dir = tmp_path / "cdi"
    path = write_cdi_spec(RESOURCES, config(spec_dir, ("cdi-annotations",)),
                          path_exists=only(set()), mig_minors=minors)
    assert path == spec_dir / "k8s.device-plugin.nvidia.com-gpu.json"
    first = json.loads(path.read_text())
    assert len(first["devices"]) == 4
    assert oct(path.stat().st_mode & 0o777) == "0o644"
    smaller = ResourceMap(resources={"nvidia.com/gpu": RESOURCES.resources["nvidia.com/gpu"]})
    assert write_cdi_spec(smaller, config(spec_dir), path_exists=only(set())) == path
    assert [d["name"] for d in json.loads(path.read_text())["devices"]] == ["GPU-0", "0"]
    assert sorted(p.name for p in spec_dir.iterdir()) == [path.name]  # no temp files left


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_unwritable_directory_is_a_clear_error_and_keeps_old_file(tmp_path: Path) -> None:
    spec_dir = tmp_path / "cdi"
    path = write_cdi_spec(RESOURCES, config(spec_dir), path_exists=only(set()), mig_minors=minors)
    assert path is not None
    before = path.read_text()
    spec_dir.chmod(0o500)
    try:
        with pytest.raises(CdiError, match=f"cannot write CDI spec {path}: Permission denied"):
            write_cdi_spec(RESOURCES, config(spec_dir), path_exists=only(set()),
                           mig_minors=minors)
    finally:
        spec_dir.chmod(0o700)
    assert path.read_text() == before
    assert [p.name for p in spec_dir.iterdir()] == [path.name]


def test_directory_path_is_a_file_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CdiError, match="cannot write CDI spec"):
        write_cdi_spec(RESOURCES, config(blocker), path_exists=only(set()), mig_minors=minors)
    assert blocker.read_text() == "x"


def test_missing_mig_minors_leaves_mig_devices_out_and_reports_it(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Whole GPUs need no capability minors: the spec still serves them, and the MIG devices'
    # absence is a reported problem (Allocate refuses them with the same cause).
    cfg = Config(flags=Flags(nvidia_driver_root=str(tmp_path), plugin=PluginFlags(
        device_list_strategy=("cdi-cri",), cdi_spec_dir=str(tmp_path / "cdi"))))
    problems: list[str] = []
    with caplog.at_level("ERROR", logger="deviceplugin.cdi"):
        path = write_cdi_spec(RESOURCES, cfg, path_exists=only(set()), problems=problems)
    assert path is not None
    names = [d["name"] for d in json.loads(path.read_text())["devices"]]
    assert names == ["GPU-0", "0"]
    (problem,) = problems
    assert problem.startswith("MIG devices left out of the CDI spec: reading ")
    assert "mig-minors failed" in problem
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [problem]


def test_mig_device_missing_from_minors_is_left_out(tmp_path: Path) -> None:
    problems: list[str] = []
    spec = build_cdi_spec(RESOURCES, config(tmp_path), path_exists=only(set()),
                          mig_minors=lambda _: {}, problems=problems)
    assert [d["name"] for d in spec["devices"]] == ["GPU-0", "0"]
    (problem,) = problems
    assert problem.startswith("MIG device MIG-1-0 left out of the CDI spec: gpu1/gi3/access")
    assert problem.endswith("is not listed in /proc/driver/nvidia-caps/mig-minors")


def test_permission_denied_reported_even_as_root(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    def denied(*_: object, **__: object) -> tuple[int, str]:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("gpus.atomicfile.tempfile.mkstemp", denied)
    with pytest.raises(CdiError, match="cannot write CDI spec .*: Permission denied"):
        write_cdi_spec(RESOURCES, config(tmp_path), path_exists=only(set()), mig_minors=minors)
    assert list(tmp_path.iterdir()) == []


def test_failed_replace_removes_the_temp_file(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("deviceplugin.cdi.os.replace", broken)
    with pytest.raises(CdiError, match="No space left on device"):
        write_cdi_spec(RESOURCES, config(tmp_path), path_exists=only(set()), mig_minors=minors)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("profile,strategy", [("dgx-a100", "none"), ("dgx-a100-mig", "mixed"),
                                              ("a100-mig-1g", "single")])
def test_spec_for_real_profiles_covers_every_allocatable_name(
        fake_snapshot: Callable[..., Snapshot], profile: str, strategy: str) -> None:
    snapshot = fake_snapshot(profile)
    cfg = Config(flags=Flags(mig_strategy=strategy, plugin=PluginFlags(
        device_list_strategy=("cdi-cri",))))
    resource_map = build_resource_map(snapshot, cfg)
    table = {}
    for g in snapshot.gpus:
        for m in g.mig_devices:
            table[f"gpu{g.minor}/gi{m.gpu_instance_id}/access"] = 100 + m.index
            table[f"gpu{g.minor}/gi{m.gpu_instance_id}/ci{m.compute_instance_id}/access"] = 200
    spec = build_cdi_spec(resource_map, cfg, path_exists=only(set()), mig_minors=lambda _: table)
    names = [d["name"] for d in spec["devices"]]
    assert len(names) == len(set(names))
    for resource in resource_map.resources.values():
        for device in resource.devices:
            assert device.uuid in names and device.index in names
    json.dumps(spec)  # serialisable as is
