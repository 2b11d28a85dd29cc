"""CUDA MPS pieces shared by the MPS control daemon (``mpsdaemon``) and the device plugin.

* :class:`MpsRoot`: where NVIDIA's layout puts things under the MPS root (``--mps-root`` on the
  host, mounted at ``/mps`` in NVIDIA's containers): ``<root>/<resource>/pipe``,
  ``<root>/<resource>/log``, ``<root>/<resource>/.started``, ``<root>/shm``, ``<root>/.ready``.
* :class:`MpsControl`: talks to one MPS control daemon through ``nvidia-cuda-mps-control``
  (``-d`` to start it, commands on stdin), with the pipe and log directories in its
  environment, as NVIDIA's plugin and control daemon do. The plugin's readiness check sends
  ``get_default_active_thread_percentage`` (:meth:`MpsControl.assert_healthy`).
* :func:`pinned_memory_limits` and :func:`active_thread_percentage`: the per-client defaults
  the daemon sets (total memory / replicas per GPU, 100 / replicas), in NVIDIA's formats.
* :func:`client_env` and :func:`client_mounts`: what Allocate adds for an MPS resource
  (NVIDIA's ``updateReponse``): the pipe directory variable, the pipe and shm mounts.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path

from gpus.model import MIB
from gpus.records import record
from gpus.resources import Resource

CONTROL_BINARY = "nvidia-cuda-mps-control"
CONTAINER_ROOT = "/mps"  # where NVIDIA's pods mount the host MPS root
SHM_CONTAINER_PATH = "/dev/shm"  # where the shared tmpfs is mounted in daemons and clients
PIPE_ENV = "CUDA_MPS_PIPE_DIRECTORY"
LOG_ENV = "CUDA_MPS_LOG_DIRECTORY"
CONTROL_LOG = "control.log"  # written by the control daemon into its log directory
HEALTH_COMMAND = "get_default_active_thread_percentage"
# How long one nvidia-cuda-mps-control invocation may take before it counts as failed.
CONTROL_TIMEOUT_S = 10.0


def local_root(mps_root: str, container_root: str = CONTAINER_ROOT) -> str:
    """Where this process sees the MPS root: ``/mps`` when mounted there (NVIDIA's pods: the
    plugin and the control daemon), else ``mps_root`` itself (a process on the host)."""
    return container_root if os.path.isdir(container_root) else mps_root


class MpsError(Exception):
    """An MPS control daemon could not be started, configured or reached."""


@record
class MpsRoot:
    """NVIDIA's layout under an MPS root; resource names keep their ``/`` (nested dirs)."""

    path: str

    def resource_dir(self, resource: str) -> Path:
        """``<root>/nvidia.com/gpu`` for ``nvidia.com/gpu``."""
        return Path(self.path, resource)

    def pipe_dir(self, resource: str) -> Path:
        """The control daemon's pipe directory (``CUDA_MPS_PIPE_DIRECTORY``) for ``resource``."""
        return self.resource_dir(resource) / "pipe"

    def log_dir(self, resource: str) -> Path:
        """The control daemon's log directory (``CUDA_MPS_LOG_DIRECTORY``) for ``resource``."""
        return self.resource_dir(resource) / "log"

    def started_file(self, resource: str) -> Path:
        """Present while ``resource``'s daemon is started and configured."""
        return self.resource_dir(resource) / ".started"

    @property
    def shm_dir(self) -> Path:
        """The tmpfs shared by the daemons and their clients (mounted at ``/dev/shm``)."""
        return Path(self.path, "shm")

    @property
    def ready_file(self) -> Path:
        """Present while every MPS daemon of the node is started."""
        return Path(self.path, ".ready")

    def control(self, resource: str, binary: str = CONTROL_BINARY,
                environ: Mapping[str, str] | None = None) -> MpsControl:
        """A :class:`MpsControl` for ``resource``'s daemon under this root."""
        return MpsControl(str(self.pipe_dir(resource)), str(self.log_dir(resource)), binary,
                          environ)


class MpsControl:
    """One control daemon, reached through ``nvidia-cuda-mps-control`` with its pipe/log env."""

    def __init__(self, pipe_dir: str, log_dir: str, binary: str = CONTROL_BINARY,
                 environ: Mapping[str, str] | None = None,
                 timeout: float = CONTROL_TIMEOUT_S) -> None:
        self.pipe_dir = pipe_dir
        self.log_dir = log_dir
        self.binary = binary
        self.timeout = timeout
        self._environ = dict(os.environ if environ is None else environ)

    @property
    def env(self) -> dict[str, str]:
        """The environment every invocation gets: ours plus the pipe and log directories."""
        return {**self._environ, PIPE_ENV: self.pipe_dir, LOG_ENV: self.log_dir}

    def _executable(self) -> str:
        found = shutil.which(self.binary, path=self._environ.get("PATH", os.defpath))
        if found is None:
            raise MpsError(f"{self.binary} not found on PATH")
        return found

    def _run(self, args: list[str], stdin: str, what: str) -> str:
        try:
            done = subprocess.run([self._executable(), *args], input=stdin, env=self.env,
                                  capture_output=True, text=True, timeout=self.timeout,
                                  check=False)
        except subprocess.TimeoutExpired:
            raise MpsError(f"{what}: {self.binary} did not answer within {self.timeout:g}s "
                           f"(pipe {self.pipe_dir})") from None
        except OSError as error:
            raise MpsError(f"{what}: cannot run {self.binary}: {error}") from None
        if done.returncode != 0:
            detail = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()
            raise MpsError(f"{what}: {self.binary} exited {done.returncode}: {detail[-1]} "
                           f"(pipe {self.pipe_dir})")
        return done.stdout

    def start_daemon(self) -> None:
        """``nvidia-cuda-mps-control -d``: start the control daemon in the background."""
        self._run(["-d"], "", "starting the MPS control daemon")

    def send(self, command: str) -> str:
        """Send one command on stdin (as NVIDIA does, without a newline); return its output."""
        return self._run([], command, command)

    def assert_healthy(self) -> None:
        """Raise MpsError unless the daemon answers (NVIDIA's readiness check)."""
        self.send(HEALTH_COMMAND)

    def quit(self) -> None:
        """Ask the control daemon to shut down (and its MPS servers with it)."""
        self.send("quit")


def replicas_per_gpu(resource: Resource) -> dict[str, int]:
    """Replicas of each GPU (by UUID) in ``resource``, in device order."""
    counts: dict[str, int] = {}
    for device in resource.devices:
        counts[device.gpu.uuid] = counts.get(device.gpu.uuid, 0) + 1
    return counts


def pinned_memory_limits(resource: Resource) -> dict[int, str]:
    """``set_default_device_pinned_mem_limit`` values per GPU index: total memory / replicas,
    in whole MiB with an ``M`` suffix (NVIDIA's format); GPUs reporting no memory are skipped."""
    counts = replicas_per_gpu(resource)
    limits: dict[int, str] = {}
    for device in resource.devices:
        gpu = device.gpu
        if gpu.index in limits or gpu.memory_bytes <= 0:
            continue
        limits[gpu.index] = f"{gpu.memory_bytes // counts[gpu.uuid] // MIB}M"
    return limits


def active_thread_percentage(resource: Resource) -> int | None:
    """``set_default_active_thread_percentage``: 100 / replicas per GPU (integer division, as
    NVIDIA computes it from devices / GPUs); None for a resource without devices."""
    counts = replicas_per_gpu(resource)
    if not counts:
        return None
    return 100 // (len(resource.devices) // len(counts))


@record
class Mount:
    """A host directory mounted into a client container (read-write, as NVIDIA's)."""

    host_path: str
    container_path: str


def client_env(resource: str) -> dict[str, str]:
    """The environment Allocate adds for an MPS resource: only the pipe directory, as seen in
    the container (``/mps/<resource>/pipe``); the limits are the daemon's defaults."""
    return {PIPE_ENV: str(MpsRoot(CONTAINER_ROOT).pipe_dir(resource))}


def client_mounts(resource: str, host_root: str) -> tuple[Mount, ...]:
    """The mounts Allocate adds for an MPS resource: the resource's pipe directory at the same
    place under ``/mps``, and the MPS shm at ``/dev/shm``. ``host_root`` is ``--mps-root``."""
    host, container = MpsRoot(host_root), MpsRoot(CONTAINER_ROOT)
    return (Mount(str(host.pipe_dir(resource)), str(container.pipe_dir(resource))),
            Mount(str(host.shm_dir), SHM_CONTAINER_PATH))
