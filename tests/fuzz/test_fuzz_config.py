"""Fuzzing the v1 config parser: random documents and mutations of valid ones.

``parse_config`` must return a Config or raise ConfigError whose message starts with
``<file>[:<line>]:`` (a line within the document when given); never any other exception.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpus.config import MAX_EXPANDED_NODES, Config, ConfigError, parse_config

from .strategies import TEXT, dump, fuzz_settings, json_values, mutated_text

SOURCE = "fuzz.yaml"
ROOT = Path(__file__).resolve().parents[2]
WHERE = re.compile(rf"^{re.escape(SOURCE)}(?::(\d+))?: ")

VALID = [
    "",
    "version: v1\n",
    "version: v1\nflags:\n  migStrategy: mixed\n  failOnInitError: false\n"
    "  plugin:\n    deviceListStrategy: [envvar, cdi-cri]\n    deviceIDStrategy: index\n"
    "    healthQuietPeriod: 1m30s\n  gfd:\n    oneshot: true\n    sleepInterval: 60s\n",
    "version: v1\nsharing:\n  timeSlicing:\n    renameByDefault: true\n"
    "    failRequestsGreaterThanOne: true\n    resources:\n"
    "    - name: nvidia.com/gpu\n      replicas: 4\n      devices: [0, 1, \"2:0\"]\n"
    "    - name: nvidia.com/mig-1g.5gb\n      replicas: 2\n      rename: small\n",
    '{"version": "v1", "flags": {"migStrategy": "single", "plugin": {"passDeviceSpecs": true}},'
    ' "sharing": {"timeSlicing": {"resources": [{"name": "gpu", "replicas": 3, "devices": 2}]}}}',
]
KEYS = st.one_of(
    st.sampled_from([
        "version", "flags", "sharing", "resources", "imex", "migStrategy", "failOnInitError",
        "nvidiaDriverRoot", "plugin", "gfd", "passDeviceSpecs", "deviceListStrategy",
        "deviceIDStrategy", "kubeletSocket", "sharedDevicesAllocationPolicy", "cdiSpecDir",
        "healthRecoveryInterval", "healthQuietPeriod", "oneshot", "noTimestamp",
        "sleepInterval", "outputFile", "machineTypeFile", "timeSlicing", "renameByDefault",
        "failRequestsGreaterThanOne", "name", "replicas", "rename", "devices", "mps",
    ]),
    TEXT,
)


def overlay_config() -> str:
    """The time-slicing overlay's config.yaml, cut out of its ConfigMap."""
    text = (ROOT / "daemonset" / "overlays" / "time-slicing" / "config.yaml").read_text()
    body = text.split("config.yaml: |\n", 1)[1]
    return "".join(line[4:] + "\n" for line in body.splitlines())


SEEDS = [*VALID, overlay_config()]


def check(text: str) -> None:
    """The property: a Config, or a ConfigError naming the file (and a real line)."""
    try:
        result = parse_config(text, SOURCE)
    except ConfigError as err:
        match = WHERE.match(str(err))
        assert match, f"message does not start with {SOURCE}[:line]: {err}"
        if match.group(1) is not None:
            assert 1 <= int(match.group(1)) <= text.count("\n") + 1, str(err)
        return
    assert isinstance(result, Config)


@st.composite
def structured(draw: st.DrawFn) -> Any:
    """Documents shaped like a config, every value of a random type."""
    value = json_values(KEYS)
    resource = st.fixed_dictionaries(
        {}, optional={"name": st.one_of(TEXT, st.just("nvidia.com/gpu"), value),
                      "replicas": st.one_of(st.integers(-3, 10), value),
                      "rename": value, "devices": value})
    doc = draw(st.fixed_dictionaries({}, optional={
        "version": st.one_of(st.just("v1"), value),
        "flags": st.one_of(value, st.fixed_dictionaries({}, optional={
            "migStrategy": value, "plugin": st.dictionaries(KEYS, value, max_size=4),
            "gfd": st.dictionaries(KEYS, value, max_size=4)})),
        "sharing": st.one_of(value, st.fixed_dictionaries({}, optional={
            "timeSlicing": st.one_of(value, st.fixed_dictionaries({}, optional={
                "resources": st.one_of(value, st.lists(resource, max_size=4)),
                "renameByDefault": value}))})),
    }))
    return doc


@fuzz_settings(120)
@given(st.one_of(structured(), json_values(KEYS)), st.booleans())
def test_random_documents(document: Any, as_json: bool) -> None:
    check(dump(document, as_json))


@fuzz_settings(150)
@given(st.one_of(structured(), json_values(KEYS)))
def test_random_mappings_without_text(document: Any) -> None:
    """Already-parsed data (no line numbers): still only Config or ConfigError."""
    try:
        assert isinstance(parse_config(document, SOURCE), Config)
    except ConfigError as err:
        assert str(err).startswith(SOURCE), str(err)


@fuzz_settings(500)
@given(mutated_text(SEEDS))
def test_mutations_of_valid_configs(text: str) -> None:
    check(text)


@pytest.mark.parametrize("text", SEEDS)
def test_seeds_are_valid(text: str) -> None:
    assert isinstance(parse_config(text, SOURCE), Config)


# --- regressions found by fuzzing -------------------------------------------------------------


def bounded(call: Callable[[], None], timeout: float = 30.0) -> None:
    """Run ``call`` in a thread; fail (instead of hanging the suite) if it does not finish."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            call()
        except BaseException as err:  # handed to the test thread
            errors.append(err)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"still running after {timeout}s"
    if errors:
        raise errors[0]


@pytest.mark.parametrize(("text", "where"), [
    ("&a [*a]\n", "fuzz.yaml:1: [0]: recursive YAML alias"),
    ("version: v1\nflags: &f\n  plugin: *f\n", "fuzz.yaml:2: flags.plugin: recursive YAML alias"),
    ("sharing:\n  timeSlicing:\n    resources: &r [*r]\n",
     "fuzz.yaml:3: sharing.timeSlicing.resources[0]: recursive"),
])
def test_recursive_alias_is_a_config_error(text: str, where: str) -> None:
    """Was RecursionError: the line recorder followed the alias back into its own anchor."""
    with pytest.raises(ConfigError) as info:
        parse_config(text, SOURCE)
    assert str(info.value).startswith(where)


def test_billion_laughs_is_refused_at_once() -> None:
    """Was exponential (10^9 paths walked, hours): aliases are now expanded to a bound."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 10)]
    text = "\n".join(["version: v1", *lines, ""])
    errors: list[ConfigError] = []

    def parse() -> None:
        with pytest.raises(ConfigError) as info:
            parse_config(text, SOURCE)
        errors.append(info.value)

    bounded(parse)
    assert str(errors[0]) == (f"{SOURCE}: excessive aliasing: more than {MAX_EXPANDED_NODES} "
                              "values once YAML aliases are expanded")


def test_reused_anchor_within_the_bound_is_fine() -> None:
    text = ("version: v1\nsharing:\n  timeSlicing:\n    resources:\n"
            "    - &r {name: nvidia.com/gpu, replicas: 2}\n"
            "    - {name: nvidia.com/mig-1g.5gb, replicas: 2}\n")
    assert len(parse_config(text, SOURCE).sharing.time_slicing.resources) == 2


@pytest.mark.parametrize("text", ["[" * 1500 + "]" * 1500, "- " * 1500 + "x",
                                  '{"a":' * 1500 + "1" + "}" * 1500])
def test_deep_nesting_is_a_config_error(text: str) -> None:
    """Was RecursionError from PyYAML's recursive composer."""
    with pytest.raises(ConfigError) as info:
        parse_config(text, SOURCE)
    assert str(info.value) == f"{SOURCE}: not valid YAML: nested too deeply"


def test_construction_errors_are_one_line_with_the_line() -> None:
    """Was a multi-line PyYAML dump without the file's line number."""
    with pytest.raises(ConfigError) as info:
        parse_config("version: v1\n? [a]\n: b\n", SOURCE)
    assert str(info.value) == f"{SOURCE}:2: not valid YAML: found unhashable key"
