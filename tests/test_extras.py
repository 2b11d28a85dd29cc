"""GDS, MOFED, gdrcopy and IMEX channels in Allocate, per device-list strategy (issue 12), and
the extra CDI specs that resolve their names."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TypedDict, Unpack

import builders
import pytest
from cdi_checks import allocated_names, check_spec

from deviceplugin.allocate import DeviceSpec, build_allocation
from deviceplugin.cdi import remove_cdi_spec, write_cdi_spec
from deviceplugin.extras import check_imex, compute_extras, extra_cdi_specs
from gpus.config import Config, DeviceListStrategy, Flags, Imex, PluginFlags
from gpus.errors import InitError
from gpus.resources import Device, Resource, ResourceMap

G0 = builders.gpu(0, name="NVIDIA H100", memory_bytes=80 * builders.GIB,
                  compute_capability=(9, 0), architecture="hopper", bus=1)
RESOURCE = Resource("nvidia.com/gpu", (Device(id="GPU-0", uuid="GPU-0", gpu=G0),))
FEATURE_NODES = ("dev/nvidia-fs0", "dev/nvidia-fs1", "dev/nvidia-fs10", "dev/nvidia-fs2",
                 "dev/infiniband/uverbs0", "dev/infiniband/rdma_cm", "dev/gdrdrv")


class Switches(TypedDict, total=False):
    """The Flags switches these tests turn on (typed, so ``**ALL_ON`` reaches only them)."""

    gds_enabled: bool
    mofed_enabled: bool
    gdrcopy_enabled: bool


ALL_ON: Switches = {"gds_enabled": True, "mofed_enabled": True, "gdrcopy_enabled": True}


def dev_root(tmp_path: Path, nodes: tuple[str, ...] = FEATURE_NODES,
             channels: tuple[int, ...] = (0, 1)) -> Path:
    root = tmp_path / "host"
    for node in nodes + tuple(f"dev/nvidia-caps-imex-channels/channel{c}" for c in channels):
        (root / node).parent.mkdir(parents=True, exist_ok=True)
        (root / node).touch()
    return root


def config(root: Path, strategies: tuple[str, ...] = ("envvar",), channels: tuple[str, ...] = (),
           required: bool = False, specs: bool = False, prefix: str = "cdi.k8s.io/",
           **flags: Unpack[Switches]) -> Config:
    return Config(
        flags=Flags(nvidia_driver_root=str(root), plugin=PluginFlags(
            device_list_strategy=tuple(map(DeviceListStrategy, strategies)),
            pass_device_specs=specs,
            cdi_annotation_prefix=prefix, cdi_spec_dir=str(root / "cdi")), **flags),
        imex=Imex(channel_ids=channels, required=required))


def allocate(cfg: Config):  # type: ignore[no-untyped-def]
    return build_allocation(RESOURCE, ["GPU-0"], cfg, uuid_factory=lambda: "u1",
                            path_exists=lambda _: False)


def test_nothing_enabled_looks_nothing_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_: object) -> None:
        raise AssertionError("no file-system look-up expected")

    monkeypatch.setattr(os, "listdir", refuse)
    alloc = allocate(config(tmp_path))
    assert alloc.envs == {"NVIDIA_VISIBLE_DEVICES": "GPU-0"} and alloc.devices == ()


def test_envvar_gets_nvidia_env_vars_and_imex_channels(tmp_path: Path) -> None:
    alloc = allocate(config(dev_root(tmp_path), channels=("0",), **ALL_ON))
    assert alloc.envs == {"NVIDIA_VISIBLE_DEVICES": "GPU-0", "NVIDIA_GDS": "enabled",
                          "NVIDIA_MOFED": "enabled", "NVIDIA_GDRCOPY": "enabled",
                          "NVIDIA_IMEX_CHANNELS": "0"}
    assert alloc.devices == () and alloc.cdi_devices == ()


def test_volume_mounts_gets_the_env_vars_but_no_imex_variable(tmp_path: Path) -> None:
    # NVIDIA sets NVIDIA_IMEX_CHANNELS with the envvar strategy only.
    alloc = allocate(config(dev_root(tmp_path), ("volume-mounts",), channels=("0",),
                            gds_enabled=True))
    assert alloc.envs == {"NVIDIA_VISIBLE_DEVICES": "/var/run/nvidia-container-devices",
                          "NVIDIA_GDS": "enabled"}


@pytest.mark.parametrize("strategy", ["cdi-cri", "cdi-annotations"])
def test_cdi_only_names_the_extra_classes_and_sets_no_env(tmp_path: Path, strategy: str) -> None:
    cfg = config(dev_root(tmp_path), (strategy,), channels=("all",),
                 prefix="nvidia.cdi.k8s.io/", **ALL_ON)
    alloc = allocate(cfg)
    assert alloc.envs == {}
    names = allocated_names(alloc.annotations, alloc.cdi_devices, prefix="nvidia.cdi.k8s.io/")
    assert names == ["k8s.device-plugin.nvidia.com/gpu=GPU-0",
                     "k8s.device-plugin.nvidia.com/imex-channel=0",
                     "k8s.device-plugin.nvidia.com/imex-channel=1",
                     "k8s.device-plugin.nvidia.com/gds=all",
                     "k8s.device-plugin.nvidia.com/mofed=all",
                     "k8s.device-plugin.nvidia.com/gdrcopy=all"]
    if strategy == "cdi-annotations":
        assert list(alloc.annotations) == ["nvidia.cdi.k8s.io/nvidia-device-plugin_u1"]


def test_a_feature_without_nodes_gets_no_cdi_name(tmp_path: Path) -> None:
    root = dev_root(tmp_path, nodes=("dev/gdrdrv",), channels=())
    alloc = allocate(config(root, ("cdi-cri",), **ALL_ON))
    assert alloc.cdi_devices == ("k8s.device-plugin.nvidia.com/gpu=GPU-0",
                                 "k8s.device-plugin.nvidia.com/gdrcopy=all")


def test_pass_device_specs_adds_every_node(tmp_path: Path) -> None:
    root = dev_root(tmp_path)
    alloc = allocate(config(root, channels=("1",), specs=True, **ALL_ON))
    paths = ["/dev/nvidia-caps-imex-channels/channel1", "/dev/nvidia-fs0", "/dev/nvidia-fs1",
             "/dev/nvidia-fs2", "/dev/nvidia-fs10", "/dev/infiniband/rdma_cm",
             "/dev/infiniband/uverbs0", "/dev/gdrdrv"]
    assert alloc.devices == (DeviceSpec("/dev/nvidia0", f"{root}/dev/nvidia0"),) + tuple(
        DeviceSpec(path, f"{root}{path}") for path in paths)


def test_imex_all_takes_every_channel_in_numeric_order(tmp_path: Path) -> None:
    cfg = config(dev_root(tmp_path, nodes=(), channels=(10, 2, 0)), channels=("all",))
    assert compute_extras(cfg).imex_env == "0,2,10"


def test_required_channel_missing_is_a_start_up_error(tmp_path: Path) -> None:
    root = dev_root(tmp_path, nodes=(), channels=(0,))
    check_imex(config(root, channels=("0",), required=True))  # present: fine
    with pytest.raises(InitError) as err:
        check_imex(config(root, channels=("0", "3"), required=True))
    assert str(err.value) == ("IMEX channel required (--imex-required) but not found: "
                              f"{root}/dev/nvidia-caps-imex-channels/channel3")
    with pytest.raises(InitError, match="not found: any channel in "):
        check_imex(config(dev_root(tmp_path / "x", channels=()), channels=("all",),
                          required=True))


def test_missing_channel_not_required_is_skipped_with_a_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = config(dev_root(tmp_path, nodes=(), channels=(0,)), channels=("0", "5"))
    with caplog.at_level("WARNING", logger="deviceplugin.extras"):
        check_imex(cfg)
        assert compute_extras(cfg).imex_env == "0"
    assert any("channel5" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("strategy", ["cdi-cri", "cdi-annotations"])
def test_extra_specs_are_valid_and_resolve_every_name(tmp_path: Path, strategy: str) -> None:
    root = dev_root(tmp_path)
    cfg = config(root, (strategy,), channels=("all",), **ALL_ON)
    path = write_cdi_spec(ResourceMap(resources={RESOURCE.name: RESOURCE}), cfg,
                          path_exists=lambda _: False)
    assert path is not None
    specs = {p.name: json.loads(p.read_text()) for p in path.parent.iterdir()}
    assert sorted(specs) == [f"k8s.device-plugin.nvidia.com-{c}.json" for c in
                             ("gdrcopy", "gds", "gpu", "imex-channel", "mofed")]
    alloc = allocate(cfg)
    names = allocated_names(alloc.annotations, alloc.cdi_devices)
    for spec in specs.values():
        kind = spec["kind"]
        check_spec(spec, allocated=[n for n in names if n.startswith(kind + "=")])
    assert {n.partition("=")[0] for n in names} == {s["kind"] for s in specs.values()}
    gds = specs["k8s.device-plugin.nvidia.com-gds.json"]["devices"][0]["containerEdits"]
    assert [n["path"] for n in gds["deviceNodes"]] == [
        "/dev/nvidia-fs0", "/dev/nvidia-fs1", "/dev/nvidia-fs2", "/dev/nvidia-fs10"]
    assert remove_cdi_spec(cfg) and list(path.parent.iterdir()) == []


def test_extra_spec_of_a_class_that_lost_its_nodes_is_removed(tmp_path: Path) -> None:
    root = dev_root(tmp_path)
    cfg = config(root, ("cdi-cri",), gds_enabled=True)
    resources = ResourceMap(resources={RESOURCE.name: RESOURCE})
    write_cdi_spec(resources, cfg, path_exists=lambda _: False)
    gds = root / "cdi" / "k8s.device-plugin.nvidia.com-gds.json"
    assert gds.exists()
    for node in ("nvidia-fs0", "nvidia-fs1", "nvidia-fs2", "nvidia-fs10"):
        (root / "dev" / node).unlink()
    write_cdi_spec(resources, cfg, path_exists=lambda _: False)
    assert not gds.exists() and extra_cdi_specs(cfg) == {}


def test_imex_required_and_missing_stops_the_plugin_with_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from deviceplugin.main import main

    root = dev_root(tmp_path, nodes=(), channels=())
    code = main(["--nvml", "fake:dgx-a100", "--kubelet-socket", "", "--socket-dir",
                 str(tmp_path), "--ready-file", "", "--dev-root", str(root),
                 "--imex-channel-ids", "0", "--imex-required"])
    lines = [line for line in capsys.readouterr().err.splitlines()
             if line.startswith("nvidia-device-plugin:")]
    assert code == 1
    assert lines == ["nvidia-device-plugin: initialisation failed: IMEX channel required "
                     f"(--imex-required) but not found: {root}/dev/nvidia-caps-imex-channels/"
                     "channel0"]
