"""Driver discovery under a driver root, and the fake driver root it is tested on."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest

from gpus.driver.discover import DriverError, DriverRoots, Link, discover_driver
from gpus.driver.elf import read_soname
from gpus.driver.ldcache import build_ld_cache, read_ld_cache
from gpus.fake.driverroot import BINARIES, LIBRARIES, write_fake_driver_root
from gpus.fake.profile import load_profile

VERSION = "535.129.03"
LIB = "/usr/lib/x86_64-linux-gnu"


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    write_fake_driver_root(load_profile("a100-mig-mixed"), tmp_path / "driver")
    return tmp_path / "driver"


def roots(root: Path, host: str = "/host/driver") -> DriverRoots:
    return DriverRoots(driver_root=host, driver_root_ctr_path=str(root))


def test_fake_root_libraries_carry_their_sonames(root: Path) -> None:
    for stem, soname in LIBRARIES:
        path = root / LIB.lstrip("/") / f"{stem}.{VERSION}"
        assert read_soname(str(path)) == soname.format(v=VERSION)
    cache = {e.soname: e.path for e in read_ld_cache(str(root / "etc/ld.so.cache")).libs64}
    assert cache["libcuda.so.1"] == f"{LIB}/libcuda.so.1"
    assert os.readlink(root / LIB.lstrip("/") / "libcuda.so.1") == f"libcuda.so.{VERSION}"
    for name in BINARIES:
        assert os.access(root / "usr/bin" / name, os.X_OK)


def test_discovers_every_piece_with_host_and_container_paths(root: Path) -> None:
    info = discover_driver(roots(root), VERSION, kernel_release="6.1.0",
                           allow_plain_device_files=True)
    assert info.version == VERSION
    assert info.library_dirs == (LIB,)
    names = {os.path.basename(f.path) for f in info.libraries}
    assert names == {os.path.basename(stem) + f".{VERSION}" for stem, _ in LIBRARIES}
    cuda = next(f for f in info.libraries if f.path == f"{LIB}/libcuda.so.{VERSION}")
    assert cuda.host_path == f"/host/driver{LIB}/libcuda.so.{VERSION}"
    assert cuda.local_path == f"{root}{LIB}/libcuda.so.{VERSION}"
    assert [f.path for f in info.binaries] == sorted(f"/usr/bin/{b}" for b in BINARIES)
    assert [f.path for f in info.firmware] == [
        f"/lib/firmware/nvidia/{VERSION}/gsp_ga10x.bin",
        f"/lib/firmware/nvidia/{VERSION}/gsp_tu10x.bin"]
    assert [f.path for f in info.sockets] == ["/run/nvidia-persistenced/socket"]
    vulkan = next(f for f in info.configs if "vulkan" in f.path)
    assert vulkan.path == "/etc/vulkan/icd.d/nvidia_icd.json"  # the toolkit's choice
    assert vulkan.host_path == "/host/driver/usr/share/vulkan/icd.d/nvidia_icd.json"
    paths = [n.path for n in info.device_nodes]
    assert "/dev/nvidiactl" in paths and "/dev/nvidia0" in paths
    assert any(p.startswith("/dev/nvidia-caps/nvidia-cap") for p in paths)
    assert info.device_node("/dev/nvidiactl").host_path == "/host/driver/dev/nvidiactl"  # type: ignore[union-attr]  # None fails the test


def test_library_links_follow_host_links_and_the_toolkits_fixed_ones(root: Path) -> None:
    info = discover_driver(roots(root), VERSION, allow_plain_device_files=True)
    links = set(info.library_links)
    assert Link(f"libcuda.so.{VERSION}", f"{LIB}/libcuda.so.1") in links
    assert Link("libcuda.so.1", f"{LIB}/libcuda.so") in links
    assert Link(f"libGLX_nvidia.so.{VERSION}", f"{LIB}/libGLX_indirect.so.0") in links
    assert Link(f"libvdpau_nvidia.so.{VERSION}", f"{LIB}/vdpau/libvdpau_nvidia.so.1") in links
    # SONAME equal to the file name: no link.
    assert not any(link.link.endswith(f"libnvidia-glcore.so.{VERSION}") for link in links)
    assert Link("../libnvidia-allocator.so.1", f"{LIB}/gbm/nvidia-drm_gbm.so") in set(
        info.graphics_links)


def test_soname_link_only_when_it_exists_on_the_host(root: Path) -> None:
    (root / LIB.lstrip("/") / "libnvidia-cfg.so.1").unlink()
    info = discover_driver(roots(root), VERSION, allow_plain_device_files=True)
    assert not any(link.link.endswith("libnvidia-cfg.so.1") for link in info.library_links)


def test_version_inferred_from_libcuda(root: Path) -> None:
    assert discover_driver(roots(root), None, allow_plain_device_files=True).version == VERSION


def test_other_version_libraries_are_not_mounted(root: Path) -> None:
    (root / LIB.lstrip("/") / "libnvidia-old.so.470.1").write_bytes(b"x")
    info = discover_driver(roots(root), VERSION, allow_plain_device_files=True)
    assert not any("470" in f.path for f in info.libraries)


def test_ld_cache_used_only_when_standard_dirs_hold_nothing(tmp_path: Path, root: Path) -> None:
    # Move the libraries to a non-standard directory; only the cache knows where they are.
    odd = root / "opt/nvidia/lib"
    shutil.move(str(root / LIB.lstrip("/")), str(odd))
    (root / "etc/ld.so.cache").write_bytes(build_ld_cache([
        ("libcuda.so.1", "/opt/nvidia/lib/libcuda.so.1"),
        ("libnvidia-ml.so.1", "/opt/nvidia/lib/libnvidia-ml.so.1"),
        ("libnvidia-cfg.so.1", "/opt/nvidia/lib/libnvidia-cfg.so.1")]))
    info = discover_driver(roots(root), VERSION, allow_plain_device_files=True)
    assert info.library_dirs == ("/opt/nvidia/lib",)
    assert f"/opt/nvidia/lib/libnvidia-encode.so.{VERSION}" in {f.path for f in info.libraries}


@pytest.mark.parametrize("missing", ["libcuda.so", "libnvidia-ml.so"])
def test_missing_required_library_is_a_clear_error(root: Path, missing: str) -> None:
    lib = root / LIB.lstrip("/")
    for path in lib.glob(f"{missing}*"):
        path.unlink()
    (root / "etc/ld.so.cache").unlink()
    with pytest.raises(DriverError) as err:
        discover_driver(roots(root), VERSION, allow_plain_device_files=True)
    message = str(err.value)
    assert f"no {missing}.{VERSION} under {root}" in message
    assert "/usr/lib/x86_64-linux-gnu" in message and "--driver-root-ctr-path" in message


def test_empty_root_cannot_infer_a_version(tmp_path: Path) -> None:
    with pytest.raises(DriverError, match="no libcuda.so.\\*.\\* or libnvidia-ml.so"):
        discover_driver(roots(tmp_path))


def test_optional_pieces_missing_are_logged_once(root: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    (root / "usr/bin/nvidia-smi").unlink()
    shutil.rmtree(root / "lib/firmware")
    with caplog.at_level(logging.WARNING, logger="gpus.driver.discover"):
        info = discover_driver(roots(root), VERSION, allow_plain_device_files=True)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "binary nvidia-smi" in warnings[0] and "GSP firmware" in warnings[0]
    assert "/dev/nvidia-modeset" in warnings[0]  # the fake leaves it out on purpose
    assert info.firmware == () and "/usr/bin/nvidia-smi" not in {f.path for f in info.binaries}


def test_plain_files_are_not_device_nodes_unless_allowed(root: Path) -> None:
    assert discover_driver(roots(root), VERSION).device_nodes == ()


def test_real_character_devices_carry_numbers(tmp_path: Path, root: Path) -> None:
    if not os.path.exists("/dev/null"):
        pytest.skip("no /dev/null")
    (root / "dev/nvidiactl").unlink()
    (root / "dev/nvidiactl").symlink_to("/dev/null")  # a real char device, 1:3
    info = discover_driver(roots(root), VERSION)
    node = info.device_node("/dev/nvidiactl")
    assert node is not None and (node.major, node.minor) == (os.major(os.stat("/dev/null").st_rdev),
                                                             os.minor(os.stat("/dev/null").st_rdev))
    assert node.file_mode == 0o666


def test_dev_root_is_slash_when_the_driver_root_has_no_dev(root: Path) -> None:
    shutil.rmtree(root / "dev")
    assert roots(root).local_dev_root() == "/"


def test_ipc_off(root: Path) -> None:
    assert discover_driver(roots(root), VERSION, ipc=False).sockets == ()


def test_symlink_loop_is_not_followed_forever(root: Path) -> None:
    lib = root / LIB.lstrip("/")
    (lib / f"libloop.so.{VERSION}").symlink_to(f"libloop.so.{VERSION}")
    info = discover_driver(roots(root), VERSION, allow_plain_device_files=True)
    assert not any("libloop" in f.path for f in info.libraries)


def test_driver_root_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from gpus.fake.driverroot import main

    assert main(["t4", str(tmp_path / "root")]) == 0
    assert f"fake NVIDIA driver {VERSION} in {tmp_path / 'root'}" in capsys.readouterr().out
    assert (tmp_path / "root" / LIB.lstrip("/") / f"libcuda.so.{VERSION}").is_file()
    assert main(["no-such-profile", str(tmp_path / "other")]) == 1
    assert capsys.readouterr().err.startswith("driver-root: ")


def test_root_path_with_glob_characters(tmp_path: Path) -> None:
    # A root's own path is not a pattern: "[1]" must match itself.
    root = tmp_path / "driver[1]"
    write_fake_driver_root(load_profile("t4"), root)
    info = discover_driver(roots(root), VERSION, allow_plain_device_files=True)
    assert f"{LIB}/libcuda.so.{VERSION}" in {f.path for f in info.libraries}
    assert info.device_node("/dev/nvidia0") is not None
