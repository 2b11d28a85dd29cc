"""What the value kinds of the config table promise (gpus/config/values.py), pinned down where
mutation testing (docs/testing.md) found nothing that would notice a change.

Most of it is the messages: an operator who put a wrong value in a Helm chart's flags, env or
ConfigMap reads them, so each names the flag, variable or file field (with the file's line),
the value given and what is allowed. The rest are the kinds built the way the table builds
them (constructed here, inside each test, like the table's own rows) and the entry points the
table does not reach through a flag or a file key today.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence

import pytest

from gpus.config import (
    Config,
    ConfigError,
    DeviceListStrategy,
    LogLevel,
    MigStrategy,
    PluginFlags,
    add_flags,
    duration_seconds,
    parse_choice,
    parse_config,
    parse_device_list_strategy,
    parse_duration,
    resolve,
)
from gpus.config.enums import DeviceDiscoveryStrategy
from gpus.config.table import rows
from gpus.config.values import (
    ChoiceKind,
    ChoiceListKind,
    DurationKind,
    ImexChannelsKind,
    NumberKind,
    TextKind,
    TextListKind,
    ValueProblem,
    VersionKind,
)

STRATEGIES = "envvar, volume-mounts, cdi-annotations, cdi-cri"
IMEX_REASON = "must be 'all' or a comma list of channel numbers >= 0"


def resolved(program: str, argv: Sequence[str] = (),
             env: Mapping[str, str] | None = None) -> Config:
    parser = argparse.ArgumentParser(prog=program)
    add_flags(parser, program)  # type: ignore[arg-type]  # plain str in tests
    return resolve(parser.parse_args(list(argv)), env or {})


def text_error(program: str, argv: Sequence[str] = (),
               env: Mapping[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        resolved(program, argv, env)
    return str(info.value)


def file_error(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "cm.yaml")
    return str(info.value)


def problem(call: Callable[..., object], *args: object) -> ValueProblem:
    """The ValueProblem ``call(*args)`` raises (a kind's ``from_file``)."""
    with pytest.raises(ValueProblem) as info:
        call(*args)
    return info.value


# --- ValueProblem -------------------------------------------------------------------------


def test_a_value_problem_reads_as_its_reason() -> None:
    # The parser reads .reason and .suffix; anything else that shows one (a traceback, a log
    # line) prints str(), which must be the reason too.
    error = ValueProblem("must be a string, got a number 5", "[1]")
    assert (str(error), error.reason, error.suffix) == (
        "must be a string, got a number 5", "must be a string, got a number 5", "[1]")


# --- parse_choice, the durations ------------------------------------------------------------


def test_parse_choice_names_the_label_the_value_and_the_choices() -> None:
    assert parse_choice(" packed ", "--policy", ("distributed", "packed")) == "packed"
    with pytest.raises(ConfigError) as info:
        parse_choice("random", "--policy", ("distributed", "packed"))
    assert str(info.value) == "invalid --policy 'random': must be one of distributed, packed"


def test_duration_seconds_allows_zero_unless_told() -> None:
    assert duration_seconds("0") == 0.0
    assert duration_seconds("0s") == 0.0
    with pytest.raises(ValueError, match="^must be > 0$"):
        duration_seconds("0s", allow_zero=False)


@pytest.mark.parametrize("text", ["inf", "-inf", "1e400", "Infinity"])
def test_an_infinite_duration_is_refused_as_such(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_duration(text, "--health-quiet-period")
    assert str(info.value) == f"invalid --health-quiet-period '{text}': must be a finite duration"


def test_an_infinite_duration_in_the_file_names_the_key() -> None:
    assert file_error("flags:\n  gfd:\n    sleepInterval: .inf\n") == (
        "cm.yaml:3: flags.gfd.sleepInterval: must be a finite duration, got inf")


@pytest.mark.parametrize("text", ["X5s", "x5s", "*5s"])
def test_only_a_sign_may_precede_a_go_duration(text: str) -> None:
    with pytest.raises(ConfigError, match="must be a duration like"):
        parse_duration(text, "--sleep-interval")


# --- TextKind --------------------------------------------------------------------------------


def test_text_kinds_take_empty_values_unless_nonempty() -> None:
    # TEXT rows take "" (KUBELET_SOCKET="" skips registration); NONEMPTY ones refuse it.
    text, nonempty = TextKind(), TextKind(nonempty=True)
    assert (text.from_text("", "--kubelet-socket"), text.from_file("")) == ("", "")
    assert (nonempty.from_text("/x", "--cdi-spec-dir"), nonempty.from_file("/x")) == ("/x", "/x")
    with pytest.raises(ConfigError) as info:
        nonempty.from_text(" ", "--cdi-spec-dir")
    assert str(info.value) == "invalid --cdi-spec-dir ' ': must not be empty"
    assert problem(nonempty.from_file, "").reason == "must not be empty, got ''"


def test_a_text_key_given_a_number_says_so() -> None:
    assert file_error("flags:\n  plugin:\n    kubeletSocket: 5\n") == (
        "cm.yaml:3: flags.plugin.kubeletSocket: must be a string, got a number 5")


# --- ChoiceKind --------------------------------------------------------------------------------


def test_choice_kinds_as_the_table_builds_them() -> None:
    mig = ChoiceKind(MigStrategy)
    assert mig.from_text("mixed", "--mig-strategy") is MigStrategy.MIXED
    assert mig.from_file("single") is MigStrategy.SINGLE
    with pytest.raises(ConfigError) as info:  # exact case unless any_case
        mig.from_text("MIXED", "--mig-strategy")
    assert str(info.value) == "invalid --mig-strategy 'MIXED': must be one of none, single, mixed"
    assert ChoiceKind(LogLevel, any_case=True).from_text("Debug", "--log-level") is LogLevel.DEBUG
    refusing = ChoiceKind(DeviceDiscoveryStrategy, unsupported={"tegra": "not here"})
    with pytest.raises(ConfigError) as info:
        refusing.from_text("tegra", "--device-discovery-strategy")
    assert str(info.value) == "invalid --device-discovery-strategy 'tegra': not here"
    assert problem(refusing.from_file, "tegra").reason == "not here, got 'tegra'"


def test_log_level_takes_any_case_and_mig_strategy_only_its_own() -> None:
    assert resolved("plugin", ["--log-level", "DEBUG"]).daemon.log_level is LogLevel.DEBUG
    assert resolved("gfd", env={"GFD_LOG_LEVEL": "Warning"}).daemon.log_level is LogLevel.WARNING
    assert text_error("plugin", ["--mig-strategy", "Mixed"]) == (
        "invalid --mig-strategy 'Mixed': must be one of none, single, mixed")


def test_a_choice_key_given_a_number_says_so() -> None:
    assert file_error("flags:\n  migStrategy: 5\n") == (
        "cm.yaml:2: flags.migStrategy: must be a string, got a number 5")


# --- DurationKind ------------------------------------------------------------------------------


def test_duration_kinds_as_the_table_builds_them() -> None:
    seconds, positive = DurationKind(), DurationKind(allow_zero=False)
    assert (seconds.from_text("0", "--health-quiet-period"), seconds.from_file("0s")) == (0, 0)
    assert (positive.from_text("2", "--sleep-interval"), positive.from_file("1m")) == (2, 60)
    with pytest.raises(ConfigError) as info:
        positive.from_text("0", "--sleep-interval")
    assert str(info.value) == "invalid --sleep-interval '0': must be > 0"


@pytest.mark.parametrize(("value", "got"), [
    ("[60s]", "a list"), ("true", "a boolean"), ("{s: 60}", "a mapping")])
def test_a_duration_key_of_the_wrong_type_says_which(value: str, got: str) -> None:
    assert file_error(f"flags:\n  gfd:\n    sleepInterval: {value}\n") == (
        f'cm.yaml:3: flags.gfd.sleepInterval: must be a duration like "60s", got {got}')


# --- ChoiceListKind (deviceListStrategy) -------------------------------------------------------


def test_parse_device_list_strategy() -> None:
    # demo/node.py's entry point: several values, each a comma list, duplicates dropped.
    assert parse_device_list_strategy(["cdi-cri,envvar", " envvar "], "--x") == (
        DeviceListStrategy.CDI_CRI, DeviceListStrategy.ENVVAR)
    with pytest.raises(ConfigError) as info:
        parse_device_list_strategy(["envvar", "nfs"], "--device-list-strategy")
    assert str(info.value) == (
        f"invalid --device-list-strategy 'nfs': must be one of {STRATEGIES}")


def test_repeated_empty_strategy_flags_are_shown_as_given() -> None:
    assert text_error("plugin", ["--device-list-strategy", "", "--device-list-strategy", " "]) == (
        "invalid --device-list-strategy ', ': must name at least one strategy")


@pytest.mark.parametrize(("value", "expected"), [
    ("5", "cm.yaml:3: flags.plugin.deviceListStrategy: must be a string or a list of strings, "
     "got a number"),
    ("[envvar, 5]", "cm.yaml:3: flags.plugin.deviceListStrategy: must be a string or a list of "
     "strings, got a list"),
    ("[]", "cm.yaml:3: flags.plugin.deviceListStrategy: must name at least one strategy"),
    # One string: the message is about the key itself, not an item [0] the user never wrote.
    ("nfs", f"cm.yaml:3: flags.plugin.deviceListStrategy: must be one of {STRATEGIES}, "
     "got 'nfs'"),
])
def test_device_list_strategy_file_errors(value: str, expected: str) -> None:
    assert file_error(f"flags:\n  plugin:\n    deviceListStrategy: {value}\n") == expected


def test_a_default_of_several_strategies_is_shown_as_the_flag_takes_it() -> None:
    kind = ChoiceListKind(DeviceListStrategy)
    assert kind.show((DeviceListStrategy.ENVVAR, DeviceListStrategy.CDI_CRI)) == "envvar,cdi-cri"


def test_strategies_set_in_code_become_members_where_valid() -> None:
    # As for a single choice (test_config_table.py): plain strings set in code become members;
    # an unknown one is left as given, for the code that uses it to refuse.
    plugin = PluginFlags(device_list_strategy=("cdi-cri", "bogus"))  # type: ignore[arg-type]
    first, second = plugin.device_list_strategy
    assert first is DeviceListStrategy.CDI_CRI
    assert second == "bogus" and type(second) is str


# --- VersionKind (the file's version; no flag reads it today) --------------------------------


def test_version_kind() -> None:
    kind = VersionKind("v1")
    assert (kind.from_file("v1"), kind.from_text(" v1 ", "CONFIG_VERSION")) == ("v1", "v1")
    assert problem(kind.from_file, "v2").reason == "unknown version 'v2': must be v1"
    with pytest.raises(ConfigError) as info:
        kind.from_text("v2", "CONFIG_VERSION")
    assert str(info.value) == "invalid CONFIG_VERSION 'v2': must be v1"


# --- NumberKind ----------------------------------------------------------------------------------


def test_number_kinds_as_the_table_builds_them() -> None:
    plain = NumberKind()  # any number >= 0
    assert (plain.from_text("0", "--n"), plain.from_text("0.5", "--n")) == (0.0, 0.5)
    with pytest.raises(ConfigError) as info:
        plain.from_text("-1", "--n")
    assert str(info.value) == "invalid --n '-1': must be a number >= 0"
    whole = NumberKind(integer=True, minimum=1)
    with pytest.raises(ConfigError) as info:
        whole.from_text("1.5", "--kube-api-burst")
    assert str(info.value) == "invalid --kube-api-burst '1.5': must be a whole number >= 1"


def test_the_minimum_itself_is_allowed_and_whole_numbers_stay_whole() -> None:
    flags = resolved("gfd", env={"KUBE_API_QPS": "0.01", "KUBE_API_BURST": "1"}).flags
    assert (flags.kube_api_qps, flags.kube_api_burst) == (0.01, 1)
    flags = resolved("gfd", env={"KUBE_API_QPS": "2.5", "KUBE_API_BURST": "3"}).flags
    assert flags.kube_api_qps == 2.5
    assert type(flags.kube_api_burst) is int and str(flags.kube_api_burst) == "3"


def test_number_kind_from_the_file() -> None:
    # No number row has a file key today; a parsed YAML/JSON number is read like a flag's.
    whole = NumberKind(integer=True, minimum=1)
    assert whole.from_file(1) == 1 and type(whole.from_file(2.0)) is int
    assert NumberKind(minimum=0.01).from_file(2.5) == 2.5
    for value, got in ((0, "a number 0"), (1.5, "a number 1.5"), (True, "a boolean True"),
                       ("3", "a string '3'")):
        assert problem(whole.from_file, value).reason == f"must be a whole number >= 1, got {got}"


# --- TextListKind --------------------------------------------------------------------------------


def test_a_text_list_key_takes_one_string() -> None:
    config = parse_config("flags:\n  plugin:\n    cdiFeatureFlags: disable-ipc-discoverer\n")
    assert config.flags.plugin.cdi_feature_flags == ("disable-ipc-discoverer",)


def test_a_text_list_key_of_the_wrong_type_says_which() -> None:
    assert file_error("flags:\n  plugin:\n    cdiFeatureFlags: 5\n") == (
        "cm.yaml:3: flags.plugin.cdiFeatureFlags: must be a string or a list of strings, "
        "got a number")


# --- ImexChannelsKind ----------------------------------------------------------------------------


def test_bad_imex_channels_are_shown_as_given() -> None:
    assert text_error("plugin", ["--imex-channel-ids", "0, x"]) == (
        f"invalid --imex-channel-ids '0,x': {IMEX_REASON}")
    assert text_error("plugin", ["--imex-channel-ids", "0", "--imex-channel-ids", "-1"]) == (
        f"invalid --imex-channel-ids '0,-1': {IMEX_REASON}")


@pytest.mark.parametrize("text", ["\u00b2", "0,\u0663", "\u2460"])  # ², Arabic-Indic 3, ①
def test_imex_channels_are_ascii_numbers(text: str) -> None:
    # Bug fixed: str.isdigit() let "²" through to int(), whose ValueError escaped resolve()
    # and reload() (a traceback at start; on SIGHUP with such a ConfigMap, the plugin ended).
    assert text_error("plugin", env={"IMEX_CHANNEL_IDS": text}) == (
        f"invalid IMEX_CHANNEL_IDS {text!r}: {IMEX_REASON}")
    assert file_error(f"imex:\n  channelIDs: [{text}]\n").startswith(
        f"cm.yaml:2: imex.channelIDs: {IMEX_REASON}, got a list")


@pytest.mark.parametrize(("value", "got"), [
    ("1.5", "a number 1.5"), ("{'0': 1}", "a mapping {'0': 1}")])
def test_imex_channels_in_the_file_of_the_wrong_type(value: str, got: str) -> None:
    assert file_error(f"imex:\n  channelIDs: {value}\n") == (
        f"cm.yaml:2: imex.channelIDs: {IMEX_REASON}, got {got}")


# --- show: a default as the help text (--help) writes it --------------------------------------


@pytest.mark.parametrize(("name", "help_text"), [
    ("kubelet_socket", "kubelet registration socket; empty skips registration "
     "(default /var/lib/kubelet/device-plugins/kubelet.sock)"),
    ("pass_device_specs", "pass device specs to the kubelet in Allocate (default false)"),
    ("fail_on_init_error", "exit on NVML initialisation errors; false logs and idles "
     "(default true)"),
    ("mig_strategy", "how MIG devices are advertised: none, single or mixed (default none)"),
    ("device_list_strategy", f"how Allocate passes devices: comma list of {STRATEGIES} "
     "(default envvar)"),
    ("sleep_interval", 'time between labelling passes: Go duration ("60s", "1m30s") or seconds '
     "(default 60s)"),
    ("kube_api_burst", "burst of the client-side API rate limit (default 10)"),
])
def test_help_shows_the_default_as_it_would_be_typed(name: str, help_text: str) -> None:
    row = next(row for row in rows(Config) if row.name == name)
    assert row.help_text() == help_text


def test_list_kinds_show_a_default_as_a_comma_list_or_none() -> None:
    # The rows of these kinds write "(default none)" in words today; show is what {default}
    # in their help would print.
    for kind in (TextListKind(), ImexChannelsKind()):
        assert (kind.show(()), kind.show(("0", "3"))) == ("none", "0,3")
