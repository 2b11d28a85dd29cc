"""Flags and environment variables over the file: ``add_flags``, ``resolve``, ``reload``.

Every flag and variable comes from the table (:func:`gpus.config.table.rows_for`); no setting
is named here except ``config_file``, which is read first because it names the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from .checks import check_plugin
from .errors import ConfigError
from .model import PROGRAM_DEST, Config
from .parse import load_config
from .table import PROGRAMS, Program, Row, rows, rows_for

LOG = logging.getLogger(__package__)
_CONFIG_FILE = "config_file"  # the row naming the file the others are read over
_UNSET: Any = object()


def add_flags(parser: argparse.ArgumentParser, program: Program,
              only: Collection[str] | None = None) -> None:
    """Define the flags of ``program`` ("plugin", "gfd" or "exporter") on ``parser``; ``only``
    (row names) limits them to a few, for a daemon reading ``program``'s settings (the MPS
    control daemon reads the plugin's), the others coming from env and file as usual.

    Every default is None so :func:`resolve` can tell an unset flag from one set to the default.
    Values are validated by :func:`resolve`, not argparse, so errors are ConfigErrors.
    Boolean flags accept ``--flag``, ``--flag=false`` and ``--flag false``.
    """
    if program not in PROGRAMS:
        raise ValueError(f"program must be one of {', '.join(PROGRAMS)}, got {program!r}")
    parser.set_defaults(**{PROGRAM_DEST: program})
    rows = rows_for(Config, program)
    # The exporter reads no config file: its help must not promise one.
    reads_file = any(map(_names_config_file, rows))
    order = "flag > env > config file > default" if reads_file else "flag > env > default"
    group = parser.add_argument_group(f"configuration ({order})")
    for row in rows:
        if row.setting.flags and (only is None or row.name in only):
            _add_argument(group, row, program)


def _names_config_file(row: Row) -> bool:
    """Whether ``row`` is the top-level setting naming the config file."""
    return row.name == _CONFIG_FILE and not row.section


def _add_argument(group: argparse._ArgumentGroup, row: Row, program: str) -> None:
    names = row.setting.env[program]
    help_text = row.help_text() + (f" [env {'/'.join(names)}]" if names else "")
    flags = row.setting.flags
    form = row.setting.kind.arg_form
    if form == "bool":
        group.add_argument(*flags, dest=row.name, nargs="?", const="true", default=None,
                           metavar="BOOL", help=help_text)
        return
    # The metavar argparse would derive from the first long flag, whatever the dest: the
    # exporter's rows list the short flag first, and "-f F" would tell the reader nothing.
    long_flag = next((flag for flag in flags if flag.startswith("--")), flags[0])
    metavar = long_flag.lstrip("-").replace("-", "_").upper()
    action = "append" if form == "multi" else "store"
    group.add_argument(*flags, dest=row.name, action=action, default=None, metavar=metavar,
                       help=help_text)


def _from_env(environ: Mapping[str, str], names: Sequence[str],
              empty_is_value: bool = False) -> tuple[str, str] | None:
    """The first non-empty variable among ``names`` as (name, value); empty counts as unset,
    unless ``empty_is_value``: then the first variable set at all, blank meaning ""."""
    for name in names:
        value = environ.get(name, "")
        if value.strip():
            return name, value
        if empty_is_value and name in environ:
            return name, ""
    return None


def _given(row: Row, args: argparse.Namespace, environ: Mapping[str, str],
           program: str) -> Any:
    """The row's value from its flag, else its first set variable, else _UNSET."""
    raw = getattr(args, row.name, None) if row.setting.flags else None
    if raw is not None:
        return row.setting.kind.from_text(raw, row.setting.flags[0])
    found = _from_env(environ, row.setting.env[program], row.setting.empty_is_value)
    if found is None:
        return _UNSET
    return row.setting.kind.from_text(found[1], found[0])


def _replace(base: Any, attrs: tuple[str, ...], changes: Mapping[str, Any]) -> Any:
    """``base`` with ``changes`` applied to the section at attribute path ``attrs``."""
    if not attrs:
        return dataclasses.replace(base, **changes)
    inner = _replace(getattr(base, attrs[0]), attrs[1:], changes)
    return dataclasses.replace(base, **{attrs[0]: inner})


def resolve(args: argparse.Namespace, environ: Mapping[str, str]) -> Config:
    """Build the effective Config: flag > env var > config file > default.

    ``args`` comes from a parser prepared by :func:`add_flags`. Raises ConfigError naming the
    flag, environment variable or file field that is wrong, or (plugin) a combination it cannot
    run (:func:`~gpus.config.checks.check_plugin`).
    """
    program = getattr(args, PROGRAM_DEST, "plugin")
    table = rows_for(Config, program)
    path = next((_given(row, args, environ, program) for row in table
                 if _names_config_file(row)), _UNSET)
    config = load_config(path) if path is not _UNSET and path else Config()
    changes: dict[tuple[str, ...], dict[str, Any]] = {}
    for row in table:
        value = _given(row, args, environ, program)
        if value is not _UNSET:
            changes.setdefault(row.section, {})[row.name] = value
    for attrs, section_changes in changes.items():
        config = _replace(config, attrs, section_changes)
    if program == "plugin":
        check_plugin(config)
    return config


def resolve_section(cls: type, args: argparse.Namespace, environ: Mapping[str, str],
                    program: Program | None = None) -> Any:
    """One section of flag/env-only rows (a daemon's own options, ``daemon.gfd``) resolved
    alone: flag > env var > default, without reading the config file. The same rows and
    precedence as :func:`resolve`, which resolves them as part of the whole Config."""
    daemon = str(program or getattr(args, PROGRAM_DEST, "plugin"))
    values: dict[str, Any] = {}
    for row in rows(cls):
        if row.section or daemon not in row.setting.env:
            continue
        value = _given(row, args, environ, daemon)
        if value is not _UNSET:
            values[row.name] = value
    return cls(**values)


def resolve_setting(cls: type, name: str, flag: str | None, environ: Mapping[str, str],
                    program: Program) -> Any:
    """The value of row ``name`` of section ``cls``: ``flag`` (None: not given), else its
    variables, else its default."""
    section = resolve_section(cls, argparse.Namespace(**{name: flag}), environ, program)
    return getattr(section, name)


def reload(current: Config, args: argparse.Namespace,
           environ: Mapping[str, str]) -> tuple[Config, str | None]:
    """Resolve again (e.g. on SIGHUP); on any error keep ``current`` and return the message.

    Returns ``(new_config, None)`` on success, ``(current, message)`` when the file is bad or
    vanished, so the caller never runs with a half-applied configuration.
    """
    try:
        return resolve(args, environ), None
    except ConfigError as error:
        LOG.error("config reload failed, keeping the running configuration: %s", error)
        return current, str(error)
