"""Drop-in for NVIDIA v0.20 (issue 12): every NVIDIA flag, alias and environment variable is
accepted by the right daemon and lands in the right setting; ``--version`` on every console
script; ``--device-discovery-strategy tegra`` refused with one line.

``NVIDIA`` below is written by hand from NVIDIA's v0.20 command lines (not parsed from the
issue, nor generated from our table): a name we drop or mis-route fails here.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from test_server_support import short_tmpdir

from deviceplugin import main as plugin_main
from deviceplugin.mockkubelet import MockKubelet
from gfd import main as gfd_main
from gpus.config import Config, ConfigError, parse_config, resolve
from gpus.runtime import version as versionmod


class Case:
    """One NVIDIA setting of one daemon: its flag names (first the name, then aliases), its
    variables, where it lands in our Config, a value to give and what it must become."""

    def __init__(self, names: tuple[str, ...], env: tuple[str, ...], field: str, text: str,
                 expected: Any) -> None:
        self.names, self.env, self.field = names, env, field
        self.text, self.expected = text, expected

    def __repr__(self) -> str:
        return self.names[0]


def case(names: str, env: str, field: str, text: str, expected: Any) -> Case:
    return Case(tuple(names.split()), tuple(env.split()), field, text, expected)


CONFIG_FILE = "<config file>"  # replaced by a real (empty) file

NVIDIA: dict[str, list[Case]] = {
    "plugin": [
        case("mig-strategy", "MIG_STRATEGY", "flags.mig_strategy", "mixed", "mixed"),
        case("fail-on-init-error", "FAIL_ON_INIT_ERROR", "flags.fail_on_init_error", "false",
             False),
        case("driver-root nvidia-driver-root", "NVIDIA_DRIVER_ROOT", "flags.nvidia_driver_root",
             "/run/nvidia/driver", "/run/nvidia/driver"),
        case("dev-root nvidia-dev-root", "NVIDIA_DEV_ROOT", "flags.nvidia_dev_root", "/host",
             "/host"),
        case("pass-device-specs", "PASS_DEVICE_SPECS", "flags.plugin.pass_device_specs", "true",
             True),
        case("device-list-strategy", "DEVICE_LIST_STRATEGY", "flags.plugin.device_list_strategy",
             "cdi-cri", ("cdi-cri",)),
        case("device-id-strategy", "DEVICE_ID_STRATEGY", "flags.plugin.device_id_strategy",
             "index", "index"),
        case("gdrcopy-enabled", "GDRCOPY_ENABLED", "flags.gdrcopy_enabled", "true", True),
        case("gds-enabled", "GDS_ENABLED", "flags.gds_enabled", "true", True),
        case("mofed-enabled", "MOFED_ENABLED", "flags.mofed_enabled", "true", True),
        case("cdi-annotation-prefix", "CDI_ANNOTATION_PREFIX", "flags.plugin.cdi_annotation_prefix",
             "nvidia.cdi.k8s.io/", "nvidia.cdi.k8s.io/"),
        case("nvidia-cdi-hook-path nvidia-ctk-path", "NVIDIA_CDI_HOOK_PATH NVIDIA_CTK_PATH",
             "flags.plugin.nvidia_cdi_hook_path", "/usr/local/nvidia/toolkit/nvidia-cdi-hook",
             "/usr/local/nvidia/toolkit/nvidia-cdi-hook"),
        case("driver-root-ctr-path container-driver-root",
             "DRIVER_ROOT_CTR_PATH CONTAINER_DRIVER_ROOT", "flags.plugin.container_driver_root",
             "/host-driver", "/host-driver"),
        case("mps-root", "MPS_ROOT", "flags.mps_root", "/run/nvidia/mps-x", "/run/nvidia/mps-x"),
        case("shared-devices-allocation-policy", "SHARED_DEVICES_ALLOCATION_POLICY",
             "flags.plugin.shared_devices_allocation_policy", "packed", "packed"),
        case("device-discovery-strategy", "DEVICE_DISCOVERY_STRATEGY",
             "flags.device_discovery_strategy", "nvml", "nvml"),
        case("imex-channel-ids", "IMEX_CHANNEL_IDS", "imex.channel_ids", "0", ("0",)),
        case("imex-required", "IMEX_REQUIRED", "imex.required", "true", True),
        case("kubelet-socket", "KUBELET_SOCKET", "flags.plugin.kubelet_socket", "/k/kubelet.sock",
             "/k/kubelet.sock"),
        case("config-file", "CONFIG_FILE", "config_file", CONFIG_FILE, CONFIG_FILE),
        case("cdi-feature-flags", "CDI_FEATURE_FLAGS", "flags.plugin.cdi_feature_flags",
             "disable-ipc-discoverer", ("disable-ipc-discoverer",)),
        case("cdi-disable-hooks", "CDI_DISABLE_HOOKS", "flags.plugin.cdi_disable_hooks", "all",
             ("all",)),
    ],
    "gfd": [
        case("mig-strategy", "GFD_MIG_STRATEGY MIG_STRATEGY", "flags.mig_strategy", "single",
             "single"),
        case("fail-on-init-error", "GFD_FAIL_ON_INIT_ERROR FAIL_ON_INIT_ERROR",
             "flags.fail_on_init_error", "false", False),
        case("oneshot", "GFD_ONESHOT", "flags.gfd.oneshot", "true", True),
        case("no-timestamp", "GFD_NO_TIMESTAMP", "flags.gfd.no_timestamp", "true", True),
        case("sleep-interval", "GFD_SLEEP_INTERVAL", "flags.gfd.sleep_interval", "30s", 30.0),
        case("output-file output o", "GFD_OUTPUT_FILE", "flags.gfd.output_file", "/tmp/gfd",
             "/tmp/gfd"),
        case("machine-type-file", "GFD_MACHINE_TYPE_FILE", "flags.gfd.machine_type_file",
             "/m/product_name", "/m/product_name"),
        case("config-file", "GFD_CONFIG_FILE CONFIG_FILE", "config_file", CONFIG_FILE,
             CONFIG_FILE),
        case("use-node-feature-api", "GFD_USE_NODE_FEATURE_API USE_NODE_FEATURE_API",
             "flags.use_node_feature_api", "false", False),
        case("device-discovery-strategy", "DEVICE_DISCOVERY_STRATEGY",
             "flags.device_discovery_strategy", "nvml", "nvml"),
        case("driver-root-ctr-path container-driver-root",
             "DRIVER_ROOT_CTR_PATH CONTAINER_DRIVER_ROOT", "flags.plugin.container_driver_root",
             "/host-driver", "/host-driver"),
        case("kubeconfig", "KUBECONFIG", "daemon.gfd.kubeconfig", "/k/config", "/k/config"),
        case("kube-api-qps", "KUBE_API_QPS", "flags.kube_api_qps", "20", 20.0),
        case("kube-api-burst", "KUBE_API_BURST", "flags.kube_api_burst", "40", 40),
        case("namespace", "NAMESPACE", "flags.namespace", "gpu-operator", "gpu-operator"),
        case("node-name", "NODE_NAME", "daemon.gfd.node_name", "node-1", "node-1"),
        case("pod-name", "POD_NAME", "flags.pod_name", "gfd-abcde", "gfd-abcde"),
    ],
}
PARSERS = {"plugin": plugin_main.build_parser, "gfd": gfd_main.build_parser}


def flag(name: str) -> str:
    return f"-{name}" if len(name) == 1 else f"--{name}"


def value_at(config: Config, path: str) -> Any:
    target: Any = config
    for attr in path.split("."):
        target = getattr(target, attr)
    return target


def concrete(item: Case, tmp_path: Path) -> tuple[str, Any]:
    if item.text != CONFIG_FILE:
        return item.text, item.expected
    path = tmp_path / "config.yaml"
    path.write_text("version: v1\n")
    return str(path), str(path)


def resolved(daemon: str, argv: list[str], environ: dict[str, str]) -> Config:
    args: argparse.Namespace = PARSERS[daemon]().parse_args(argv)
    return resolve(args, environ)


CASES = [(daemon, item) for daemon, items in NVIDIA.items() for item in items]


@pytest.mark.parametrize(("daemon", "item"), CASES, ids=lambda c: str(c))
def test_every_nvidia_name_and_alias_lands_in_its_setting(daemon: str, item: Case,
                                                          tmp_path: Path) -> None:
    text, expected = concrete(item, tmp_path)
    default = value_at(Config(), item.field)
    assert default != expected, "the sample must differ from the default to prove anything"
    for name in item.names:
        assert value_at(resolved(daemon, [flag(name), text], {}), item.field) == expected, name
    for env in item.env:
        assert value_at(resolved(daemon, [], {env: text}), item.field) == expected, env


def test_every_nvidia_name_at_once_starts_nothing_but_parses(tmp_path: Path) -> None:
    # A manifest passes them all together: none may conflict with another.
    for daemon, items in NVIDIA.items():
        argv: list[str] = []
        for item in items:
            argv += [flag(item.names[0]), concrete(item, tmp_path)[0]]
        config = resolved(daemon, argv, {})
        for item in items:
            assert value_at(config, item.field) == concrete(item, tmp_path)[1], item


@pytest.mark.parametrize("daemon", ["plugin", "gfd"])
def test_tegra_is_refused_with_one_line(daemon: str) -> None:
    message = ("invalid --device-discovery-strategy 'tegra': Tegra (integrated GPUs) is not "
               "supported")
    with pytest.raises(ConfigError) as err:
        resolved(daemon, ["--device-discovery-strategy", "tegra"], {})
    assert str(err.value) == message
    with pytest.raises(ConfigError, match="DEVICE_DISCOVERY_STRATEGY 'tegra': Tegra"):
        resolved(daemon, [], {"DEVICE_DISCOVERY_STRATEGY": "tegra"})
    with pytest.raises(ConfigError, match="deviceDiscoveryStrategy: Tegra .* got 'tegra'"):
        parse_config("flags:\n  deviceDiscoveryStrategy: tegra\n", "c.yaml")


@pytest.mark.parametrize("module", [plugin_main, gfd_main], ids=["plugin", "gfd"])
def test_tegra_exits_2_with_one_line(module: Any, capsys: pytest.CaptureFixture[str]) -> None:
    assert module.main(["--device-discovery-strategy=tegra"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "Tegra (integrated GPUs) is not supported" in lines[0]


@pytest.mark.parametrize(("argv", "message"), [
    (["--cdi-annotation-prefix", ""], "invalid --cdi-annotation-prefix '': must not be empty"),
    (["--gds-enabled=maybe"], "invalid --gds-enabled 'maybe': must be one of true, false"),
    (["--device-discovery-strategy", "csv"],
     "invalid --device-discovery-strategy 'csv': must be one of auto, nvml"),
])
def test_bad_values_are_one_clear_error(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        resolved("plugin", argv, {})
    assert str(err.value).startswith(message)


@pytest.mark.parametrize(("text", "expected"), [
    ("0", ("0",)), ("all", ("all",)), ("0,3,3", ("0", "3")), (" 007 , 1", ("7", "1"))])
def test_imex_channel_ids_forms(text: str, expected: tuple[str, ...]) -> None:
    assert resolved("plugin", ["--imex-channel-ids", text], {}).imex.channel_ids == expected


@pytest.mark.parametrize("text", ["-1", "x", "all,0", "1.5"])
def test_bad_imex_channel_ids_are_one_clear_error(text: str) -> None:
    with pytest.raises(ConfigError, match="invalid --imex-channel-ids .*must be 'all' or a comma "
                                          "list of channel numbers >= 0"):
        resolved("plugin", ["--imex-channel-ids", text], {})


@pytest.mark.parametrize("value", ["[true]", "[-1]", "{a: 1}", "[all, 0]"])
def test_bad_imex_channel_ids_in_the_file_name_the_key(value: str) -> None:
    with pytest.raises(ConfigError, match=r"c.yaml:2: imex.channelIDs: must be 'all'"):
        parse_config(f"imex:\n  channelIDs: {value}\n", "c.yaml")


# --- --version on every console script ------------------------------------------------------

SCRIPTS = {
    "nvidia-device-plugin": "deviceplugin.main",
    "gpu-feature-discovery": "gfd.main",
    "mock-kubelet": "deviceplugin.mockkubelet",
    "fake-nvml": "gpus.fake.cli",
    "nvk8s-demo": "demo.node",
    "fake-mps-control": "gpus.fake.mpscontrol",
    "mps-control-daemon": "mpsdaemon.main",
    "gpu-metrics-exporter": "exporter.main",
}


def test_every_console_script_is_covered() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    pyproject = Path(__file__).parents[1] / "pyproject.toml"
    scripts = tomllib.loads(pyproject.read_text())["project"]["scripts"]
    assert {name: target.split(":")[0] for name, target in scripts.items()} == SCRIPTS


@pytest.mark.parametrize(("prog", "module"), SCRIPTS.items())
def test_version_names_version_commit_python_and_grpcio(
        prog: str, module: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        importlib.import_module(module).main(["--version"])
    assert done.value.code in (0, None)
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{prog} {versionmod.package_version()} (commit ")
    assert f"Python {sys.version.split()[0]}" in line
    assert f"grpcio {versionmod.grpcio_version()}" in line


def test_commit_from_the_build_file_else_git_else_unknown(tmp_path: Path) -> None:
    build_file = tmp_path / "GIT_COMMIT"
    build_file.write_text("abc123\n")
    assert versionmod.git_commit(build_file, checkout=tmp_path) == "abc123"
    missing = tmp_path / "none"
    assert versionmod.git_commit(missing, checkout=tmp_path) == "unknown"  # no .git
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    assert versionmod.git_commit(missing, checkout=tmp_path) == "unknown"  # no commit yet
    (tmp_path / ".git").rename(tmp_path / "moved")
    (tmp_path / ".git").write_text("gitdir: /nonexistent\n")  # a broken worktree link
    assert versionmod.git_commit(missing, checkout=tmp_path) == "unknown"


def test_commit_from_a_checkout(tmp_path: Path) -> None:
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "PATH": "/usr/bin:/bin"}
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run(["git", "-C", str(tmp_path), "commit", "-q", "--allow-empty", "-m", "x"],
                   check=True, env=env)
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD"], check=True,
                          capture_output=True, text=True).stdout.strip()
    assert versionmod.git_commit(tmp_path / "none", checkout=tmp_path) == head


# --- an NVIDIA Helm-chart deployment's arguments start our daemons -----------------------------

# What NVIDIA's chart (v0.20 templates, values with gds/mofed and IMEX set) puts in the
# containers' env and args, plus, last, what a GPU-less test run needs (fake NVML, temp paths).
HELM_PLUGIN_ENV = {
    "MPS_ROOT": "/run/nvidia/mps",
    "NVIDIA_MIG_MONITOR_DEVICES": "all",  # for the container toolkit: ignored by the plugin
    "NVIDIA_VISIBLE_DEVICES": "all",
    "NVIDIA_DRIVER_CAPABILITIES": "compute,utility",
    "MIG_STRATEGY": "single",
    "FAIL_ON_INIT_ERROR": "true",
    "PASS_DEVICE_SPECS": "false",
    "DEVICE_LIST_STRATEGY": "envvar",
    "DEVICE_ID_STRATEGY": "uuid",
    "NVIDIA_DRIVER_ROOT": "/",
    "CONTAINER_DRIVER_ROOT": "/driver-root",
    "NVIDIA_CDI_HOOK_PATH": "/usr/bin/nvidia-cdi-hook",
    "CDI_ANNOTATION_PREFIX": "cdi.k8s.io/",
    "GDS_ENABLED": "true",
    "MOFED_ENABLED": "true",
    "DEVICE_DISCOVERY_STRATEGY": "auto",
    "IMEX_CHANNEL_IDS": "0",
    "IMEX_REQUIRED": "false",
}
HELM_PLUGIN_ARGS = ["--mig-strategy=single", "--fail-on-init-error=true",
                    "--device-discovery-strategy=auto"]
HELM_GFD_ENV = {
    "GFD_USE_NODE_FEATURE_API": "false",
    "MIG_STRATEGY": "single",
    "GFD_MIG_STRATEGY": "single",
    "FAIL_ON_INIT_ERROR": "true",
    "GFD_FAIL_ON_INIT_ERROR": "true",
    "GFD_SLEEP_INTERVAL": "60s",
    "GFD_NO_TIMESTAMP": "false",
    "NODE_NAME": "gpu-node-1",
    "NAMESPACE": "nvidia-device-plugin",
    "POD_NAME": "gpu-feature-discovery-abcde",
    "DEVICE_DISCOVERY_STRATEGY": "auto",
    "DRIVER_ROOT_CTR_PATH": "/driver-root",
    "KUBE_API_QPS": "5",
    "KUBE_API_BURST": "10",
}


def test_helm_style_env_and_args_start_the_plugin(tmp_path: Path) -> None:
    with short_tmpdir() as directory, MockKubelet(directory) as kubelet:
        env = {**os.environ, **HELM_PLUGIN_ENV, "PYTHONPATH": str(Path(__file__).parents[1]),
               "NVML_BACKEND": "fake:dgx-a100", "KUBELET_SOCKET": kubelet.socket_path,
               "DP_READY_FILE": "", "SYSFS_ROOT": str(tmp_path / "sys")}
        proc = subprocess.Popen([sys.executable, "-m", "deviceplugin.main", *HELM_PLUGIN_ARGS],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        try:
            assert kubelet.wait_for_registration("nvidia.com/gpu", 30)
            response = kubelet.allocate("nvidia.com/gpu", 1).response
            assert response.envs["NVIDIA_GDS"] == response.envs["NVIDIA_MOFED"] == "enabled"
            assert response.envs["NVIDIA_VISIBLE_DEVICES"].startswith("GPU-")
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0, err


def test_helm_style_env_starts_gfd(tmp_path: Path, sysfs_root: Any) -> None:
    out = tmp_path / "features.d" / "gfd"
    environ = {**HELM_GFD_ENV, "NVML_BACKEND": "fake:dgx-a100", "SYSFS_ROOT": sysfs_root(),
               "GFD_OUTPUT_FILE": str(out), "GFD_HEALTH_FILE": str(tmp_path / "health"),
               "GFD_MACHINE_TYPE_FILE": str(tmp_path / "none")}
    assert gfd_main.main(["--oneshot"], environ=environ) == 0
    assert "nvidia.com/gpu.count=8" in out.read_text().splitlines()
