"""The config file's reading (fileformat), sharing entries, type names and the table's
``Config.where``: behaviours that mutation testing found unprotected (docs/testing.md).

Every message here is one a user reads when a ConfigMap is wrong, so the tests pin its parts:
the file, the line, the field path and the reason.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

import pytest
from locale_support import ascii_default_encoding

from gpus.config import (
    MAX_EXPANDED_NODES,
    ConfigError,
    ReplicatedResource,
    add_flags,
    check_plugin,
    load_config,
    load_config_file,
    parse_config,
    resolve,
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


# --- _compose: JSON and YAML -----------------------------------------------------------------


def test_tab_indented_json_after_a_blank_line_keeps_its_lines() -> None:
    # Tabs become spaces for any document that starts, after blank space, like JSON; else
    # PyYAML refuses the tabs and the JSON fallback loses every line number.
    text = '\n{\n\t"flags": {\n\t\t"migStrategy": "foo"\n\t}\n}\n'
    assert error_of(text) == (
        f"{SOURCE}:4: flags.migStrategy: must be one of none, single, mixed, got 'foo'")


def test_a_tab_indented_flow_list_is_read_as_yaml() -> None:
    # A flow list is YAML too (single quotes are not JSON): with its tabs made spaces it parses,
    # and the user is told the document is a list, not that it is bad JSON.
    assert error_of("[\n\t'gpu'\n]\n") == f"{SOURCE}: the document must be a mapping, got a list"


@pytest.mark.parametrize("lead", ["", " \n"])
def test_json_that_yaml_refuses_is_read_as_json(lead: str) -> None:
    text = lead + '{"flags": {"plugin": {"kubeletSocket": "/run/k' + C1 + '.sock"}}}'
    config = parse_config(text, SOURCE)
    assert config.flags.plugin.kubelet_socket == f"/run/k{C1}.sock"


def test_a_json_list_that_yaml_refuses_is_still_a_list() -> None:
    assert error_of(f'["{C1}"]') == f"{SOURCE}: the document must be a mapping, got a list"


def test_invalid_json_names_the_file_and_line() -> None:
    text = '{"flags": {"nvidiaDriverRoot": "' + C1 + '"},\n\n "sharing": }'
    assert error_of(text) == f"{SOURCE}:3: not valid JSON: Expecting value"


def test_json_nested_too_deeply() -> None:
    depth = 5000
    text = f'["{C1}", ' + "[" * depth + "]" * depth + "]"
    assert error_of(text) == f"{SOURCE}: not valid JSON: nested too deeply"


def test_yaml_nested_too_deeply() -> None:
    # Block lists: flow lists this deep take PyYAML's scanner seconds.
    assert error_of("- " * 1000 + "x") == f"{SOURCE}: not valid YAML: nested too deeply"


def test_a_construction_error_is_one_line_at_its_line() -> None:
    assert error_of("version: v1\n? [a]\n: b\n") == (
        f"{SOURCE}:2: not valid YAML: found unhashable key")


def test_a_character_yaml_refuses_is_named_without_a_line() -> None:
    # PyYAML's reader error has neither a mark nor a "problem": the file and the first line of
    # its text (the second one says where, in PyYAML's terms: "<unicode string>", position).
    assert error_of("version: v1\nflags: \x07\n") == (
        f"{SOURCE}: not valid YAML or JSON: unacceptable character #x0007: special characters "
        "are not allowed")


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


# --- _record_lines: the alias budget, cycles, paths ------------------------------------------


def expanding_to(nodes: int) -> str:
    """A document walked as exactly ``nodes`` values once its aliases are expanded (the root
    mapping, each value, each list item)."""
    # root 1 + a (1 + 999) + b (1 + 1000 per alias) + c (1 + m)
    per_alias = 1000
    aliases = (nodes - 1003) // per_alias
    padding = nodes - 1003 - per_alias * aliases
    assert aliases > 0
    return ("a: &a [" + ", ".join(["x"] * (per_alias - 1)) + "]\n"
            "b: [" + ", ".join(["*a"] * aliases) + "]\n"
            "c: [" + ", ".join(["y"] * padding) + "]\n")


def test_the_alias_budget_is_exact(tmp_path: Path) -> None:
    at_limit = tmp_path / "limit.yaml"
    at_limit.write_text(expanding_to(MAX_EXPANDED_NODES))
    data = load_config_file(at_limit)
    assert len(data["b"]) == (MAX_EXPANDED_NODES - 1003) // 1000
    over = tmp_path / "over.yaml"
    over.write_text(expanding_to(MAX_EXPANDED_NODES + 1))
    with pytest.raises(ConfigError) as info:
        load_config_file(over)
    assert str(info.value) == (
        f"{over}: excessive aliasing: more than {MAX_EXPANDED_NODES} values once YAML aliases "
        "are expanded")


@pytest.mark.parametrize(("text", "expected"), [
    ("&a [*a]\n", f"{SOURCE}:1: [0]: recursive YAML alias (an anchor used inside itself)"),
    ("version: v1\nflags: &f\n  plugin: *f\n",
     f"{SOURCE}:2: flags.plugin: recursive YAML alias (an anchor used inside itself)"),
])
def test_a_recursive_alias_names_its_line_and_field(text: str, expected: str) -> None:
    assert error_of(text) == expected


def test_an_anchor_used_twice_side_by_side_is_no_cycle() -> None:
    text = resources("    - name: gpu\n      replicas: 2\n      devices: &d [0, 1]\n"
                     "    - name: mig-1g.5gb\n      replicas: 2\n      devices: *d\n")
    entries = parse_config(text, SOURCE).sharing.time_slicing.resources
    assert [entry.devices for entry in entries] == [("0", "1"), ("0", "1")]


def test_a_duplicate_key_inside_a_list_item_names_the_file() -> None:
    text = resources("    - name: gpu\n      replicas: 2\n      replicas: 3\n")
    assert error_of(text) == (
        f"{SOURCE}:6: sharing.timeSlicing.resources[0].replicas: duplicate key")


# --- load_config_file and _read --------------------------------------------------------------


def test_load_config_file_names_the_file(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("flags: {migStrategy: [none\n")
    with pytest.raises(ConfigError) as info:
        load_config_file(broken)
    assert str(info.value).startswith(f"{broken}:2: not valid YAML or JSON: ")
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n")
    with pytest.raises(ConfigError) as info:
        load_config_file(listed)
    assert str(info.value) == f"{listed}: the document must be a mapping, got a list"


def test_a_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"flags:\n  nvidiaDriverRoot: /opt/nvidi\xe4\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        f"cannot read config file {path}: not UTF-8 text (invalid continuation byte)")


def test_the_file_is_read_as_utf8_under_an_ascii_locale(tmp_path: Path) -> None:
    # A container without a locale may run Python with an ASCII default encoding; a ConfigMap
    # is UTF-8 whatever the locale.
    path = tmp_path / "config.yaml"
    path.write_text("flags:\n  nvidiaDriverRoot: /opt/nvidi\u00e4\n", encoding="utf-8")
    with ascii_default_encoding():
        config = load_config(path)
    assert config.flags.nvidia_driver_root == "/opt/nvidi\u00e4"


# --- sharing: resource names, entries, devices -----------------------------------------------


def test_a_resource_name_of_exactly_63_characters_is_allowed() -> None:
    name = "nvidia.com/" + "a" * (63 - len("nvidia.com/"))
    text = resources(f"    - name: {name}\n      replicas: 2\n")
    assert parse_config(text).sharing.time_slicing.resources == (ReplicatedResource(name, 2),)
    assert error_of(resources(f"    - name: {name}b\n      replicas: 2\n")) == (
        f"{SOURCE}:4: sharing.timeSlicing.resources[0].name: fully-qualified resource name must "
        f"be 63 characters or less, got '{name}b' (64)")


def test_a_resource_name_of_another_domain_is_refused() -> None:
    # "example.com/gpu" is not a name under nvidia.com/: NVIDIA prefixes it, and the "/" left
    # in the short name is refused (not cut off at the first or last "/").
    assert error_of(resources("    - name: example.com/gpu\n      replicas: 2\n")) == (
        f"{SOURCE}:4: sharing.timeSlicing.resources[0].name: resource name "
        "'nvidia.com/example.com/gpu' must be lower-case letters, digits, '-' and '.' (a DNS "
        "subdomain after 'nvidia.com/')")


def test_the_most_replicas_allowed() -> None:
    text = resources("    - name: gpu\n      replicas: 1024\n")
    assert parse_config(text).sharing.time_slicing.resources[0].replicas == 1024


def test_a_bad_rename_names_the_rename_field() -> None:
    text = resources("    - name: gpu\n      replicas: 2\n      rename: Small_GPU\n")
    assert error_of(text) == (
        f"{SOURCE}:6: sharing.timeSlicing.resources[0].rename: resource name "
        "'nvidia.com/Small_GPU' must be lower-case letters, digits, '-' and '.' (a DNS subdomain "
        "after 'nvidia.com/')")


@pytest.mark.parametrize(("field", "line"), [("name", 4), ("rename", 6)])
def test_a_name_that_is_not_a_string(field: str, line: int) -> None:
    text = resources(f"    - {field}: 5\n      replicas: 2\n") if field == "name" else (
        resources(f"    - name: gpu\n      replicas: 2\n      {field}: 5\n"))
    assert error_of(text) == (
        f"{SOURCE}:{line}: sharing.timeSlicing.resources[0].{field}: must be a string, got a "
        "number 5")


def test_devices_one_is_a_count() -> None:
    text = resources("    - name: gpu\n      replicas: 2\n      devices: 1\n")
    assert parse_config(text).sharing.time_slicing.resources[0].devices == 1


DEVICES_EXPECTED = ("must be 'all', a count > 0, or a list of GPU indices, MIG indices "
                    "(<gpu>:<mig>) or UUIDs")


@pytest.mark.parametrize(("devices", "got"), [("some", "'some'"), ("[]", "an empty list")])
def test_bad_devices_name_the_devices_field(devices: str, got: str) -> None:
    text = resources(f"    - name: gpu\n      replicas: 2\n      devices: {devices}\n")
    assert error_of(text) == (
        f"{SOURCE}:6: sharing.timeSlicing.resources[0].devices: {DEVICES_EXPECTED}, got {got}")


# --- sharing: names across entries, both strategies ------------------------------------------


def test_rename_by_default_collides_with_an_entry_named_like_it() -> None:
    # With renameByDefault, "gpu" is advertised as "gpu.shared": the name of entry 1. The
    # error points at entry 0's name (it has no rename to blame).
    text = ("sharing:\n  timeSlicing:\n    renameByDefault: true\n    resources:\n"
            "    - name: gpu\n      replicas: 2\n    - name: gpu.shared\n      replicas: 2\n")
    assert error_of(text) == (
        f"{SOURCE}:5: sharing.timeSlicing.resources[0].name: rename 'nvidia.com/gpu.shared' "
        "conflicts with sharing.timeSlicing.resources[1].name")


MPS = "  mps:\n    resources:\n    - name: gpu\n      replicas: 2\n"
TIME_SLICING = "  timeSlicing:\n    resources:\n    - name: gpu\n      replicas: 2\n"


def test_mps_over_time_slicing_is_said_once_and_only_then(
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="gpus.config"):
        parse_config("sharing:\n" + MPS + TIME_SLICING, SOURCE)
    assert [r.getMessage() for r in caplog.records] == [
        "sharing.timeSlicing is ignored: sharing.mps has resources and MPS takes precedence"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gpus.config"):
        parse_config("sharing:\n" + MPS, SOURCE)
        parse_config("sharing:\n" + TIME_SLICING, SOURCE)
    assert caplog.records == []


# --- errors.type_name: how a message names what it got ---------------------------------------


@pytest.mark.parametrize(("value", "named"), [
    ("null", "null"), ("true", "a boolean"), ("5", "a number"), ("1.5", "a number"),
    ("gpu", "a string"), ("2024-01-01", "date"),
])
def test_messages_name_the_type_found(value: str, named: str) -> None:
    assert error_of(resources(f"    - {value}\n")) == (
        f"{SOURCE}:4: sharing.timeSlicing.resources[0]: must be a mapping, got {named}")


# --- model: Config.where ---------------------------------------------------------------------


def test_a_check_after_resolve_names_the_file_when_the_line_is_unknown(tmp_path: Path) -> None:
    # A JSON file read by the fallback has no line numbers: the message still names the file.
    path = tmp_path / "config.json"
    path.write_text('{"version": "v1", "flags": {"nvidiaDriverRoot": "/' + C1 + '"}, '
                    '"sharing": {"mps": {"resources": [{"name": "gpu", "replicas": 2}]}}}')
    parser = argparse.ArgumentParser()
    add_flags(parser, "plugin")
    with pytest.raises(ConfigError) as info:
        resolve(parser.parse_args(["--config-file", str(path)]), {})
    assert str(info.value).startswith(f"{path}: sharing.mps: MPS sharing needs --mps-root")
    # Without a file there is nothing to name.
    loose = dataclasses.replace(parse_config({"sharing": {"mps": {"resources": [
        {"name": "gpu", "replicas": 2}]}}}), config_file="")
    assert loose.where("sharing.mps") == ""
    with pytest.raises(ConfigError, match=r"^sharing.mps: MPS sharing needs --mps-root"):
        check_plugin(loose)
