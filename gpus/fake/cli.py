"""``fake-nvml``: list and show machine profiles, and inject faults into a running daemon's fake.

fake-nvml list
fake-nvml show dgx-a100-mig [--json]
fake-nvml driver-root dgx-a100 /tmp/driver     # a fake driver root for CDI-mode runs
fake-nvml inject --control /run/fake-nvml.sock xid 3 79
fake-nvml inject --control /run/fake-nvml.sock xid MIG-... 94
fake-nvml inject --control /run/fake-nvml.sock fail nvmlDeviceGetUUID NVML_ERROR_UNKNOWN --count 1

--control (or $FAKE_NVML_CONTROL) may come before or after the fault. inject waits up to --wait
seconds (default 5) for the socket to appear and, for an XID or ECC event, for a daemon to watch
that GPU's events, so it can follow a daemon that is still starting (an event posted before
anyone watches is lost, as with NVML).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gpus.fake.control import (
    CONNECT_WAIT_S,
    MAX_EVENT_WAIT_S,
    REPLY_TIMEOUT_S,
    ControlError,
    send,
)
from gpus.fake.controller import install, write_sysfs
from gpus.fake.driverroot import write_fake_driver_root
from gpus.fake.profile import ProfileError, list_profiles, load_profile
from gpus.model import Snapshot, TopologyLevel
from gpus.nvml import Nvml, NvmlError
from gpus.runtime.version import add_version_flag

CONTROL_ENV = "FAKE_NVML_CONTROL"
# nvidia-smi topo -m abbreviations.
_LEVEL_NAMES = {
    TopologyLevel.INTERNAL: "X",
    TopologyLevel.SINGLE: "PIX",
    TopologyLevel.MULTIPLE: "PXB",
    TopologyLevel.HOSTBRIDGE: "PHB",
    TopologyLevel.NODE: "NODE",
    TopologyLevel.SYSTEM: "SYS",
}


def _gpu_arg(text: str) -> int | str:
    """A GPU index or a GPU/MIG UUID."""
    return int(text) if text.isdigit() else text


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    parser = argparse.ArgumentParser(
        prog="fake-nvml", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_version_flag(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the shipped machine profiles")
    show = sub.add_parser("show", help="read a profile through pynvml and the fake, and print it")
    show.add_argument("profile", help="profile name or path to a .yaml")
    show.add_argument("--json", action="store_true", help="print the Snapshot as JSON")
    driver = sub.add_parser("driver-root", help="write a fake NVIDIA driver root for a profile "
                            "(libraries, binaries, firmware, device nodes as plain files)")
    driver.add_argument("profile", help="profile name or path to a .yaml")
    driver.add_argument("directory", help="the driver root to create or refresh")
    driver.add_argument("--dev-root", help="where dev/ goes (default: the driver root)")

    inject = sub.add_parser("inject", help="inject a fault through a daemon's control socket")
    _socket_options(
        inject, default_control=os.environ.get(CONTROL_ENV), default_wait=CONNECT_WAIT_S
    )
    # The same options after the fault; SUPPRESS so that absent there they do not overwrite
    # what was given before it.
    after = argparse.ArgumentParser(add_help=False)
    _socket_options(after, default_control=argparse.SUPPRESS, default_wait=argparse.SUPPRESS)
    faults = _FaultParsers(inject.add_subparsers(dest="fault", required=True), after)
    xid = faults.add_parser("xid", help="deliver a critical XID event")
    xid.add_argument("gpu", type=_gpu_arg, help="GPU index, GPU UUID or MIG UUID")
    xid.add_argument("xid", type=int)
    xid.add_argument("--gi", type=int, help="GPU instance id (a MIG UUID sets it)")
    xid.add_argument("--ci", type=int, help="compute instance id (a MIG UUID sets it)")
    ecc = faults.add_parser("ecc", help="deliver an ECC error event")
    ecc.add_argument("gpu", type=_gpu_arg)
    ecc.add_argument("--single", action="store_true", help="single-bit (default: double-bit)")
    for name, text in (("lose", "the GPU falls off the bus"), ("restore", "bring a lost GPU back")):
        faults.add_parser(name, help=text).add_argument("gpu", type=_gpu_arg)
    fail = faults.add_parser("fail", help="make an NVML function return an error")
    fail.add_argument("function", help="e.g. nvmlDeviceGetUUID (covers version suffixes)")
    fail.add_argument("error", help="e.g. NVML_ERROR_GPU_IS_LOST, GPU_IS_LOST or 15")
    fail.add_argument("--count", type=int, help="only this many times (default: until cleared)")
    for name in ("fail-event-wait", "fail-init"):
        faults.add_parser(name, help=f"make {name[5:]} fail").add_argument("error", nargs="?")
    faults.add_parser("clear", help="remove all injected faults, restore lost GPUs")
    faults.add_parser("status", help="print the active faults")
    return parser


def _socket_options(
    parser: argparse.ArgumentParser, default_control: Any, default_wait: Any
) -> None:
    parser.add_argument(
        "--control", default=default_control, help=f"control socket path (env {CONTROL_ENV})"
    )
    parser.add_argument(
        "--wait",
        type=float,
        default=default_wait,
        metavar="S",
        help=f"wait up to S seconds for the socket to appear and, for xid and ecc, for a "
        f"daemon to watch the GPU's events (default {CONNECT_WAIT_S:g})",
    )


class _FaultParsers:
    """The fault subcommands, each also accepting the socket options."""

    def __init__(self, actions: Any, parent: argparse.ArgumentParser) -> None:
        self._actions = actions
        self._parent = parent

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = self._actions.add_parser(
            name, parents=[self._parent], **kwargs
        )
        return parser


def _request(args: argparse.Namespace) -> dict[str, Any]:
    """The control request for ``fake-nvml inject ...``."""
    fault = args.fault
    if fault == "xid":
        return {"op": "xid", "gpu": args.gpu, "xid": args.xid, "gi": args.gi, "ci": args.ci,
                "wait": _event_wait(args)}
    if fault == "ecc":
        return {"op": "ecc", "gpu": args.gpu, "double_bit": not args.single,
                "wait": _event_wait(args)}
    if fault in ("lose", "restore"):
        return {"op": fault, "gpu": args.gpu}
    if fault == "fail":
        error: str | int = int(args.error) if args.error.isdigit() else args.error
        return {"op": "fail", "function": args.function, "error": error, "count": args.count}
    if fault in ("fail-event-wait", "fail-init"):
        request: dict[str, Any] = {"op": fault.replace("-", "_")}
        if args.error:
            request["error"] = int(args.error) if args.error.isdigit() else args.error
        return request
    return {"op": fault}


def _event_wait(args: argparse.Namespace) -> float:
    """How long the fake may wait for a watcher of the event: --wait, within its bound."""
    wait: float = args.wait
    return min(max(wait, 0.0), MAX_EVENT_WAIT_S)


def render(snapshot: Snapshot, title: str) -> str:
    """A human-readable summary: GPUs, MIG devices and an nvidia-smi-like topology matrix."""
    system = snapshot.system
    lines = [
        title,
        f"driver {system.driver_version}, CUDA {system.cuda_driver_version}, "
        f"NVML {system.nvml_version}",
        "",
    ]
    for gpu in snapshot.gpus:
        mig = "MIG enabled" if gpu.mig_enabled else ("MIG capable" if gpu.mig_capable else "")
        lines.append(
            f"GPU {gpu.index}: {gpu.name}  {gpu.memory_bytes >> 20} MiB  {gpu.pci_bus_id}"
            f"  NUMA {gpu.numa_node}  {gpu.uuid}  {mig}".rstrip()
        )
        for dev in gpu.mig_devices:
            lines.append(
                f"  MIG {dev.profile:<12} gi {dev.gpu_instance_id:<2} "
                f"ci {dev.compute_instance_id}  {dev.memory_bytes >> 20} MiB  {dev.uuid}"
            )
    n = len(snapshot.gpus)
    lines += ["", "      " + "".join(f"GPU{k:<5}" for k in range(n))]
    for i in range(n):
        cells = []
        for j in range(n):
            link = snapshot.link(i, j)
            cells.append(f"NV{link.nvlinks}" if link.nvlinks else _LEVEL_NAMES[link.level])
        lines.append(f"GPU{i:<3}" + "".join(f"{c:<8}" for c in cells))
    return "\n".join(lines)


def _show(profile_ref: str, as_json: bool) -> str:
    profile = load_profile(profile_ref)
    with tempfile.TemporaryDirectory(prefix="fake-nvml-") as root:
        write_sysfs(profile, Path(root))
        with install(profile), Nvml() as nvml:
            snapshot = nvml.read_snapshot(root)
    if as_json:
        return json.dumps(dataclasses.asdict(snapshot), indent=2)
    return render(snapshot, f"{profile.name}: {profile.description} ({profile.source})")


def _driver_root(profile_ref: str, directory: str, dev_root: str | None) -> str:
    """Write the fake driver root; a one-line summary (gpus/fake/driverroot.py)."""
    made = write_fake_driver_root(load_profile(profile_ref), directory, dev_root)
    return (f"fake NVIDIA driver {made.version} in {made.root}: {len(made.libraries)} "
            f"libraries, {len(made.binaries)} binaries, {len(made.firmware)} firmware files")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    try:
        return _main(argv)
    except BrokenPipeError:
        # The reader went away (fake-nvml list | head): stop quietly, as the Python docs
        # advise: point stdout at /dev/null so the flush at exit does not fail again.
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return 1


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "list":
            for name in list_profiles():
                print(f"{name:<18} {load_profile(name).description}")
        elif args.command == "show":
            print(_show(args.profile, args.json))
        elif args.command == "driver-root":
            try:
                summary = _driver_root(args.profile, args.directory, args.dev_root)
            except OSError as exc:  # not BrokenPipeError from print: main() handles that
                print(f"fake-nvml: driver-root: {exc}", file=sys.stderr)
                return 1
            print(summary)
        else:
            if not args.control:
                print(f"fake-nvml: --control (or {CONTROL_ENV}) is required", file=sys.stderr)
                return 2
            request = _request(args)
            # The reply may come only after the fake waited for a watcher of the event.
            timeout = REPLY_TIMEOUT_S + float(request.get("wait", 0.0))
            reply = send(args.control, request, timeout=timeout, wait=max(args.wait, 0.0))
            reply.pop("ok", None)
            print(json.dumps(reply) if reply else "ok")
    except (ProfileError, ControlError, NvmlError) as exc:
        print(f"fake-nvml: {exc}", file=sys.stderr)
        return 1
    sys.stdout.flush()  # a closed pipe shows here, inside main, not at interpreter exit
    return 0


if __name__ == "__main__":
    sys.exit(main())
