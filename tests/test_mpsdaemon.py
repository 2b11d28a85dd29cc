"""The MPS control daemon end to end: fake NVML, fake nvidia-cuda-mps-control, temp MPS root."""

from __future__ import annotations

import logging
import os
import queue
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pynvml
import pytest

from gpus.backoff import Backoff
from gpus.config import Config, Flags, Mps, ReplicatedResource, Sharing
from gpus.fake import FakeNvml
from gpus.fake.mpscontrol import FAIL_ENV, inject, install_as, read_state
from gpus.model import MIB
from gpus.mps import MpsError, MpsRoot
from gpus.nvml import Nvml
from gpus.resources import build_resource_map
from mpsdaemon.daemon import MpsDaemon
from mpsdaemon.logfollow import LogFollower
from mpsdaemon.manager import FAILED, RUNNING, STOPPED, DaemonStatus, MpsManager, mps_resources
from mpsdaemon.shm import FALLBACK_SIZE, mount_shm, shm_size

FakeFactory = Callable[..., FakeNvml]
REPO = Path(__file__).resolve().parent.parent
GPU = "nvidia.com/gpu"
EXCLUSIVE = pynvml.NVML_COMPUTEMODE_EXCLUSIVE_PROCESS
DEFAULT = pynvml.NVML_COMPUTEMODE_DEFAULT
WAIT_S = 10.0


def mps_config(replicas: int = 4, rename_by_default: bool = False) -> Config:
    return Config(flags=Flags(mps_root="/run/nvidia/mps"), sharing=Sharing(mps=Mps(
        rename_by_default=rename_by_default, resources=(ReplicatedResource(GPU, replicas),))))


@pytest.fixture
def environ(tmp_path: Path) -> dict[str, str]:
    """Our environment with the fake control binary first on PATH."""
    bindir = install_as(tmp_path / "bin").parent
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": str(REPO)}
    env.pop(FAIL_ENV, None)
    return env


@pytest.fixture
def nvml(fake_nvml: FakeFactory) -> Iterator[tuple[FakeNvml, Nvml]]:
    fake = fake_nvml("dgx-a100")
    session = Nvml()
    session.init()
    yield fake, session
    session.shutdown()


def manager_for(nvml: tuple[FakeNvml, Nvml], root: MpsRoot, environ: dict[str, str],
                config: Config | None = None) -> MpsManager:
    fake, session = nvml
    resources = mps_resources(build_resource_map(session.read_snapshot(), config or mps_config()))
    return MpsManager(resources, root, session, environ=environ, check_interval=0.02,
                      backoff=lambda: Backoff(initial=0.01, cap=0.05), log_poll_interval=0.02)


def running(status: dict[str, DaemonStatus]) -> bool:
    return all(s.state == RUNNING for s in status.values())


def test_start_configures_every_gpu_and_stop_restores_it(
        nvml: tuple[FakeNvml, Nvml], tmp_path: Path, environ: dict[str, str]) -> None:
    fake, _ = nvml
    root = MpsRoot(str(tmp_path / "mps"))
    manager = manager_for(nvml, root, environ)
    manager.start()
    try:
        assert manager.status()[GPU].state == RUNNING and manager.problems() == []
        assert root.ready_file.is_file() and root.started_file(GPU).is_file()
        assert all(fake.compute_mode(i) == EXCLUSIVE for i in range(8))
        state = read_state(root.pipe_dir(GPU))
        assert state["running"]
        # Memory / replicas per device in MiB, and 100 / replicas.
        memory = fake.profile.gpus[0].model.memory_bytes
        assert state["pinned_mem_limits"] == {str(i): f"{memory // 4 // MIB}M" for i in range(8)}
        assert state["active_thread_percentage"] == 25.0
        assert state["commands"][-1] == "set_default_active_thread_percentage 25"
        assert (root.log_dir(GPU) / "control.log").is_file()
    finally:
        manager.stop()
    assert all(fake.compute_mode(i) == DEFAULT for i in range(8))
    assert not root.ready_file.exists() and not root.started_file(GPU).exists()
    assert not root.log_dir(GPU).exists()
    assert read_state(root.pipe_dir(GPU))["commands"][-1] == "quit"
    assert manager.status()[GPU].state == STOPPED


def test_a_renamed_resource_gets_its_own_directories(
        nvml: tuple[FakeNvml, Nvml], tmp_path: Path, environ: dict[str, str]) -> None:
    root = MpsRoot(str(tmp_path / "mps"))
    manager = manager_for(nvml, root, environ, mps_config(2, rename_by_default=True))
    manager.start()
    try:
        assert root.started_file("nvidia.com/gpu.shared").is_file()
        assert read_state(root.pipe_dir("nvidia.com/gpu.shared"))["active_thread_percentage"] == 50
    finally:
        manager.stop()


def test_a_dead_daemon_is_reported_undone_and_restarted(
        nvml: tuple[FakeNvml, Nvml], tmp_path: Path, environ: dict[str, str],
        caplog: pytest.LogCaptureFixture) -> None:
    fake, _ = nvml
    root = MpsRoot(str(tmp_path / "mps"))
    manager = manager_for(nvml, root, environ)
    manager.start()
    try:
        inject(root.pipe_dir(GPU), running=False)  # the control daemon crashed
        assert manager.wait_for(lambda s: s[GPU].restarts == 1 and running(s), WAIT_S)
        assert read_state(root.pipe_dir(GPU))["starts"] == 2
        assert root.ready_file.is_file() and root.started_file(GPU).is_file()
        uuid0 = fake.uuids()[0]
        modes = [mode for uuid, mode in fake.compute_mode_changes() if uuid == uuid0]
        assert modes == [EXCLUSIVE, DEFAULT, EXCLUSIVE]  # undone, then configured again
        assert any("stopped answering" in r.getMessage() and r.levelno == logging.ERROR
                   for r in caplog.records)
    finally:
        manager.stop()


def test_a_failed_start_is_undone_and_retried_with_backoff(
        nvml: tuple[FakeNvml, Nvml], tmp_path: Path, environ: dict[str, str]) -> None:
    fake, _ = nvml
    root = MpsRoot(str(tmp_path / "mps"))
    inject(root.pipe_dir(GPU), fail=["set_default_active_thread_percentage"])
    manager = manager_for(nvml, root, environ)
    manager.start()
    try:
        status = manager.status()[GPU]
        assert status.state == FAILED and status.retry_in > 0
        assert "set_default_active_thread_percentage" in status.error
        assert manager.problems() == [f"MPS control daemon for {GPU}: {status.error}"]
        # Never half-configured: compute mode back to DEFAULT, no markers, server quit.
        assert all(fake.compute_mode(i) == DEFAULT for i in range(8))
        assert not root.started_file(GPU).exists() and not root.ready_file.exists()
        assert not read_state(root.pipe_dir(GPU))["running"]
        inject(root.pipe_dir(GPU), fail=[])
        assert manager.wait_for(running, WAIT_S)
        assert root.ready_file.is_file()
        assert all(fake.compute_mode(i) == EXCLUSIVE for i in range(8))
    finally:
        manager.stop()


def test_an_nvml_failure_names_the_call_and_leaves_nothing_set(
        nvml: tuple[FakeNvml, Nvml], tmp_path: Path, environ: dict[str, str]) -> None:
    fake, session = nvml
    root = MpsRoot(str(tmp_path / "mps"))
    resource = mps_resources(build_resource_map(session.read_snapshot(), mps_config()))[0]
    daemon = MpsDaemon(resource, root, session, environ=environ)
    fake.fail("nvmlDeviceSetComputeMode", "NVML_ERROR_NO_PERMISSION", count=1)
    with pytest.raises(MpsError, match="nvmlDeviceSetComputeMode: NVML_ERROR_NO_PERMISSION"):
        daemon.start()
    assert all(fake.compute_mode(i) == DEFAULT for i in range(8))
    assert not root.started_file(GPU).exists()
    assert read_state(root.pipe_dir(GPU)) == {}  # the control daemon was never started
    daemon.start()
    assert root.started_file(GPU).is_file()
    daemon.stop()


def test_nothing_to_do_without_mps_resources(
        nvml: tuple[FakeNvml, Nvml], tmp_path: Path, environ: dict[str, str]) -> None:
    root = MpsRoot(str(tmp_path / "mps"))
    manager = manager_for(nvml, root, environ, Config())
    assert manager.daemons == []
    manager.start()
    assert not root.ready_file.exists()
    manager.stop()


def test_the_log_follower_passes_new_lines_and_survives_replacement(tmp_path: Path) -> None:
    path = tmp_path / "log" / "control.log"
    lines: queue.Queue[str] = queue.Queue()
    follower = LogFollower(path, lines.put, poll_interval=0.01)
    follower.start()
    try:
        path.parent.mkdir()
        path.write_text("first\nsecond\npart")
        assert lines.get(timeout=WAIT_S) == "first"
        assert lines.get(timeout=WAIT_S) == "second"
        with open(path, "a") as handle:
            handle.write("ial\n")
        assert lines.get(timeout=WAIT_S) == "partial"
        path.unlink()
        path.write_text("after restart\n")
        assert lines.get(timeout=WAIT_S) == "after restart"
    finally:
        follower.stop()
    assert lines.empty()


class RecordingMounter:
    def __init__(self, mounted: bool = False) -> None:
        self.mounted = mounted
        self.calls: list[tuple[object, ...]] = []

    def is_mounted(self, path: Path) -> bool:
        return self.mounted

    def unmount(self, path: Path) -> None:
        self.calls.append(("umount", path))

    def mount(self, source: str, target: Path, fstype: str, options: Sequence[str]) -> None:
        self.calls.append(("mount", source, target, fstype, tuple(options)))


def test_mount_shm_remounts_a_tmpfs_of_half_the_memory(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       131072000 kB\nMemFree: 1 kB\n")
    mounter = RecordingMounter(mounted=True)
    shm = mount_shm(tmp_path / "mps", mounter, str(meminfo))
    assert shm == tmp_path / "mps" / "shm" and shm.is_dir()
    assert mounter.calls == [
        ("umount", shm),
        ("mount", "shm", shm, "tmpfs", ("rw", "nosuid", "nodev", "noexec", "relatime",
                                        "size=65536000k"))]


def test_shm_size_falls_back_when_memtotal_is_unreadable(tmp_path: Path) -> None:
    assert shm_size(str(tmp_path / "missing")) == FALLBACK_SIZE == "65536k"
    bad = tmp_path / "meminfo"
    bad.write_text("MemTotal: lots\n")
    assert shm_size(str(bad)) == FALLBACK_SIZE
