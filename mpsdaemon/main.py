"""``mps-control-daemon``: NVIDIA's MPS control daemon's command line.

``mps-control-daemon [flags]`` reads the device plugin's configuration (the same file, flags
and variables: ``--config-file``/``CONFIG_FILE``, ``--mps-root``/``MPS_ROOT``,
``--nvml``/``NVML_BACKEND``, ``--log-level``/``DP_LOG_LEVEL``, the rest from the environment and
the file), reads the GPUs through NVML, builds the resource map as the plugin does and runs one
MPS control daemon per MPS-shared resource (:class:`mpsdaemon.manager.MpsManager`) under the
MPS root as this process sees it (``/mps`` in NVIDIA's pod, else ``--mps-root``). SIGTERM or
SIGINT stops them: ``quit`` to each, compute mode back to DEFAULT, markers removed. SIGHUP is
ignored (logged): the daemons keep running; restart the pod for a new configuration, as
NVIDIA's.

``mps-control-daemon mount-shm [flags]`` is NVIDIA's init step: a tmpfs at ``<root>/shm``.

Exit status (gpus.runtime.exits): 0 after a signal or a successful ``mount-shm``; 1 when NVML,
the mount or a clean stop fails; 2 for invalid flags or configuration (including MPS not
configured as the plugin accepts it: no ``--mps-root``, ``--mig-strategy mixed``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from gpus import config as configmod
from gpus.config import Config
from gpus.errors import InitError
from gpus.mps import MpsError, MpsRoot, local_root
from gpus.runtime import EXIT_OK, NvmlBackend, Signals, run_daemon, setup_logging
from gpus.runtime.version import add_version_flag

if TYPE_CHECKING:  # importing it loads pynvml: only once a backend is chosen
    from gpus.nvml import Nvml

log = logging.getLogger("mpsdaemon")

PROG = "mps-control-daemon"
MOUNT_SHM = "mount-shm"
# The plugin's rows this command takes as flags; every other setting comes from env and file.
FLAG_ROWS = ("config_file", "mps_root", "nvml", "log_level")


def build_parser() -> argparse.ArgumentParser:
    """The flags (rows of the configuration table) and the ``mount-shm`` subcommand."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("command", nargs="?", choices=(MOUNT_SHM,),
                        help=f"{MOUNT_SHM}: mount a tmpfs at <mps root>/shm and exit")
    configmod.add_flags(parser, "plugin", only=FLAG_ROWS)
    add_version_flag(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run until SIGTERM/SIGINT (or mount the shm); see the module docstring for statuses."""
    args = build_parser().parse_args(argv)
    environ = dict(os.environ)
    return run_daemon(PROG, lambda: _run(args, environ))


def _run(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    config = configmod.resolve(args, environ)
    undo_logging = setup_logging(config.daemon.log_level)
    try:
        root = MpsRoot(local_root(config.flags.mps_root))
        if args.command == MOUNT_SHM:
            return mount(root)
        signals = Signals().install()
        try:
            return run_with_backend(config, environ, root, signals)
        finally:
            signals.restore()
    finally:
        undo_logging()


def mount(root: MpsRoot) -> int:
    """NVIDIA's ``mount-shm``; InitError when the mount fails."""
    from mpsdaemon.shm import MountError, mount_shm

    try:
        mount_shm(root.path)
    except MountError as error:
        raise InitError(f"cannot mount the MPS shm at {root.shm_dir}: {error}") from error
    return EXIT_OK


def run_with_backend(config: Config, environ: Mapping[str, str], root: MpsRoot,
                     signals: Signals) -> int:
    """Install ``--nvml``'s backend, open NVML and :func:`serve` until a stop is requested."""
    from gpus.nvml import Nvml, NvmlError

    backend = NvmlBackend(environ)
    backend.select(config.flags.nvml, sysfs_root=config.flags.sysfs_root)
    try:
        config = backend.effective(config)
        nvml = Nvml()
        try:
            nvml.init()
        except NvmlError as error:
            raise InitError(f"failed to initialise NVML: {error}") from error
        try:
            return serve(config, environ, root, signals, nvml)
        finally:
            nvml.shutdown()
    finally:
        backend.close()


def serve(config: Config, environ: Mapping[str, str], root: MpsRoot, signals: Signals,
          nvml: Nvml) -> int:
    """Build the MPS resources from ``nvml``'s snapshot, run their daemons until
    ``signals`` asks to stop, then stop them (compute mode DEFAULT, markers removed).

    ``nvml`` is an open NVML session (the caller's backend: tests share their fake).
    Raises InitError when the GPUs cannot be read or a daemon cannot be stopped cleanly.
    """
    from gpus.nvml import NvmlError
    from gpus.resources import build_resource_map
    from mpsdaemon.manager import MpsManager, mps_resources

    try:
        snapshot = nvml.read_snapshot(config.flags.sysfs_root)
    except NvmlError as error:
        raise InitError(f"failed to enumerate GPUs: {error}") from error
    resource_map = build_resource_map(snapshot, config)
    for problem in resource_map.problems:
        log.error("resource map: %s", problem)
    manager = MpsManager(mps_resources(resource_map), root, nvml, environ=environ)
    log.info("starting MPS control daemons for %s under %s",
             ", ".join(d.name for d in manager.daemons) or "no resource", root.path)
    manager.start()
    try:
        while signals.wait() == "reload":
            log.info("SIGHUP ignored: the MPS daemons keep running; restart to reconfigure")
        log.info("stopping the MPS control daemons")
    finally:
        try:
            manager.stop()
        except MpsError as error:
            raise InitError(f"stopping the MPS control daemons: {error}") from error
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
