"""The v1 config: flags, env vars, the file, precedence, validation and reload."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from gpus.config import (
    AllocationPolicy,
    Config,
    ConfigError,
    DeviceIdStrategy,
    DeviceListStrategy,
    GfdFlags,
    MigStrategy,
    PluginFlags,
    ReplicatedResource,
    TimeSlicing,
    add_flags,
    load_config,
    load_config_file,
    parse_config,
    parse_duration,
    reload,
    resolve,
)

GPU_UUID = "GPU-b1028956-cfa2-0990-bf4a-5da9abb51763"
MIG_UUID = "MIG-b1028956-cfa2-0990-bf4a-5da9abb51763"

FULL = f"""\
version: v1
flags:
  migStrategy: mixed
  failOnInitError: false
  nvidiaDriverRoot: /run/nvidia/driver
  nvidiaDevRoot: /
  plugin:
    passDeviceSpecs: true
    deviceListStrategy: [envvar, cdi-annotations]
    deviceIDStrategy: index
    kubeletSocket: /tmp/kubelet.sock
  gfd:
    oneshot: true
    noTimestamp: true
    sleepInterval: 1m30s
    outputFile: /tmp/gfd
    machineTypeFile: /tmp/product_name
sharing:
  timeSlicing:
    renameByDefault: true
    failRequestsGreaterThanOne: true
    resources:
    - name: nvidia.com/gpu
      replicas: 4
    - name: mig-1g.5gb
      replicas: 2
      rename: mig-small
      devices: [0, "1:2", {GPU_UUID}]
"""


def parse(program: str, argv: Sequence[str] = ()) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=program)
    add_flags(parser, program)  # type: ignore[arg-type]  # parametrized names: plain str
    return parser.parse_args(list(argv))


def run(program: str, argv: Sequence[str] = (), env: Mapping[str, str] | None = None) -> Config:
    return resolve(parse(program, argv), env or {})


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def file_error(text: str, tmp_path: Path) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return str(info.value).replace(str(path), "config.yaml")


# --- defaults and the full file ------------------------------------------------------------


def test_defaults_without_anything() -> None:
    assert run("plugin") == Config()
    assert run("gfd") == Config()
    cfg = Config()
    assert cfg.flags.mig_strategy == "none" and cfg.flags.fail_on_init_error
    assert cfg.flags.dev_root == "/" and cfg.flags.plugin.device_list_strategy == ("envvar",)
    assert cfg.flags.gfd.sleep_interval == 60.0


def test_full_file(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, FULL))
    flags = cfg.flags
    assert flags.mig_strategy == "mixed" and not flags.fail_on_init_error
    assert flags.nvidia_driver_root == "/run/nvidia/driver" and flags.dev_root == "/"
    assert flags.plugin == PluginFlags(pass_device_specs=True,
                                       device_list_strategy=(DeviceListStrategy.ENVVAR,
                                                             DeviceListStrategy.CDI_ANNOTATIONS),
                                       device_id_strategy=DeviceIdStrategy.INDEX,
                                       kubelet_socket="/tmp/kubelet.sock")
    assert flags.gfd == GfdFlags(True, True, 90.0, "/tmp/gfd", "/tmp/product_name")
    assert cfg.sharing.time_slicing == TimeSlicing(
        rename_by_default=True, fail_requests_greater_than_one=True,
        resources=(ReplicatedResource("nvidia.com/gpu", 4),
                   ReplicatedResource("nvidia.com/mig-1g.5gb", 2, "nvidia.com/mig-small",
                                      ("0", "1:2", GPU_UUID))))
    assert cfg.config_file == str(tmp_path / "config.yaml")
    ts = cfg.sharing.time_slicing
    assert ts.shared_name(ts.resources[0]) == "nvidia.com/gpu.shared"
    assert ts.shared_name(ts.resources[1]) == "nvidia.com/mig-small"


def test_json_file_is_the_same(tmp_path: Path) -> None:
    data = load_config_file(write(tmp_path, FULL))
    path = write(tmp_path, json.dumps(data, indent="\t"), "config.json")
    assert dataclasses.replace(load_config(path), config_file="") == parse_config(FULL)


def test_json_errors_have_lines(tmp_path: Path) -> None:
    text = '{\n  "version": "v1",\n  "flags": {\n    "migStrategy": "foo"\n  }\n}\n'
    assert file_error(text, tmp_path) == (
        "config.yaml:4: flags.migStrategy: must be one of none, single, mixed, got 'foo'")


def test_missing_version_is_v1_and_empty_file_is_default(tmp_path: Path) -> None:
    assert parse_config("flags: {migStrategy: single}").flags.mig_strategy == "single"
    assert load_config(write(tmp_path, "")) == Config(config_file=str(tmp_path / "config.yaml"))
    assert load_config_file(write(tmp_path, "# nothing\n")) == {}
    assert parse_config({"flags": {"plugin": None}}) == Config()


def test_parse_config_from_data_has_no_line() -> None:
    with pytest.raises(ConfigError, match=r"^cm: flags.migStrategy: must be one of"):
        parse_config({"flags": {"migStrategy": "x"}}, "cm")


def test_device_list_strategy_single_string() -> None:
    cfg = parse_config("flags: {plugin: {deviceListStrategy: volume-mounts}}")
    assert cfg.flags.plugin.device_list_strategy == ("volume-mounts",)


def test_sleep_interval_number_is_seconds() -> None:
    assert parse_config("flags: {gfd: {sleepInterval: 5}}").flags.gfd.sleep_interval == 5.0


def test_our_plugin_extensions_in_the_file() -> None:
    cfg = parse_config("flags:\n  plugin:\n    sharedDevicesAllocationPolicy: packed\n"
                       "    cdiSpecDir: /etc/cdi\n    healthRecoveryInterval: 0\n"
                       "    healthQuietPeriod: 2m\n")
    plugin = cfg.flags.plugin
    assert plugin.shared_devices_allocation_policy == "packed"
    assert plugin.cdi_spec_dir == "/etc/cdi"
    assert plugin.health_recovery_interval == 0 and plugin.health_quiet_period == 120


def test_use_node_feature_api_in_the_file() -> None:
    assert parse_config("flags: {useNodeFeatureAPI: false}").flags.use_node_feature_api is False
    # Unset by default (NVIDIA defaults to true): unset, GFD writes the features file.
    assert Config().flags.use_node_feature_api is None


@pytest.mark.parametrize(("env", "value", "reason"), [
    ("KUBE_API_QPS", "0", "must be a number >= 0.01"),
    ("KUBE_API_QPS", "fast", "must be a number >= 0.01"),
    ("KUBE_API_QPS", "nan", "must be a number >= 0.01"),
    ("KUBE_API_BURST", "1.5", "must be a whole number >= 1"),
    ("KUBE_API_BURST", "0", "must be a whole number >= 1"),
])
def test_kube_api_rate_limits_are_checked(env: str, value: str, reason: str) -> None:
    parser = argparse.ArgumentParser()
    add_flags(parser, "gfd")
    with pytest.raises(ConfigError, match=f"invalid {env} '{value}': {reason}"):
        resolve(parser.parse_args([]), {env: value})


def test_nvidia_keys_we_do_not_implement_are_warnings(caplog: pytest.LogCaptureFixture) -> None:
    text = ("version: v1\nflags:\n  restartOnDeviceUnhealthy: true\n"
            "  useNodeFeatureAPI: true\nresources:\n  gpus: []\n"
            "sharing:\n  timeSlicing:\n    strategy: x\n")
    with caplog.at_level(logging.WARNING, logger="gpus.config"):
        config = parse_config(text, "cm.yaml")
    # The one implemented key is set; everything else is the default.
    assert config == dataclasses.replace(
        Config(), flags=dataclasses.replace(Config().flags, use_node_feature_api=True))
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3  # useNodeFeatureAPI is implemented (GFD's NodeFeature output)
    assert not any("useNodeFeatureAPI" in m for m in messages)
    assert any(m.startswith("cm.yaml:3: flags.restartOnDeviceUnhealthy is part of NVIDIA's v1 "
                            "config but not implemented here; ignored") for m in messages)


def test_nvidia_keys_once_ignored_now_land_in_their_settings(
        caplog: pytest.LogCaptureFixture) -> None:
    # Issue 12: these were warned about and dropped; a migrated ConfigMap now means them.
    text = ("version: v1\nflags:\n  gdsEnabled: true\n  mofedEnabled: true\n"
            "  gdrcopyEnabled: true\n  mpsRoot: /run/mps\n  deviceDiscoveryStrategy: nvml\n"
            "  plugin:\n    containerDriverRoot: /drv\n    cdiAnnotationPrefix: x.io/\n"
            "    nvidiaCTKPath: /opt/nvidia-ctk\n    cdiFeatureFlags: [disable-ipc-discoverer]\n"
            "imex:\n  channelIDs: [0]\n  required: true\n")
    with caplog.at_level(logging.WARNING, logger="gpus.config"):
        config = parse_config(text, "cm.yaml")
    assert caplog.records == []
    flags, plugin = config.flags, config.flags.plugin
    assert (flags.gds_enabled, flags.mofed_enabled, flags.gdrcopy_enabled) == (True, True, True)
    assert (flags.mps_root, flags.device_discovery_strategy) == ("/run/mps", "nvml")
    assert (plugin.container_driver_root, plugin.cdi_annotation_prefix,
            plugin.nvidia_cdi_hook_path, plugin.cdi_feature_flags) == (
        "/drv", "x.io/", "/opt/nvidia-ctk", ("disable-ipc-discoverer",))
    assert (config.imex.channel_ids, config.imex.required) == (("0",), True)


# --- file errors, with lines ---------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("version: v1\nsharing:\n  timeSlicing:\n    resources:\n    - name: nvidia.com/gpu\n"
     "      replicas: 1\n",
     "config.yaml:6: sharing.timeSlicing.resources[0].replicas: must be >= 2, got 1"),
    ("version: v1\nsharing:\n  timeSlicing:\n    resources:\n    - name: nvidia.com/gpu\n"
     "      replicas: 1000000\n",
     "config.yaml:6: sharing.timeSlicing.resources[0].replicas: must be <= 1024, got 1000000"),
    ("version: v2\n", "config.yaml:1: version: unknown version 'v2': must be v1"),
    ("version: v1\nflags:\n  migStrategie: mixed\n",
     "config.yaml:3: flags.migStrategie: unknown key 'migStrategie' (allowed: migStrategy, "
     "failOnInitError, nvidiaDriverRoot, nvidiaDevRoot, deviceDiscoveryStrategy, "
     "gdrcopyEnabled, gdsEnabled, mofedEnabled, mpsRoot, useNodeFeatureAPI, plugin, gfd)"),
    ("flags:\n  failOnInitError: maybe\n",
     "config.yaml:2: flags.failOnInitError: must be a boolean (true or false), got 'maybe'"),
    ("flags:\n  plugin:\n    deviceIDStrategy: serial\n",
     "config.yaml:3: flags.plugin.deviceIDStrategy: must be one of uuid, index, got 'serial'"),
    ("flags:\n  plugin:\n    deviceListStrategy: [envvar, nfs]\n",
     "config.yaml:3: flags.plugin.deviceListStrategy[1]: must be one of envvar, volume-mounts, "
     "cdi-annotations, cdi-cri, got 'nfs'"),
    ("flags:\n  gfd:\n    sleepInterval: soon\n",
     'config.yaml:3: flags.gfd.sleepInterval: must be a duration like "60s", "1m30s", "500ms" '
     "or seconds, got 'soon'"),
    ("flags:\n  gfd:\n    sleepInterval: 0s\n",
     "config.yaml:3: flags.gfd.sleepInterval: must be > 0, got '0s'"),
    ("flags: [1]\n", "config.yaml:1: flags: must be a mapping, got a list"),
    ("sharing:\n  timeSlicing:\n    resources:\n    - name: gpu\n      replicas: 2\n"
     "    - name: nvidia.com/gpu\n      replicas: 3\n",
     "config.yaml:6: sharing.timeSlicing.resources[1].name: duplicate resource name "
     "'nvidia.com/gpu' (also sharing.timeSlicing.resources[0])"),
    ("sharing:\n  timeSlicing:\n    resources:\n    - name: gpu\n      replicas: 2\n"
     "      rename: mig-1g.5gb\n    - name: mig-1g.5gb\n      replicas: 2\n",
     "config.yaml:6: sharing.timeSlicing.resources[0].rename: rename 'nvidia.com/mig-1g.5gb' "
     "conflicts with sharing.timeSlicing.resources[1].name"),
    ("sharing:\n  timeSlicing:\n    resources:\n    - name: gpu\n      replicas: 2\n"
     "      rename: shared\n    - name: mig-1g.5gb\n      replicas: 2\n      rename: shared\n",
     "config.yaml:9: sharing.timeSlicing.resources[1].rename: rename 'nvidia.com/shared' "
     "conflicts with sharing.timeSlicing.resources[0], which is advertised under the same "
     "name"),
    ("sharing:\n  timeSlicing:\n    resources:\n    - name: gpu\n      replicas: two\n",
     "config.yaml:5: sharing.timeSlicing.resources[0].replicas: must be an integer, got 'two'"),
    ("sharing:\n  timeSlicing:\n    resources:\n    - replicas: 2\n",
     "config.yaml:4: sharing.timeSlicing.resources[0]: name is required"),
    ("sharing:\n  timeSlicing:\n    resources:\n    - name: gpu\n",
     "config.yaml:4: sharing.timeSlicing.resources[0]: replicas is required"),
    ("sharing:\n  timeSlicing:\n    resources:\n    - name: Bad_Name\n      replicas: 2\n",
     "config.yaml:4: sharing.timeSlicing.resources[0].name: resource name "
     "'nvidia.com/Bad_Name' must be lower-case letters, digits, '-' and '.' (a DNS subdomain "
     "after 'nvidia.com/')"),
    ("sharing:\n  timeSlicing:\n    resources:\n    - name: gpu\n      replicas: 2\n"
     "      devices: [0, nope]\n",
     "config.yaml:6: sharing.timeSlicing.resources[0].devices[1]: must be 'all', a count > 0, "
     "or a list of GPU indices, MIG indices (<gpu>:<mig>) or UUIDs, got 'nope'"),
    ("sharing:\n  timeSlicing:\n    resources:\n    - name: gpu\n      replicas: 2\n"
     "      devices: 0\n",
     "config.yaml:6: sharing.timeSlicing.resources[0].devices: a count of devices must be > 0, "
     "got 0"),
    ("sharing:\n  timeSlicing:\n    resources: {name: gpu}\n",
     "config.yaml:3: sharing.timeSlicing.resources: must be a list, got a mapping"),
    ("flags:\n  migStrategy: none\n  migStrategy: mixed\n",
     "config.yaml:3: flags.migStrategy: duplicate key"),
    ("flags: {migStrategy: [none\n", "config.yaml:2: not valid YAML or JSON: expected ',' or "
     "']', but got '<stream end>'"),
    ("- 1\n- 2\n", "config.yaml: the document must be a mapping, got a list"),
    ("sharing:\n  sharing: {}\n",
     "config.yaml:2: sharing.sharing: unknown key 'sharing' (allowed: timeSlicing, mps)"),
])
def test_file_errors_name_file_line_field_and_reason(text: str, expected: str,
                                                     tmp_path: Path) -> None:
    assert file_error(text, tmp_path) == expected


def test_devices_forms() -> None:
    def devices(spec: str) -> object:
        cfg = parse_config("sharing:\n  timeSlicing:\n    resources:\n    - name: gpu\n"
                           f"      replicas: 2\n      devices: {spec}\n")
        return cfg.sharing.time_slicing.resources[0].devices

    assert devices("all") is None
    assert devices("3") == 3
    assert devices(f"[1, '0:3', {GPU_UUID}, {MIG_UUID}, 1]") == ("1", "0:3", GPU_UUID, MIG_UUID)
    assert devices(f"['MIG-{GPU_UUID}/1/0']") == (f"MIG-{GPU_UUID}/1/0",)
    with pytest.raises(ConfigError, match="got 'some'"):
        devices("some")
    with pytest.raises(ConfigError, match="empty list"):
        devices("[]")
    with pytest.raises(ConfigError, match="got True"):
        devices("[true]")


def test_long_resource_name_rejected() -> None:
    with pytest.raises(ConfigError, match="63 characters or less"):
        parse_config("sharing: {timeSlicing: {resources: [{name: gpu, replicas: 2, "
                     f"rename: {'x' * 60}}}]}}}}")


def test_unreadable_file() -> None:
    with pytest.raises(ConfigError, match=r"^cannot read config file /nonexistent/c.yaml: "
                                          "No such file or directory$"):
        load_config("/nonexistent/c.yaml")


# --- flags and env vars --------------------------------------------------------------------


def test_plugin_flags() -> None:
    cfg = run("plugin", ["--mig-strategy", "single", "--fail-on-init-error=false",
                         "--driver-root", "/run/nvidia/driver", "--dev-root=/dev-root",
                         "--pass-device-specs", "--device-list-strategy", "envvar,cdi-cri",
                         "--device-list-strategy", "volume-mounts", "--device-id-strategy",
                         "index", "--shared-devices-allocation-policy", "packed",
                         "--kubelet-socket", "", "--cdi-spec-dir", "/tmp/cdi",
                         "--health-recovery-interval", "0", "--health-quiet-period", "1m",
                         "--nvml", "fake:dgx-a100", "--sysfs-root", "/tmp/sys"])
    flags = cfg.flags
    assert (flags.mig_strategy, flags.fail_on_init_error) == ("single", False)
    assert (flags.nvidia_driver_root, flags.dev_root) == ("/run/nvidia/driver", "/dev-root")
    assert (flags.nvml, flags.sysfs_root) == ("fake:dgx-a100", "/tmp/sys")
    assert flags.plugin == PluginFlags(
        True, (DeviceListStrategy.ENVVAR, DeviceListStrategy.CDI_CRI,
               DeviceListStrategy.VOLUME_MOUNTS),
        DeviceIdStrategy.INDEX, AllocationPolicy.PACKED, "", "/tmp/cdi", 0.0, 60.0)


def test_plugin_env() -> None:
    cfg = run("plugin", env={
        "MIG_STRATEGY": "mixed", "FAIL_ON_INIT_ERROR": "No", "NVIDIA_DRIVER_ROOT": "/drv",
        "PASS_DEVICE_SPECS": "YES", "DEVICE_LIST_STRATEGY": "cdi-annotations, envvar",
        "DEVICE_ID_STRATEGY": "index", "SHARED_DEVICES_ALLOCATION_POLICY": "packed",
        "KUBELET_SOCKET": "/k.sock", "CDI_SPEC_DIR": "/cdi", "HEALTH_RECOVERY_INTERVAL": "2.5",
        "HEALTH_QUIET_PERIOD": "10s", "NVML_BACKEND": "fake:t4", "SYSFS_ROOT": "/s",
        "GFD_ONESHOT": "true"})
    flags = cfg.flags
    assert (flags.mig_strategy, flags.fail_on_init_error, flags.dev_root) == ("mixed", False,
                                                                              "/drv")
    assert flags.plugin == PluginFlags(
        True, (DeviceListStrategy.CDI_ANNOTATIONS, DeviceListStrategy.ENVVAR),
        DeviceIdStrategy.INDEX, AllocationPolicy.PACKED, "/k.sock", "/cdi", 2.5, 10.0)
    assert (flags.nvml, flags.sysfs_root) == ("fake:t4", "/s")
    assert not flags.gfd.oneshot  # GFD_* variables are not the plugin's


def test_gfd_flags_and_env() -> None:
    cfg = run("gfd", ["--oneshot", "--no-timestamp", "false", "--sleep-interval", "1m30s",
                      "-o", "/tmp/out", "--machine-type-file", "/tmp/m"])
    assert cfg.flags.gfd == GfdFlags(True, False, 90.0, "/tmp/out", "/tmp/m")
    cfg = run("gfd", env={"GFD_ONESHOT": "1", "GFD_NO_TIMESTAMP": "TRUE",
                          "GFD_SLEEP_INTERVAL": "30", "GFD_OUTPUT_FILE": "/o",
                          "GFD_MACHINE_TYPE_FILE": "/m", "GFD_FAIL_ON_INIT_ERROR": "false",
                          "FAIL_ON_INIT_ERROR": "true", "MIG_STRATEGY": "single",
                          "PASS_DEVICE_SPECS": "true"})
    assert cfg.flags.gfd == GfdFlags(True, True, 30.0, "/o", "/m")
    assert not cfg.flags.fail_on_init_error and cfg.flags.mig_strategy == "single"
    assert not cfg.flags.plugin.pass_device_specs


def test_gfd_output_alias() -> None:
    # NVIDIA's GFD spells it --output-file, --output or -o.
    for flag in ("--output-file", "--output", "-o"):
        assert run("gfd", [flag, "/tmp/x"]).flags.gfd.output_file == "/tmp/x"
    with pytest.raises(SystemExit):
        parse("plugin", ["--output", "/tmp/x"])


def test_gfd_fail_on_init_error_env_names() -> None:
    # NVIDIA's GFD reads GFD_FAIL_ON_INIT_ERROR, then FAIL_ON_INIT_ERROR.
    assert not run("gfd", env={"FAIL_ON_INIT_ERROR": "false"}).flags.fail_on_init_error
    both = {"GFD_FAIL_ON_INIT_ERROR": "true", "FAIL_ON_INIT_ERROR": "false"}
    assert run("gfd", env=both).flags.fail_on_init_error
    assert not run("plugin", env=both).flags.fail_on_init_error
    assert run("gfd", env={"GFD_FAIL_ON_INIT_ERROR": "", "FAIL_ON_INIT_ERROR": "no"}
               ).flags.fail_on_init_error is False
    with pytest.raises(ConfigError, match="FAIL_ON_INIT_ERROR"):
        run("gfd", env={"FAIL_ON_INIT_ERROR": "maybe"})


def test_gfd_mig_strategy_env_prefers_gfd_name() -> None:
    env = {"GFD_MIG_STRATEGY": "mixed", "MIG_STRATEGY": "single"}
    assert run("gfd", env=env).flags.mig_strategy == "mixed"
    assert run("plugin", env=env).flags.mig_strategy == "single"


def test_gfd_does_not_define_plugin_flags() -> None:
    with pytest.raises(SystemExit):
        parse("gfd", ["--pass-device-specs"])
    with pytest.raises(SystemExit):
        parse("plugin", ["--oneshot"])


def test_empty_env_counts_as_unset() -> None:
    assert run("plugin", env={"MIG_STRATEGY": "", "NVIDIA_DEV_ROOT": ""}) == Config()


@pytest.mark.parametrize(("argv", "env", "expected"), [
    (["--mig-strategy", "foo"], {}, "invalid --mig-strategy 'foo': must be one of none, "
     "single, mixed"),
    ([], {"MIG_STRATEGY": "foo"}, "invalid MIG_STRATEGY 'foo': must be one of none, single, "
     "mixed"),
    (["--fail-on-init-error=maybe"], {}, "invalid --fail-on-init-error 'maybe': must be one "
     "of true, false, 1, 0, yes, no"),
    ([], {"PASS_DEVICE_SPECS": "y"}, "invalid PASS_DEVICE_SPECS 'y': must be one of true, "
     "false, 1, 0, yes, no"),
    (["--device-list-strategy", "envvar,bogus"], {}, "invalid --device-list-strategy 'bogus': "
     "must be one of envvar, volume-mounts, cdi-annotations, cdi-cri"),
    (["--device-list-strategy", ","], {}, "invalid --device-list-strategy ',': must name at "
     "least one strategy"),
    ([], {"DEVICE_ID_STRATEGY": "serial"}, "invalid DEVICE_ID_STRATEGY 'serial': must be one "
     "of uuid, index"),
    (["--shared-devices-allocation-policy", "random"], {}, "invalid "
     "--shared-devices-allocation-policy 'random': must be one of distributed, packed"),
    (["--health-quiet-period", "-1"], {}, "invalid --health-quiet-period '-1': must be >= 0"),
    ([], {"HEALTH_RECOVERY_INTERVAL": "5 min"}, "invalid HEALTH_RECOVERY_INTERVAL '5 min': "
     'must be a duration like "60s", "1m30s", "500ms" or seconds'),
    (["--nvml", ""], {}, "invalid --nvml '': must not be empty"),
])
def test_plugin_value_errors(argv: list[str], env: dict[str, str], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        run("plugin", argv, env)
    assert str(info.value) == expected


def test_gfd_value_errors() -> None:
    with pytest.raises(ConfigError, match=r"^invalid --sleep-interval '0': must be > 0$"):
        run("gfd", ["--sleep-interval", "0"])
    with pytest.raises(ConfigError, match="^invalid GFD_SLEEP_INTERVAL 'x'"):
        run("gfd", env={"GFD_SLEEP_INTERVAL": "x"})
    with pytest.raises(ConfigError, match="^invalid GFD_ONESHOT 'sometimes'"):
        run("gfd", env={"GFD_ONESHOT": "sometimes"})


def test_add_flags_rejects_unknown_program() -> None:
    with pytest.raises(ValueError, match="program must be one of plugin, gfd"):
        add_flags(argparse.ArgumentParser(), "kubelet")  # type: ignore[arg-type]  # bad on purpose


@pytest.mark.parametrize(("text", "seconds"), [
    ("60s", 60.0), ("1m30s", 90.0), ("1h", 3600.0), ("500ms", 0.5), ("1.5h", 5400.0),
    ("2h45m", 9900.0), ("100us", 1e-4), ("10ns", 1e-8), ("0", 0.0), ("45", 45.0),
    ("2.5", 2.5), ("+5s", 5.0), (" 3s ", 3.0),
])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text, "--x") == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "s", "5", "1d", "5s3", "-5s", "nan", "inf", "1..5s"])
def test_bad_durations(text: str) -> None:
    allow_zero = text != "5"
    if text == "5":
        assert parse_duration(text, "--x", allow_zero=False) == 5.0
        return
    with pytest.raises(ConfigError, match=r"^invalid --x"):
        parse_duration(text, "--x", allow_zero=allow_zero)


# --- precedence ----------------------------------------------------------------------------


def test_precedence_flag_over_env_over_file_over_default(tmp_path: Path) -> None:
    path = write(tmp_path, "flags:\n  migStrategy: mixed\n  failOnInitError: false\n"
                          "  nvidiaDriverRoot: /file\n  plugin:\n    passDeviceSpecs: true\n")
    env = {"CONFIG_FILE": str(path), "MIG_STRATEGY": "single", "NVIDIA_DRIVER_ROOT": "/env"}
    cfg = run("plugin", ["--mig-strategy", "none"], env)
    assert cfg.flags.mig_strategy == "none"  # flag
    assert cfg.flags.nvidia_driver_root == "/env"  # env over file
    assert not cfg.flags.fail_on_init_error  # file over default
    assert cfg.flags.plugin.pass_device_specs  # file
    assert cfg.flags.plugin.device_id_strategy == "uuid"  # default
    assert cfg.config_file == str(path)


def test_flag_false_overrides_file_true(tmp_path: Path) -> None:
    path = write(tmp_path, "flags:\n  plugin:\n    passDeviceSpecs: true\n")
    cfg = run("plugin", ["--config-file", str(path), "--pass-device-specs=false"])
    assert not cfg.flags.plugin.pass_device_specs


def test_config_file_flag_beats_env(tmp_path: Path) -> None:
    good = write(tmp_path, "flags: {migStrategy: single}\n", "good.yaml")
    cfg = run("plugin", ["--config-file", str(good)], {"CONFIG_FILE": "/nonexistent"})
    assert cfg.flags.mig_strategy == "single"


def test_gfd_config_file_env_order(tmp_path: Path) -> None:
    gfd = write(tmp_path, "flags: {migStrategy: single}\n", "gfd.yaml")
    shared = write(tmp_path, "flags: {migStrategy: mixed}\n", "shared.yaml")
    env = {"GFD_CONFIG_FILE": str(gfd), "CONFIG_FILE": str(shared)}
    assert run("gfd", env=env).flags.mig_strategy == "single"
    assert run("plugin", env=env).flags.mig_strategy == "mixed"
    assert run("gfd", env={"CONFIG_FILE": str(shared)}).flags.mig_strategy == "mixed"


def test_gfd_reads_its_section_from_the_shared_file(tmp_path: Path) -> None:
    path = write(tmp_path, FULL)
    cfg = run("gfd", ["--config-file", str(path), "--sleep-interval", "5s"])
    assert cfg.flags.gfd == GfdFlags(True, True, 5.0, "/tmp/gfd", "/tmp/product_name")


# --- immutability and reload ---------------------------------------------------------------


def test_config_is_immutable() -> None:
    cfg = parse_config(FULL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.flags.mig_strategy = MigStrategy.SINGLE  # type: ignore[misc]  # frozen: on purpose
    assert isinstance(cfg.sharing.time_slicing.resources, tuple)
    assert isinstance(cfg.flags.plugin.device_list_strategy, tuple)


def test_reload_picks_up_a_good_file(tmp_path: Path) -> None:
    path = write(tmp_path, "flags: {migStrategy: single}\n")
    args = parse("plugin", ["--config-file", str(path)])
    current = resolve(args, {})
    path.write_text("flags: {migStrategy: mixed}\n")
    new, error = reload(current, args, {})
    assert error is None and new.flags.mig_strategy == "mixed"


def test_reload_keeps_the_old_config_on_a_bad_file(tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    path = write(tmp_path, FULL)
    args = parse("plugin", ["--config-file", str(path)])
    current = resolve(args, {})
    snapshot = dataclasses.replace(current)
    path.write_text(FULL.replace("replicas: 4", "replicas: 1"))
    with caplog.at_level(logging.ERROR, logger="gpus.config"):
        kept, error = reload(current, args, {})
    assert kept is current and kept == snapshot
    assert error == f"{path}:24: sharing.timeSlicing.resources[0].replicas: must be >= 2, got 1"
    assert "keeping the running configuration" in caplog.text


def test_reload_keeps_the_old_config_when_the_file_vanished(tmp_path: Path) -> None:
    path = write(tmp_path, FULL)
    args = parse("plugin", ["--config-file", str(path)])
    current = resolve(args, {})
    path.unlink()
    kept, error = reload(current, args, {})
    assert kept is current
    assert error is not None and error.startswith(f"cannot read config file {path}")


def test_tab_indented_json_errors_have_lines(tmp_path: Path) -> None:
    text = '{\n\t"flags": {\n\t\t"plugin": {\n\t\t\t"deviceIDStrategy": "serial"\n\t\t}\n\t}\n}\n'
    assert file_error(text, tmp_path) == (
        "config.yaml:4: flags.plugin.deviceIDStrategy: must be one of uuid, index, got 'serial'")


def test_nonempty_settings_are_nonempty_in_the_file_too() -> None:
    # One kind per setting: --cdi-spec-dir "" was refused while cdiSpecDir: "" was accepted.
    for section, key in (("plugin", "cdiSpecDir"), ("gfd", "machineTypeFile")):
        with pytest.raises(ConfigError, match=rf"^cm:3: flags\.{section}\.{key}: must not be "
                                              r"empty, got ' '$"):
            parse_config(f"flags:\n  {section}:\n    {key}: ' '\n", "cm")


# --- MPS sharing ---------------------------------------------------------------------------

MPS = """\
version: v1
sharing:
  mps:
    resources:
    - name: nvidia.com/gpu
      replicas: 4
"""


def plugin_resolve(argv: Sequence[str], environ: Mapping[str, str]) -> Config:
    parser = argparse.ArgumentParser()
    add_flags(parser, "plugin")
    return resolve(parser.parse_args(list(argv)), environ)


def test_mps_is_read_with_nvidias_defaults() -> None:
    cfg = parse_config(MPS, "c.yaml")
    assert cfg.sharing.strategy == "mps"
    assert cfg.sharing.active is cfg.sharing.mps
    assert cfg.sharing.mps.resources == (ReplicatedResource("nvidia.com/gpu", 4),)
    # NVIDIA v0.20: absent means true for MPS (false for time-slicing).
    assert cfg.sharing.mps.fail_requests_greater_than_one is True
    assert cfg.sharing.time_slicing.fail_requests_greater_than_one is False
    relaxed = parse_config(MPS.replace("  mps:\n", "  mps:\n    failRequestsGreaterThanOne: "
                                       "false\n    renameByDefault: true\n"))
    assert relaxed.sharing.mps.fail_requests_greater_than_one is False
    entry = relaxed.sharing.mps.resources[0]
    assert relaxed.sharing.mps.shared_name(entry) == "nvidia.com/gpu.shared"


def test_mps_wins_over_time_slicing_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    both = MPS + "  timeSlicing:\n    resources:\n    - name: gpu\n      replicas: 2\n"
    with caplog.at_level(logging.WARNING, logger="gpus.config"):
        cfg = parse_config(both, "c.yaml")
    assert cfg.sharing.strategy == "mps" and cfg.sharing.active is cfg.sharing.mps
    assert any("sharing.timeSlicing is ignored" in r.getMessage() for r in caplog.records)
    # An MPS section without resources shares nothing: time-slicing applies.
    empty = parse_config("sharing:\n  mps: {}\n  timeSlicing:\n    resources:\n"
                         "    - name: gpu\n      replicas: 2\n")
    assert empty.sharing.strategy == "time-slicing"
    assert empty.sharing.active is empty.sharing.time_slicing
    assert parse_config("sharing:\n  mps: {}\n").sharing.strategy == "none"


@pytest.mark.parametrize(("text", "expected"), [
    ("sharing:\n  mps:\n    resources:\n    - name: mig-1g.5gb\n      replicas: 2\n",
     "config.yaml:4: sharing.mps.resources[0].name: MPS sharing is not supported for MIG "
     "devices ('nvidia.com/mig-1g.5gb' is a MIG resource)"),
    ("sharing:\n  mps:\n    resources:\n    - name: gpu\n      replicas: 2\n"
     "      devices: [0, '0:1']\n",
     "config.yaml:6: sharing.mps.resources[0].devices[1]: MPS sharing is not supported for MIG "
     "devices ('0:1' is a MIG device)"),
    ("sharing:\n  mps:\n    resources:\n    - name: gpu\n      replicas: 2\n"
     f"      devices: [{MIG_UUID}]\n",
     f"config.yaml:6: sharing.mps.resources[0].devices[0]: MPS sharing is not supported for MIG "
     f"devices ('{MIG_UUID}' is a MIG device)"),
    ("sharing:\n  mps:\n    resources:\n    - name: gpu\n      replicas: 1\n",
     "config.yaml:5: sharing.mps.resources[0].replicas: must be >= 2, got 1"),
    ("sharing:\n  mps:\n    resources:\n    - name: gpu\n      replicas: 2\n"
     "    - name: nvidia.com/gpu\n      replicas: 3\n",
     "config.yaml:6: sharing.mps.resources[1].name: duplicate resource name 'nvidia.com/gpu' "
     "(also sharing.mps.resources[0])"),
    ("sharing:\n  mps:\n    failRequestsGreaterThanOne: sure\n",
     "config.yaml:3: sharing.mps.failRequestsGreaterThanOne: must be a boolean (true or false), "
     "got 'sure'"),
])
def test_mps_file_errors(text: str, expected: str, tmp_path: Path) -> None:
    assert file_error(text, tmp_path) == expected


def test_the_plugin_refuses_mps_with_mig_strategy_mixed(tmp_path: Path) -> None:
    path = write(tmp_path, MPS)
    expected = (f"{path}:3: sharing.mps: MPS sharing is not supported with --mig-strategy mixed "
                "(MIG devices cannot be shared with MPS; use none or single)")
    for argv, environ in ((["--mig-strategy", "mixed"], {}), ([], {"MIG_STRATEGY": "mixed"})):
        with pytest.raises(ConfigError) as info:
            plugin_resolve(["--config-file", str(path), "--mps-root", "/run/nvidia/mps", *argv],
                           environ)
        assert str(info.value) == expected
    # From the file itself too.
    mixed = write(tmp_path, MPS.replace("version: v1\n", "version: v1\nflags:\n  migStrategy: "
                                        "mixed\n  mpsRoot: /m\n"), "mixed.yaml")
    with pytest.raises(ConfigError, match=rf"^{mixed}:6: sharing.mps: MPS sharing is not "):
        plugin_resolve(["--config-file", str(mixed)], {})
    # single (and none) are fine; so is mixed once the flag overrides it.
    assert plugin_resolve(["--config-file", str(mixed), "--mig-strategy", "single"],
                          {}).flags.mig_strategy == "single"


def test_the_plugin_refuses_mps_without_an_mps_root(tmp_path: Path) -> None:
    path = write(tmp_path, MPS)
    with pytest.raises(ConfigError) as info:
        plugin_resolve(["--config-file", str(path)], {"MPS_ROOT": ""})
    assert str(info.value) == (
        f"{path}:3: sharing.mps: MPS sharing needs --mps-root (env MPS_ROOT, file flags.mpsRoot):"
        " the host directory shared with the MPS control daemon, /run/nvidia/mps in NVIDIA's "
        "Helm chart")
    for argv, environ in ((["--mps-root", "/a"], {}), ([], {"MPS_ROOT": "/a"})):
        cfg = plugin_resolve(["--config-file", str(path), *argv], environ)
        assert cfg.flags.mps_root == "/a" and cfg.sharing.strategy == "mps"
    in_file = write(tmp_path, MPS + "flags:\n  mpsRoot: /run/nvidia/mps\n", "root.yaml")
    assert plugin_resolve(["--config-file", str(in_file)], {}).flags.mps_root == "/run/nvidia/mps"
    # GFD neither needs nor reads the MPS root; time-slicing does not need one either.
    parser = argparse.ArgumentParser()
    add_flags(parser, "gfd")
    assert resolve(parser.parse_args(["--config-file", str(path)]), {}).sharing.strategy == "mps"
    plain = write(tmp_path, MPS.replace("mps:", "timeSlicing:"), "ts.yaml")
    assert plugin_resolve(["--config-file", str(plain)], {}).flags.mps_root == ""


def test_parsed_data_without_lines_still_names_the_field() -> None:
    cfg = parse_config({"sharing": {"mps": {"resources": [{"name": "gpu", "replicas": 2}]}}})
    with pytest.raises(ConfigError, match=r"^sharing.mps: MPS sharing needs --mps-root"):
        from gpus.config import check_plugin

        check_plugin(cfg)


def test_reload_keeps_the_running_config_when_mps_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "version: v1\n")
    parser = argparse.ArgumentParser()
    add_flags(parser, "plugin")
    args = parser.parse_args(["--config-file", str(path)])
    running = resolve(args, {})
    path.write_text(MPS)
    kept, error = reload(running, args, {})
    assert kept is running
    assert error is not None and "MPS sharing needs --mps-root" in error
