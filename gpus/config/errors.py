"""The one exception of the configuration, and how its messages name values.

:class:`ConfigError` is defined in :mod:`gpus.errors` (the project's error tree) and
re-exported here.
"""

from __future__ import annotations

from collections.abc import Mapping

from gpus.errors import ConfigError

__all__ = ["ConfigError", "type_name"]


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
