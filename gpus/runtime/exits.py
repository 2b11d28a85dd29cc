"""Exit codes, the same in every daemon, and which error of the tree maps to which.

- ``EXIT_OK`` (0): stopped by a signal, or a oneshot run that succeeded;
- ``EXIT_FAILURE`` (1): a runtime failure a restart might fix (NVML, the API server, a
  socket directory...), including initialisation with ``--fail-on-init-error``;
- ``EXIT_USAGE`` (2): bad usage or configuration (flags, env vars, config file, ``--nvml``
  spec or profile); a restart would not fix it. argparse exits 2 on unknown flags too.
"""

from __future__ import annotations

from gpus.errors import ConfigError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


def exit_code(error: BaseException) -> int:
    """The exit code an error ends a daemon with: 2 for configuration errors, else 1."""
    return EXIT_USAGE if isinstance(error, ConfigError) else EXIT_FAILURE
