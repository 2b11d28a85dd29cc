"""The plugin's view of the GPUs: the NVML backend, one NVML session kept open while serving
(the health monitor waits on its events), snapshots read through it, and the CDI spec written
from them. Every failure is an :class:`~gpus.errors.InitError` with one clear line.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

from deviceplugin.allocate import cdi_enabled
from gpus.config import Config
from gpus.errors import InitError, NvmlError
from gpus.model import Snapshot
from gpus.nvml import Nvml
from gpus.resources import ResourceMap
from gpus.runtime import NvmlBackend

if TYPE_CHECKING:  # the fake is imported only when --nvml names it
    from gpus.fake import FakeNvml

log = logging.getLogger(__name__)


class NvmlSession:
    """The backend ``--nvml`` names (kept across stops) and the open NVML session, if any."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        """``environ``: the daemon's environment (the backend's GPU-node check reads it)."""
        self.backend = NvmlBackend(environ)
        self.nvml: Nvml | None = None

    @property
    def controller(self) -> FakeNvml | None:
        """The fake backend's controller, or None for real NVML."""
        return self.backend.controller

    def select(self, config: Config) -> Config:
        """Install ``config``'s backend (once); ``config`` as the fake's sysfs makes it.

        Raises BackendSpecError (a usage error) or InitError.
        """
        self.backend.select(config.flags.nvml, sysfs_root=config.flags.sysfs_root)
        # A fake's profile answers sysfs too (PCI class, NUMA): read where it wrote them.
        return self.backend.effective(config)

    def open(self) -> Nvml:
        """Initialise NVML; InitError when it cannot start."""
        nvml = Nvml()
        try:
            nvml.init()
        except NvmlError as err:
            raise InitError(f"failed to initialise NVML: {err}") from err
        self.nvml = nvml
        return nvml

    def read_snapshot(self, sysfs_root: str) -> Snapshot:
        """Enumerate the GPUs; InitError when NVML is closed or fails.

        ``Snapshot.vgpu`` is not read (None): only GFD's labels use it.
        """
        if self.nvml is None:
            raise InitError("NVML is not initialised")
        try:
            snapshot: Snapshot = self.nvml.read_snapshot(sysfs_root, vgpu=False)
        except NvmlError as err:
            raise InitError(f"failed to enumerate GPUs: {err}") from err
        return snapshot

    def close(self) -> None:
        """Shut NVML down (the backend stays installed)."""
        if self.nvml is None:
            return
        try:
            self.nvml.shutdown()
        except NvmlError as err:  # shutting down anyway; say why it was untidy
            log.warning("NVML shutdown failed: %s", err)
        self.nvml = None

    def uninstall(self) -> None:
        """Close, and remove a fake backend."""
        self.close()
        self.backend.close()


def write_cdi(resource_map: ResourceMap, config: Config, driver_version: str | None = None,
              *, allow_plain_device_files: bool = False) -> tuple[str, ...]:
    """In CDI mode, discover the driver (as NVIDIA's plugin, under ``--driver-root-ctr-path``)
    and write the CDI spec; returns its problems (MIG devices left out of it). InitError when
    the driver cannot be found (NVIDIA refuses to start then) or the spec cannot be written.
    Without a CDI strategy nothing is read or written.

    ``allow_plain_device_files``: accept regular files as device nodes (a fake backend's
    simulated driver root, where mknod is not possible); never with real NVML.
    """
    if not cdi_enabled(config):
        return ()
    # Imported only in CDI mode: the spec writer and driver discovery are ~4 ms and ~0.3 MiB
    # (-X importtime, best of 10, 2-CPU machine; tracemalloc) that other strategies never use.
    from deviceplugin.cdi import CdiError, CdiOptions, discover_for_cdi, write_cdi_spec
    from gpus.driver.discover import DriverError

    options = CdiOptions.from_config(config)
    problems: list[str] = []
    try:
        driver = discover_for_cdi(config, options, driver_version,
                                  allow_plain_device_files=allow_plain_device_files)
        write_cdi_spec(resource_map, config, problems=problems, driver=driver, options=options)
    except (CdiError, DriverError) as err:
        raise InitError(str(err)) from err
    return tuple(problems)


def remove_cdi(config: Config) -> None:
    """On a clean stop, remove the CDI specs we wrote (CDI mode only)."""
    if cdi_enabled(config):
        from deviceplugin.cdi import remove_cdi_spec  # CDI mode only: see write_cdi

        remove_cdi_spec(config)
