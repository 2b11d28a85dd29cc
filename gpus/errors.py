"""The project's error tree: every error we raise on purpose is an :class:`NvkError`.

A daemon's entry point (:func:`gpus.runtime.run_daemon`) turns the tree into exit codes, so
every daemon means the same by them (:mod:`gpus.runtime.exits`)::

    NvkError                          anything we raise on purpose
    +-- ConfigError (ValueError)      bad flags, env vars or config file          exit 2
    |   +-- BackendError              gpus.backend: bad --nvml spec or profile,   exit 2
    |                                 or a fake refused on a GPU node
    +-- InitError (RuntimeError)      a daemon cannot start (the message is the   exit 1
    |                                 one line the user sees)
    +-- NvmlError                     gpus.nvml: an NVML call failed (names the   exit 1
    |                                 call and NVML's error name)
    +-- BackendSetupError (ValueError) gpus.backend: a valid fake backend could   exit 1
    |                                 not be set up (control socket, sysfs tree)
    +-- DriverError                   the driver installation (driver root,       exit 1
    |                                 libraries, device nodes, CDI spec) is unusable
    +-- KubeletError                  deviceplugin.kubelet: registration failed   (retried)
    +-- ApiServerError                gfd.nodepatch: the API server refused or    exit 1
                                      could not be reached, or the client could
                                      not be configured

The classes live here so that a module can raise a category without importing the module of
another (``gpus`` imports no daemon); modules subclass them where they add detail
(``gpus.nvml.NvmlError`` carries the NVML call and code). ``ConfigError`` stays a
``ValueError`` and ``InitError`` a ``RuntimeError`` for callers that catch those.

This module imports nothing: it is on every daemon's start path.
"""

from __future__ import annotations


class NvkError(Exception):
    """Root of every error this project raises on purpose; its message is one line.

    ``summary`` is what the entry point's stderr line says before the message
    (``<prog>: <summary>: <message>``); empty: the message alone.
    """

    summary = ""


class ConfigError(NvkError, ValueError):
    """A configuration that cannot be used: a flag, environment variable or config-file value
    (the message names the source, field and reason). Raised by ``gpus.config`` on start and
    on reload (which keeps the running configuration); a restart cannot fix it: exit 2."""

    summary = "error"


class InitError(NvkError, RuntimeError):
    """A daemon cannot start: NVML does not initialise, no resource can be served, the socket
    directory is unusable. Raised by the daemons' start-up; the message is the one line the
    user sees. Exit 1, or an idle daemon with ``--fail-on-init-error=false``."""

    summary = "initialisation failed"


class NvmlError(NvkError):
    """An NVML call failed. ``gpus.nvml.NvmlError`` is the concrete class (call, code, name)."""


class BackendSetupError(NvkError, ValueError):
    """A valid fake NVML backend could not be set up: its control socket or its sysfs tree
    cannot be written (raised by ``gpus.backend.select_backend``). A runtime failure: exit 1."""


class DriverError(NvkError):
    """The NVIDIA driver installation cannot be used as found: the driver root, its libraries
    and binaries, its device nodes, or the CDI spec written from them (driver discovery)."""


class KubeletError(NvkError):
    """The kubelet refused or did not answer (``deviceplugin.kubelet.RegistrationError``).
    The registration watch retries with backoff; it never ends a daemon by itself."""


class ApiServerError(NvkError):
    """The Kubernetes API server refused a request or could not be reached, or the client
    could not be configured (``gfd.nodepatch``: NodeApiError, KubeConfigError)."""
