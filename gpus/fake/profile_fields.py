"""Reading one field of a raw profile: type, bounds and length checks that name the field."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from gpus.fake.profile_model import ProfileError

_BUS_ID = re.compile(
    r"^(?:([0-9A-Fa-f]{4}|[0-9A-Fa-f]{8}):)?([0-9A-Fa-f]{2}):([0-9A-Fa-f]{2})\.([0-7])$"
)


class FieldReader:
    """Checked access to a raw profile mapping; every error is ``<source>: <field>: <reason>``."""

    def __init__(self, source: str, raw: dict[str, Any]) -> None:
        self.source = source
        self.raw = raw

    def fail(self, field: str, reason: str) -> ProfileError:
        """An error for ``field``."""
        return ProfileError(f"{self.source}: {field}: {reason}")

    def get(
        self,
        data: Mapping[str, Any],
        key: str,
        field: str,
        kind: type | tuple[type, ...],
        default: Any = ...,
    ) -> Any:
        """``data[key]`` checked against ``kind`` (bool is not an int here)."""
        if key not in data or data[key] is None:
            if default is ...:
                raise self.fail(field, "required")
            return default
        value = data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds:
            raise self.fail(field, f"expected {_kind_names(kinds)}, got {value!r}")
        if not isinstance(value, kinds):
            raise self.fail(field, f"expected {_kind_names(kinds)}, got {value!r}")
        return value

    def get_int(
        self,
        data: Mapping[str, Any],
        key: str,
        field: str,
        bounds: tuple[int, int, str],
        default: Any = ...,
    ) -> Any:
        """An integer ``data[key]`` within ``bounds`` = (low, high, what NVML reports it as)."""
        value = self.get(data, key, field, int, default)
        low, high, ctype = bounds
        if isinstance(value, int) and not low <= value <= high:
            raise self.fail(field, f"{value} is out of range {low}..{high} ({ctype})")
        return value

    def get_str(
        self, data: Mapping[str, Any], key: str, field: str, buffer: int, default: Any = ...
    ) -> Any:
        """A string ``data[key]`` that fits, NUL included, in NVML's ``buffer`` bytes."""
        value = self.get(data, key, field, str, default)
        if isinstance(value, str):
            self.check_length(value, field, buffer)
        return value

    def check_length(self, text: str, field: str, buffer: int) -> None:
        """Refuse a string NVML could not return in a ``buffer``-byte buffer."""
        if len(text.encode()) >= buffer:
            raise self.fail(field, f"longer than the {buffer - 1} bytes NVML can return")

    def check_keys(self, data: Mapping[str, Any], allowed: Iterable[str], field: str) -> None:
        """Reject unknown keys (typos would otherwise be silently ignored)."""
        unknown = sorted(set(map(str, data)) - set(allowed))
        if unknown:
            prefix = f"{field}." if field else ""
            raise self.fail(
                f"{prefix}{unknown[0]}", f"unknown field (allowed: {', '.join(allowed)})"
            )

    def bus_id(self, text: str, field: str) -> str:
        """Normalise a bus id to NVML's form ("00000000:07:00.0"); the domain defaults to 0."""
        match = _BUS_ID.match(text)
        if not match:
            raise self.fail(field, f"{text!r} is not a PCI bus id like 00000000:07:00.0")
        domain, bus, dev, fn = match.groups()
        return f"{int(domain or '0', 16):08X}:{bus.upper()}:{dev.upper()}.{fn}"


def _kind_names(kinds: tuple[type, ...]) -> str:
    names = {
        int: "an integer",
        str: "a string",
        list: "a list",
        dict: "a mapping",
        bool: "a boolean",
    }
    return " or ".join(names.get(k, k.__name__) for k in kinds)
