"""The mps overlay: the control daemon DaemonSet, the plugin's MPS root and mounts, the config.

Rendered with ``kubectl kustomize`` through the helpers of test_manifests (whose shared checks
take the overlay too, the control daemon's DaemonSet included).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from test_manifests import (
    GFD,
    PLUGIN,
    REAL_NFD_NODE,
    SCHEMA_VERSIONS,
    container,
    env_values,
    mount_source,
    mounts,
    project_version,
    rendered,
    schedulable,
)

from gpus import config as gpus_config
from gpus.mps import CONTAINER_ROOT

OVERLAY = "daemonset/overlays/mps"
MPS_ROOT = "/run/nvidia/mps"  # NVIDIA's Helm default
PLUGIN_DS = "nvidia-device-plugin-daemonset"
MPS_DS = "nvidia-mps-control-daemon"


def daemonsets() -> dict[str, dict[str, Any]]:
    return {obj["metadata"]["name"]: obj for obj in rendered(OVERLAY) if obj["kind"] == "DaemonSet"}


def spec_of(name: str) -> dict[str, Any]:
    spec: dict[str, Any] = daemonsets()[name]["spec"]["template"]["spec"]
    return spec


def test_renders_both_daemonsets_in_one_namespace() -> None:
    objects = rendered(OVERLAY)
    assert sorted(obj["kind"] for obj in objects) == sorted([
        "ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet", "DaemonSet",
        "ServiceAccount"])
    assert set(daemonsets()) == {PLUGIN_DS, MPS_DS}
    assert {obj["metadata"].get("namespace") for obj in objects
            if obj["kind"] not in ("ClusterRole", "ClusterRoleBinding")} == {"kube-system"}


@pytest.mark.parametrize("version", SCHEMA_VERSIONS)
def test_objects_validate_strictly(version: str) -> None:
    for obj in rendered(OVERLAY):
        kubernetes_validate.validate(obj, version, strict=True)


def test_the_control_daemon_runs_only_where_gfd_says_mps_capable() -> None:
    spec = spec_of(MPS_DS)
    taint = [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]
    assert spec["nodeSelector"] == {"nvidia.com/mps.capable": "true"}
    assert schedulable(spec, {**REAL_NFD_NODE, "nvidia.com/mps.capable": "true"}, taint)
    assert not schedulable(spec, {**REAL_NFD_NODE, "nvidia.com/mps.capable": "false"}, taint)
    assert not schedulable(spec, REAL_NFD_NODE, taint)
    # Its pods and the plugin's are told apart by their selectors.
    selectors = [ds["spec"]["selector"]["matchLabels"] for ds in daemonsets().values()]
    assert selectors[0] != selectors[1]


def test_the_control_daemon_mounts_the_host_mps_root_and_shm() -> None:
    spec = spec_of(MPS_DS)
    (init,) = spec["initContainers"]
    assert init["command"] == ["mps-control-daemon", "mount-shm"]
    assert init["securityContext"]["privileged"] is True
    assert mounts(init)[CONTAINER_ROOT]["mountPropagation"] == "Bidirectional"
    assert mount_source(spec, init, CONTAINER_ROOT)["hostPath"] == {
        "path": MPS_ROOT, "type": "DirectoryOrCreate"}
    ctr = container(spec, "mps-control-daemon-ctr")
    assert ctr["command"] == ["mps-control-daemon"]
    assert ctr["securityContext"]["privileged"] is True and spec["hostPID"] is True
    assert mount_source(spec, ctr, CONTAINER_ROOT)["hostPath"]["path"] == MPS_ROOT
    assert mount_source(spec, ctr, "/dev/shm")["hostPath"]["path"] == f"{MPS_ROOT}/shm"
    assert mount_source(spec, ctr, "/etc/nvidia-device-plugin")["configMap"]["name"] == \
        "nvidia-device-plugin-config"
    environ = env_values(ctr)
    assert environ["MPS_ROOT"] == MPS_ROOT
    assert "compute" in environ["NVIDIA_DRIVER_CAPABILITIES"].split(",")
    images = {c["image"] for c in (*spec["initContainers"], *spec["containers"])}
    assert images == {f"nvidia-k8s-py:{project_version()}"}


def test_the_plugin_gets_the_mps_root_and_both_mounts() -> None:
    spec = spec_of(PLUGIN_DS)
    plugin = container(spec, PLUGIN)
    assert env_values(plugin)["MPS_ROOT"] == MPS_ROOT
    assert mount_source(spec, plugin, CONTAINER_ROOT)["hostPath"]["path"] == MPS_ROOT
    assert mount_source(spec, plugin, "/dev/shm")["hostPath"]["path"] == f"{MPS_ROOT}/shm"
    # Everything else of the base stays (the security context above all).
    assert plugin["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert "/var/lib/kubelet/device-plugins" in mounts(plugin)


def daemon_config(program: str, tmp_path: Path) -> gpus_config.Config:
    """What ``program`` resolves in the overlay: its env, the ConfigMap's file."""
    (config_map,) = [o for o in rendered(OVERLAY) if o["kind"] == "ConfigMap"]
    spec = spec_of(PLUGIN_DS)
    environ = env_values(container(spec, PLUGIN if program == "plugin" else GFD))
    for variable in ("CONFIG_FILE", "GFD_CONFIG_FILE"):
        if variable in environ:
            local = tmp_path / f"{program}.yaml"
            local.write_text(config_map["data"][Path(environ[variable]).name])
            environ[variable] = local.as_posix()
    parser = argparse.ArgumentParser()
    gpus_config.add_flags(parser, program)  # type: ignore[arg-type]  # parametrized: str
    return gpus_config.resolve(parser.parse_args([]), environ)


@pytest.mark.parametrize("program", ["plugin", "gfd"])
def test_the_daemons_resolve_mps_sharing(program: str, tmp_path: Path) -> None:
    resolved = daemon_config(program, tmp_path)
    assert resolved.sharing.strategy == "mps"
    assert {r.name: r.replicas for r in resolved.sharing.mps.resources} == {"nvidia.com/gpu": 4}
    assert resolved.sharing.mps.fail_requests_greater_than_one is True
    if program == "plugin":  # resolve refuses MPS without a root: the env gives it
        assert resolved.flags.mps_root == MPS_ROOT


def test_without_mps_root_the_plugin_would_refuse_to_start(tmp_path: Path) -> None:
    (config_map,) = [o for o in rendered(OVERLAY) if o["kind"] == "ConfigMap"]
    local = tmp_path / "config.yaml"
    local.write_text(config_map["data"]["config.yaml"])
    parser = argparse.ArgumentParser()
    gpus_config.add_flags(parser, "plugin")
    with pytest.raises(gpus_config.ConfigError, match="MPS sharing needs --mps-root"):
        gpus_config.resolve(parser.parse_args([]), {"CONFIG_FILE": str(local)})
