"""What every labeler shares: the label prefix and NVIDIA's label-value rules.

A module of its own so that labelers in other modules (``gfd.vgpu``) and ``gfd.labels``, which
merges them all, import it rather than each other.
"""

from __future__ import annotations

import re

PREFIX = "nvidia.com/"
MAX_VALUE_LEN = 63

_NOT_ALLOWED = re.compile(r"[^A-Za-z0-9\-_. ]")
_EDGE = re.compile(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$")

Labels = dict[str, str]


def sanitise(text: str) -> str:
    """NVIDIA's sanitising: drop characters outside ``[A-Za-z0-9-_. ]``, join words with ``-``."""
    return "-".join(_NOT_ALLOWED.sub("", text).split())


def label_value(text: str, suffix: str = "") -> str:
    """A valid Kubernetes label value built from ``text`` (sanitised) and ``suffix``.

    The suffix is kept whole (it is short and carries meaning, e.g. ``-MIG-1g.5gb``); when the
    result would exceed 63 characters the sanitised text is cut from its end. Leading and
    trailing non-alphanumerics are stripped so the value starts and ends alphanumeric.
    """
    body = _EDGE.sub("", sanitise(text))
    room = MAX_VALUE_LEN - len(suffix)
    if len(body) > room:
        body = _EDGE.sub("", body[: max(room, 0)])
    return _EDGE.sub("", (body + suffix)[:MAX_VALUE_LEN])
