"""Checks across settings, made once flags and variables are applied (they may come from any
source): what the device plugin refuses to start with, as NVIDIA's ``validateFlags`` does."""

from __future__ import annotations

from .enums import MigStrategy, SharingStrategy
from .errors import ConfigError
from .model import Config

_MPS_PATH = "sharing.mps"


def _mps_error(config: Config, reason: str) -> ConfigError:
    where = config.where(_MPS_PATH)
    return ConfigError(f"{where}: {_MPS_PATH}: {reason}" if where else f"{_MPS_PATH}: {reason}")


def check_plugin(config: Config) -> None:
    """Raise ConfigError when the device plugin cannot run ``config``.

    MPS sharing is refused with ``--mig-strategy mixed`` and without ``--mps-root``, as NVIDIA's
    plugin refuses them at start; the message names the file and line of ``sharing.mps``.
    """
    if config.sharing.strategy is not SharingStrategy.MPS:
        return
    if config.flags.mig_strategy == MigStrategy.MIXED:
        raise _mps_error(config, "MPS sharing is not supported with --mig-strategy mixed "
                         "(MIG devices cannot be shared with MPS; use none or single)")
    if not config.flags.mps_root:
        raise _mps_error(config, "MPS sharing needs --mps-root (env MPS_ROOT, file "
                         "flags.mpsRoot): the host directory shared with the MPS control "
                         "daemon, /run/nvidia/mps in NVIDIA's Helm chart")
