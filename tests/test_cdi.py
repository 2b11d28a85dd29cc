"""The CDI spec: content, atomic write, and errors."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import builders
import pytest
from cdi_checks import allocated_names, check_spec

from deviceplugin.allocate import build_allocation, cdi_device_name
from deviceplugin.cdi import (
    CdiError,
    CdiOptions,
    build_cdi_spec,
    discover_for_cdi,
    minimum_cdi_version,
    remove_cdi_spec,
    write_cdi_spec,
)
from gpus.config import (
    Config,
    DeviceIdStrategy,
    DeviceListStrategy,
    Flags,
    MigStrategy,
    PluginFlags,
)
from gpus.driver.discover import DeviceNode, DriverInfo
from gpus.fake.driverroot import FakeDriverRoot, write_fake_driver_root
from gpus.fake.profile import list_profiles, load_profile
from gpus.model import GPU, Snapshot
from gpus.resources import Device, Resource, ResourceMap, build_resource_map

MINORS = {"gpu1/gi3/access": 40, "gpu1/gi3/ci0/access": 41}


def gpu(index: int, migs: int = 0) -> GPU:
    """A100 ``index`` with ``migs`` 3g.20gb MIG devices (GPU instances from 3)."""
    return builders.gpu(index, migs=(
        builders.mig_device(index, i, gpu_instance_id=3 + i, profile="3g.20gb",
                            memory_bytes=20 * builders.GIB, gpu_instance_slices=3,
                            compute_instance_slices=3)
        for i in range(migs)))


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
           dev_root: str = "", id_strategy: str = "uuid") -> Config:
    return Config(flags=Flags(nvidia_dev_root=dev_root, plugin=PluginFlags(
        device_list_strategy=tuple(map(DeviceListStrategy, strategies)), cdi_spec_dir=str(spec_dir),
        device_id_strategy=DeviceIdStrategy(id_strategy))))


def only(paths: set[str]) -> Callable[[str], bool]:
    return lambda path: path in paths


def minors(_: str) -> Mapping[str, int]:
    return MINORS


def test_spec_content() -> None:
    spec = build_cdi_spec(RESOURCES, config(), path_exists=only({"/dev/nvidiactl"}),
                          mig_minors=minors)
    assert spec["cdiVersion"] == "0.5.0"
    assert spec["kind"] == "k8s.device-plugin.nvidia.com/gpu"
    # NVIDIA's host-root transform fills hostPath from path: it is present even when equal.
    assert spec["containerEdits"] == {
        "env": ["NVIDIA_VISIBLE_DEVICES=void"],
        "deviceNodes": [{"path": "/dev/nvidiactl", "hostPath": "/dev/nvidiactl"}],
    }
    by_name = {d["name"]: d["containerEdits"]["deviceNodes"] for d in spec["devices"]}
    # One name per device, by --device-id-strategy (uuid by default), sorted by name (nvcdi).
    assert list(by_name) == ["GPU-0", "MIG-1-0"]
    assert by_name["GPU-0"] == [{"path": "/dev/nvidia0", "hostPath": "/dev/nvidia0"}]
    assert by_name["MIG-1-0"] == [
        {"path": "/dev/nvidia1", "hostPath": "/dev/nvidia1"},
        {"path": "/dev/nvidia-caps/nvidia-cap40", "hostPath": "/dev/nvidia-caps/nvidia-cap40"},
        {"path": "/dev/nvidia-caps/nvidia-cap41", "hostPath": "/dev/nvidia-caps/nvidia-cap41"}]
    check_spec(spec, host_exists=lambda _: True)


def test_index_strategy_names_devices_by_index() -> None:
    spec = build_cdi_spec(RESOURCES, config(id_strategy="index"), path_exists=only(set()),
                          mig_minors=minors)
    assert [d["name"] for d in spec["devices"]] == ["0", "1:0"]
    assert spec["cdiVersion"] == "0.5.0"
    check_spec(spec)


@pytest.mark.parametrize("id_strategy,names", [("uuid", ("GPU-0", "MIG-1-0")),
                                               ("index", ("0", "1:0"))])
def test_names_match_what_allocate_hands_out(id_strategy: str, names: tuple[str, ...]) -> None:
    spec = build_cdi_spec(RESOURCES, config(id_strategy=id_strategy), path_exists=only(set()),
                          mig_minors=minors)
    qualified = {f"{spec['kind']}={d['name']}" for d in spec["devices"]}
    assert qualified == {cdi_device_name(name) for name in names}


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
    assert [d["name"] for d in first["devices"]] == ["GPU-0", "MIG-1-0"]
    assert oct(path.stat().st_mode & 0o777) == "0o644"
    smaller = ResourceMap(resources={"nvidia.com/gpu": RESOURCES.resources["nvidia.com/gpu"]})
    assert write_cdi_spec(smaller, config(spec_dir), path_exists=only(set())) == path
    assert [d["name"] for d in json.loads(path.read_text())["devices"]] == ["GPU-0"]
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
        device_list_strategy=(DeviceListStrategy.CDI_CRI,), cdi_spec_dir=str(tmp_path / "cdi"))))
    problems: list[str] = []
    with caplog.at_level("ERROR", logger="deviceplugin.cdi"):
        path = write_cdi_spec(RESOURCES, cfg, path_exists=only(set()), problems=problems)
    assert path is not None
    names = [d["name"] for d in json.loads(path.read_text())["devices"]]
    assert names == ["GPU-0"]
    (problem,) = problems
    assert problem.startswith("MIG devices left out of the CDI spec: reading ")
    assert "mig-minors failed" in problem
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [problem]


def test_mig_device_missing_from_minors_is_left_out(tmp_path: Path) -> None:
    problems: list[str] = []
    spec = build_cdi_spec(RESOURCES, config(tmp_path), path_exists=only(set()),
                          mig_minors=lambda _: {}, problems=problems)
    assert [d["name"] for d in spec["devices"]] == ["GPU-0"]
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


@pytest.mark.parametrize("id_strategy", ["uuid", "index"])
@pytest.mark.parametrize("profile,strategy", [("dgx-a100", "none"), ("dgx-a100-mig", "mixed"),
                                              ("a100-mig-1g", "single")])
def test_spec_for_real_profiles_covers_every_allocatable_name(
        fake_snapshot: Callable[..., Snapshot], profile: str, strategy: str,
        id_strategy: str) -> None:
    snapshot = fake_snapshot(profile)
    cfg = Config(flags=Flags(mig_strategy=MigStrategy(strategy), plugin=PluginFlags(
        device_list_strategy=(DeviceListStrategy.CDI_CRI,),
        device_id_strategy=DeviceIdStrategy(id_strategy))))
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
            wanted, other = ((device.index, device.uuid) if id_strategy == "index"
                             else (device.uuid, device.index))
            assert wanted in names and other not in names
    check_spec(spec)


# --- Full specs with the driver (issue 13) ------------------------------------------------

LIB = "/usr/lib/x86_64-linux-gnu"
NVIDIA_HOOKS = ["create-symlinks", "create-symlinks", "enable-cuda-compat", "update-ldcache",
                "disable-device-node-modification", "update-application-profile"]


def driver_setup(tmp_path: Path, profile: str, strategy: str = "cdi-cri",
                 host_root: str | None = None, **option_fields: object
                 ) -> tuple[Config, CdiOptions, FakeDriverRoot]:
    root = tmp_path / "driver"
    fake = write_fake_driver_root(load_profile(profile), root)
    cfg = Config(flags=Flags(nvidia_driver_root=str(root), mig_strategy=MigStrategy.MIXED,
                             plugin=PluginFlags(device_list_strategy=(DeviceListStrategy(strategy),),
                                                cdi_spec_dir=str(tmp_path / "cdi"))))
    options = CdiOptions(driver_root=host_root or str(root), driver_root_ctr_path=str(root),
                         **option_fields)  # type: ignore[arg-type]
    return cfg, options, fake


@pytest.mark.parametrize("list_strategy", ["cdi-annotations", "cdi-cri"])
@pytest.mark.parametrize("profile", list_profiles())
def test_every_profile_gets_a_valid_complete_spec(
        fake_snapshot: Callable[..., Snapshot], tmp_path: Path, profile: str,
        list_strategy: str) -> None:
    snapshot = fake_snapshot(profile)
    cfg, options, fake = driver_setup(tmp_path, profile, list_strategy)
    driver = discover_for_cdi(cfg, options, snapshot.system.driver_version,
                              allow_plain_device_files=True)
    resource_map = build_resource_map(snapshot, cfg)
    problems: list[str] = []
    path = write_cdi_spec(resource_map, cfg, driver=driver, options=options, problems=problems)
    assert path is not None and problems == []
    spec = json.loads(path.read_text())
    allocated: list[str] = []
    for resource in resource_map.resources.values():
        for device in resource.devices:
            alloc = build_allocation(resource, [device.id], cfg)
            allocated += allocated_names(alloc.annotations, alloc.cdi_devices)
    assert len(allocated) == sum(len(r.devices) for r in resource_map.resources.values())
    check_spec(spec, allocated=allocated)
    names = [d["name"] for d in spec["devices"]]
    assert names == sorted(names)  # nvcdi sorts devices by name
    common = spec["containerEdits"]
    mounted = {m["containerPath"] for m in common["mounts"]}
    assert set(fake.libraries + fake.binaries + fake.firmware) <= mounted
    assert [h["args"][2] for h in common["hooks"]] == NVIDIA_HOOKS
    assert common["env"] == [f"NVIDIA_CTK_LIBCUDA_DIR={LIB}", "NVIDIA_VISIBLE_DEVICES=void"]


def test_common_edits_as_nvidia_writes_them(tmp_path: Path) -> None:
    cfg, options, fake = driver_setup(tmp_path, "dgx-a100", host_root="/host/root")
    root = str(fake.root)
    driver = discover_for_cdi(cfg, options, fake.version, allow_plain_device_files=True)
    spec = build_cdi_spec(RESOURCES, cfg, driver=driver, options=options, mig_minors=minors)
    check_spec(spec, host_exists=lambda p: os.path.lexists(p.replace("/host/root", root, 1)))
    assert spec["cdiVersion"] == "0.5.0"
    common = spec["containerEdits"]
    by_path = {m["containerPath"]: m for m in common["mounts"]}
    cuda = by_path[f"{LIB}/libcuda.so.{fake.version}"]
    assert cuda == {"hostPath": f"/host/root{LIB}/libcuda.so.{fake.version}",
                    "containerPath": f"{LIB}/libcuda.so.{fake.version}",
                    "options": ["ro", "nosuid", "nodev", "rbind", "rprivate"]}
    assert by_path["/run/nvidia-persistenced/socket"]["options"] == [
        "nosuid", "nodev", "rbind", "rprivate", "noexec"]
    assert by_path["/usr/bin/nvidia-smi"]["hostPath"] == "/host/root/usr/bin/nvidia-smi"
    paths = [m["containerPath"] for m in common["mounts"]]
    assert paths == sorted(paths, key=lambda p: (p.count("/"), p))  # nvcdi's order
    assert [n["path"] for n in common["deviceNodes"]] == [
        "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidiactl"]
    assert common["deviceNodes"][2] == {"path": "/dev/nvidiactl",
                                        "hostPath": "/host/root/dev/nvidiactl",
                                        "permissions": "rwm"}
    hooks = {h["args"][2]: h for h in common["hooks"]}
    assert all(h["path"] == "/usr/bin/nvidia-ctk" and h["hookName"] == "createContainer"
               and h["env"] == ["NVIDIA_CTK_DEBUG=false"] and h["args"][:2] == ["nvidia-ctk",
                                                                              "hook"]
               for h in common["hooks"])
    assert hooks["update-ldcache"]["args"][3:] == ["--folder", LIB, "--folder", f"{LIB}/vdpau"]
    assert hooks["enable-cuda-compat"]["args"][3:] == [f"--host-driver-version={fake.version}"]
    libs = common["hooks"][1]["args"][3:]
    assert f"libcuda.so.{fake.version}::{LIB}/libcuda.so.1" in libs
    assert f"libcuda.so.1::{LIB}/libcuda.so" in libs
    assert libs[::2] == ["--link"] * (len(libs) // 2)
    assert common["hooks"][0]["args"][3:] == [
        "--link", f"../libnvidia-allocator.so.1::{LIB}/gbm/nvidia-drm_gbm.so"]
    device = next(d for d in spec["devices"] if d["name"] == "GPU-0")
    assert device["containerEdits"]["deviceNodes"] == [
        {"path": "/dev/nvidia0", "hostPath": "/host/root/dev/nvidia0", "permissions": "rwm"}]


def test_hook_path_forms_and_host_rewrite() -> None:
    assert CdiOptions(hook_path="/usr/bin/nvidia-cdi-hook").host_hook_path() == \
        "/usr/bin/nvidia-cdi-hook"
    inside = CdiOptions(driver_root="/run/nvidia/driver", driver_root_ctr_path="/driver-root",
                        hook_path="/driver-root/usr/bin/nvidia-cdi-hook")
    assert inside.host_hook_path() == "/run/nvidia/driver/usr/bin/nvidia-cdi-hook"
    near = CdiOptions(driver_root_ctr_path="/driver-root", hook_path="/driver-rootx/hook")
    assert near.host_hook_path() == "/driver-rootx/hook"


def test_cdi_hook_binary_args(tmp_path: Path) -> None:
    cfg, options, fake = driver_setup(tmp_path, "t4", hook_path="/usr/bin/nvidia-cdi-hook")
    driver = discover_for_cdi(cfg, options, fake.version, allow_plain_device_files=True)
    spec = build_cdi_spec(RESOURCES, cfg, driver=driver, options=options, mig_minors=minors)
    assert [h["args"][:2] for h in spec["containerEdits"]["hooks"]][2:4] == [
        ["nvidia-cdi-hook", "enable-cuda-compat"], ["nvidia-cdi-hook", "update-ldcache"]]


@pytest.mark.parametrize("disabled,left", [
    (("update-ldcache",), [h for h in NVIDIA_HOOKS if h != "update-ldcache"]),
    (("create-symlinks", "enable-cuda-compat"),
     ["update-ldcache", "disable-device-node-modification", "update-application-profile"]),
    (("all",), []),
])
def test_disabled_hooks(tmp_path: Path, disabled: tuple[str, ...], left: list[str]) -> None:
    cfg, options, fake = driver_setup(tmp_path, "t4", disabled_hooks=disabled)
    driver = discover_for_cdi(cfg, options, fake.version, allow_plain_device_files=True)
    spec = build_cdi_spec(RESOURCES, cfg, driver=driver, options=options, mig_minors=minors)
    assert [h["args"][2] for h in spec["containerEdits"].get("hooks", [])] == left
    check_spec(spec)


def test_ipc_discoverer_feature_flag(tmp_path: Path) -> None:
    cfg, options, fake = driver_setup(tmp_path, "t4", feature_flags=("disable-ipc-discoverer",))
    driver = discover_for_cdi(cfg, options, fake.version, allow_plain_device_files=True)
    assert driver is not None and driver.sockets == ()
    spec = build_cdi_spec(RESOURCES, cfg, driver=driver, options=options, mig_minors=minors)
    assert not any("socket" in m["containerPath"] for m in spec["containerEdits"]["mounts"])


def char_driver(gid: int, mode: int) -> DriverInfo:
    node = DeviceNode(path="/dev/nvidiactl", host_path="/dev/nvidiactl", major=195, minor=255,
                      file_mode=mode, gid=gid)
    gpu0 = DeviceNode(path="/dev/nvidia0", host_path="/dev/nvidia0", major=195, minor=0,
                      file_mode=mode, gid=gid)
    return DriverInfo(version="1.2", libraries=(), library_dirs=(), device_nodes=(node, gpu0))


def test_char_device_nodes_and_additional_gids() -> None:
    spec = build_cdi_spec(RESOURCES, config(), driver=char_driver(44, 0o660), mig_minors=minors)
    assert spec["containerEdits"]["deviceNodes"] == [
        {"path": "/dev/nvidiactl", "hostPath": "/dev/nvidiactl", "major": 195, "minor": 255,
         "fileMode": 0o660, "permissions": "rwm", "gid": 44}]
    assert spec["containerEdits"]["additionalGids"] == [44]
    assert spec["cdiVersion"] == "0.7.0"
    # minor 0 is a zero value: not written (as observed from nvcdi for /dev/nvidia0).
    gpu0 = spec["devices"][0]["containerEdits"]["deviceNodes"][0]
    assert "minor" not in gpu0 and gpu0["major"] == 195
    check_spec(spec, host_exists=lambda _: True)
    flagged = build_cdi_spec(RESOURCES, config(), driver=char_driver(44, 0o660),
                             options=CdiOptions(
                                 feature_flags=("no-additional-gids-for-device-nodes",)),
                             mig_minors=minors)
    assert "additionalGids" not in flagged["containerEdits"]
    assert flagged["cdiVersion"] == "0.5.0"
    world = build_cdi_spec(RESOURCES, config(), driver=char_driver(44, 0o666), mig_minors=minors)
    assert "additionalGids" not in world["containerEdits"]


@pytest.mark.parametrize("spec,version", [
    ({"kind": "a/b", "devices": [{"name": "x", "containerEdits": {}}]}, "0.3.0"),
    ({"kind": "a/b", "devices": [], "containerEdits": {"mounts": [{"type": "bind"}]}}, "0.4.0"),
    ({"kind": "a/b", "devices": [{"name": "0", "containerEdits": {}}]}, "0.5.0"),
    ({"kind": "a/b", "devices": [{"name": "x", "containerEdits": {
        "deviceNodes": [{"path": "/d", "hostPath": "/d"}]}}]}, "0.5.0"),
    ({"kind": "a/b", "annotations": {"k": "v"}, "devices": []}, "0.6.0"),
    ({"kind": "a/b.c", "devices": []}, "0.6.0"),
    ({"kind": "a/b", "devices": [], "containerEdits": {"additionalGids": [5]}}, "0.7.0"),
])
def test_minimum_cdi_version(spec: dict[str, object], version: str) -> None:
    assert minimum_cdi_version(spec) == version


def test_discovery_only_in_cdi_mode(tmp_path: Path) -> None:
    empty = CdiOptions(driver_root=str(tmp_path), driver_root_ctr_path=str(tmp_path))
    envvar = config(tmp_path, ("envvar",))
    assert discover_for_cdi(envvar, empty, "535.129.03") is None
    with pytest.raises(CdiError, match=f"CDI device-list strategy cdi-cri: NVIDIA driver not "
                                       f"found: no libcuda.so.535.129.03 under {tmp_path}"):
        discover_for_cdi(config(tmp_path), empty, "535.129.03")


def test_unknown_feature_flag_is_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg, options, fake = driver_setup(tmp_path, "t4", feature_flags=("no-such-flag",))
    with caplog.at_level("WARNING", logger="deviceplugin.cdi"):
        discover_for_cdi(cfg, options, fake.version, allow_plain_device_files=True)
    assert any("no-such-flag" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("breakage,message", [
    (lambda s: s["containerEdits"]["mounts"].append(
        {"hostPath": "/nonexistent/lib.so", "containerPath": "/lib.so"}), "mount source missing"),
    (lambda s: s["containerEdits"]["hooks"][0].update(path="usr/bin/nvidia-ctk"),
     "not absolute"),
    (lambda s: s["devices"].append(dict(s["devices"][0])), "duplicate device names"),
    (lambda s: s["devices"][0].pop("containerEdits"), "AssertionError"),
    (lambda s: s.update(cdiVersion="0.3.0"), "below what the content needs"),
])
def test_checks_catch_broken_specs(tmp_path: Path, breakage: Callable[[dict[str, Any]], object],
                                   message: str) -> None:
    cfg, options, fake = driver_setup(tmp_path, "t4")
    driver = discover_for_cdi(cfg, options, fake.version, allow_plain_device_files=True)
    spec = build_cdi_spec(RESOURCES, cfg, driver=driver, options=options, mig_minors=minors)
    check_spec(spec)
    breakage(spec)
    with pytest.raises(AssertionError) as err:
        check_spec(spec)
    assert message in str(err.value) or message == "AssertionError"


def test_allocated_name_not_in_spec_is_caught() -> None:
    spec = build_cdi_spec(RESOURCES, config(), path_exists=only(set()), mig_minors=minors)
    with pytest.raises(AssertionError, match="is not a device of the spec"):
        check_spec(spec, allocated=[cdi_device_name("0")])


def test_spec_removed_on_clean_stop(tmp_path: Path) -> None:
    cfg = config(tmp_path / "cdi")
    path = write_cdi_spec(RESOURCES, cfg, path_exists=only(set()), mig_minors=minors)
    assert path is not None and path.exists()
    assert remove_cdi_spec(cfg) is True
    assert not path.exists()
    assert remove_cdi_spec(cfg) is False  # already gone: fine
