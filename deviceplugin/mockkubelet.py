"""A small stand-in for the kubelet's device manager, for local runs, the demo and tests.

It serves ``v1beta1.Registration`` on ``<dir>/kubelet.sock``, validates Register like the
kubelet (API version, vendor-domain resource name), dials each plugin back on its socket, follows
its ListAndWatch stream, and can allocate devices the way the kubelet does (GetPreferredAllocation,
then Allocate). :meth:`MockKubelet.restart` behaves like a kubelet restart: every socket in the
directory is deleted (plugins' included) and ``kubelet.sock`` is recreated, and nothing
reconnects by itself.

With ``pod_resources_socket`` it also serves the kubelet's PodResources v1 API (``List``,
``GetAllocatableResources``, ``Get``) on that socket (the kubelet's is
``/var/lib/kubelet/pod-resources/kubelet.sock``), answering from its own bookkeeping: every
allocation made on behalf of a pod is recorded until :meth:`MockKubelet.free_pod`, and the
allocatable devices are those the plugins last listed in ListAndWatch. Allocations survive
:meth:`MockKubelet.restart`, as the kubelet's checkpoint keeps them.

The mock is three modules beside this one, which holds its command line and is where its names
are imported from: :mod:`deviceplugin.mockkubelet_devicemanager` (:class:`MockKubelet`, the
Registration server and the plugin clients), :mod:`deviceplugin.mockkubelet_podresources` (the
PodResources server and the allocation book) and :mod:`deviceplugin.mockkubelet_base` (what
both share).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence

import grpc

from deviceplugin.mockkubelet_base import (
    DIAL_TIMEOUT_S,
    KUBELET_SOCKET,
    POD_RESOURCES_SOCKET,
    RPC_TIMEOUT_S,
    SUPPORTED_VERSIONS,
    AllocationOutcome,
    DeviceInfo,
    MockKubeletError,
    PodAllocation,
    PodResourcesFault,
)
from deviceplugin.mockkubelet_devicemanager import MockKubelet
from deviceplugin.mockkubelet_podresources import PodBook, pod_resources
from gpus.runtime.version import add_version_flag

__all__ = [
    "DIAL_TIMEOUT_S",
    "KUBELET_SOCKET",
    "POD_RESOURCES_SOCKET",
    "RPC_TIMEOUT_S",
    "SUPPORTED_VERSIONS",
    "AllocationOutcome",
    "DeviceInfo",
    "MockKubelet",
    "MockKubeletError",
    "PodAllocation",
    "PodBook",
    "PodResourcesFault",
    "build_parser",
    "format_allocation",
    "format_devices",
    "main",
    "pod_resources",
]


# command line --------------------------------------------------------------------------------


def format_devices(resource: str, devices: Sequence[DeviceInfo]) -> str:
    """One ListAndWatch update as printable lines."""
    healthy = sum(d.health == "Healthy" for d in devices)
    lines = [f"[ListAndWatch] {resource}: {len(devices)} devices, {healthy} healthy"]
    for d in devices:
        numa = f" numa={','.join(map(str, d.numa_nodes))}" if d.numa_nodes else ""
        lines.append(f"    {d.id} {d.health}{numa}")
    return "\n".join(lines)


def format_allocation(outcome: AllocationOutcome) -> str:
    """An allocation outcome as printable lines."""
    r = outcome.response
    lines = [
        f"[GetPreferredAllocation] {outcome.resource}: {', '.join(outcome.preferred) or '(none)'}",
        f"[Allocate] {outcome.resource}: {', '.join(outcome.allocated)}",
    ]
    lines += [f"    env {k}={v}" for k, v in sorted(r.envs.items())]
    lines += [f"    mount {m.host_path} -> {m.container_path}" for m in r.mounts]
    lines += [
        f"    device {d.host_path} -> {d.container_path} ({d.permissions})" for d in r.devices
    ]
    lines += [f"    annotation {k}={v}" for k, v in sorted(r.annotations.items())]
    lines += [f"    cdi {c.name}" for c in r.cdi_devices]
    return "\n".join(lines)


def _parse_allocation(text: str) -> tuple[str, int]:
    name, eq, count = text.rpartition("=")
    if not eq or not name or not count.isdigit() or int(count) < 1:
        raise argparse.ArgumentTypeError(f"expected RESOURCE=N with N >= 1, got {text!r}")
    return name, int(count)


def build_parser() -> argparse.ArgumentParser:
    """The mock-kubelet command line."""
    parser = argparse.ArgumentParser(
        prog="mock-kubelet", description="Serve a stand-in kubelet registration socket."
    )
    parser.add_argument("--dir", required=True, help="directory for kubelet.sock and plugins")
    parser.add_argument(
        "--allocate",
        action="append",
        default=[],
        type=_parse_allocation,
        metavar="RESOURCE=N",
        help="once RESOURCE registers, allocate N devices and print the responses (each "
        "on behalf of a pod default/mock-pod-<k>, container main, as PodResources reports)",
    )
    parser.add_argument(
        "--pod-resources-socket",
        metavar="PATH",
        help="also serve the PodResources v1 API on PATH (the kubelet's is "
        f"{POD_RESOURCES_SOCKET}); its directory must exist",
    )
    parser.add_argument(
        "--restart-after", type=float, metavar="S", help="simulate a kubelet restart after S s"
    )
    parser.add_argument("--exit-after", type=float, metavar="S", help="exit after S seconds")
    add_version_flag(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the mock kubelet until SIGINT/SIGTERM (or --exit-after)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if not os.path.isdir(args.dir):
        print(f"mock-kubelet: --dir {args.dir!r} is not a directory", file=sys.stderr)
        return 2
    if not os.access(args.dir, os.W_OK | os.X_OK):
        print(f"mock-kubelet: --dir {args.dir!r} is not writable: {KUBELET_SOCKET} cannot be "
              "created there", file=sys.stderr)
        return 2
    if args.pod_resources_socket is not None:
        parent = os.path.dirname(os.path.abspath(args.pod_resources_socket))
        if not os.path.isdir(parent):
            print(f"mock-kubelet: --pod-resources-socket {args.pod_resources_socket!r}: "
                  f"directory {parent!r} does not exist", file=sys.stderr)
            return 2
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    kubelet = MockKubelet(
        args.dir,
        on_update=lambda r, d: print(format_devices(r, d), flush=True),
        pod_resources_socket=args.pod_resources_socket,
    )
    try:
        kubelet.start()
    except MockKubeletError as err:
        print(f"mock-kubelet: {err}", file=sys.stderr)
        return 2
    try:
        for number, (resource, count) in enumerate(args.allocate, start=1):
            if not kubelet.wait_for_registration(resource, timeout=60):
                print(f"mock-kubelet: {resource} did not register", file=sys.stderr)
                continue
            try:
                outcome = kubelet.allocate(resource, count, pod=f"mock-pod-{number}")
                print(format_allocation(outcome), flush=True)
            except (grpc.RpcError, ValueError) as err:
                print(f"mock-kubelet: allocation of {resource} failed: {err}", file=sys.stderr)
        if args.restart_after is not None and not done.wait(args.restart_after):
            print("[restart] deleting sockets and recreating kubelet.sock", flush=True)
            kubelet.restart()
        done.wait(args.exit_after)
    except MockKubeletError as err:  # the restart could not listen again
        print(f"mock-kubelet: {err}", file=sys.stderr)
        return 2
    finally:
        kubelet.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
