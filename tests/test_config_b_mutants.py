"""The config file's reading (fileformat), sharing entries, type names and the table's
``Config.where``: behaviours that mutation testing found unprotected (docs/testing.md).

Every message here is one a user reads when a ConfigMap is wrong, so the tests pin its parts:
the file, the line, the field path and the reason.
"""

from __future__ import annotations

import pytest

from gpus.config import (
    ConfigError,
    parse_config,
)

SOURCE = "cm.yaml"
# A C1 control character: JSON strings may hold it raw, YAML refuses it anywhere, so a JSON
# file holding one is read by the JSON fallback (without line numbers).
C1 = "\x80"


def error_of(text: str) -> str:
    """The message parse_config gives for ``text`` (which must be refused)."""
    with pytest.raises(ConfigError) as info:
        parse_config(text, SOURCE)
    return str(info.value)


def resources(entries: str) -> str:
    """A document whose sharing.timeSlicing.resources are ``entries`` (block YAML at 4)."""
    return "sharing:\n  timeSlicing:\n    resources:\n" + entries


# --- _compose: regressions (a crash instead of a ConfigError) ----------------------------------


def test_aliases_nesting_deeper_than_the_stack_are_refused() -> None:
    # Each line nests 200 levels (fine for the composer) around the previous anchor: the
    # expanded document is 1,200 levels deep. Was a RecursionError out of parse_config.
    depth = 200
    lines = ["a0: &a0 " + "[" * depth + "x" + "]" * depth]
    lines += [f"a{i}: &a{i} " + "[" * depth + f"*a{i - 1}" + "]" * depth for i in range(1, 6)]
    assert error_of("\n".join(lines) + "\n") == f"{SOURCE}: not valid YAML: nested too deeply"


@pytest.mark.parametrize(("value", "reason"), [
    ("2024-02-30", "cannot read '2024-02-30' as timestamp: day is out of range for month"),
    ("2024-01-01 25:00:00", "cannot read '2024-01-01 25:00:00' as timestamp: hour must be in "
     "0..23"),
    ("!!int x", "cannot read 'x' as int: invalid literal for int() with base 10: 'x'"),
    ("!!bool x", "cannot read 'x' as bool: 'x'"),
])
def test_a_scalar_yaml_cannot_build_is_an_error_at_its_line(value: str, reason: str) -> None:
    # PyYAML takes a date-like value for a timestamp and raised ValueError (a crash, and a
    # SIGHUP reload did not keep the running config) for one that is no date.
    text = f"version: v1\nflags:\n  nvidiaDriverRoot: {value}\n"
    assert error_of(text) == f"{SOURCE}:3: not valid YAML: {reason}"


def test_a_json_number_beyond_the_digit_limit_is_an_error() -> None:
    text = f'{{"flags": "{C1}", "version": ' + "1" * 5000 + "}"
    assert error_of(text).startswith(f"{SOURCE}: not valid JSON: Exceeds the limit")
