"""One MPS control daemon: the steps NVIDIA's mps-control-daemon takes for one resource."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from gpus.mps import (
    CONTROL_BINARY,
    MpsControl,
    MpsError,
    MpsRoot,
    active_thread_percentage,
    pinned_memory_limits,
)
from gpus.nvml import COMPUTE_MODE_DEFAULT, COMPUTE_MODE_EXCLUSIVE_PROCESS, NvmlError
from gpus.resources import Resource

log = logging.getLogger(__name__)


class ComputeModes(Protocol):
    """What the daemon needs of NVML (``gpus.nvml.Nvml`` is one)."""

    def set_compute_mode(self, uuid: str, mode: int) -> None: ...


class MpsDaemon:
    """The MPS control daemon of one shared resource.

    :meth:`start` leaves it either fully configured (``.started`` present) or undone; :meth:`stop`
    undoes it whatever state it is in, so a dead daemon is cleaned up before a restart.
    """

    def __init__(self, resource: Resource, root: MpsRoot, nvml: ComputeModes,
                 binary: str = CONTROL_BINARY, environ: Mapping[str, str] | None = None) -> None:
        if not resource.devices:
            raise ValueError(f"{resource.name}: no devices to share")
        self.resource = resource
        self.root = root
        self.nvml = nvml
        self.control: MpsControl = root.control(resource.name, binary, environ)
        # GPU UUIDs in device order, once each: the GPUs this daemon owns.
        self.gpus = tuple(dict.fromkeys(device.gpu.uuid for device in resource.devices))

    @property
    def name(self) -> str:
        """The resource this daemon serves (``nvidia.com/gpu``)."""
        return self.resource.name

    @property
    def log_file(self) -> Path:
        """The control daemon's log, followed into ours."""
        return self.root.log_dir(self.name) / "control.log"

    def start(self) -> None:
        """Configure and start; on any failure undo what was done and raise MpsError."""
        log.info("%s: starting the MPS control daemon for %d GPUs", self.name, len(self.gpus))
        try:
            self._set_compute_mode(COMPUTE_MODE_EXCLUSIVE_PROCESS, "EXCLUSIVE_PROCESS")
            for directory in (self.root.pipe_dir(self.name), self.root.log_dir(self.name)):
                directory.mkdir(mode=0o755, parents=True, exist_ok=True)
            self.control.start_daemon()
            for index, limit in pinned_memory_limits(self.resource).items():
                self.control.send(f"set_default_device_pinned_mem_limit {index} {limit}")
            percentage = active_thread_percentage(self.resource)
            if percentage is not None:
                self.control.send(f"set_default_active_thread_percentage {percentage}")
            self.root.started_file(self.name).touch()
        except (MpsError, OSError) as error:
            self._undo(error)
            raise MpsError(f"{self.name}: {error}") from error
        log.info("%s: MPS control daemon started (pipe %s)", self.name, self.control.pipe_dir)

    def _undo(self, error: Exception) -> None:
        log.error("%s: MPS start failed, undoing it: %s", self.name, error)
        try:
            self.stop()
        except MpsError as undo_error:
            log.error("%s: undoing the failed start: %s", self.name, undo_error)

    def healthy(self) -> None:
        """Raise MpsError unless the control daemon answers."""
        self.control.assert_healthy()

    def stop(self) -> None:
        """Quit the control daemon, restore compute mode DEFAULT, remove ``.started`` and the
        log directory. Every step is tried; the failures are raised together as MpsError."""
        problems: list[str] = []
        self.root.started_file(self.name).unlink(missing_ok=True)
        try:
            self.control.quit()
        except MpsError as error:  # already dead, or never started: nothing to quit
            log.info("%s: quit: %s", self.name, error)
        try:
            self._set_compute_mode(COMPUTE_MODE_DEFAULT, "DEFAULT")
        except MpsError as error:
            problems.append(str(error))
        log_dir = self.root.log_dir(self.name)
        if os.path.isdir(log_dir):
            shutil.rmtree(log_dir, ignore_errors=True)
        if problems:
            raise MpsError(f"{self.name}: stopping: {'; '.join(problems)}")
        log.info("%s: MPS control daemon stopped", self.name)

    def _set_compute_mode(self, mode: int, mode_name: str) -> None:
        failed: list[str] = []
        for uuid in self.gpus:
            try:
                self.nvml.set_compute_mode(uuid, mode)
            except NvmlError as error:
                failed.append(f"{uuid}: {error}")
        if failed:
            raise MpsError(f"setting compute mode {mode_name}: {'; '.join(failed)}")
