"""Reading a config file: YAML or JSON text -> plain data and the line of every field."""

from __future__ import annotations

import functools
import json
import logging
import reprlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpus.records import record

from .errors import ConfigError, type_name

if TYPE_CHECKING:  # imported where a config file is parsed: most starts read none (start-up time)
    import yaml

LOG = logging.getLogger(__package__)


@record(shared_init=True)
class _Doc:
    """A parsed file: plain data plus the line of every field path (for error messages)."""

    source: str
    lines: Mapping[str, int]

    def where(self, path: str) -> str:
        line = self.lines.get(path)
        return f"{self.source}:{line}" if line is not None else self.source

    def error(self, path: str, reason: str) -> ConfigError:
        return ConfigError(f"{self.where(path)}: {path}: {reason}")

    def warn_ignored(self, path: str) -> None:
        LOG.warning("%s: %s is part of NVIDIA's v1 config but not implemented here; ignored",
                    self.where(path), path)


def _compose(text: str, source: str) -> tuple[Any, dict[str, int]]:
    """YAML (or JSON) text -> (data, {field path: line}); duplicate keys are errors."""
    import yaml  # ~11 ms of start-up, paid only when a config file is read

    if text.lstrip().startswith(("{", "[")):
        # JSON may indent with tabs, which YAML forbids; JSON strings cannot hold a raw tab,
        # so turning them into spaces changes nothing but keeps the line numbers.
        text = text.replace("\t", " ")
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as error:
        if text.lstrip().startswith(("{", "[")):
            return _parse_json(text, source), {}
        raise ConfigError(f"{_yaml_where(error, source)}: not valid YAML or JSON: "
                          f"{_yaml_problem(error)}") from None
    except RecursionError:  # PyYAML's composer recurses once per nesting level
        raise ConfigError(f"{source}: not valid YAML: nested too deeply") from None
    if node is None:
        return None, {}
    lines: dict[str, int] = {}
    loader = _loader_class()("")
    try:
        # _record_lines recurses once per level and follows aliases, which the composer never
        # does: aliases can nest a small document deeper than the stack allows.
        _record_lines(node, "", lines, source, _Walk())
        data = loader.construct_document(node)
    except yaml.YAMLError as error:
        raise ConfigError(f"{_yaml_where(error, source)}: not valid YAML: "
                          f"{_yaml_problem(error)}") from None
    except RecursionError:
        raise ConfigError(f"{source}: not valid YAML: nested too deeply") from None
    finally:
        loader.dispose()
    return data, lines


@functools.cache
def _loader_class() -> type[yaml.SafeLoader]:
    """PyYAML's SafeLoader, except that a scalar it cannot build is a YAML error at its line.

    PyYAML raises ValueError, KeyError or AttributeError for a date-like value that is no date
    (``2024-02-30``, which its resolver takes for a timestamp) or a tagged ``!!int x``; left
    alone they escape as a crash (a reload on SIGHUP included) instead of a ConfigError.
    Built on first use, as PyYAML is imported: most starts read no config file.
    """
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
            try:
                return super().construct_object(node, deep)
            except (ValueError, TypeError, KeyError, AttributeError, OverflowError) as error:
                # Raised by scalar constructors only (those of collections raise YAML errors).
                tag = node.tag.rpartition(":")[2]
                raise yaml.constructor.ConstructorError(
                    None, None, f"cannot read {reprlib.repr(node.value)} as {tag}: {error}",
                    node.start_mark) from None

    return Loader


def _yaml_where(error: yaml.YAMLError, source: str) -> str:
    mark = getattr(error, "problem_mark", None)
    return f"{source}:{mark.line + 1}" if mark is not None else source


def _yaml_problem(error: yaml.YAMLError) -> str:
    """The one-line reason of a PyYAML error (its str() spans several lines)."""
    return getattr(error, "problem", None) or str(error).splitlines()[0]


def _parse_json(text: str, source: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(f"{source}:{error.lineno}: not valid JSON: {error.msg}") from None
    except ValueError as error:  # a number beyond Python's int() digit limit
        raise ConfigError(f"{source}: not valid JSON: {error}") from None
    except RecursionError:
        raise ConfigError(f"{source}: not valid JSON: nested too deeply") from None


# Nodes walked once aliases are expanded: far above any real config, far below the billion
# laughs (Go's yaml refuses "excessive aliasing" the same way).
MAX_EXPANDED_NODES = 100_000


@dataclass
class _Walk:
    """Bookkeeping of one :func:`_record_lines` walk: the alias expansion budget and the
    nodes on the current path (an alias to one of them is a cycle)."""

    visited: int = 0
    ancestors: set[int] = field(default_factory=set)


def _record_lines(node: yaml.Node, path: str, lines: dict[str, int], source: str,
                  walk: _Walk) -> None:
    import yaml  # already loaded by _compose: a dictionary look-up

    walk.visited += 1
    if walk.visited > MAX_EXPANDED_NODES:
        raise ConfigError(f"{source}: excessive aliasing: more than {MAX_EXPANDED_NODES} "
                          "values once YAML aliases are expanded")
    if id(node) in walk.ancestors:
        raise ConfigError(f"{source}:{node.start_mark.line + 1}: {path or 'document'}: "
                          "recursive YAML alias (an anchor used inside itself)")
    if not isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
        return
    walk.ancestors.add(id(node))
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = str(key_node.value)
            child = f"{path}.{key}" if path else key
            if key in seen:
                raise ConfigError(
                    f"{source}:{key_node.start_mark.line + 1}: {child}: duplicate key"
                )
            seen.add(key)
            lines[child] = key_node.start_mark.line + 1
            _record_lines(value_node, child, lines, source, walk)
    else:
        for index, item in enumerate(node.value):
            child = f"{path}[{index}]"
            lines[child] = item.start_mark.line + 1
            _record_lines(item, child, lines, source, walk)
    walk.ancestors.discard(id(node))


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a config file (YAML or JSON) into plain data; ConfigError if unreadable or invalid.

    An empty file gives ``{}``. Use :func:`load_config` for a validated Config.
    """
    text = _read(path)
    data, _ = _compose(text, str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the document must be a mapping, got {type_name(data)}")
    return data




def _read(path: str | Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror or error}") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"cannot read config file {path}: not UTF-8 text ({error.reason})"
                          ) from None

