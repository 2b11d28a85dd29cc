"""``make run``: the device plugin on a simulated DGX A100, talking to the mock kubelet.

Everything runs in one process in a temporary directory: the mock kubelet serves
``kubelet.sock``, the device plugin runs on the fake NVML (``fake:dgx-a100``, sysfs written by
the fake), registers, and the mock kubelet prints what it sees, allocates two GPUs
(GetPreferredAllocation, then Allocate) and the GFD labels of the node are printed. Then it
serves until Ctrl-C (or ``--exit-after`` seconds); inject faults meanwhile with
``fake-nvml inject --control <printed socket> xid 0 79`` and watch ListAndWatch change.

``--mig-strategy`` and a MIG profile (``--profile a100-mig-1g``) show MIG resources;
``--pass-device-specs`` makes the fake write a driver root (``mig-minors``) and device nodes in
the temporary directory, so Allocate lists device nodes as on a real node.
``--device-list-strategy cdi-cri`` (or ``cdi-annotations``) writes a fake driver root for the
profile's driver version there too (libraries, binaries, firmware: gpus/fake/driverroot.py), so
the CDI spec the plugin writes is complete, and prints what it holds.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from deviceplugin.allocate import CDI_STRATEGIES
from deviceplugin.cdi import SPEC_FILE_NAME, cdi_enabled
from deviceplugin.main import DevicePlugin, InitError, replace_flags, replace_plugin_flags
from deviceplugin.mockkubelet import MockKubelet, format_allocation, format_devices
from gpus.config import Config, ConfigError, parse_device_list_strategy
from gpus.fake.driverroot import write_fake_driver_root
from gpus.model import Snapshot
from gpus.resources import GPU_RESOURCE
from gpus.runtime.version import add_version_flag

if TYPE_CHECKING:
    from gpus.fake import Profile

REGISTER_TIMEOUT_S = 30.0


def build_parser() -> argparse.ArgumentParser:
    """The demo's command line."""
    parser = argparse.ArgumentParser(prog="nvk8s-demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="dgx-a100", help="fake machine profile")
    parser.add_argument("--allocate", type=int, default=2, metavar="N",
                        help="devices to allocate (of nvidia.com/gpu, else the first resource)")
    parser.add_argument("--mig-strategy", default="none", choices=("none", "single", "mixed"),
                        help="MIG strategy (default none)")
    parser.add_argument("--pass-device-specs", action="store_true",
                        help="pass device nodes in Allocate (the fake writes a driver root)")
    parser.add_argument("--device-list-strategy", default="envvar", metavar="LIST",
                        help="comma list of envvar, volume-mounts, cdi-annotations, cdi-cri "
                        "(default envvar); a CDI one writes a fake driver root and the spec")
    parser.add_argument("--exit-after", type=float, metavar="S", help="exit after S seconds")
    parser.add_argument("--verbose", action="store_true", help="show the daemons' logs")
    add_version_flag(parser)
    return parser


def demo_config(
    workdir: str, profile: str, mig_strategy: str = "none", pass_device_specs: bool = False,
    device_list_strategy: str = "envvar",
) -> Config:
    """Defaults, pointed at the temporary directory and the fake backend.

    With ``pass_device_specs`` or a CDI strategy the driver (and dev) root is
    ``<workdir>/driver``, which :func:`run` fills with the fake's files; the plugin reads it
    there too (``--driver-root-ctr-path``: no container here).
    """
    strategies = parse_device_list_strategy([device_list_strategy], "--device-list-strategy")
    control = os.path.join(workdir, "fake-nvml.sock")
    config = replace_flags(
        Config(),
        nvml=f"fake:{profile}?control={control}",
        sysfs_root=os.path.join(workdir, "root"),
        mig_strategy=mig_strategy,
    )
    driver = os.path.join(workdir, "driver")
    if pass_device_specs or CDI_STRATEGIES.intersection(strategies):
        config = replace_flags(config, nvidia_driver_root=driver)
    return replace_plugin_flags(
        config,
        device_list_strategy=strategies,
        container_driver_root=driver,
        kubelet_socket=os.path.join(workdir, "kubelet.sock"),
        cdi_spec_dir=os.path.join(workdir, "cdi"),
        pass_device_specs=pass_device_specs,
        health_recovery_interval=1.0,
        health_quiet_period=5.0,
    )


def describe_cdi_spec(config: Config) -> str:
    """One line about the CDI spec the plugin wrote, and how to look at it."""
    path = os.path.join(config.flags.plugin.cdi_spec_dir, SPEC_FILE_NAME)
    try:
        with open(path, encoding="utf-8") as handle:
            spec = json.load(handle)
    except (OSError, ValueError) as err:
        return f"[demo] no CDI spec at {path}: {err}"
    common = spec.get("containerEdits", {})
    return (f"[demo] CDI spec {path}: cdiVersion {spec['cdiVersion']}, "
            f"{len(spec['devices'])} devices, {len(common.get('mounts', []))} mounts, "
            f"{len(common.get('hooks', []))} hooks (python -m json.tool {path})")


def machine_type(profile: Profile | None) -> str:
    """The simulated node's machine type (GFD's ``gpu.machine``): the profile's, marked so."""
    if profile is None:
        return "unknown"
    return f"{profile.machine or profile.name}-simulated"


def print_labels(
    snapshot: Snapshot, config: Config, out: _Printer, machine: str = "unknown"
) -> None:
    """GFD's labels for the simulated node of machine type ``machine``."""
    try:
        from gfd.labels import node_labels
    except ImportError as err:  # GFD is optional for the plugin demo
        out(f"[GFD] labels unavailable: {err}")
        return
    labels = node_labels(snapshot, config, machine=machine)
    out(f"[GFD] {len(labels)} node labels:")
    for key, value in sorted(labels.items()):
        out(f"    {key}={value}")


class _Printer:
    """Serialises prints from the main thread and ListAndWatch callbacks."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.live = False

    def __call__(self, text: str) -> None:
        with self._lock:
            print(text, flush=True)

    def update(self, resource: str, devices: Sequence[object]) -> None:
        if self.live:
            self(format_devices(resource, devices))  # type: ignore[arg-type]


def run(args: argparse.Namespace, workdir: str, out: _Printer) -> int:
    """The demo proper, in ``workdir``."""
    kubelet = MockKubelet(workdir, on_update=out.update)
    kubelet.start()
    try:
        config = demo_config(workdir, args.profile, args.mig_strategy, args.pass_device_specs,
                             args.device_list_strategy)
    except ConfigError as err:
        out(f"[demo] {err}")
        return 2
    plugin = DevicePlugin(config, os.environ)
    try:
        controller = plugin.select_backend()
        if controller is not None:
            controller.write_sysfs(Path(config.flags.sysfs_root))
            if config.flags.plugin.pass_device_specs:
                controller.write_driver_root(config.flags.nvidia_driver_root, config.flags.dev_root)
            if cdi_enabled(config):
                write_fake_driver_root(controller.profile, config.flags.nvidia_driver_root)
        plugin.start()
        out(f"[demo] fake NVML profile {args.profile}; kubelet socket {kubelet.socket_path}")
        for problem in plugin.resource_map.problems:
            out(f"[demo] problem: {problem}")
        served = sorted(n for n, r in plugin.resource_map.resources.items() if r.devices)
        for name in served:
            if not kubelet.wait_for_registration(name, REGISTER_TIMEOUT_S):
                out(f"[demo] {name} did not register")
                return 1
        for resource in kubelet.resources():
            out(format_devices(resource, kubelet.devices(resource)))
        if served:
            target = GPU_RESOURCE if GPU_RESOURCE in served else served[0]
            count = min(args.allocate, len(plugin.resource_map.resources[target].devices))
            out(format_allocation(kubelet.allocate(target, count)))
            if cdi_enabled(config):
                out(describe_cdi_spec(config))
        else:
            out("[demo] nothing to allocate: no resource has devices")
        assert plugin.snapshot is not None
        profile = controller.profile if controller is not None else None
        print_labels(plugin.snapshot, config, out, machine_type(profile))
        control = config.flags.nvml.partition("control=")[2]
        out(f"[demo] serving; try: fake-nvml inject --control {control} xid 0 79")
        out.live = True
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait(args.exit_after)
        out("[demo] stopping")
        return 0
    except InitError as err:
        out(f"[demo] the device plugin could not start: {err}")
        return 1
    finally:
        out.live = False
        plugin.close()
        kubelet.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    workdir = tempfile.mkdtemp(prefix="nvk-demo", dir="/tmp")
    try:
        return run(args, workdir, _Printer())
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
