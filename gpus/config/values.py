"""Scalar parsers shared by flags, environment variables and the file."""

from __future__ import annotations

import re
from collections.abc import Sequence

from .errors import ConfigError
from .model import DEVICE_LIST_STRATEGIES, MAX_RESOURCE_NAME_LENGTH, RESOURCE_PREFIX

# Each takes the raw value and a label ("--mig-strategy", "MIG_STRATEGY") for its message.

_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no")
_GO_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "\u00b5s": 1e-6,  # micro sign
    "\u03bcs": 1e-6,  # Greek mu
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_GO_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|\u00b5s|\u03bcs|ms|s|m|h)")
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_UUID = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
_DEVICE_REF = re.compile(
    rf"\d+|\d+:\d+|GPU-{_UUID}|MIG-{_UUID}|MIG-GPU-{_UUID}/\d+/\d+",
)


def _invalid(label: str, raw: object, reason: str) -> ConfigError:
    return ConfigError(f"invalid {label} {raw!r}: {reason}")


def parse_bool(raw: str, label: str) -> bool:
    """true/false/1/0/yes/no, case-insensitive."""
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise _invalid(label, raw, "must be one of true, false, 1, 0, yes, no")


def parse_choice(raw: str, label: str, choices: Sequence[str]) -> str:
    """One of ``choices``, exactly."""
    value = raw.strip()
    if value not in choices:
        raise _invalid(label, raw, f"must be one of {', '.join(choices)}")
    return value


def parse_duration(raw: str, label: str, allow_zero: bool = True) -> float:
    """A Go duration ("60s", "1m30s", "500ms") or a number of seconds ("60", "2.5") -> seconds."""
    try:
        return duration_seconds(raw, allow_zero)
    except ValueError as error:
        raise _invalid(label, raw, str(error)) from None


def duration_seconds(raw: str, allow_zero: bool = True) -> float:
    """Like :func:`parse_duration` but raises ValueError carrying only the reason."""
    text = raw.strip()
    seconds: float
    try:
        seconds = float(text)
    except ValueError:
        seconds = _parse_go_duration(text)
    if seconds != seconds or seconds in (float("inf"), float("-inf")):  # NaN / inf
        raise ValueError("must be a finite duration")
    if seconds < 0 or (seconds == 0 and not allow_zero):
        raise ValueError("must be >= 0" if allow_zero else "must be > 0")
    return seconds


def _parse_go_duration(text: str) -> float:
    body = text[1:] if text[:1] in "+-" else text
    sign = -1.0 if text.startswith("-") else 1.0
    position, total = 0, 0.0
    while position < len(body):
        match = _GO_DURATION_PART.match(body, position)
        if match is None:
            break
        total += float(match.group(1)) * _GO_DURATION_UNITS[match.group(2)]
        position = match.end()
    if not body or position != len(body):
        raise ValueError('must be a duration like "60s", "1m30s", "500ms" or seconds')
    return sign * total


def parse_device_list_strategy(raw: Sequence[str], label: str) -> tuple[str, ...]:
    """A comma list (or several values) of device-list strategies, duplicates dropped."""
    items: list[str] = []
    for chunk in raw:
        items.extend(part.strip() for part in chunk.split(",") if part.strip())
    if not items:
        raise _invalid(label, ",".join(raw), "must name at least one strategy")
    result: list[str] = []
    for item in items:
        if item not in DEVICE_LIST_STRATEGIES:
            raise _invalid(label, item, f"must be one of {', '.join(DEVICE_LIST_STRATEGIES)}")
        if item not in result:
            result.append(item)
    return tuple(result)


def normalize_resource_name(raw: str) -> str:
    """NVIDIA's rule: prefix a bare name with ``nvidia.com/``; the name must be a DNS subdomain.

    Raises ValueError with the reason.
    """
    name = raw if raw.startswith(RESOURCE_PREFIX + "/") else f"{RESOURCE_PREFIX}/{raw}"
    if len(name) > MAX_RESOURCE_NAME_LENGTH:
        raise ValueError(
            f"fully-qualified resource name must be {MAX_RESOURCE_NAME_LENGTH} characters or "
            f"less, got {name!r} ({len(name)})"
        )
    short = name.split("/", 1)[1]
    if not short or not all(_DNS_LABEL.fullmatch(label) for label in short.split(".")):
        raise ValueError(
            f"resource name {name!r} must be lower-case letters, digits, '-' and '.' "
            "(a DNS subdomain after 'nvidia.com/')"
        )
    return name

