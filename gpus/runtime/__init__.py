"""The runtime every daemon shares (device plugin, GFD, and the daemons to come).

- :mod:`~gpus.runtime.signals`: SIGHUP reloads, SIGTERM/SIGINT stop, an interruptible wait;
- :mod:`~gpus.runtime.logs`: one logging set-up, the level on the root logger;
- :mod:`~gpus.runtime.backend`: the NVML backend's selection and lifecycle;
- :mod:`~gpus.runtime.statefile`: the files probes read (readiness, status, health);
- :mod:`~gpus.runtime.exits` and :mod:`~gpus.runtime.entry`: exit codes, and ``run_daemon``,
  which turns the error tree (:mod:`gpus.errors`) into them with one stderr line.
- :mod:`~gpus.runtime.heap`: glibc's malloc thresholds fixed, for a daemon that receives
  requests of hundreds of KiB (the device plugin).

A daemon's ``main`` is then: parse flags, ``resolve`` the configuration (gpus.config, which
holds the daemon's own options too), ``setup_logging``, and run its body through
``run_daemon`` with ``Signals`` installed. Nothing here imports NVML, the fake or a daemon.
"""

from .backend import BackendSpecError, NvmlBackend
from .entry import error_line, run_daemon
from .exits import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, exit_code
from .logs import LEVELS, setup_logging
from .signals import Signals
from .statefile import StateFile, write_atomically

__all__ = [
    "EXIT_FAILURE",
    "EXIT_OK",
    "EXIT_USAGE",
    "LEVELS",
    "BackendSpecError",
    "NvmlBackend",
    "Signals",
    "StateFile",
    "error_line",
    "exit_code",
    "run_daemon",
    "setup_logging",
    "write_atomically",
]
