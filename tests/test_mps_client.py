"""gpus.mps: NVIDIA's layout, what Allocate adds for MPS, and the limits the daemon sets."""

from __future__ import annotations

import dataclasses

import builders

from gpus.config import Config, Flags, Mps, ReplicatedResource, Sharing
from gpus.model import GPU, MIB
from gpus.mps import (
    Mount,
    MpsRoot,
    active_thread_percentage,
    client_env,
    client_mounts,
    pinned_memory_limits,
)
from gpus.resources import build_resource_map


def test_allocate_additions_are_nvidias() -> None:
    # The reference table: resource nvidia.com/gpu, mpsRoot /run/nvidia/mps.
    assert client_env("nvidia.com/gpu") == {
        "CUDA_MPS_PIPE_DIRECTORY": "/mps/nvidia.com/gpu/pipe"}
    assert client_mounts("nvidia.com/gpu", "/run/nvidia/mps") == (
        Mount("/run/nvidia/mps/nvidia.com/gpu/pipe", "/mps/nvidia.com/gpu/pipe"),
        Mount("/run/nvidia/mps/shm", "/dev/shm"))


def test_root_layout() -> None:
    root = MpsRoot("/mps")
    assert str(root.pipe_dir("nvidia.com/gpu.shared")) == "/mps/nvidia.com/gpu.shared/pipe"
    assert str(root.log_dir("nvidia.com/gpu")) == "/mps/nvidia.com/gpu/log"
    assert str(root.started_file("nvidia.com/gpu")) == "/mps/nvidia.com/gpu/.started"
    assert str(root.ready_file) == "/mps/.ready" and str(root.shm_dir) == "/mps/shm"


def gpu(index: int, memory_mib: int) -> GPU:
    return builders.gpu(index, uuid=f"GPU-{index:08d}-0000-0000-0000-000000000000", name="X",
                        memory_bytes=memory_mib * MIB, pci_bus_id=f"00000000:{index:02x}:00.0")


def test_limits_are_memory_over_replicas_and_100_over_replicas() -> None:
    snapshot = builders.snapshot(gpu(0, 40960), gpu(1, 81920), gpu(2, 0), driver="550.54.15",
                                 cuda=12040)
    config = Config(flags=Flags(mps_root="/r"), sharing=Sharing(mps=Mps(resources=(
        ReplicatedResource("nvidia.com/gpu", 3),))))
    resource = build_resource_map(snapshot, config).resources["nvidia.com/gpu"]
    # Whole MiB, rounded down; a GPU reporting no memory gets no limit (as NVIDIA).
    assert pinned_memory_limits(resource) == {0: "13653M", 1: "27306M"}
    assert active_thread_percentage(resource) == 33
    empty = dataclasses.replace(resource, devices=())
    assert active_thread_percentage(empty) is None and pinned_memory_limits(empty) == {}
