"""The one exception of the configuration, and how its messages name values."""

from __future__ import annotations

from collections.abc import Mapping


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the source, field and reason."""


def type_name(value: object) -> str:
    """How a message names the type of a parsed value ("a list", "a number", "null")."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__
