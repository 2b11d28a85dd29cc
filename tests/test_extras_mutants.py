"""Behaviour of deviceplugin/extras.py that test_extras.py leaves open, found by mutation testing
(issue 10): each feature switch on its own, the operator's IMEX messages word for word, the
empty driver root, node order, and the exact device nodes of the extra CDI specs (host paths
under the dev root, numbers and mode of real character devices)."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest
from test_extras import FEATURE_NODES, Switches, allocate, config, dev_root

from deviceplugin.extras import check_imex, compute_extras, extra_cdi_specs
from gpus.config import Config, Flags, Imex
from gpus.errors import InitError

IMEX = "dev/nvidia-caps-imex-channels"
LOGGER = "deviceplugin.extras"


def _null_is_1_3() -> bool:
    try:
        info = os.stat("/dev/null")
    except OSError:
        return False
    return stat.S_ISCHR(info.st_mode) and (os.major(info.st_rdev), os.minor(info.st_rdev)) == (1, 3)


# A real character device to point simulated nodes at (mknod needs privileges; a symlink does not,
# and os.stat follows it): Linux's /dev/null, 1:3, mode 0666.
needs_dev_null = pytest.mark.skipif(not _null_is_1_3(), reason="no /dev/null character device 1:3")


# --- wants_extras: every switch alone turns the extras on --------------------------------------


ALONE: list[tuple[Switches, str]] = [({"gds_enabled": True}, "NVIDIA_GDS"),
                                    ({"mofed_enabled": True}, "NVIDIA_MOFED"),
                                    ({"gdrcopy_enabled": True}, "NVIDIA_GDRCOPY")]


@pytest.mark.parametrize(("switch", "env"), ALONE)
def test_each_feature_switch_alone_reaches_the_allocation(tmp_path: Path, switch: Switches,
                                                          env: str) -> None:
    # Guards the fast path's "any switch on" test: one switch must be enough, not a combination.
    alloc = allocate(config(dev_root(tmp_path), **switch))
    assert alloc.envs == {"NVIDIA_VISIBLE_DEVICES": "GPU-0", env: "enabled"}


# --- imex_channels: what the operator reads ------------------------------------------------------


def test_required_channels_missing_are_all_named_comma_separated(tmp_path: Path) -> None:
    root = dev_root(tmp_path, nodes=(), channels=(0,))
    with pytest.raises(InitError) as err:
        check_imex(config(root, channels=("0", "3", "5"), required=True))
    assert str(err.value) == ("IMEX channel required (--imex-required) but not found: "
                              f"{root}/{IMEX}/channel3, {root}/{IMEX}/channel5")


def test_required_all_with_no_channel_names_the_directory_under_the_dev_root(
        tmp_path: Path) -> None:
    root = dev_root(tmp_path, nodes=(), channels=())
    with pytest.raises(InitError) as err:
        check_imex(config(root, channels=("all",), required=True))
    assert str(err.value) == ("IMEX channel required (--imex-required) but not found: "
                              f"any channel in {root}/{IMEX}")


def test_missing_channels_not_required_get_one_warning_naming_each(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = dev_root(tmp_path, nodes=(), channels=(0,))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert compute_extras(config(root, channels=("0", "3", "5"))).imex_env == "0"
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", "IMEX channels not found, not added to allocations: "
                    f"{root}/{IMEX}/channel3, {root}/{IMEX}/channel5")]


def test_an_empty_driver_root_means_the_host_root(tmp_path: Path) -> None:
    # nvidiaDriverRoot "" (and no dev root): nodes are looked up under "/" itself.
    absent = "/dev/nvidia-caps-imex-channels/channel4093"
    if os.path.lexists(absent):
        pytest.skip(f"{absent} exists on this host")
    cfg = Config(flags=Flags(nvidia_driver_root=""),
                 imex=Imex(channel_ids=("4093",), required=True))
    with pytest.raises(InitError) as err:
        check_imex(cfg)
    assert str(err.value) == f"IMEX channel required (--imex-required) but not found: {absent}"


# --- compute_extras / extra_cdi_specs: a required channel that vanished after start-up ----------


def test_only_a_vanished_required_channel_is_left_out_of_allocations(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # check_imex passed at start; later Allocates log the error and go on with what is there.
    root = dev_root(tmp_path, nodes=("dev/gdrdrv",), channels=(0,))
    cfg = config(root, channels=("0", "3"), required=True, specs=True, gdrcopy_enabled=True)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        extras = compute_extras(cfg)
    assert (extras.imex_env, extras.device_paths) == ("0", (f"/{IMEX}/channel0", "/dev/gdrdrv"))
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("ERROR", "IMEX channel required (--imex-required) but not found: "
                  f"{root}/{IMEX}/channel3")]


def test_only_a_vanished_required_channel_is_left_out_of_the_specs(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = dev_root(tmp_path, nodes=("dev/gdrdrv",), channels=(1,))
    cfg = config(root, ("cdi-cri",), channels=("1", "2"), required=True, gdrcopy_enabled=True)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        specs = extra_cdi_specs(cfg)
    assert sorted(specs) == ["gdrcopy", "imex-channel"]
    assert [d["name"] for d in specs["imex-channel"]["devices"]] == ["1"]
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("ERROR", "IMEX channel required (--imex-required) but not found: "
                  f"{root}/{IMEX}/channel2")]


def test_every_required_channel_vanished_still_allocates_the_rest(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = dev_root(tmp_path, nodes=("dev/gdrdrv",), channels=())
    cfg = config(root, ("cdi-cri",), channels=("0",), required=True, specs=True,
                 gdrcopy_enabled=True)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        extras = compute_extras(cfg)
        specs = extra_cdi_specs(cfg)
    assert extras.device_paths == ("/dev/gdrdrv",)
    assert extras.cdi_names == ("k8s.device-plugin.nvidia.com/gdrcopy=all",)
    assert sorted(specs) == ["gdrcopy"]
    message = f"IMEX channel required (--imex-required) but not found: {root}/{IMEX}/channel0"
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [("ERROR", message)] * 2


# --- node order -----------------------------------------------------------------------------------


def test_an_unnumbered_node_comes_before_its_numbered_siblings(tmp_path: Path) -> None:
    # Natural order keeps the plain order for a bare stem: nvidia-fs, nvidia-fs0, nvidia-fs1.
    root = dev_root(tmp_path, nodes=("dev/nvidia-fs1", "dev/nvidia-fs0", "dev/nvidia-fs"),
                    channels=())
    extras = compute_extras(config(root, specs=True, gds_enabled=True))
    assert extras.device_paths == ("/dev/nvidia-fs", "/dev/nvidia-fs0", "/dev/nvidia-fs1")


# --- extra_cdi_specs: the device nodes themselves -------------------------------------------------


@needs_dev_null
def test_extra_specs_carry_each_nodes_host_path_numbers_and_mode(tmp_path: Path) -> None:
    # Character devices get type, major, minor and fileMode as nvcdi writes them; a plain
    # stand-in file only its paths; both "rwm" and a hostPath under the dev root.
    root = dev_root(tmp_path, nodes=("dev/gdrdrv",), channels=())
    for node in (f"{IMEX}/channel2", "dev/nvidia-fs0"):
        (root / node).parent.mkdir(parents=True, exist_ok=True)
        (root / node).symlink_to("/dev/null")
    cfg = config(root, ("cdi-cri",), channels=("2",), gds_enabled=True, gdrcopy_enabled=True)

    def char(path: str) -> dict[str, object]:
        return {"path": path, "hostPath": f"{root}{path}", "type": "c", "major": 1, "minor": 3,
                "fileMode": 0o666, "permissions": "rwm"}

    assert extra_cdi_specs(cfg) == {
        "imex-channel": {"kind": "k8s.device-plugin.nvidia.com/imex-channel", "devices": [
            {"name": "2", "containerEdits": {"deviceNodes": [char(f"/{IMEX}/channel2")]}}]},
        "gds": {"kind": "k8s.device-plugin.nvidia.com/gds", "devices": [
            {"name": "all", "containerEdits": {"deviceNodes": [char("/dev/nvidia-fs0")]}}]},
        "gdrcopy": {"kind": "k8s.device-plugin.nvidia.com/gdrcopy", "devices": [
            {"name": "all", "containerEdits": {"deviceNodes": [
                {"path": "/dev/gdrdrv", "hostPath": f"{root}/dev/gdrdrv",
                 "permissions": "rwm"}]}}]}}


def test_mofed_spec_lists_every_infiniband_node_under_the_dev_root(tmp_path: Path) -> None:
    root = dev_root(tmp_path, nodes=FEATURE_NODES, channels=())
    specs = extra_cdi_specs(config(root, ("cdi-cri",), mofed_enabled=True))
    assert specs["mofed"]["devices"][0]["containerEdits"]["deviceNodes"] == [
        {"path": f"/dev/infiniband/{name}", "hostPath": f"{root}/dev/infiniband/{name}",
         "permissions": "rwm"} for name in ("rdma_cm", "uverbs0")]
