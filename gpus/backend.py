"""Which NVML the daemons talk to: the real driver, or the fake beneath pynvml.

Spec forms (flag ``--nvml``, env ``NVML_BACKEND``):

- ``real``: pynvml loads ``libnvidia-ml.so.1`` (the default);
- ``fake:<profile>``: a shipped profile name (``fake:dgx-a100``) or a YAML path
  (``fake:/etc/profiles/node.yaml``);
- ``fake:<profile>?control=<socket>``: also serve the fault-injection control socket
  (``fake-nvml inject --control <socket> ...``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING
from urllib.parse import parse_qs

if TYPE_CHECKING:
    from gpus.fake import FakeNvml

log = logging.getLogger(__name__)

ENV_VAR = "NVML_BACKEND"
DEFAULT_BACKEND = "real"
QUERY_KEYS = ("control",)
USAGE = "expected 'real' or 'fake:<profile name or path to a .yaml>[?control=<socket path>]'"


def backend_from_env(environ: Mapping[str, str] | None = None) -> str:
    """The spec in ``NVML_BACKEND``, or ``real``."""
    env = os.environ if environ is None else environ
    return env.get(ENV_VAR, "").strip() or DEFAULT_BACKEND


def parse_backend(spec: str) -> tuple[str, str | None] | None:
    """Validate a spec without installing anything: None for real, else (profile, control).

    Raises ValueError naming the allowed forms.
    """
    text = spec.strip() if isinstance(spec, str) else ""
    if text == "real":
        return None
    if not text.startswith("fake:"):
        raise ValueError(f"unknown NVML backend {spec!r}: {USAGE}")
    target, _, query = text[len("fake:") :].partition("?")
    if not target:
        raise ValueError(f"NVML backend {spec!r} names no profile: {USAGE}")
    try:
        params = parse_qs(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError as exc:
        raise ValueError(f"NVML backend {spec!r}: bad query {query!r}: {USAGE}") from exc
    unknown = sorted(set(params) - set(QUERY_KEYS))
    if unknown:
        raise ValueError(f"NVML backend {spec!r}: unknown option {unknown[0]!r} (allowed: control)")
    control = params.get("control", [""])[-1] or None
    if "control" in params and control is None:
        raise ValueError(f"NVML backend {spec!r}: control= needs a socket path")
    return target, control


def select_backend(spec: str) -> FakeNvml | None:
    """Install the backend ``spec`` names: None for real, else the installed fake's controller.

    Bad specs and unknown profiles raise ValueError; nothing is installed then.
    """
    parsed = parse_backend(spec)
    if parsed is None:
        log.info("NVML backend: real driver (libnvidia-ml.so.1)")
        return None
    profile, control = parsed
    # Imported here so real GPU nodes never load (or pay start-up time for) the simulator.
    from gpus.fake import ProfileError, install

    try:
        fake = install(profile, control_socket=control)
    except ProfileError as exc:
        raise ValueError(f"NVML backend {spec!r}: {exc}") from exc
    except OSError as exc:
        raise ValueError(f"NVML backend {spec!r}: cannot serve control socket: {exc}") from exc
    log.info(
        "NVML backend: fake, profile %s%s",
        fake.profile.name,
        f", control socket {control}" if control else "",
    )
    return fake
