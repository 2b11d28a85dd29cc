"""What Allocate adds besides the GPUs: GPUDirect Storage, MOFED, gdrcopy and IMEX channels.

As NVIDIA's plugin v0.20 (``internal/plugin/server.go``, ``internal/cdi``), per device-list
strategy:

- ``envvar`` / ``volume-mounts``: ``NVIDIA_GDS``, ``NVIDIA_MOFED``, ``NVIDIA_GDRCOPY`` =
  ``enabled`` for each enabled feature (the NVIDIA container runtime then injects the device
  nodes); with ``envvar`` also ``NVIDIA_IMEX_CHANNELS=<ids>`` for the channels present.
- ``cdi-annotations`` / ``cdi-cri``: the CDI names
  ``k8s.device-plugin.nvidia.com/imex-channel=<id>`` per channel and
  ``k8s.device-plugin.nvidia.com/<gds|mofed|gdrcopy>=all``, resolved by the extra
  specs :func:`extra_cdi_specs` describes (one per class; a class with no device node on the
  node gets no spec and no name, as NVIDIA skips "empty device edits").
- ``pass-device-specs``: a device spec per IMEX channel (NVIDIA) and, ours, per GDS / MOFED /
  gdrcopy node, so a runtime without NVIDIA's hook gets the nodes too.

Device nodes are looked up under the dev root (``--dev-root``, else ``--driver-root``):
``/dev/nvidia-fs*`` (GDS), everything in ``/dev/infiniband`` (MOFED), ``/dev/gdrdrv``
(gdrcopy), ``/dev/nvidia-caps-imex-channels/channel<N>`` (IMEX). With nothing enabled (the
default) nothing is looked up: Allocate stays a pure function of the request.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from collections.abc import Mapping
from typing import Any

from gpus.config import Config
from gpus.config.values import IMEX_ALL
from gpus.errors import InitError
from gpus.records import record

LOG = logging.getLogger(__name__)

CDI_VENDOR = "k8s.device-plugin.nvidia.com"
IMEX_CLASS = "imex-channel"
IMEX_DIR = "/dev/nvidia-caps-imex-channels"
IMEX_ENV = "NVIDIA_IMEX_CHANNELS"
_CHANNEL = re.compile(r"^channel(\d+)$")
ENABLED = "enabled"
EXTRA_CLASSES = (IMEX_CLASS, "gds", "mofed", "gdrcopy")


@record
class Feature:
    """One of NVIDIA's additional modes: its CDI class, env var and device nodes."""

    name: str  # CDI class and NVIDIA's mode name
    env: str
    directory: str  # where its nodes are
    pattern: re.Pattern[str]  # which names in ``directory``


FEATURES = (
    Feature("gds", "NVIDIA_GDS", "/dev", re.compile(r"^nvidia-fs\d*$")),
    Feature("mofed", "NVIDIA_MOFED", "/dev/infiniband", re.compile(r"^.+$")),
    Feature("gdrcopy", "NVIDIA_GDRCOPY", "/dev", re.compile(r"^gdrdrv$")),
)


@record
class Extras:
    """What one configuration adds to every allocation (container paths of device nodes)."""

    envs: Mapping[str, str]  # for non-CDI strategies
    imex_env: str  # NVIDIA_IMEX_CHANNELS's value ("" when no channel): envvar strategy only
    device_paths: tuple[str, ...]  # for pass-device-specs
    cdi_names: tuple[str, ...]  # qualified names, for CDI strategies

    @property
    def empty(self) -> bool:
        """True when nothing is added."""
        return not (self.envs or self.device_paths or self.cdi_names)


NOTHING = Extras({}, "", (), ())


def enabled_features(config: Config) -> tuple[Feature, ...]:
    """The features ``--gds-enabled`` / ``--mofed-enabled`` / ``--gdrcopy-enabled`` turn on."""
    flags = config.flags
    on = {"gds": flags.gds_enabled, "mofed": flags.mofed_enabled,
          "gdrcopy": flags.gdrcopy_enabled}
    return tuple(feature for feature in FEATURES if on[feature.name])


def _under(root: str, path: str) -> str:
    return os.path.join(root or "/", path.lstrip("/"))


def _names_in(root: str, directory: str, pattern: re.Pattern[str]) -> list[str]:
    """Container paths of the entries of ``directory`` (under ``root``) matching ``pattern``,
    sorted (numbers in order: channel2 before channel10)."""
    try:
        names = os.listdir(_under(root, directory))
    except OSError:
        return []
    found = [name for name in names if pattern.match(name)]
    return [f"{directory}/{name}" for name in sorted(found, key=_natural)]


def _natural(name: str) -> tuple[str, int]:
    match = re.match(r"^(.*?)(\d+)$", name)
    return (match.group(1), int(match.group(2))) if match else (name, -1)


def feature_nodes(feature: Feature, dev_root: str) -> list[str]:
    """Container paths of ``feature``'s device nodes present under ``dev_root``."""
    return _names_in(dev_root, feature.directory, feature.pattern)


def imex_channels(config: Config, *, fatal: bool = True) -> tuple[str, ...]:
    """The configured IMEX channel IDs present under the dev root (``all``: every one there).

    When ``--imex-required`` is set and a configured channel is not there (or, with ``all``,
    none is): InitError naming what is missing, or with ``fatal`` False (allocations, after the
    start-up check passed) an error log line, and the channels that are there are still given.
    """
    wanted = config.imex.channel_ids
    if not wanted:
        return ()
    dev_root = config.flags.dev_root
    present = list(dict.fromkeys(str(int(path.rsplit("channel", 1)[1]))
                                 for path in _names_in(dev_root, IMEX_DIR, _CHANNEL)))
    if wanted == (IMEX_ALL,):
        found = tuple(present)
        missing = [] if found else [f"any channel in {_under(dev_root, IMEX_DIR)}"]
    else:
        found = tuple(i for i in wanted if i in present)
        missing = [_under(dev_root, f"{IMEX_DIR}/channel{i}") for i in wanted if i not in present]
    if missing and config.imex.required:
        message = (f"IMEX channel required (--imex-required) but not found: "
                   f"{', '.join(missing)}")
        if fatal:
            raise InitError(message)
        # A channel that vanished since start-up: only it is left out, not those still there.
        LOG.error("%s", message)
    elif missing:
        LOG.warning("IMEX channels not found, not added to allocations: %s", ", ".join(missing))
    return found


def check_imex(config: Config) -> None:
    """Start-up check: InitError when ``--imex-required`` and a channel is missing."""
    imex_channels(config)


def wants_extras(config: Config) -> bool:
    """True when any extra is configured (Allocate's fast path: False by default)."""
    flags = config.flags
    return bool(flags.gds_enabled or flags.mofed_enabled or flags.gdrcopy_enabled
                or config.imex.channel_ids)


def compute_extras(config: Config) -> Extras:
    """What ``config`` adds to every allocation, from the devices present now."""
    if not wants_extras(config):
        return NOTHING
    features = enabled_features(config)
    dev_root = config.flags.dev_root
    channels = imex_channels(config, fatal=False)  # checked at start (check_imex)
    paths = [f"{IMEX_DIR}/channel{i}" for i in channels]
    names = [f"{CDI_VENDOR}/{IMEX_CLASS}={i}" for i in channels]
    for feature in features:
        nodes = feature_nodes(feature, dev_root)
        paths += nodes
        if nodes:  # no nodes: no spec for the class, so no name
            names.append(f"{CDI_VENDOR}/{feature.name}=all")
    return Extras(envs={feature.env: ENABLED for feature in features},
                  imex_env=",".join(channels), device_paths=tuple(paths),
                  cdi_names=tuple(names))


# --- the extra CDI specs -------------------------------------------------------------------------


def _node_entry(path: str, dev_root: str) -> dict[str, Any]:
    """A CDI deviceNode for ``path``: numbers and mode from the node when it is a character
    device (as nvcdi writes them; a plain stand-in file in a simulated root has none)."""
    host = _under(dev_root, path)
    entry: dict[str, Any] = {"path": path, "hostPath": host}
    try:
        info = os.stat(host)
    except OSError:
        return entry
    if stat.S_ISCHR(info.st_mode):
        entry.update({"type": "c", "major": os.major(info.st_rdev),
                      "minor": os.minor(info.st_rdev),
                      "fileMode": stat.S_IMODE(info.st_mode)})
        entry = {k: v for k, v in entry.items() if v != 0}
    entry["permissions"] = "rwm"
    return entry


def extra_cdi_specs(config: Config) -> dict[str, dict[str, Any]]:
    """The CDI specs of the extra classes, by class (``imex-channel``, ``gds``, ...): only
    classes with device nodes present, each device carrying its nodes. ``cdiVersion`` is
    left for the writer to compute."""
    dev_root = config.flags.dev_root
    specs: dict[str, dict[str, Any]] = {}
    channels = imex_channels(config, fatal=False)
    if channels:
        specs[IMEX_CLASS] = {"kind": f"{CDI_VENDOR}/{IMEX_CLASS}", "devices": [
            {"name": i, "containerEdits": {"deviceNodes": [
                _node_entry(f"{IMEX_DIR}/channel{i}", dev_root)]}} for i in channels]}
    for feature in enabled_features(config):
        nodes = feature_nodes(feature, dev_root)
        if nodes:
            specs[feature.name] = {"kind": f"{CDI_VENDOR}/{feature.name}", "devices": [
                {"name": "all", "containerEdits": {
                    "deviceNodes": [_node_entry(path, dev_root) for path in nodes]}}]}
    return specs
