"""MPS end to end through the mock kubelet on the fake dgx-a100 (issue 14's "done when").

The plugin starts first and holds the MPS resource back (not registered, the status says why);
the control daemon (``mpsdaemon.main.serve``, the console script's body, on a thread over the
same fake GPUs) starts the fake ``nvidia-cuda-mps-control`` installed on PATH; the plugin then
registers the resource, Allocate hands out NVIDIA's env and mounts, the daemon's defaults are
memory / replicas and 100 / replicas, GFD labels say mps, and a real SIGTERM to the daemon
restores compute mode DEFAULT.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pynvml
import pytest
from plugin_support import snapshot_of
from test_plugin_mig_e2e import TIMEOUT, mig_config
from test_server_support import short_tmpdir

from deviceplugin.mockkubelet import MockKubelet
from deviceplugin.plugin import DevicePlugin
from deviceplugin.readiness import Status
from gfd.labels import node_labels
from gpus.backoff import Backoff
from gpus.config import Config, Mps, ReplicatedResource, Sharing
from gpus.fake import FakeNvml
from gpus.fake.mpscontrol import FAIL_ENV, install_as, read_state
from gpus.model import MIB
from gpus.mps import MpsRoot
from gpus.nvml import Nvml
from gpus.runtime import EXIT_OK, Signals
from mpsdaemon.main import serve
from protos.deviceplugin.v1beta1 import api_pb2

REPO = Path(__file__).resolve().parent.parent
GPU = "nvidia.com/gpu"
REPLICAS = 4
EXCLUSIVE = pynvml.NVML_COMPUTEMODE_EXCLUSIVE_PROCESS
DEFAULT = pynvml.NVML_COMPUTEMODE_DEFAULT
HELD = f"cannot serve {GPU}: its MPS control daemon "


@dataclass
class Node:
    kubelet: MockKubelet
    plugin: DevicePlugin
    fake: FakeNvml
    root: MpsRoot
    environ: dict[str, str]

    def held(self, status: Status) -> bool:
        return any(problem.startswith(HELD) for problem in status.problems)


def mps_config(directory: str, root: str) -> Config:
    base = mig_config(directory, "dgx-a100", "none")
    sharing = Sharing(mps=Mps(resources=(ReplicatedResource(GPU, REPLICAS),)))
    return dataclasses.replace(base, flags=dataclasses.replace(base.flags, mps_root=root),
                               sharing=sharing)


@contextmanager
def mps_node() -> Iterator[Node]:
    """The mock kubelet and the plugin (started, the MPS resource held); no control daemon."""
    with short_tmpdir() as directory:
        root = MpsRoot(os.path.join(directory, "mps"))
        bindir = install_as(Path(directory, "bin")).parent
        environ = {k: v for k, v in os.environ.items() if k != FAIL_ENV}
        environ.update(PATH=f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}",
                       PYTHONPATH=str(REPO))
        config = mps_config(directory, root.path)
        kubelet = MockKubelet(directory)
        kubelet.start()
        plugin = DevicePlugin(config, environ, poll_interval=0.02, mps_root_view=root.path,
                              mps_backoff=lambda: Backoff(initial=0.02, cap=0.1),
                              status_file=os.path.join(directory, "status.json"))
        try:
            fake = plugin.select_backend()
            assert fake is not None
            fake.write_sysfs(Path(config.flags.sysfs_root))
            fake.write_driver_root(config.flags.nvidia_driver_root, config.flags.dev_root)
            plugin.start()
            yield Node(kubelet, plugin, fake, root, environ)
        finally:
            plugin.close()
            kubelet.stop()


@contextmanager
def control_daemon(node: Node) -> Iterator[tuple[threading.Thread, list[int]]]:
    """``mps-control-daemon``'s body on a thread, its signals routed here (main thread)."""
    signals = Signals().install()
    nvml = Nvml()
    nvml.init()
    codes: list[int] = []
    thread = threading.Thread(
        target=lambda: codes.append(serve(node.plugin.config, node.environ, node.root,
                                          signals, nvml)),
        name="mps-control-daemon", daemon=True)
    thread.start()
    try:
        yield thread, codes
    finally:
        signals.request_stop()
        thread.join(TIMEOUT)
        signals.restore()
        nvml.shutdown()


def test_mps_end_to_end() -> None:
    with mps_node() as node:
        kubelet, plugin, fake, root = node.kubelet, node.plugin, node.fake, node.root
        # Held: the daemon does not answer yet, so nothing is registered and we are not ready.
        assert plugin.readiness.wait_status(node.held, TIMEOUT), plugin.readiness.status
        assert kubelet.registrations(GPU) == [] and not plugin.readiness.ready
        assert HELD in Path(plugin.readiness.status_path).read_text()
        assert all(fake.compute_mode(i) == DEFAULT for i in range(8))

        with control_daemon(node) as (thread, codes):
            assert kubelet.wait_for_registration(GPU, TIMEOUT)
            assert plugin.readiness.wait(True, TIMEOUT)
            assert not node.held(plugin.readiness.status)
            assert root.ready_file.is_file() and root.started_file(GPU).is_file()
            assert all(fake.compute_mode(i) == EXCLUSIVE for i in range(8))

            # Replicas, and Allocate's additions exactly as NVIDIA's.
            uuids = [g.uuid for g in snapshot_of(plugin).gpus]
            ids = [d.id for d in kubelet.devices(GPU)]
            assert ids == [f"{u}::{n}" for u in uuids for n in range(REPLICAS)]
            response = kubelet.allocate(GPU, 1).response
            assert response.envs["CUDA_MPS_PIPE_DIRECTORY"] == "/mps/nvidia.com/gpu/pipe"
            mounts = [(m.host_path, m.container_path, m.read_only) for m in response.mounts]
            assert mounts == [(str(root.pipe_dir(GPU)), "/mps/nvidia.com/gpu/pipe", False),
                              (str(root.shm_dir), "/dev/shm", False)]

            # failRequestsGreaterThanOne (true for MPS by default), with NVIDIA's text.
            request = api_pb2.AllocateRequest(container_requests=[
                api_pb2.ContainerAllocateRequest(devices_ids=ids[:2])])
            with pytest.raises(grpc.RpcError) as info:
                kubelet.stub(GPU).Allocate(request, timeout=TIMEOUT)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert info.value.details() == (
                'invalid allocation request for "nvidia.com/gpu": invalid request: '
                "maximum request size for shared resources is 1; found 2")

            # The daemon's defaults: memory / replicas per GPU (MiB), 100 / replicas.
            state = read_state(root.pipe_dir(GPU))
            assert state["pinned_mem_limits"] == {
                str(g.index): f"{g.memory_bytes // REPLICAS // MIB}M"
                for g in snapshot_of(plugin).gpus}
            assert state["active_thread_percentage"] == 100 // REPLICAS

            labels = node_labels(snapshot_of(plugin), plugin.config, timestamp=1)
            assert labels["nvidia.com/mps.capable"] == "true"
            assert labels["nvidia.com/gpu.sharing-strategy"] == "mps"
            assert labels["nvidia.com/gpu.replicas"] == str(REPLICAS)
            assert labels["nvidia.com/gpu.product"].endswith("-SHARED")

            # SIGTERM: quit, compute mode DEFAULT, markers removed, exit 0.
            os.kill(os.getpid(), signal.SIGTERM)
            thread.join(TIMEOUT)
            assert not thread.is_alive() and codes == [EXIT_OK]
        assert all(fake.compute_mode(i) == DEFAULT for i in range(8))
        uuid0 = fake.uuids()[0]
        assert [m for u, m in fake.compute_mode_changes() if u == uuid0] == [EXCLUSIVE, DEFAULT]
        assert read_state(root.pipe_dir(GPU))["commands"][-1] == "quit"
        assert not root.ready_file.exists() and not root.started_file(GPU).exists()
