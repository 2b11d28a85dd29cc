"""``make run``: the device plugin, GFD and the metrics exporter on a simulated DGX A100,
talking to the mock kubelet.

Everything runs in one process in a temporary directory: the mock kubelet serves
``kubelet.sock`` (and the PodResources API on ``pod-resources/kubelet.sock``), the device
plugin runs on the fake NVML (``fake:dgx-a100``, sysfs written by the fake), registers, and the
mock kubelet prints what it sees, allocates two GPUs (GetPreferredAllocation, then Allocate) on
behalf of the pod ``default/demo-pod`` (container ``main``) and the GFD labels of the node are
printed. Then ``gpu-metrics-exporter`` (dcgm-exporter's metric names) starts on the same fake
NVML, learns from PodResources which pod holds which GPU, and serves Prometheus metrics on
``--metrics-address`` (default ``127.0.0.1:0``: a free port; ``""`` leaves the exporter out);
the demo prints the ``curl`` line for it and a sample of what it serves (the allocated GPUs'
``DCGM_FI_DEV_GPU_UTIL``, with the pod's ``pod``/``namespace``/``container`` labels). Then it
serves until Ctrl-C (or ``--exit-after`` seconds); inject faults meanwhile with
``fake-nvml inject --control <printed socket> xid 0 79`` and watch ListAndWatch change (and
``DCGM_FI_DEV_XID_ERRORS`` in the exporter's metrics).

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
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from deviceplugin.allocate import CDI_STRATEGIES, cdi_enabled
from deviceplugin.cdi import SPEC_FILE_NAME
from deviceplugin.main import DevicePlugin, InitError, replace_flags, replace_plugin_flags
from deviceplugin.mockkubelet import MockKubelet, format_allocation, format_devices
from exporter.main import parse_address
from exporter.service import Exporter, ExporterOptions, build_exporter
from gpus.config import Config, ConfigError, parse_device_list_strategy
from gpus.errors import NvkError
from gpus.fake.driverroot import write_fake_driver_root
from gpus.model import Snapshot
from gpus.resources import GPU_RESOURCE
from gpus.runtime.version import add_version_flag

if TYPE_CHECKING:
    from gpus.fake import Profile

REGISTER_TIMEOUT_S = 30.0
# The pod the demo's allocation is made for: PodResources reports it, the exporter labels with it.
DEMO_NAMESPACE, DEMO_POD, DEMO_CONTAINER = "default", "demo-pod", "main"
# The kubelet's own layout: PodResources in its own directory beside the registration socket.
POD_RESOURCES_SOCKET = os.path.join("pod-resources", "kubelet.sock")
EXPORTER_WAIT_S = 10.0  # the exporter's first PodResources answer, and the demo's own scrape
SAMPLE_LINES = 4  # series printed from the exporter's /metrics


def metrics_address(text: str) -> tuple[str, int] | None:
    """``--metrics-address``: ``[host]:port`` as (host, port), None for "" (no exporter)."""
    if not text.strip():
        return None
    try:
        return parse_address(text, "--metrics-address")
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


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
    parser.add_argument("--metrics-address", type=metrics_address, default="127.0.0.1:0",
                        metavar="[HOST]:PORT",
                        help="serve the GPU metrics exporter there (default 127.0.0.1:0, a free "
                        "port; \"\" leaves the exporter out)")
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


def metrics_url(address: tuple[str, int]) -> str:
    """Where to scrape an exporter listening on ``address`` (the wildcard hosts: loopback)."""
    host, port = address
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/metrics"


def metrics_sample(text: str, limit: int = SAMPLE_LINES) -> list[str]:
    """A few series of a /metrics page worth showing a newcomer: the utilisation of the GPUs a
    pod holds (``pod`` label), else any series a pod holds (MIG-enabled GPUs report no
    DCGM_FI_DEV_GPU_UTIL), else the utilisation of the first GPUs, else the first series."""
    series = [line for line in text.splitlines() if line.startswith("DCGM_")]
    held = [line for line in series if 'pod="' in line and 'pod=""' not in line]
    util = [line for line in series if line.startswith("DCGM_FI_DEV_GPU_UTIL{")]
    for candidates in ([line for line in held if line in util], held, util, series):
        if candidates:
            return candidates[:limit]
    return []


def start_exporter(
    address: tuple[str, int], config: Config, workdir: str, pod_resources_socket: str
) -> Exporter:
    """The metrics exporter, started on the NVML backend the plugin installed (the fake lives
    in this process, and NVML counts each init, so the two share it).

    Raises OSError when ``address`` cannot be listened on, NvkError when NVML fails.
    """
    exporter = build_exporter(ExporterOptions(
        address=address,
        kubernetes=True,
        pod_resources_socket=pod_resources_socket,
        sysfs_root=config.flags.sysfs_root,
        # The simulated GPUs' processes are not this host's: read no /proc or container logs
        # of the machine the demo runs on (these directories do not exist).
        proc_root=os.path.join(workdir, "proc"),
        container_logs=os.path.join(workdir, "containers"),
    ))
    exporter.start()
    return exporter


def serve_metrics(
    address: tuple[str, int], config: Config, workdir: str, pod_resources_socket: str,
    out: _Printer,
) -> Exporter | None:
    """Start the exporter and show what it serves; None (said in one line) if it cannot start."""
    try:
        exporter = start_exporter(address, config, workdir, pod_resources_socket)
    except OSError as err:
        out(f"[demo] the metrics exporter cannot listen on {address[0]}:{address[1]}: "
            f"{err.strerror or err}")
        return None
    except NvkError as err:
        out(f"[demo] the metrics exporter could not start: {err}")
        return None
    try:
        describe_metrics(exporter, out)
    except BaseException:
        exporter.stop()  # run() closes only what it was handed back
        raise
    return exporter


def describe_metrics(exporter: Exporter, out: _Printer) -> None:
    """The exporter's address as a curl line, and a sample of what a scrape of it returns."""
    assert exporter.server is not None and exporter.refresher is not None
    url = metrics_url((exporter.options.address[0], exporter.server.port))
    # The refresher asks PodResources on its own thread as it starts: the sample shows the pod
    # labels once that first answer is in.
    if exporter.refresher.wait_for(lambda c: c.fetched_at is not None, EXPORTER_WAIT_S) is None:
        out(f"[exporter] no PodResources answer yet: {exporter.refresher.current().health}")
    gpus = len(exporter.sampler.snapshot.gpus) if exporter.sampler is not None else 0
    out(f"[exporter] gpu-metrics-exporter: {gpus} GPUs, pod labels from PodResources; "
        f"curl {url}")
    try:
        with urllib.request.urlopen(url, timeout=EXPORTER_WAIT_S) as response:
            text = response.read().decode("utf-8")
    except OSError as err:  # e.g. a host name that does not resolve back to the listener
        out(f"[exporter] cannot scrape {url} here: {err}")
        return
    for line in metrics_sample(text):
        out(f"    {line}")


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


def allocate_for_the_demo_pod(
    kubelet: MockKubelet, plugin: DevicePlugin, served: Sequence[str], count: int, out: _Printer
) -> None:
    """Allocate ``count`` devices of nvidia.com/gpu (else of the first resource served) like
    the kubelet, for the demo's pod, so PodResources reports them as that pod's."""
    if not served:
        out("[demo] nothing to allocate: no resource has devices")
        return
    target = GPU_RESOURCE if GPU_RESOURCE in served else served[0]
    count = min(count, len(plugin.resource_map.resources[target].devices))
    out(format_allocation(kubelet.allocate(
        target, count, pod=DEMO_POD, namespace=DEMO_NAMESPACE, container=DEMO_CONTAINER)))
    out(f"[demo] allocated to pod {DEMO_NAMESPACE}/{DEMO_POD}, container {DEMO_CONTAINER} "
        "(the mock kubelet's PodResources API reports it)")
    if cdi_enabled(plugin.config):
        out(describe_cdi_spec(plugin.config))


def run(args: argparse.Namespace, workdir: str, out: _Printer) -> int:
    """The demo proper, in ``workdir``."""
    try:
        config = demo_config(workdir, args.profile, args.mig_strategy, args.pass_device_specs,
                             args.device_list_strategy)
    except ConfigError as err:
        out(f"[demo] {err}")
        return 2
    pod_resources = os.path.join(workdir, POD_RESOURCES_SOCKET)
    os.makedirs(os.path.dirname(pod_resources))
    kubelet = MockKubelet(workdir, on_update=out.update, pod_resources_socket=pod_resources)
    kubelet.start()
    plugin = DevicePlugin(config, os.environ)
    exporter: Exporter | None = None
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
        allocate_for_the_demo_pod(kubelet, plugin, served, args.allocate, out)
        assert plugin.nvml is not None
        profile = controller.profile if controller is not None else None
        # GFD reads the whole node (vGPU included), which the plugin's snapshot leaves out.
        labels_snapshot = plugin.nvml.read_snapshot(config.flags.sysfs_root)
        print_labels(labels_snapshot, config, out, machine_type(profile))
        if args.metrics_address is not None:
            exporter = serve_metrics(args.metrics_address, plugin.config, workdir, pod_resources,
                                     out)
            if exporter is None:
                return 1
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
        # The exporter first: its NVML reference and event set live in the fake the plugin
        # installed, and plugin.close() uninstalls it; then the plugin, then the kubelet that
        # both talk to.
        if exporter is not None:
            exporter.stop()
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
