"""The configuration table, row by row: every flag alias, every env name and the config-file
key of every setting resolve into the right field with flag > env > file > default, on start
(``resolve``) and on reload (``reload`` with the same args and environment).

The cases are generated from the table (gpus.config.table.rows); ``EXPECTED`` below is written
by hand so that a row whose flag, variable or key changes (or a row added or dropped) fails
here instead of drifting silently.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from deviceplugin.allocate import build_allocation
from gfd.labels import node_labels
from gpus.config import (
    AllocationPolicy,
    Config,
    ConfigError,
    DeviceIdStrategy,
    DeviceListStrategy,
    Flags,
    MigStrategy,
    PluginFlags,
    add_flags,
    reload,
    resolve,
)
from gpus.config.enums import Choice
from gpus.config.sharing import ReplicatedResource, ResourceListKind
from gpus.config.table import PROGRAMS, Row, rows
from gpus.config.values import (
    BoolKind,
    ChoiceKind,
    ChoiceListKind,
    DurationKind,
    ImexChannelsKind,
    Kind,
    NumberKind,
    TextKind,
    TextListKind,
    VersionKind,
)
from gpus.model import Snapshot
from gpus.resources import build_resource_map


def both(*names: str) -> dict[str, tuple[str, ...]]:
    return {"plugin": names, "gfd": names}


def every(*names: str) -> dict[str, tuple[str, ...]]:
    return {"plugin": names, "gfd": names, "exporter": names}


def exporter(flags: tuple[str, ...], *names: str
             ) -> tuple[tuple[str, ...], dict[str, tuple[str, ...]], None]:
    return flags, {"exporter": names}, None


# field path -> (flags, env names per daemon, config-file path). Hand-written: NVIDIA's names.
EXPECTED: dict[str, tuple[tuple[str, ...], dict[str, tuple[str, ...]], str | None]] = {
    "version": ((), {}, "version"),
    "flags.mig_strategy": (("--mig-strategy",), {"plugin": ("MIG_STRATEGY",),
                           "gfd": ("GFD_MIG_STRATEGY", "MIG_STRATEGY")}, "flags.migStrategy"),
    "flags.fail_on_init_error": (("--fail-on-init-error",), {
        "plugin": ("FAIL_ON_INIT_ERROR",),
        "gfd": ("GFD_FAIL_ON_INIT_ERROR", "FAIL_ON_INIT_ERROR")}, "flags.failOnInitError"),
    "flags.nvidia_driver_root": (("--driver-root", "--nvidia-driver-root"),
                                 both("NVIDIA_DRIVER_ROOT"), "flags.nvidiaDriverRoot"),
    "flags.nvidia_dev_root": (("--dev-root", "--nvidia-dev-root"), both("NVIDIA_DEV_ROOT"),
                              "flags.nvidiaDevRoot"),
    "flags.nvml": (("--nvml",), every("NVML_BACKEND"), None),
    "flags.sysfs_root": (("--sysfs-root",), every("SYSFS_ROOT"), None),
    "flags.device_discovery_strategy": (("--device-discovery-strategy",),
                                        both("DEVICE_DISCOVERY_STRATEGY"),
                                        "flags.deviceDiscoveryStrategy"),
    "flags.gdrcopy_enabled": (("--gdrcopy-enabled",), {"plugin": ("GDRCOPY_ENABLED",)},
                              "flags.gdrcopyEnabled"),
    "flags.gds_enabled": (("--gds-enabled",), {"plugin": ("GDS_ENABLED",)}, "flags.gdsEnabled"),
    "flags.mofed_enabled": (("--mofed-enabled",), {"plugin": ("MOFED_ENABLED",)},
                            "flags.mofedEnabled"),
    "flags.mps_root": (("--mps-root",), {"plugin": ("MPS_ROOT",)}, "flags.mpsRoot"),
    # NodeFeature output (GFD), together:
    "flags.use_node_feature_api": (("--use-node-feature-api",), {
        "gfd": ("GFD_USE_NODE_FEATURE_API", "USE_NODE_FEATURE_API")}, "flags.useNodeFeatureAPI"),
    "flags.namespace": (("--namespace",), {"gfd": ("NAMESPACE",)}, None),
    "flags.pod_name": (("--pod-name",), {"gfd": ("POD_NAME",)}, None),
    "flags.kube_api_qps": (("--kube-api-qps",), {"gfd": ("KUBE_API_QPS",)}, None),
    "flags.kube_api_burst": (("--kube-api-burst",), {"gfd": ("KUBE_API_BURST",)}, None),
    "flags.plugin.pass_device_specs": (("--pass-device-specs",),
                                       {"plugin": ("PASS_DEVICE_SPECS",)},
                                       "flags.plugin.passDeviceSpecs"),
    "flags.plugin.device_list_strategy": (("--device-list-strategy",),
                                          {"plugin": ("DEVICE_LIST_STRATEGY",)},
                                          "flags.plugin.deviceListStrategy"),
    "flags.plugin.device_id_strategy": (("--device-id-strategy",),
                                        {"plugin": ("DEVICE_ID_STRATEGY",)},
                                        "flags.plugin.deviceIDStrategy"),
    "flags.plugin.shared_devices_allocation_policy": (
        ("--shared-devices-allocation-policy",),
        {"plugin": ("SHARED_DEVICES_ALLOCATION_POLICY",)},
        "flags.plugin.sharedDevicesAllocationPolicy"),
    "flags.plugin.kubelet_socket": (("--kubelet-socket",), {"plugin": ("KUBELET_SOCKET",)},
                                    "flags.plugin.kubeletSocket"),
    "flags.plugin.cdi_spec_dir": (("--cdi-spec-dir",), {"plugin": ("CDI_SPEC_DIR",)},
                                  "flags.plugin.cdiSpecDir"),
    "flags.plugin.health_recovery_interval": (("--health-recovery-interval",),
                                              {"plugin": ("HEALTH_RECOVERY_INTERVAL",)},
                                              "flags.plugin.healthRecoveryInterval"),
    "flags.plugin.health_quiet_period": (("--health-quiet-period",),
                                         {"plugin": ("HEALTH_QUIET_PERIOD",)},
                                         "flags.plugin.healthQuietPeriod"),
    "flags.plugin.cdi_annotation_prefix": (("--cdi-annotation-prefix",),
                                           {"plugin": ("CDI_ANNOTATION_PREFIX",)},
                                           "flags.plugin.cdiAnnotationPrefix"),
    "flags.plugin.nvidia_cdi_hook_path": (("--nvidia-cdi-hook-path", "--nvidia-ctk-path"),
                                          {"plugin": ("NVIDIA_CDI_HOOK_PATH", "NVIDIA_CTK_PATH")},
                                          "flags.plugin.nvidiaCTKPath"),
    "flags.plugin.container_driver_root": (("--driver-root-ctr-path", "--container-driver-root"),
                                           both("DRIVER_ROOT_CTR_PATH", "CONTAINER_DRIVER_ROOT"),
                                           "flags.plugin.containerDriverRoot"),
    "flags.plugin.cdi_feature_flags": (("--cdi-feature-flags",),
                                       {"plugin": ("CDI_FEATURE_FLAGS",)},
                                       "flags.plugin.cdiFeatureFlags"),
    "flags.plugin.cdi_disable_hooks": (("--cdi-disable-hooks",),
                                       {"plugin": ("CDI_DISABLE_HOOKS",)}, None),
    "flags.gfd.oneshot": (("--oneshot",), {"gfd": ("GFD_ONESHOT",)}, "flags.gfd.oneshot"),
    "flags.gfd.no_timestamp": (("--no-timestamp",), {"gfd": ("GFD_NO_TIMESTAMP",)},
                               "flags.gfd.noTimestamp"),
    "flags.gfd.sleep_interval": (("--sleep-interval",), {"gfd": ("GFD_SLEEP_INTERVAL",)},
                                 "flags.gfd.sleepInterval"),
    "flags.gfd.output_file": (("--output-file", "--output", "-o"),
                              {"gfd": ("GFD_OUTPUT_FILE",)}, "flags.gfd.outputFile"),
    "flags.gfd.machine_type_file": (("--machine-type-file",),
                                    {"gfd": ("GFD_MACHINE_TYPE_FILE",)},
                                    "flags.gfd.machineTypeFile"),
    "sharing.time_slicing.rename_by_default": ((), {}, "sharing.timeSlicing.renameByDefault"),
    "sharing.time_slicing.fail_requests_greater_than_one": (
        (), {}, "sharing.timeSlicing.failRequestsGreaterThanOne"),
    "sharing.time_slicing.resources": ((), {}, "sharing.timeSlicing.resources"),
    "sharing.mps.rename_by_default": ((), {}, "sharing.mps.renameByDefault"),
    "sharing.mps.fail_requests_greater_than_one": (
        (), {}, "sharing.mps.failRequestsGreaterThanOne"),
    "sharing.mps.resources": ((), {}, "sharing.mps.resources"),
    "imex.channel_ids": (("--imex-channel-ids",), {"plugin": ("IMEX_CHANNEL_IDS",)},
                         "imex.channelIDs"),
    "imex.required": (("--imex-required",), {"plugin": ("IMEX_REQUIRED",)}, "imex.required"),
    "config_file": (("--config-file",), {"plugin": ("CONFIG_FILE",),
                                         "gfd": ("GFD_CONFIG_FILE", "CONFIG_FILE")}, None),
    # The daemons' own options: flags and variables only, never in the file.
    "daemon.log_level": (("--log-level",), {"plugin": ("DP_LOG_LEVEL",),
                                            "gfd": ("GFD_LOG_LEVEL",),
                                            "exporter": ("GPU_EXPORTER_LOG_LEVEL",)}, None),
    "daemon.plugin.socket_dir": (("--socket-dir",), {"plugin": ("PLUGIN_SOCKET_DIR",)}, None),
    "daemon.plugin.ready_file": (("--ready-file",), {"plugin": ("DP_READY_FILE",)}, None),
    "daemon.plugin.status_file": (("--status-file",), {"plugin": ("DP_STATUS_FILE",)}, None),
    "daemon.plugin.metrics_address": (("--metrics-address",), {"plugin": ("DP_METRICS_ADDRESS",)},
                                      None),
    "daemon.plugin.disable_healthchecks": ((), {"plugin": ("DP_DISABLE_HEALTHCHECKS",)}, None),
    "daemon.plugin.enable_healthchecks": ((), {"plugin": ("DP_ENABLE_HEALTHCHECKS",)}, None),
    "daemon.gfd.output_mode": (("--output-mode",), {"gfd": ("GFD_OUTPUT_MODE",)}, None),
    "daemon.gfd.node_name": (("--node-name",), {"gfd": ("NODE_NAME",)}, None),
    "daemon.gfd.kubeconfig": (("--kubeconfig",), {"gfd": ("GFD_KUBECONFIG", "KUBECONFIG")},
                              None),
    "daemon.gfd.health_file": (("--health-file",), {"gfd": ("GFD_HEALTH_FILE",)}, None),
    "daemon.gfd.dry_run": (("--dry-run",), {"gfd": ()}, None),  # flag only
    "daemon.gfd.metrics_address": (("--metrics-address",), {"gfd": ("GFD_METRICS_ADDRESS",)},
                                   None),
    # gpu-metrics-exporter: dcgm-exporter's flags and variables (pkg/cmd/app.go).
    "daemon.exporter.collectors": exporter(("-f", "--collectors"), "DCGM_EXPORTER_COLLECTORS"),
    "daemon.exporter.address": exporter(("-a", "--address"), "DCGM_EXPORTER_LISTEN"),
    "daemon.exporter.collect_interval": exporter(("-c", "--collect-interval"),
                                                 "DCGM_EXPORTER_INTERVAL"),
    "daemon.exporter.kubernetes": exporter(("-k", "--kubernetes"), "DCGM_EXPORTER_KUBERNETES"),
    "daemon.exporter.kubernetes_gpu_id_type": exporter(
        ("--kubernetes-gpu-id-type",), "DCGM_EXPORTER_KUBERNETES_GPU_ID_TYPE"),
    "daemon.exporter.pod_resources_kubelet_socket": exporter(
        ("--pod-resources-kubelet-socket",), "DCGM_POD_RESOURCES_KUBELET_SOCKET"),
    "daemon.exporter.nvidia_resource_names": exporter(("--nvidia-resource-names",),
                                                      "NVIDIA_RESOURCE_NAMES"),
    "daemon.exporter.no_hostname": exporter(("-n", "--no-hostname"),
                                            "DCGM_EXPORTER_NO_HOSTNAME"),
    "daemon.exporter.replace_blanks_in_model_name": exporter(
        ("--replace-blanks-in-model-name", "-rbmn"), "DCGM_EXPORTER_REPLACE_BLANKS_IN_MODEL_NAME"),
    "daemon.exporter.use_old_namespace": exporter(("--use-old-namespace", "-o"),
                                                  "DCGM_EXPORTER_USE_OLD_NAMESPACE"),
    "daemon.exporter.xid_count_window_size": exporter(("-x", "--xid-count-window-size"),
                                                      "DCGM_EXPORTER_XID_COUNT_WINDOW_SIZE"),
    "daemon.exporter.web_config_file": exporter(("--web-config-file",),
                                                "DCGM_EXPORTER_WEB_CONFIG_FILE"),
    "daemon.exporter.node_name": exporter((), "NODE_NAME"),  # variable only
}

TABLE: tuple[Row, ...] = tuple(rows(Config))
# The daemons that read NVIDIA's config file (the exporter reads flags and variables only).
FILE_PROGRAMS = tuple(p for p in PROGRAMS
                      if p in next(r for r in TABLE if r.name == "config_file").setting.daemons)


def field_path(row: Row) -> str:
    return ".".join((*row.section, row.name))


def value_of(config: Config, row: Row) -> Any:
    target: Any = config
    for attr in (*row.section, row.name):
        target = getattr(target, attr)
    return target


@dataclasses.dataclass(frozen=True)
class Sample:
    """One value of a row: as a flag/env string, as a file value, and as resolved."""

    text: str
    file: Any
    expected: Any


def samples(row: Row, tmp_path: Path) -> tuple[Sample, Sample]:
    """Two different values for ``row``, the first never its default (built from its kind)."""
    kind, default = row.setting.kind, row.default
    if row.name == "config_file":  # its value is a file that must exist
        paths = [tmp_path / "a.yaml", tmp_path / "b.yaml"]
        for path in paths:
            path.write_text("{}\n")
        return Sample(str(paths[0]), None, str(paths[0])), Sample(str(paths[1]), None,
                                                                  str(paths[1]))
    return _KIND_SAMPLES[type(kind)](kind, default, row.name)


def _bool_samples(kind: Kind, default: Any, name: str) -> tuple[Sample, Sample]:
    if default is None:  # unset by default (use_node_feature_api): both values are samples
        return Sample("true", True, True), Sample("false", False, False)
    return (Sample(str(not default).lower(), not default, not default),
            Sample(str(default).lower(), default, default))


def _text_samples(kind: Kind, default: Any, name: str) -> tuple[Sample, Sample]:
    return Sample(f"/a/{name}", f"/a/{name}", f"/a/{name}"), Sample(f"/b/{name}", f"/b/{name}",
                                                                   f"/b/{name}")


def _choice_samples(kind: Kind, default: Any, name: str) -> tuple[Sample, Sample]:
    assert isinstance(kind, ChoiceKind)
    if default is None:  # unset by default (output_mode): two real choices
        first, second = kind.choices[:2]
        return (Sample(first, first, kind.choice(first)),
                Sample(second, second, kind.choice(second)))
    other = next(value for value in kind.choices if value != default)
    return (Sample(other, other, kind.choice(other)),
            Sample(str(default), str(default), kind.choice(default)))


def _choice_list_samples(kind: Kind, default: Any, name: str) -> tuple[Sample, Sample]:
    assert isinstance(kind, ChoiceListKind)
    first = tuple(reversed(kind.choices))[:2]
    second = kind.choices[1:2]
    assert first != tuple(default) and second != first
    return (Sample(",".join(first), list(first), tuple(kind.choice(v) for v in first)),
            Sample(",".join(second), list(second), tuple(kind.choice(v) for v in second)))


def _duration_samples(kind: Kind, default: Any, name: str) -> tuple[Sample, Sample]:
    assert default not in (7.0, 90.0)
    return Sample("7s", "7s", 7.0), Sample("1m30s", 90, 90.0)


def _number_samples(kind: Kind, default: Any, name: str) -> tuple[Sample, Sample]:
    assert isinstance(kind, NumberKind) and default not in (7, 90)
    return Sample("7", 7, 7), Sample("90", 90, 90)


def _version_samples(kind: Kind, default: Any, name: str) -> tuple[Sample, Sample]:
    # One valid value only: the file test below checks a wrong one is refused at this key.
    return Sample("v1", "v1", "v1"), Sample("v1", "v1", "v1")


def _resources_samples(kind: Kind, default: Any, name: str) -> tuple[Sample, Sample]:
    return (Sample("", [{"name": "gpu", "replicas": 3}],
                   (ReplicatedResource("nvidia.com/gpu", 3),)),
            Sample("", [{"name": "gpu", "replicas": 2}],
                   (ReplicatedResource("nvidia.com/gpu", 2),)))


def _text_list_samples(kind: Kind, default: Any, name: str) -> tuple[Sample, Sample]:
    return (Sample("a,b", ["a", "b"], ("a", "b")), Sample("c", ["c"], ("c",)))


def _imex_samples(kind: Kind, default: Any, name: str) -> tuple[Sample, Sample]:
    return (Sample("0,3", [0, 3], ("0", "3")), Sample("all", "all", ("all",)))


_KIND_SAMPLES: dict[type, Callable[[Kind, Any, str], tuple[Sample, Sample]]] = {
    BoolKind: _bool_samples,
    NumberKind: _number_samples,
    TextKind: _text_samples,
    ChoiceKind: _choice_samples,
    ChoiceListKind: _choice_list_samples,
    DurationKind: _duration_samples,
    VersionKind: _version_samples,
    ResourceListKind: _resources_samples,
    TextListKind: _text_list_samples,
    ImexChannelsKind: _imex_samples,
}


def file_text(path: str, value: Any) -> str:
    """A config file (JSON, which is YAML) holding ``value`` at dotted ``path``."""
    document: Any = value
    for key in reversed(path.split(".")):
        document = {key: document}
    if path.startswith("sharing.mps."):  # the plugin refuses MPS sharing without an MPS root
        document["flags"] = {"mpsRoot": "/run/nvidia/mps"}
    return json.dumps(document, indent=1)


def parser_for(program: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=program)
    add_flags(parser, program)  # type: ignore[arg-type]  # parametrized names: plain str
    return parser


def start_and_reload(program: str, argv: Sequence[str], environ: Mapping[str, str],
                     row: Row) -> tuple[Any, Any]:
    """The row's value after resolve, and after a reload from another configuration with the
    same args and environment (a reload that forgot either would differ)."""
    args = parser_for(program).parse_args(list(argv))
    started = resolve(args, environ)
    reloaded, error = reload(Config(), args, environ)
    assert error is None
    return value_of(started, row), value_of(reloaded, row)


def rows_with_daemon() -> list[tuple[Row, str]]:
    return [(row, daemon) for row in TABLE for daemon in row.setting.daemons]


def row_id(case: object) -> str:
    if isinstance(case, tuple):
        return f"{field_path(case[0])}-{case[1]}"
    return field_path(case) if isinstance(case, Row) else str(case)


# --- the table is what NVIDIA's names say ------------------------------------------------------


def test_table_matches_the_hand_written_names() -> None:
    actual = {field_path(row): (row.setting.flags, dict(row.setting.env), row.file_path)
              for row in TABLE}
    assert actual == EXPECTED


def test_every_daemon_flag_has_one_dest_and_no_env_name_serves_two_rows() -> None:
    for program in PROGRAMS:
        mine = [row for row in TABLE if program in row.setting.daemons]
        assert len({row.name for row in mine}) == len(mine)
        names = [name for row in mine for name in row.setting.env[program]]
        assert len(set(names)) == len(names), program


# --- flag > env > file > default, on start and on reload --------------------------------------


@pytest.mark.parametrize("case", rows_with_daemon(), ids=row_id)
def test_every_flag_alias_beats_env_and_file(case: tuple[Row, str], tmp_path: Path) -> None:
    row, daemon = case
    first, second = samples(row, tmp_path)
    environ = {name: second.text for name in row.setting.env[daemon]}
    argv: list[str] = []
    if row.file_path is not None:
        path = tmp_path / "config.json"
        path.write_text(file_text(row.file_path, second.file))
        argv = ["--config-file", str(path)]
    for flag in row.setting.flags:
        got = start_and_reload(daemon, [*argv, flag, first.text], environ, row)
        assert got == (first.expected, first.expected), (flag, got)


@pytest.mark.parametrize("case", rows_with_daemon(), ids=row_id)
def test_every_env_name_beats_the_file(case: tuple[Row, str], tmp_path: Path) -> None:
    row, daemon = case
    first, second = samples(row, tmp_path)
    argv: list[str] = []
    if row.file_path is not None:
        path = tmp_path / "config.json"
        path.write_text(file_text(row.file_path, second.file))
        argv = ["--config-file", str(path)]
    names = row.setting.env[daemon]
    if not names:
        return  # a flag-only row (--dry-run): no variable to check
    for name in names:
        got = start_and_reload(daemon, argv, {name: first.text}, row)
        assert got == (first.expected, first.expected), (name, got)
    # The first name wins over the later ones (GFD_MIG_STRATEGY before MIG_STRATEGY).
    both_set = {name: second.text for name in names[1:]} | {names[0]: first.text}
    assert start_and_reload(daemon, argv, both_set, row) == (first.expected, first.expected)


@pytest.mark.parametrize("case", rows_with_daemon(), ids=row_id)
def test_empty_env_is_unset_unless_the_row_says(case: tuple[Row, str], tmp_path: Path) -> None:
    row, daemon = case
    for name in row.setting.env[daemon]:
        got = start_and_reload(daemon, [], {name: ""}, row)
        expected = "" if row.setting.empty_is_value else row.default
        assert got == (expected, expected), name


@pytest.mark.parametrize("row", [row for row in TABLE if row.file_path], ids=row_id)
def test_the_file_key_beats_the_default_for_both_daemons(row: Row, tmp_path: Path) -> None:
    assert row.file_path is not None
    first, _ = samples(row, tmp_path)
    path = tmp_path / "config.json"
    path.write_text(file_text(row.file_path, first.file))
    for program in FILE_PROGRAMS:
        for argv, environ in ((["--config-file", str(path)], {}),
                              ([], {"CONFIG_FILE": str(path)})):
            got = start_and_reload(program, argv, environ, row)
            assert got == (first.expected, first.expected), (program, argv)
        assert start_and_reload(program, [], {}, row) == (row.default, row.default)


@pytest.mark.parametrize("row", [row for row in TABLE if row.file_path], ids=row_id)
def test_a_wrong_value_at_the_file_key_names_it(row: Row, tmp_path: Path) -> None:
    # Proves the key is read into this row's kind even where one value is all it can take.
    assert row.file_path is not None
    path = tmp_path / "config.json"
    path.write_text(file_text(row.file_path, {"nested": 1}))
    line = 1 + row.file_path.count(".") + 1
    with pytest.raises(ConfigError, match=rf"^{re.escape(f'{path}:{line}: {row.file_path}: ')}"):
        resolve(parser_for("plugin").parse_args(["--config-file", str(path)]), {})


@pytest.mark.parametrize("case", [(row, daemon) for row in TABLE for daemon in PROGRAMS
                                  if row.setting.daemons and daemon not in row.setting.daemons],
                         ids=row_id)
def test_the_other_daemon_neither_defines_nor_reads_it(case: tuple[Row, str],
                                                       tmp_path: Path) -> None:
    row, daemon = case
    first, _ = samples(row, tmp_path)
    theirs = {f for r in TABLE if daemon in r.setting.daemons for f in r.setting.flags}
    for flag in row.setting.flags:
        if flag in theirs:  # the same letter, another row of its own (-o: GFD's output file)
            continue
        with pytest.raises(SystemExit):
            parser_for(daemon).parse_args([flag, first.text])
    environ = {name: first.text for names in row.setting.env.values() for name in names}
    assert start_and_reload(daemon, [], environ, row) == (row.default, row.default)


# --- typed strategies, and the strings they print as -------------------------------------------


@pytest.mark.parametrize("choice", [MigStrategy, DeviceListStrategy, DeviceIdStrategy,
                                    AllocationPolicy])
def test_choice_members_print_as_their_value(choice: type[Choice]) -> None:
    for member in choice:
        value = member.value
        assert str(member) == f"{member}" == format(member, "") == value
        assert "%s" % member == value  # noqa: UP031 (logging formats this way)
        assert f"{member:>12}" == f"{value:>12}"
        assert member == value and hash(member) == hash(value) and {value: 1}[member] == 1
        assert json.dumps(member) == json.dumps(value)


def test_resolved_strategies_are_members(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("flags:\n  plugin:\n    deviceIDStrategy: index\n")
    config = resolve(parser_for("plugin").parse_args(
        ["--config-file", str(path), "--device-list-strategy", "cdi-cri,envvar"]),
        {"MIG_STRATEGY": "mixed"})
    assert config.flags.mig_strategy is MigStrategy.MIXED
    assert config.flags.plugin.device_id_strategy is DeviceIdStrategy.INDEX
    assert config.flags.plugin.device_list_strategy == (DeviceListStrategy.CDI_CRI,
                                                        DeviceListStrategy.ENVVAR)
    assert config.flags.plugin.shared_devices_allocation_policy is AllocationPolicy.DISTRIBUTED
    # Set in code as plain strings: members too; an unknown one is left for its user to refuse.
    single = Flags(mig_strategy="single")  # type: ignore[arg-type]  # a str on purpose
    assert single.mig_strategy is MigStrategy.SINGLE
    bogus = Flags(mig_strategy="bogus")  # type: ignore[arg-type]  # an unknown one on purpose
    assert bogus.mig_strategy == "bogus"


def plain(config: Config) -> Config:
    """``config`` with every strategy as a plain ``str`` (how they were before the Enums)."""
    flags, plugin = config.flags, config.flags.plugin
    object.__setattr__(flags, "mig_strategy", str.__str__(flags.mig_strategy))
    for name in ("device_id_strategy", "shared_devices_allocation_policy"):
        object.__setattr__(plugin, name, str.__str__(getattr(plugin, name)))
    object.__setattr__(plugin, "device_list_strategy",
                       tuple(str.__str__(s) for s in plugin.device_list_strategy))
    return config


def typed(**plugin: Any) -> Config:
    mig = plugin.pop("mig", "mixed")
    return Config(flags=Flags(mig_strategy=mig, plugin=PluginFlags(**plugin)))


@pytest.mark.parametrize("profile", ["dgx-a100-mig", "a100-mig-mixed"])
@pytest.mark.parametrize("mig", ["single", "mixed"])
def test_labels_are_the_same_as_with_plain_strings(
        fake_snapshot: Callable[[str], Snapshot], profile: str, mig: str) -> None:
    snapshot = fake_snapshot(profile)
    labels = node_labels(snapshot, typed(mig=mig), timestamp=1)
    assert type(typed(mig=mig).flags.mig_strategy) is MigStrategy
    assert labels == node_labels(snapshot, plain(typed(mig=mig)), timestamp=1)
    assert all(type(v) is str and "Strategy." not in v for v in labels.values())
    assert labels.get("nvidia.com/mig.strategy") == mig


def test_allocate_env_and_cdi_are_the_same_as_with_plain_strings(
        fake_snapshot: Callable[[str], Snapshot]) -> None:
    snapshot = fake_snapshot("dgx-a100")
    for strategies in (("envvar", "cdi-cri"), ("volume-mounts", "cdi-annotations")):
        for id_strategy in ("uuid", "index"):
            config = typed(mig="none", device_list_strategy=strategies,
                           device_id_strategy=id_strategy)
            resource = build_resource_map(snapshot, config).resources["nvidia.com/gpu"]
            ids = [device.id for device in resource.devices[:2]]

            def allocate(cfg: Config, resource: Any = resource, ids: list[str] = ids) -> Any:
                return build_allocation(resource, ids, cfg, uuid_factory=lambda: "u",
                                        path_exists=lambda _: True)

            typed_alloc, plain_alloc = allocate(config), allocate(plain(typed(
                mig="none", device_list_strategy=strategies, device_id_strategy=id_strategy)))
            assert typed_alloc == plain_alloc
            for value in (*typed_alloc.envs.values(), *typed_alloc.annotations.values()):
                assert type(value) is str and "Strategy." not in value
