"""Validating a parsed config file into a :class:`Config`, by walking the table.

No setting is named here: each section's keys, the kinds of their values and the NVIDIA keys
it ignores come from the dataclass fields of :mod:`gpus.config.model`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

from .errors import ConfigError, type_name
from .fileformat import _compose, _Doc, _read
from .model import ROOT, Config
from .table import Section, section_of, setting_of
from .values import ValueProblem, split_keys


def load_config(path: str | Path) -> Config:
    """Read and validate a config file; flags and env vars are NOT applied (see resolve)."""
    config = parse_config(_read(path), str(path))
    return dataclasses.replace(config, config_file=str(path))


def parse_config(data: str | Mapping[str, Any] | None, source: str = "<config>") -> Config:
    """Validate a v1 config given as file text (YAML/JSON, with line numbers in errors) or as
    already-parsed data (no line numbers). Raises ConfigError on the first problem."""
    if isinstance(data, str):
        parsed, lines = _compose(data, source)
    else:
        parsed, lines = data, {}
    doc = _Doc(source, lines)
    if parsed is None:
        return Config()
    if not isinstance(parsed, Mapping):
        raise ConfigError(f"{source}: the document must be a mapping, got {type_name(parsed)}")
    config = cast(Config, _section(doc, ROOT, parsed, ""))
    if not lines:
        return config
    where = tuple((path, f"{source}:{line}") for path, line in lines.items())
    return dataclasses.replace(config, locations=where)


def _child(path: str, suffix: str) -> str:
    """``path`` extended by a ValueProblem suffix (".key", "[0]"); the root path is ""."""
    if path:
        return path + suffix
    return suffix[1:] if suffix.startswith(".") else suffix


def _section(doc: _Doc, section: Section, value: object, path: str) -> Any:
    """One section: its keys checked, each setting read by its kind, sub-sections walked."""
    fields = dataclasses.fields(section.cls)
    known = [key for item in fields if (key := _file_key(item)) is not None]
    try:
        raw = split_keys(value, known, section.ignored,
                         lambda key: doc.warn_ignored(_child(path, f".{key}")))
    except ValueProblem as problem:
        raise doc.error(_child(path, problem.suffix), problem.reason) from None
    values: dict[str, Any] = {}
    for item in fields:
        row, sub = setting_of(item), section_of(item)
        if sub is not None and sub.file is not None:
            values[item.name] = _section(doc, sub, raw.get(sub.file), _child(path, f".{sub.file}"))
        elif row is not None and row.file is not None and row.file in raw:
            key_path = _child(path, f".{row.file}")
            try:
                values[item.name] = row.kind.from_file(raw[row.file])
            except ValueProblem as problem:
                raise doc.error(key_path + problem.suffix, problem.reason) from None
    instance = section.cls(**values)
    if section.check is not None:
        try:
            section.check(instance, path)
        except ValueProblem as problem:
            raise doc.error(_child(path, problem.suffix), problem.reason) from None
    return instance


def _file_key(item: dataclasses.Field[Any]) -> str | None:
    row, sub = setting_of(item), section_of(item)
    if sub is not None:
        return sub.file
    return row.file if row is not None else None
