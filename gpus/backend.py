"""Which NVML the daemons talk to: the real driver, or the fake beneath pynvml.

Spec forms (flag ``--nvml``, env ``NVML_BACKEND``):

- ``real``: pynvml loads ``libnvidia-ml.so.1`` (the default);
- ``fake:<profile>``: a shipped profile name (``fake:dgx-a100``) or a YAML path
  (``fake:/etc/profiles/node.yaml``);
- ``fake:<profile>?control=<socket>``: also serve the fault-injection control socket
  (``fake-nvml inject --control <socket> ...``).

The fake must never stand in for real GPUs by accident: inside a Kubernetes pod
(``KUBERNETES_SERVICE_HOST`` set) a fake backend is refused when the host's sysfs shows an NVIDIA
display or 3D controller, unless ``ALLOW_FAKE_NVML_ON_GPU_NODE=true``. Outside a cluster (a
developer's laptop with an NVIDIA GPU running ``make run``) the fake is always allowed.

The reader takes each GPU's PCI class and NUMA node from sysfs. A fake backend writes its
profile's sysfs files (into ``--sysfs-root`` when that is not ``/``, else into a private scratch
directory) and :func:`effective_config` points the reader there, so a simulated node reports the
profile's values rather than whatever the host's ``/sys`` holds at those bus ids.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qs

from gpus.errors import BackendSetupError, ConfigError

if TYPE_CHECKING:
    from gpus.config import Config
    from gpus.fake import FakeNvml

log = logging.getLogger(__name__)

ENV_VAR = "NVML_BACKEND"
ALLOW_ON_GPU_NODE_ENV = "ALLOW_FAKE_NVML_ON_GPU_NODE"
NVIDIA_PCI_VENDOR = "0x10de"
PCI_DISPLAY_CLASS_PREFIX = "0x03"  # VGA (0x0300xx) and 3D controllers (0x0302xx)
DEFAULT_BACKEND = "real"
QUERY_KEYS = ("control",)
USAGE = "expected 'real' or 'fake:<profile name or path to a .yaml>[?control=<socket path>]'"


class BackendError(ConfigError):
    """The ``--nvml`` spec itself is wrong: a bad form, an unknown or invalid profile, or a fake
    refused on a GPU node. A restart cannot fix it, so both daemons exit 2 (usage) on it,
    whatever ``--fail-on-init-error`` says.

    ``spec`` is the spec and ``reason`` what is wrong with it, for callers that name the spec
    their own way (``invalid --nvml 'x': <reason>``); the message names both.
    """

    def __init__(self, spec: str, reason: str, message: str | None = None) -> None:
        super().__init__(message or f"NVML backend {spec!r}: {reason}")
        self.spec = spec
        self.reason = reason


def backend_from_env(environ: Mapping[str, str] | None = None) -> str:
    """The spec in ``NVML_BACKEND`` of ``environ`` (the process environment when None), or
    ``real``. The daemons resolve ``--nvml`` through gpus.config instead; this is for tools."""
    env = os.environ if environ is None else environ
    return env.get(ENV_VAR, "").strip() or DEFAULT_BACKEND


def parse_backend(spec: str) -> tuple[str, str | None] | None:
    """Validate a spec without installing anything: None for real, else (profile, control).

    Raises BackendError naming the allowed forms.
    """
    text = spec.strip() if isinstance(spec, str) else ""
    if text == "real":
        return None
    if not text.startswith("fake:"):
        raise BackendError(spec, f"unknown backend: {USAGE}",
                           f"unknown NVML backend {spec!r}: {USAGE}")
    target, _, query = text[len("fake:") :].partition("?")
    if not target:
        raise BackendError(spec, f"names no profile: {USAGE}",
                           f"NVML backend {spec!r} names no profile: {USAGE}")
    try:
        params = parse_qs(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError as exc:
        raise BackendError(spec, f"bad query {query!r}: {USAGE}") from exc
    unknown = sorted(set(params) - set(QUERY_KEYS))
    if unknown:
        raise BackendError(spec, f"unknown option {unknown[0]!r} (allowed: control)")
    control = params.get("control", [""])[-1] or None
    if "control" in params and control is None:
        raise BackendError(spec, "control= needs a socket path")
    return target, control


def nvidia_gpus_in_sysfs(sysfs_root: str = "/") -> list[str]:
    """PCI addresses of NVIDIA display/3D controllers under ``<sysfs_root>/sys/bus/pci``."""
    devices = os.path.join(sysfs_root, "sys", "bus", "pci", "devices")
    try:
        entries = sorted(os.listdir(devices))
    except OSError:
        return []
    return [entry for entry in entries if _is_nvidia_gpu(os.path.join(devices, entry))]


def _is_nvidia_gpu(device_dir: str) -> bool:
    try:
        with open(os.path.join(device_dir, "vendor")) as vendor_file:
            vendor = vendor_file.read().strip().lower()
        with open(os.path.join(device_dir, "class")) as class_file:
            pci_class = class_file.read().strip().lower()
    except OSError:
        return False
    return vendor == NVIDIA_PCI_VENDOR and pci_class.startswith(PCI_DISPLAY_CLASS_PREFIX)


def check_fake_allowed(
    spec: str, environ: Mapping[str, str] | None = None, host_sysfs: str = "/"
) -> None:
    """Raise BackendError if a fake backend would stand in for real GPUs on a cluster node."""
    env = os.environ if environ is None else environ
    if not env.get("KUBERNETES_SERVICE_HOST"):
        return
    if env.get(ALLOW_ON_GPU_NODE_ENV, "").strip().lower() in ("1", "true", "yes"):
        return
    gpus = nvidia_gpus_in_sysfs(host_sysfs)
    if gpus:
        reason = (f"refused: this node has NVIDIA GPUs ({', '.join(gpus[:4])}"
                  f"{', ...' if len(gpus) > 4 else ''}); the simulated backend must not stand "
                  f"in for them (set {ALLOW_ON_GPU_NODE_ENV}=true to override)")
        raise BackendError(spec, reason, f"NVML backend {spec!r} {reason}")


def select_backend(
    spec: str,
    *,
    environ: Mapping[str, str] | None = None,
    host_sysfs: str = "/",
    sysfs_root: str = "/",
) -> FakeNvml | None:
    """Install the backend ``spec`` names: None for real, else the installed fake's controller.

    Bad specs, unknown or invalid profiles and a fake on a real GPU node in a cluster (checked in
    ``host_sysfs``; see the module docstring) raise BackendError (a ConfigError); a control
    socket or sysfs tree that cannot be written raises BackendSetupError. Nothing is installed
    after either. ``environ`` is the daemon's environment (the one its configuration was
    resolved from); None means the process environment, for callers outside a daemon. For a
    fake, a
    ``sysfs_root`` other than "/" receives the profile's sysfs files.
    """
    parsed = parse_backend(spec)
    if parsed is None:
        log.info("NVML backend: real driver (libnvidia-ml.so.1)")
        return None
    check_fake_allowed(spec, environ, host_sysfs)
    profile, control = parsed
    # Imported here so real GPU nodes never load (or pay start-up time for) the simulator:
    # ~25 ms and its PyYAML (-X importtime, 2-CPU machine).
    from gpus.fake import ProfileError, install

    try:
        fake = install(profile, control_socket=control)
    except ProfileError as exc:
        raise BackendError(spec, str(exc)) from exc
    except OSError as exc:
        raise BackendSetupError(
            f"NVML backend {spec!r}: cannot serve control socket: {exc}") from exc
    log.info(
        "NVML backend: fake, profile %s%s",
        fake.profile.name,
        f", control socket {control}" if control else "",
    )
    _prepare_sysfs(fake, sysfs_root)
    return fake


def _prepare_sysfs(fake: FakeNvml, sysfs_root: str) -> None:
    try:
        if os.path.realpath(sysfs_root) == "/":
            # Never write into the host's /sys: a private scratch tree instead, which the
            # daemons read through effective_config().
            fake.use_scratch_sysfs()
        else:
            fake.write_sysfs(Path(sysfs_root))
    except OSError as exc:
        fake.uninstall()
        raise BackendSetupError(
            f"cannot write the fake sysfs tree under {sysfs_root!r}: {exc}") from exc


def effective_config(config: Config, fake: FakeNvml | None) -> Config:
    """``config`` with ``sysfs_root`` pointing at the fake's sysfs files, if it wrote any."""
    if fake is None or fake.sysfs_root is None or fake.sysfs_root == config.flags.sysfs_root:
        return config
    flags = dataclasses.replace(config.flags, sysfs_root=fake.sysfs_root)
    return dataclasses.replace(config, flags=flags)
