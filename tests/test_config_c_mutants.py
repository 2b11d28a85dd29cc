"""Behaviour of the configuration table, its resolver and the file parser that the other config
tests leave open (each test below failed under a mutant of gpus/config/table.py, resolve.py or
parse.py that survived them).

Two groups:

- the real table, through what operators and daemons see: ``--help`` (the flag, its metavar,
  its choices, default and variables), which daemon a namespace resolves for, a daemon's own
  section resolved alone, the reload's error line, the default source name in file errors;
- a small table declared *inside each test* with ``setting()``/``section()``, as model.py
  declares the real one (docs/config.md, "Adding a setting"). The real table is built once,
  when gpus.config is imported, so a test that only reads it cannot tell whether the builders
  still work the way a new row relies on: the declaration must run while the test runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gpus.config import (
    ConfigError,
    DaemonOptions,
    ExporterOptions,
    GfdOptions,
    LogLevel,
    MigStrategy,
    OutputMode,
    PluginOptions,
    add_flags,
    parse_config,
    reload,
    resolve,
    resolve_section,
    resolve_setting,
)
from gpus.config.table import Program, coerce_settings, rows, section, section_of, setting
from gpus.config.values import BoolKind, ChoiceKind, TextKind

# --- --help: what an operator reads -----------------------------------------------------------


def parser_for(program: Program, only: tuple[str, ...] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=program)
    add_flags(parser, program, only=only)
    return parser


def help_entries(program: Program, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """``--help`` as {invocation ("--flag METAVAR, --alias METAVAR"): help text}, read from a
    help formatted wide enough that no entry wraps."""
    monkeypatch.setenv("COLUMNS", "1000")
    lines = parser_for(program).format_help().splitlines()
    entries: dict[str, str] = {}
    for number, line in enumerate(lines):
        if not line.startswith("  -"):
            continue
        invocation, _, text = line.strip().partition("  ")
        if not text.strip() and number + 1 < len(lines) and not lines[number + 1].startswith(
                "  -"):
            text = lines[number + 1]
        entries[invocation] = text.strip()
    return entries


def test_help_groups_the_table_flags_under_the_precedence(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    monkeypatch.setenv("COLUMNS", "1000")
    for program in ("plugin", "gfd"):
        text = parser_for(program).format_help()
        assert "\nconfiguration (flag > env > config file > default):\n" in text, program
    # The exporter reads no config file, and its help says so.
    text = parser_for("exporter").format_help()
    assert "\nconfiguration (flag > env > default):\n" in text
    assert "config file >" not in text


def test_help_names_each_flag_with_its_variables_default_and_choices(
        monkeypatch: pytest.MonkeyPatch) -> None:
    gfd = help_entries("gfd", monkeypatch)
    # Every variable, in the order they are read, at the end of the entry.
    mig = gfd["--mig-strategy MIG_STRATEGY"]
    assert mig.startswith("how MIG devices are advertised")
    assert mig.endswith("(default none) [env GFD_MIG_STRATEGY/MIG_STRATEGY]")
    # The default and the choices come from the row's kind.
    discovery = gfd["--device-discovery-strategy DEVICE_DISCOVERY_STRATEGY"]
    assert "auto, nvml " in discovery and "default auto)" in discovery
    assert gfd["--log-level LOG_LEVEL"].startswith(
        "logging verbosity, any case: debug, info, warning, error (default info)")
    # A boolean takes an optional value, shown as [BOOL]; it has its help too.
    assert gfd["--oneshot [BOOL]"] == "label once and exit (default false) [env GFD_ONESHOT]"
    # A flag with no variable (env={"gfd": ()}) says nothing about variables.
    assert gfd["--dry-run [BOOL]"] == "print the labels as a table and exit; write nothing"


def test_help_metavar_is_the_first_long_flag_not_the_field(monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    plugin = help_entries("plugin", monkeypatch)
    # The field is nvidia_driver_root; the flags are --driver-root and --nvidia-driver-root.
    driver_root = plugin["--driver-root DRIVER_ROOT, --nvidia-driver-root DRIVER_ROOT"]
    assert driver_root.endswith("[env NVIDIA_DRIVER_ROOT]")
    assert "--driver-root-ctr-path DRIVER_ROOT_CTR_PATH, --container-driver-root "\
           "DRIVER_ROOT_CTR_PATH" in plugin


def test_help_metavar_of_a_short_first_flag_is_its_long_name(monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    # dcgm-exporter's rows list the short flag first; "-f F" would tell the reader nothing.
    exporter = help_entries("exporter", monkeypatch)
    for invocation in ("-f COLLECTORS, --collectors COLLECTORS",
                       "-a ADDRESS, --address ADDRESS",
                       "-c COLLECT_INTERVAL, --collect-interval COLLECT_INTERVAL",
                       "-x XID_COUNT_WINDOW_SIZE, --xid-count-window-size XID_COUNT_WINDOW_SIZE"):
        assert invocation in exporter, sorted(exporter)
    assert exporter["-a ADDRESS, --address ADDRESS"].endswith("[env DCGM_EXPORTER_LISTEN]")


# --- add_flags(only=...): a daemon reading another's settings (the MPS control daemon) ---------


def test_only_defines_just_the_named_rows() -> None:
    parser = parser_for("plugin", only=("mps_root", "nvml"))
    args = parser.parse_args(["--mps-root", "/run/mps", "--nvml", "fake:dgx-a100"])
    config = resolve(args, {"MIG_STRATEGY": "single"})
    assert config.flags.mps_root == "/run/mps" and config.flags.nvml == "fake:dgx-a100"
    # The rows left out still come from their variables, not from flags.
    assert config.flags.mig_strategy is MigStrategy.SINGLE
    with pytest.raises(SystemExit):
        parser.parse_args(["--mig-strategy", "single"])


# --- which daemon a namespace resolves for -----------------------------------------------------


def test_a_namespace_without_a_program_resolves_as_the_plugin() -> None:
    # Not prepared by add_flags: no program recorded, so the plugin's variables apply.
    assert resolve(argparse.Namespace(), {"MIG_STRATEGY": "mixed"}).flags.mig_strategy \
        is MigStrategy.MIXED
    assert resolve(argparse.Namespace(), {"GFD_MIG_STRATEGY": "mixed"}).flags.mig_strategy \
        is MigStrategy.NONE  # GFD's own name: not the plugin's
    assert resolve_section(PluginOptions, argparse.Namespace(),
                           {"PLUGIN_SOCKET_DIR": "/var/run/dp"}).socket_dir == "/var/run/dp"


def test_a_variable_only_row_takes_no_flag_of_the_same_name() -> None:
    # ExporterOptions.node_name is a variable only (as dcgm-exporter's NODE_NAME); an option a
    # daemon adds with the same dest must not be read as this row's flag.
    parser = parser_for("exporter")
    parser.add_argument("--node-name", dest="node_name")
    args = parser.parse_args(["--node-name", "from-flag"])
    config = resolve(args, {"NODE_NAME": "from-env"})
    assert config.daemon.exporter.node_name == "from-env"
    assert resolve_setting(ExporterOptions, "node_name", "from-flag", {}, "exporter") == ""


# --- a daemon's own section resolved alone (resolve_section / resolve_setting) ----------------


def test_resolve_section_reads_the_program_from_the_namespace() -> None:
    args = parser_for("gfd").parse_args(["--node-name", "node-7"])
    options = resolve_section(GfdOptions, args, {"GFD_OUTPUT_MODE": "both", "NODE_NAME": "x"})
    assert options == GfdOptions(node_name="node-7", output_mode=OutputMode.BOTH)


def test_a_daemon_section_alone_leaves_its_sub_sections_at_their_defaults() -> None:
    # GFD resolves DaemonOptions for its log level only; its sub-sections' flags are resolved
    # with their own section (GfdOptions above), not merged in here.
    args = parser_for("gfd").parse_args(["--log-level", "debug", "--output-mode", "both"])
    options = resolve_section(DaemonOptions, args, {"GFD_HEALTH_FILE": ""}, "gfd")
    assert options == DaemonOptions(log_level=LogLevel.DEBUG)


def test_resolve_setting_flag_beats_the_variable_and_reads_the_programs_names() -> None:
    # An empty flag is a value for the ready file (it disables it) and beats the variable.
    assert resolve_setting(PluginOptions, "ready_file", "", {"DP_READY_FILE": "/x/ready"},
                           "plugin") == ""
    assert resolve_setting(GfdOptions, "metrics_address", None,
                           {"GFD_METRICS_ADDRESS": ":9402", "DP_METRICS_ADDRESS": ":9401"},
                           "gfd") == ":9402"


# --- reload: the line an operator reads when a SIGHUP finds a bad file -------------------------


def test_a_failed_reload_logs_the_error_and_keeps_the_configuration(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("flags:\n  migStrategy: single\n")
    args = parser_for("plugin").parse_args(["--config-file", str(path)])
    current = resolve(args, {})
    path.write_text("flags:\n  migStrategy: sideways\n")
    with caplog.at_level(logging.ERROR, logger="gpus.config"):
        kept, error = reload(current, args, {})
    assert kept is current and error is not None and "migStrategy" in error
    messages = [record.getMessage() for record in caplog.records
                if record.levelno == logging.ERROR]
    assert len(messages) == 1
    assert messages[0].startswith("config reload failed, keeping the running configuration: ")
    assert messages[0].endswith(error)


# --- parse_config: the source named in errors when none is given ------------------------------


def test_parse_config_names_its_source_config_by_default() -> None:
    with pytest.raises(ConfigError, match=r"^<config>: the document must be a mapping"):
        parse_config("- a\n- b\n")
    with pytest.raises(ConfigError, match=r"^<config>:2: flags\.migStrategy: "):
        parse_config("flags:\n  migStrategy: sideways\n")


# --- the builders: a table declared while the test runs -----------------------------------------


@dataclass(frozen=True)
class Declared:
    """The classes of a table declared by :func:`declare`, and the calls its check saw."""

    root: type
    inner: type
    own: type
    checked: list[tuple[Any, str]]


def declare() -> Declared:
    """A small table as model.py writes one: a file section with a check and ignored keys, a
    flag/env-only section (``file=None``), and a setting after the sections."""
    checked: list[tuple[Any, str]] = []

    def check(instance: Any, path: str) -> None:
        checked.append((instance, path))

    @dataclass(frozen=True)
    class Inner:
        level: MigStrategy = setting(
            MigStrategy.NONE, kind=ChoiceKind(MigStrategy), flags=("--level", "--lvl"),
            env={"plugin": ("LEVEL",), "gfd": ("GFD_LEVEL", "LEVEL")}, file="level",
            help="the level: {choices} (default {default})")

        def __post_init__(self) -> None:
            coerce_settings(self)

    @dataclass(frozen=True)
    class Own:
        plugin_only: str = setting("p", kind=TextKind(), flags=("--plugin-only",),
                                   env={"plugin": ("PLUGIN_ONLY",)}, help="the plugin's")
        socket: str = setting("/run/x.sock", kind=TextKind(), flags=("--socket",),
                              env={"gfd": ("SOCKET",)}, empty_is_value=True,
                              help="a socket; empty disables it (default {default})")
        quiet: bool = setting(False, kind=BoolKind(), env={"gfd": ("QUIET",)})  # no help

    @dataclass(frozen=True)
    class Root:
        inner: Inner = section(Inner, file="inner", ignored=("legacy",), check=check)
        own: Own = section(Own, file=None)
        mode: MigStrategy = setting(MigStrategy.NONE, kind=ChoiceKind(MigStrategy),
                                    file="mode", help="the mode")

        def __post_init__(self) -> None:
            coerce_settings(self)

    return Declared(Root, Inner, Own, checked)


def test_declared_rows_have_their_section_default_and_file_path() -> None:
    table = declare()
    got = [(row.section, row.name, row.default, row.file_path) for row in rows(table.root)]
    assert got == [
        (("inner",), "level", MigStrategy.NONE, "inner.level"),  # the section's key first
        (("own",), "plugin_only", "p", None),  # flag/env only: not in the file
        (("own",), "socket", "/run/x.sock", None),
        (("own",), "quiet", False, None),
        ((), "mode", MigStrategy.NONE, "mode"),  # at the root: the key alone
    ]
    assert [repr(row) for row in rows(table.root)][:2] == ["Row(inner.level)",
                                                           "Row(own.plugin_only)"]


def test_declared_rows_help_fills_in_choices_and_default_and_may_be_empty() -> None:
    table = declare()
    helps = {row.name: row.help_text() for row in rows(table.root)}
    assert helps["level"] == "the level: none, single, mixed (default none)"
    assert helps["socket"] == "a socket; empty disables it (default /run/x.sock)"
    assert helps["quiet"] == ""  # declared without help


def test_declared_sections_default_to_their_class_and_keep_check_and_ignored_keys() -> None:
    table = declare()
    root = table.root()
    assert root.inner == table.inner() and root.own == table.own()
    inner, own = (section_of(item) for item in dataclasses.fields(table.root)[:2])
    assert inner is not None and own is not None
    # What the file parser reads of a section: its class, key, NVIDIA keys to ignore, check.
    assert (inner.cls, inner.file, inner.ignored) == (table.inner, "inner", ("legacy",))
    assert inner.check is not None
    inner.check(root.inner, "inner")
    assert table.checked == [(root.inner, "inner")]
    assert (own.cls, own.file, own.ignored, own.check) == (table.own, None, (), None)


def test_declared_rows_resolve_flag_over_variable_over_default_per_daemon() -> None:
    own = declare().own
    environ = {"PLUGIN_ONLY": "from-env", "SOCKET": "", "QUIET": "yes"}
    # GFD: the plugin's row (first in the section) is skipped, not the end of the section;
    # an empty SOCKET is a value (empty_is_value), a bool variable is read by its kind.
    assert resolve_section(own, argparse.Namespace(), environ, "gfd") == own(
        socket="", quiet=True)
    assert resolve_section(own, argparse.Namespace(socket="/flag.sock"),
                           {"SOCKET": "/env.sock"}, "gfd") == own(socket="/flag.sock")
    # The plugin: its row only; an empty variable of a row without empty_is_value is unset.
    assert resolve_section(own, argparse.Namespace(), environ, "plugin") == own(
        plugin_only="from-env")
    assert resolve_section(own, argparse.Namespace(), {"PLUGIN_ONLY": ""}, "plugin") == own()


def test_declared_values_set_in_code_become_members() -> None:
    table = declare()
    # The setting after the sections is coerced too.
    assert table.root(mode="mixed").mode is MigStrategy.MIXED
    assert table.inner(level="single").level is MigStrategy.SINGLE
