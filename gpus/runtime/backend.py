"""The NVML backend's lifecycle in a daemon: install the one ``--nvml`` names, swap it when a
reload names another, uninstall a fake on the way out.

Selection itself is :func:`gpus.backend.select_backend`; this adds the daemon's environment (the
one its configuration was resolved from, never ``os.environ`` behind its back), one error type
per outcome and the swap. Importing this module imports no NVML code.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from gpus.backend import BackendError, effective_config, select_backend
from gpus.errors import ConfigError, InitError, NvkError

if TYPE_CHECKING:
    from gpus.config import Config
    from gpus.fake import FakeNvml


class BackendSpecError(InitError, ConfigError):
    """``--nvml`` names a backend that cannot be used as given (bad form, unknown or invalid
    profile, a fake refused on a GPU node): the daemon cannot start, and a restart would not
    help, so it is a usage error (exit 2) whatever ``--fail-on-init-error`` says."""

    summary = "error"


class NvmlBackend:
    """The installed backend; :attr:`controller` is the fake's controller, or None for real."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        """``environ``: the daemon's environment (None: the process environment)."""
        self._environ = environ
        self.spec: str | None = None
        self.controller: FakeNvml | None = None

    def select(self, spec: str, sysfs_root: str = "/") -> FakeNvml | None:
        """Install ``spec`` unless it is already installed; returns the fake's controller.

        Raises BackendSpecError for a spec that cannot be used, InitError when a valid fake
        cannot be set up (control socket, sysfs tree). The previous backend is uninstalled
        first; after an error none is installed.
        """
        if spec == self.spec:
            return self.controller
        self.close()
        try:
            self.controller = select_backend(spec, environ=self._environ, sysfs_root=sysfs_root)
        except BackendError as err:
            raise BackendSpecError(f"invalid --nvml {spec!r}: {err.reason}") from err
        except NvkError as err:  # BackendSetupError: the control socket or sysfs tree
            raise InitError(f"--nvml {spec!r}: {err}") from err
        self.spec = spec
        return self.controller

    def effective(self, config: Config) -> Config:
        """``config`` reading sysfs where a fake backend wrote its profile's files."""
        return effective_config(config, self.controller)

    def close(self) -> None:
        """Uninstall a fake backend, if one is installed."""
        if self.controller is not None:
            self.controller.uninstall()
        self.controller = None
        self.spec = None
