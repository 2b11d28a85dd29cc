"""The configuration table: each setting is one dataclass field whose metadata is its row.

A row says everything about a setting once: its type and default (the field), how its values
are read (:class:`~gpus.config.values.Kind`), its flags, its environment variables per daemon
(the daemons that use it are that mapping's keys), its key in the config file (the path comes
from the sections it sits in: ``flags.X``, ``flags.plugin.X``, ``flags.gfd.X``) and its help.
:func:`rows` walks the table; ``resolve`` and the file parser use nothing else.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from dataclasses import field
from typing import Any, Literal

from .values import Kind

Program = Literal["plugin", "gfd", "exporter"]
PROGRAMS: tuple[Program, ...] = ("plugin", "gfd", "exporter")
_SETTING = "nvk8s.setting"
_SECTION = "nvk8s.section"


# The three classes below are plain slotted classes, not dataclasses: they are built when
# gpus.config is imported, on every daemon start, and a frozen dataclass costs about 1 ms to
# create where a plain class costs microseconds.


class Setting:
    """One row of the table (a dataclass field's metadata)."""

    __slots__ = ("kind", "flags", "env", "file", "help", "empty_is_value")

    def __init__(self, kind: Kind, flags: tuple[str, ...] = (),
                 env: Mapping[str, tuple[str, ...]] | None = None, file: str | None = None,
                 help: str = "", empty_is_value: bool = False) -> None:
        self.kind = kind
        self.flags = flags  # every alias; the first is the one messages name
        self.env: Mapping[str, tuple[str, ...]] = dict(env or {})  # daemon -> names
        self.file = file  # key in its section of the config file; None: not in the file
        self.help = help  # may hold {default} and {choices}
        # A variable set to "" is a value, not unset (KUBELET_SOCKET="" skips registration).
        self.empty_is_value = empty_is_value

    @property
    def daemons(self) -> tuple[str, ...]:
        """The daemons that read this setting from a flag or variable."""
        return tuple(self.env)


class Section:
    """A nested section of the file (``flags``, ``flags.plugin``, ``sharing.timeSlicing``)."""

    __slots__ = ("cls", "file", "ignored", "check")

    def __init__(self, cls: type, file: str | None, ignored: tuple[str, ...] = (),
                 check: Callable[[Any, str], None] | None = None) -> None:
        self.cls = cls
        self.file = file  # None: not in the config file (a daemon's own options)
        self.ignored = ignored  # NVIDIA's keys we accept but do not implement (warned)
        # A check across the section's fields: (instance, section path) -> None or ValueProblem.
        self.check = check


def setting(default: Any, *, kind: Kind, flags: tuple[str, ...] = (),
            env: Mapping[str, tuple[str, ...]] | None = None, file: str | None = None,
            help: str = "", empty_is_value: bool = False) -> Any:
    """A dataclass field that is a row of the table (see :class:`Setting`)."""
    row = Setting(kind, flags, dict(env or {}), file, help, empty_is_value)
    return field(default=default, metadata={_SETTING: row})


def section(cls: type, *, file: str | None, ignored: tuple[str, ...] = (),
            check: Callable[[Any, str], None] | None = None) -> Any:
    """A dataclass field holding a nested section (defaults to ``cls()``); ``file=None``: a
    section of flags and env vars only (its rows must have no file key)."""
    return field(default_factory=cls, metadata={_SECTION: Section(cls, file, ignored, check)})


def setting_of(item: dataclasses.Field[Any]) -> Setting | None:
    """The row of a dataclass field, or None when it is not a setting."""
    return item.metadata.get(_SETTING)


def section_of(item: dataclasses.Field[Any]) -> Section | None:
    """The section a dataclass field holds, or None."""
    return item.metadata.get(_SECTION)


class Row:
    """A setting where it sits: attribute path of its section from the root, and file path."""

    __slots__ = ("section", "name", "setting", "default", "file_path")

    def __init__(self, section: tuple[str, ...], name: str, setting: Setting, default: Any,
                 file_path: str | None) -> None:
        self.section = section  # ("flags", "plugin")
        self.name = name  # the field ("pass_device_specs"); also the flag's argparse dest
        self.setting = setting
        self.default = default
        self.file_path = file_path  # "flags.plugin.passDeviceSpecs"; None when not in the file

    def __repr__(self) -> str:
        return f"Row({'.'.join((*self.section, self.name))})"

    def help_text(self) -> str:
        """The help with its default filled in."""
        kind = self.setting.kind
        return self.setting.help.format(default=kind.show(self.default),
                                        choices=", ".join(kind.choices))


def rows(root: type) -> Iterator[Row]:
    """Every setting of ``root`` and its sections, in field order, depth first."""
    yield from _rows(root, (), "")


def _rows(cls: type, attrs: tuple[str, ...], path: str) -> Iterator[Row]:
    for item in dataclasses.fields(cls):
        row, sub = setting_of(item), section_of(item)
        if row is not None:
            file_path = f"{path}.{row.file}".lstrip(".") if row.file is not None else None
            yield Row(attrs, item.name, row, item.default, file_path)
        elif sub is not None:
            inner = f"{path}.{sub.file}".lstrip(".") if sub.file is not None else ""
            yield from _rows(sub.cls, (*attrs, item.name), inner)


def rows_for(root: type, program: str) -> tuple[Row, ...]:
    """The settings ``program`` reads from flags and environment variables."""
    return tuple(row for row in rows(root) if program in row.setting.env)


def coerce_settings(instance: Any) -> None:
    """Bring values set in code into their kind's type (strings -> Enum members) where valid.

    Called from ``__post_init__`` of frozen dataclasses; invalid values are left as given, for
    the code that uses them to reject (a Config built without validation).
    """
    for item in dataclasses.fields(instance):
        row = setting_of(item)
        if row is None:
            continue
        value = getattr(instance, item.name)
        coerced = row.kind.coerce(value)
        if coerced is not value:
            object.__setattr__(instance, item.name, coerced)
