"""The DaemonSet manifests (daemonset/): rendering, schema validation and deployment invariants.

Every kustomization that docs/deploy.md applies is rendered with the real ``kubectl kustomize``
(the kustomize built into kubectl, what ``kubectl apply -k`` runs). Where kubectl is absent these
tests skip, saying so, except under CI (the CI variable set), where a missing kubectl fails them.
Rendered objects are validated offline, strictly, against the Kubernetes schemas of 1.29, 1.33
and the newest version kubernetes-validate ships. The commands docs/deploy.md gives (names,
namespaces, label selectors, node labels and taints, ``kubectl kustomize`` itself) are checked
against the rendered objects.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Iterable, Mapping
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import tomllib
import yaml
from kubernetes_validate.utils import latest_version

import deviceplugin.main as plugin_main
import gfd.main as gfd_main
import mpsdaemon.main as mps_main
from deviceplugin.readiness import READY_FILE_ENV
from gfd.labels import node_labels
from gfd.output import HealthFile
from gpus import config as gpus_config

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs" / "deploy.md"
# The paths docs/deploy.md applies, relative to the repository root, as written there.
KUSTOMIZATIONS = (
    "daemonset",
    "daemonset/overlays/mig-mixed",
    "daemonset/overlays/time-slicing",
    "daemonset/overlays/simulated",
    "daemonset/overlays/runtimeclass",
    "daemonset/overlays/nfd",
    "daemonset/overlays/node-feature-api",
    "daemonset/overlays/mps",
)
# Kustomizations deploying DaemonSets besides the plugin's (with GFD), by name; every other
# kustomization deploys exactly one DaemonSet.
EXTRA_DAEMONSETS = {"daemonset/overlays/mps": ("nvidia-mps-control-daemon",)}

# Also applied by docs/deploy.md, but not the device plugin's DaemonSet, so the checks here do
# not apply to them: tests/test_exporter_manifests.py renders and validates them.
EXPORTER_KUSTOMIZATIONS = ("daemonset/exporter", "daemonset/exporter/hpa-example")
SCHEMA_VERSIONS = ("1.29", "1.33", latest_version())
PLUGIN = "nvidia-device-plugin-ctr"
GFD = "gpu-feature-discovery"
MPS_CONTROL = "mps-control-daemon-ctr"
SIMULATED_LABEL = "nvk8s.io/simulated-gpu"
NFD_GPU_LABEL = "feature.node.kubernetes.io/pci-10de.present"
GPU_PRESENT_LABEL = "nvidia.com/gpu.present"


KUBECTL_MISSING = ("kubectl is not installed: the manifests are rendered with `kubectl kustomize`"
                   " (kubectl 1.14+ has kustomize built in)")


def in_ci(environ: Mapping[str, str]) -> bool:
    """Whether ``environ`` says this is a CI run (CI=true, as CI services set it)."""
    return environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def kubectl(environ: Mapping[str, str] | None = None) -> str:
    """kubectl's path. Where it is missing the calling test skips, or fails under CI: a CI machine
    without kubectl would otherwise pass while checking no manifest at all."""
    environ = os.environ if environ is None else environ
    found = shutil.which("kubectl", path=environ.get("PATH", os.defpath))
    if found is None:
        if in_ci(environ):
            pytest.fail(f"{KUBECTL_MISSING}; CI is set, so this is an error, not a skip")
        pytest.skip(KUBECTL_MISSING)
    return found


class KustomizeError(Exception):
    """``kubectl kustomize`` refused a kustomization; the message is its stderr."""


def kustomize(path: Path) -> list[dict[str, Any]]:
    """The objects ``kubectl kustomize path`` renders (what ``kubectl apply -k`` would send)."""
    done = subprocess.run([kubectl(), "kustomize", str(path)], capture_output=True, text=True,
                          timeout=60, check=False)
    if done.returncode != 0:
        raise KustomizeError(f"kubectl kustomize {path}: exit {done.returncode}: "
                             f"{kubectl_error(done.stderr)}")
    return [obj for obj in yaml.safe_load_all(done.stdout) if obj is not None]


def kubectl_error(stderr: str) -> str:
    """The error in kubectl's stderr: newer versions log it through klog, quoted (`E1127 ...
    "command failed" err="..."`), older ones print `error: ...`."""
    match = re.search(r'err="((?:[^"\\]|\\.)*)"', stderr)
    if match is None:
        return stderr.strip()
    return str(json.loads(f'"{match.group(1)}"'))


@cache
def _rendered(path: str) -> tuple[dict[str, Any], ...]:
    return tuple(kustomize(REPO / path))


def rendered(path: str) -> list[dict[str, Any]]:
    """The objects of one kustomization (a private copy: tests may not spoil the cache)."""
    return copy.deepcopy(list(_rendered(path)))


def only(objects: Iterable[dict[str, Any]], kind: str) -> dict[str, Any]:
    """The single object of ``kind``."""
    found = [obj for obj in objects if obj["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def plugin_daemonset(path: str) -> dict[str, Any]:
    """The plugin's DaemonSet in kustomization ``path``: its only one, or the one besides
    those EXTRA_DAEMONSETS names (which must all be there)."""
    daemonsets = [obj for obj in rendered(path) if obj["kind"] == "DaemonSet"]
    extra = set(EXTRA_DAEMONSETS.get(path, ()))
    assert extra <= {d["metadata"]["name"] for d in daemonsets}, (path, sorted(extra))
    plugin = [d for d in daemonsets if d["metadata"]["name"] not in extra]
    assert len(plugin) == 1, f"{path}: expected one plugin DaemonSet, found {len(plugin)}"
    return plugin[0]


def pod_spec(path: str) -> dict[str, Any]:
    """The plugin DaemonSet's pod spec in kustomization ``path``."""
    spec: dict[str, Any] = plugin_daemonset(path)["spec"]["template"]["spec"]
    return spec


def pod_specs(path: str) -> list[dict[str, Any]]:
    """The pod spec of every DaemonSet in kustomization ``path``, the plugin's first."""
    names = EXTRA_DAEMONSETS.get(path, ())
    extra = [o["spec"]["template"]["spec"] for o in rendered(path)
             if o["kind"] == "DaemonSet" and o["metadata"]["name"] in names]
    return [pod_spec(path), *extra]


def all_containers(spec: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The pod's containers and init containers."""
    return [*spec["containers"], *spec.get("initContainers", [])]


def container(spec: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The container called ``name``."""
    matches: list[dict[str, Any]] = [c for c in spec["containers"] if c["name"] == name]
    assert len(matches) == 1, f"container {name!r} missing or duplicated"
    return matches[0]


def env_values(ctr: Mapping[str, Any], node_name: str = "node-a") -> dict[str, str]:
    """The container's environment, with the downward-API node name filled in."""
    result: dict[str, str] = {}
    for item in ctr.get("env", []):
        if "value" in item:
            result[item["name"]] = item["value"]
        elif item.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "spec.nodeName":
            result[item["name"]] = node_name
    return result


def mounts(ctr: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The container's volume mounts by mount path."""
    return {m["mountPath"]: m for m in ctr.get("volumeMounts", [])}


def volumes(spec: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The pod's volumes by name."""
    return {v["name"]: v for v in spec.get("volumes", [])}


def mount_source(spec: Mapping[str, Any], ctr: Mapping[str, Any], path: str) -> dict[str, Any]:
    """The volume mounted at ``path`` in ``ctr``."""
    mount = mounts(ctr).get(path)
    assert mount is not None, f"{ctr['name']}: nothing mounted at {path}"
    return volumes(spec)[mount["name"]]


def covering_mount(ctr: Mapping[str, Any], file_path: str) -> dict[str, Any] | None:
    """The mount whose directory holds ``file_path``, if any."""
    for path, mount in mounts(ctr).items():
        if file_path.startswith(path.rstrip("/") + "/"):
            return mount
    return None


def project_version() -> str:
    """The version in pyproject.toml."""
    with (REPO / "pyproject.toml").open("rb") as handle:
        return str(tomllib.load(handle)["project"]["version"])


# --------------------------------------------------------------------------------------------
# Scheduling: a small evaluator of node selectors, node affinity and tolerations.

_GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
_SIM_TAINT = {"key": SIMULATED_LABEL, "value": "dgx-a100", "effect": "NoSchedule"}


def _expression_matches(expression: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    key, operator = expression["key"], expression["operator"]
    values = expression.get("values", [])
    if operator == "In":
        return key in labels and labels[key] in values
    if operator == "NotIn":
        return key not in labels or labels[key] not in values
    if operator == "Exists":
        return key in labels
    if operator == "DoesNotExist":
        return key not in labels
    raise AssertionError(f"operator {operator} not modelled by this test")


def _tolerated(taint: Mapping[str, str], tolerations: Iterable[Mapping[str, Any]]) -> bool:
    for toleration in tolerations:
        if toleration.get("effect") not in (None, "", taint["effect"]):
            continue
        if toleration.get("operator") == "Exists":
            if toleration.get("key") in (None, "", taint["key"]):
                return True
        elif toleration.get("key") == taint["key"] and toleration.get("value") == taint["value"]:
            return True
    return False


def schedulable(spec: Mapping[str, Any], labels: Mapping[str, str],
                taints: Iterable[Mapping[str, str]] = ()) -> bool:
    """Would the scheduler (and the DaemonSet controller) place this pod on such a node?"""
    if any(labels.get(k) != v for k, v in spec.get("nodeSelector", {}).items()):
        return False
    required = (spec.get("affinity", {}).get("nodeAffinity", {})
                .get("requiredDuringSchedulingIgnoredDuringExecution"))
    if required is not None and not any(
        all(_expression_matches(e, labels) for e in term.get("matchExpressions", []))
        for term in required["nodeSelectorTerms"]
    ):
        return False
    return all(_tolerated(taint, spec.get("tolerations", [])) for taint in taints)


REAL_NFD_NODE = {NFD_GPU_LABEL: "true"}
REAL_OPERATOR_NODE = {GPU_PRESENT_LABEL: "true"}
CPU_NODE: dict[str, str] = {}
SIM_NODE = {SIMULATED_LABEL: "dgx-a100"}
SIM_OTHER_PROFILE_NODE = {SIMULATED_LABEL: "t4"}


# --------------------------------------------------------------------------------------------
# Rendering and schemas.


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_renders_the_expected_objects(path: str) -> None:
    kinds = sorted(obj["kind"] for obj in rendered(path))
    # node-feature-api adds a namespaced Role for the NodeFeature object and the pod look-up.
    extra = ["Role", "RoleBinding"] if path.endswith("/node-feature-api") else []
    extra += ["DaemonSet"] * len(EXTRA_DAEMONSETS.get(path, ()))
    assert kinds == sorted(["ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet",
                            "ServiceAccount", *extra])


@pytest.mark.parametrize("version", SCHEMA_VERSIONS)
@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_objects_validate_strictly(path: str, version: str) -> None:
    for obj in rendered(path):
        kubernetes_validate.validate(obj, version, strict=True)


def test_schema_validation_rejects_an_unknown_field() -> None:
    # Guards the test above: strict mode must notice a misspelt field deep in the pod spec.
    daemonset = only(rendered("daemonset"), "DaemonSet")
    daemonset["spec"]["template"]["spec"]["containers"][0]["readOnlyRootFileSystem"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(daemonset, SCHEMA_VERSIONS[-1], strict=True)


def test_kubectl_missing_skips_locally_and_fails_in_ci(tmp_path: Path) -> None:
    # Guards every rendering test: outside CI a machine without kubectl skips them with a
    # reason; in CI the same absence is an error, or the manifests would go unchecked.
    empty_path = {"PATH": tmp_path.as_posix()}
    with pytest.raises(pytest.skip.Exception, match="kubectl is not installed"):
        kubectl(empty_path)
    for ci in ("true", "1", "yes"):
        with pytest.raises(pytest.fail.Exception, match="kubectl is not installed.*CI is set"):
            kubectl({**empty_path, "CI": ci})
    with pytest.raises(pytest.skip.Exception):
        kubectl({**empty_path, "CI": "false"})
    fake = tmp_path / "kubectl"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    assert kubectl({**empty_path, "CI": "true"}) == fake.as_posix()


def test_ci_script_stops_first_and_clearly_without_kubectl(tmp_path: Path) -> None:
    bash = shutil.which("bash")
    assert bash is not None
    done = subprocess.run([bash, str(REPO / ".ci" / "run")], env={"PATH": tmp_path.as_posix()},
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1, done
    assert "kubectl not found on PATH" in done.stderr and "kubectl kustomize" in done.stderr
    assert done.stdout == ""  # before make lint or make test ran


def test_docs_apply_exactly_the_rendered_kustomizations() -> None:
    text = DOCS.read_text()
    applied = {p.rstrip("/") for p in re.findall(
        r"kubectl (?:(?:apply|delete|diff) -k|kustomize) ([\w./-]+)", text)}
    assert applied == set(KUSTOMIZATIONS) | set(EXPORTER_KUSTOMIZATIONS)


def copy_of_daemonset(tmp_path: Path) -> Path:
    """A copy of daemonset/ to edit, as a user's own overlay would."""
    tree = tmp_path / "daemonset"
    shutil.copytree(REPO / "daemonset", tree, ignore=shutil.ignore_patterns("__pycache__"))
    return tree


def test_namespace_is_overridable_and_the_binding_follows(tmp_path: Path) -> None:
    overlay = copy_of_daemonset(tmp_path) / "overlays" / "gpu-system"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        "namespace: gpu-system\nresources:\n  - ../../base\n")
    objects = kustomize(overlay)
    assert {o["metadata"].get("namespace") for o in objects
            if o["kind"] not in ("ClusterRole", "ClusterRoleBinding")} == {"gpu-system"}
    binding = only(objects, "ClusterRoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "nvidia-device-plugin",
                                    "namespace": "gpu-system"}]


def _tree_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(("edit", "reported"), [
    # A misspelt kustomization field is refused, not ignored.
    (("overlays/mig-mixed/kustomization.yaml", "resources:", "resouces:"),
     'unknown field "resouces"'),
    # An overlay patching a DaemonSet the base does not have (renamed, or a typo) is refused:
    # the overlay would otherwise deploy the base unchanged.
    (("overlays/mig-mixed/mig-strategy.yaml", "name: nvidia-device-plugin-daemonset",
      "name: nvidia-device-plugin-deamonset"),
     "no matches for Id DaemonSet.v1.apps/nvidia-device-plugin-deamonset"),
    # A wrong path to the base.
    (("overlays/mig-mixed/kustomization.yaml", "../../base", "../../bsae"),
     "accumulating resources from '../../bsae'"),
])
def test_kustomize_refuses_broken_overlays_and_changes_nothing(
        tmp_path: Path, edit: tuple[str, str, str], reported: str) -> None:
    tree = copy_of_daemonset(tmp_path)
    relative, old, new = edit
    text = (tree / relative).read_text()
    assert old in text, edit  # the edit still applies to the manifests as they are
    (tree / relative).write_text(text.replace(old, new))
    before = _tree_files(tree)
    with pytest.raises(KustomizeError) as info:
        kustomize(tree / "overlays" / "mig-mixed")
    assert reported in str(info.value)
    assert _tree_files(tree) == before


# --------------------------------------------------------------------------------------------
# Invariants of every kustomization.


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_pod_basics(path: str) -> None:
    daemonset = plugin_daemonset(path)
    spec = daemonset["spec"]["template"]["spec"]
    assert daemonset["spec"]["updateStrategy"]["type"] == "RollingUpdate"
    assert spec["priorityClassName"] == "system-node-critical"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec[
        "tolerations"]
    assert spec["serviceAccountName"] == only(rendered(path), "ServiceAccount")["metadata"]["name"]
    # Patches may reorder containers (kustomize puts patched ones first); the annotation keeps
    # `kubectl logs` and `kubectl exec` on the plugin whatever the order.
    assert {c["name"]: c["command"] for c in spec["containers"]} == {
        PLUGIN: ["nvidia-device-plugin"], GFD: ["gpu-feature-discovery"]}
    annotations = daemonset["spec"]["template"]["metadata"]["annotations"]
    assert annotations["kubectl.kubernetes.io/default-container"] == PLUGIN
    assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC")


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_commands_are_console_scripts_of_the_package(path: str) -> None:
    with (REPO / "pyproject.toml").open("rb") as handle:
        scripts = tomllib.load(handle)["project"]["scripts"]
    for spec in pod_specs(path):
        for ctr in all_containers(spec):
            assert ctr["command"][0] in scripts, (path, ctr["name"])


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_image_is_the_project_version(path: str) -> None:
    expected = f"nvidia-k8s-py:{project_version()}"
    assert {c["image"] for spec in pod_specs(path) for c in all_containers(spec)} == {expected}
    assert expected in (REPO / "Dockerfile").read_text()
    assert f"docker build -t {expected} ." in DOCS.read_text()


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_container_security_contexts(path: str) -> None:
    spec = pod_spec(path)
    for ctr in spec["containers"]:
        context = ctr["securityContext"]
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"] == {"drop": ["ALL"]}
        assert context["readOnlyRootFilesystem"] is True
        assert not context.get("privileged")
        # A read-only root needs a writable /tmp.
        assert "emptyDir" in mount_source(spec, ctr, "/tmp")
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_every_container_falls_back_to_its_logs_as_termination_message(path: str) -> None:
    # The daemons write no termination-message file: without the fallback a crash-looping pod
    # shows no reason in `kubectl describe pod`.
    for spec in pod_specs(path):
        for ctr in all_containers(spec):
            assert ctr.get("terminationMessagePolicy") == "FallbackToLogsOnError", (
                path, ctr["name"])
    assert {c["name"] for c in all_containers(pod_spec(path))} == {PLUGIN, GFD}


WRITABLE_PLUGIN_HOST_MOUNTS = {"daemonset/overlays/mps": ("/mps", "/dev/shm")}


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_host_mounts(path: str) -> None:
    spec = pod_spec(path)
    plugin, gfd = container(spec, PLUGIN), container(spec, GFD)
    sockets = mount_source(spec, plugin, "/var/lib/kubelet/device-plugins")
    assert sockets["hostPath"]["path"] == "/var/lib/kubelet/device-plugins"
    assert not mounts(plugin)["/var/lib/kubelet/device-plugins"].get("readOnly")
    for ctr in (plugin, gfd):
        assert mount_source(spec, ctr, "/sys")["hostPath"]["path"] == "/sys"
        assert mounts(ctr)["/sys"]["readOnly"] is True
    # Every other host path is mounted read-only, except the NFD features directory and (mps
    # overlay) the MPS root and shm, which the plugin shares with the MPS daemons read-write.
    writable = ("/var/lib/kubelet/device-plugins",
                "/etc/kubernetes/node-feature-discovery/features.d",
                *WRITABLE_PLUGIN_HOST_MOUNTS.get(path, ()))
    for ctr in (plugin, gfd):
        for path_in, mount in mounts(ctr).items():
            volume = volumes(spec)[mount["name"]]
            if "hostPath" in volume and path_in not in writable:
                assert mount.get("readOnly") is True, path_in


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_config_map_is_mounted_into_both_containers(path: str) -> None:
    objects = rendered(path)
    config_map = only(objects, "ConfigMap")
    spec = pod_spec(path)
    for ctr, variable in ((container(spec, PLUGIN), "CONFIG_FILE"),
                          (container(spec, GFD), "GFD_CONFIG_FILE")):
        config_file = env_values(ctr)[variable]
        mount = covering_mount(ctr, config_file)
        assert mount is not None and mount.get("readOnly") is True
        volume = volumes(spec)[mount["name"]]
        assert volume["configMap"]["name"] == config_map["metadata"]["name"]
        assert config_file.rsplit("/", 1)[1] in config_map["data"]


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_gfd_gets_its_node_name_from_the_downward_api(path: str) -> None:
    gfd = container(pod_spec(path), GFD)
    node_name = [e for e in gfd["env"] if e["name"] == "NODE_NAME"]
    assert node_name == [{"name": "NODE_NAME",
                          "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}]


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_rbac_is_get_and_patch_on_nodes_only(path: str) -> None:
    objects = rendered(path)
    role, binding = only(objects, "ClusterRole"), only(objects, "ClusterRoleBinding")
    account = only(objects, "ServiceAccount")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["nodes"],
                              "verbs": ["get", "patch"]}]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"],
                                    "namespace": account["metadata"]["namespace"]}]
    assert {o["metadata"].get("namespace") for o in objects
            if o["kind"] in ("ServiceAccount", "ConfigMap", "DaemonSet")} == {"kube-system"}


# Steady-state RSS measured per container, in MiB: the device plugin on the fake dgx-a100;
# GFD in loop mode with Node-label output through the kubernetes client (bench/gfd_bench.py).
MEASURED_RSS_MIB = {PLUGIN: 46, GFD: 74}


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_resources_have_requests_below_limits(path: str) -> None:
    units = {"Mi": 2**20, "Gi": 2**30, "m": 1e-3, "": 1}

    def quantity(text: str) -> float:
        match = re.fullmatch(r"([0-9.]+)(Mi|Gi|m|)", str(text))
        assert match is not None, f"unreadable quantity {text!r}"
        number, unit = match.groups()
        return float(number) * units[unit]

    for ctr in pod_spec(path)["containers"]:
        requests, limits = ctr["resources"]["requests"], ctr["resources"]["limits"]
        assert set(requests) == set(limits) == {"cpu", "memory"}
        for name in requests:
            assert quantity(requests[name]) <= quantity(limits[name])
    # Requests hold the measured steady-state RSS plus >= 25% headroom, limits at least twice
    # it (see the comments in daemonset/base/daemonset.yaml and docs/deploy.md).
    for name, rss_mib in MEASURED_RSS_MIB.items():
        memory = container(pod_spec(path), name)["resources"]
        assert quantity(memory["requests"]["memory"]) >= 1.25 * rss_mib * 2**20, name
        assert quantity(memory["limits"]["memory"]) >= 2 * rss_mib * 2**20, name


# --------------------------------------------------------------------------------------------
# Probes and the health-file contract.


def _exec_commands(ctr: Mapping[str, Any]) -> dict[str, list[str]]:
    return {kind: ctr[kind]["exec"]["command"]
            for kind in ("startupProbe", "readinessProbe", "livenessProbe")}


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_probe_files_are_configured_and_writable(path: str) -> None:
    spec = pod_spec(path)
    plugin, gfd = container(spec, PLUGIN), container(spec, GFD)
    ready = env_values(plugin)["DP_READY_FILE"]
    assert all(cmd == ["test", "-f", ready] for cmd in _exec_commands(plugin).values())
    health = env_values(gfd)["GFD_HEALTH_FILE"]
    for ctr, path_in in ((plugin, ready), (gfd, health)):
        mount = covering_mount(ctr, path_in)
        assert mount is not None and "emptyDir" in volumes(spec)[mount["name"]], path_in
        assert not mount.get("readOnly")


def _run_probe(command: list[str], environ: Mapping[str, str]) -> int:
    return subprocess.run(command, env=dict(environ), capture_output=True,
                          timeout=10).returncode


def test_plugin_probe_follows_the_ready_file(tmp_path: Path) -> None:
    plugin = container(pod_spec("daemonset"), PLUGIN)
    command = _exec_commands(plugin)["readinessProbe"]
    ready = tmp_path / "ready"
    local = [ready.as_posix() if part == env_values(plugin)["DP_READY_FILE"] else part
             for part in command]
    assert _run_probe(local, {"PATH": "/usr/bin:/bin"}) != 0
    ready.write_text("")
    assert _run_probe(local, {"PATH": "/usr/bin:/bin"}) == 0


@pytest.mark.parametrize(("content", "healthy"), [
    (None, False),  # no pass yet
    ("{now}\n", True),
    ("{now}.734\n", True),  # fractional seconds are accepted
    ("{stale}\n", False),  # older than PROBE_MAX_AGE_SECONDS: a hung GFD
    ("", False),
    ("garbage\n", False),
])
def test_gfd_probes_follow_the_health_file(tmp_path: Path, content: str | None,
                                           healthy: bool) -> None:
    gfd = container(pod_spec("daemonset"), GFD)
    environ = {**env_values(gfd), "PATH": "/usr/bin:/bin"}
    health = tmp_path / "last-pass-ok"
    environ["GFD_HEALTH_FILE"] = health.as_posix()
    now = int(time.time())
    if content is not None:
        stale = now - int(environ["PROBE_MAX_AGE_SECONDS"]) - 1
        health.write_text(content.format(now=now, stale=stale))
    commands = _exec_commands(gfd)
    assert (_run_probe(commands["readinessProbe"], environ) == 0) is healthy
    assert (_run_probe(commands["livenessProbe"], environ) == 0) is healthy
    assert (_run_probe(commands["startupProbe"], environ) == 0) is (content is not None)


def test_gfd_probes_accept_what_gfd_writes(tmp_path: Path) -> None:
    """The contract end to end: the file gfd.output.HealthFile writes passes the probes."""
    gfd = container(pod_spec("daemonset"), GFD)
    health = tmp_path / "last-pass-ok"
    environ = {**env_values(gfd), "PATH": "/usr/bin:/bin", "GFD_HEALTH_FILE": health.as_posix()}
    assert env_values(gfd)["GFD_HEALTH_FILE"] == "/run/gfd/last-pass-ok"  # GFD's default too
    writer = HealthFile(health.as_posix())
    writer.mark()
    for command in _exec_commands(gfd).values():
        assert _run_probe(command, environ) == 0
    writer.reset()  # what GFD does when it starts
    for command in _exec_commands(gfd).values():
        assert _run_probe(command, environ) != 0


# --------------------------------------------------------------------------------------------
# Scheduling.


@pytest.mark.parametrize("path", [p for p in KUSTOMIZATIONS if not p.endswith("simulated")])
def test_real_deployments_run_on_gpu_nodes_only(path: str) -> None:
    spec = pod_spec(path)
    assert schedulable(spec, REAL_NFD_NODE, [_GPU_TAINT])
    assert schedulable(spec, REAL_OPERATOR_NODE, [_GPU_TAINT])
    assert not schedulable(spec, CPU_NODE)
    assert not schedulable(spec, SIM_NODE)


def test_simulated_overlay_runs_on_labelled_cpu_nodes_only() -> None:
    spec = pod_spec("daemonset/overlays/simulated")
    assert schedulable(spec, SIM_NODE)
    assert schedulable(spec, SIM_NODE, [_SIM_TAINT])
    assert not schedulable(spec, CPU_NODE)
    assert not schedulable(spec, SIM_OTHER_PROFILE_NODE)
    # A real GPU node never gets the fake NVML, even if it is labelled for simulation by mistake.
    for real in (REAL_NFD_NODE, REAL_OPERATOR_NODE):
        assert not schedulable(spec, real, [_GPU_TAINT])
        assert not schedulable(spec, {**real, **SIM_NODE}, [_GPU_TAINT])
        assert not schedulable(spec, {**real, SIMULATED_LABEL: "dgx-a100"})


def test_simulated_overlay_uses_the_fake_nvml_and_a_distinct_name() -> None:
    objects = rendered("daemonset/overlays/simulated")
    spec = pod_spec("daemonset/overlays/simulated")
    for ctr in spec["containers"]:
        environ = env_values(ctr)
        assert environ["NVML_BACKEND"] == "fake:dgx-a100"
        assert environ["NVIDIA_VISIBLE_DEVICES"] == "void"
    base_names = {(o["kind"], o["metadata"]["name"]) for o in rendered("daemonset")}
    assert not base_names & {(o["kind"], o["metadata"]["name"]) for o in objects}
    daemonset = only(objects, "DaemonSet")
    assert daemonset["spec"]["selector"]["matchLabels"][SIMULATED_LABEL] == "dgx-a100"


def test_simulated_profile_exists() -> None:
    profiles = {p.stem for p in (REPO / "gpus" / "profiles").glob("*.yaml")
                if not p.name.startswith("_")}
    assert "dgx-a100" in profiles


def test_only_the_runtimeclass_overlay_sets_a_runtime_class() -> None:
    for path in KUSTOMIZATIONS:
        expected = "nvidia" if path.endswith("runtimeclass") else None
        assert pod_spec(path).get("runtimeClassName") == expected, path


def test_nfd_overlay_writes_the_features_file_as_root() -> None:
    spec = pod_spec("daemonset/overlays/nfd")
    gfd = container(spec, GFD)
    environ = env_values(gfd)
    assert environ["GFD_OUTPUT_MODE"] == "file"
    mount = covering_mount(gfd, environ["GFD_OUTPUT_FILE"])
    assert mount is not None and not mount.get("readOnly")
    assert volumes(spec)[mount["name"]]["hostPath"]["path"] == (
        "/etc/kubernetes/node-feature-discovery/features.d")
    assert gfd["securityContext"]["runAsUser"] == 0
    # Node-API output (every other kustomization) needs neither the host directory nor root.
    base_gfd = container(pod_spec("daemonset"), GFD)
    assert env_values(base_gfd)["GFD_OUTPUT_MODE"] == "node-api"
    assert base_gfd["securityContext"]["runAsNonRoot"] is True
    assert covering_mount(base_gfd, environ["GFD_OUTPUT_FILE"]) is None


# --------------------------------------------------------------------------------------------
# The daemons read what the manifests give them (the config module's own resolution).


EXPECTED_SETTINGS = {
    # path: (mig strategy, nvml backend, time-slicing replicas of nvidia.com/gpu)
    "daemonset": ("none", "real", None),
    "daemonset/overlays/mig-mixed": ("mixed", "real", None),
    "daemonset/overlays/time-slicing": ("none", "real", 4),
    "daemonset/overlays/simulated": ("none", "fake:dgx-a100", None),
    "daemonset/overlays/runtimeclass": ("none", "real", None),
    "daemonset/overlays/nfd": ("none", "real", None),
    "daemonset/overlays/node-feature-api": ("none", "real", None),
    "daemonset/overlays/mps": ("none", "real", None),
}
# MPS replicas of nvidia.com/gpu, where a kustomization shares it with MPS.
EXPECTED_MPS_REPLICAS = {"daemonset/overlays/mps": 4}


PROGRAMS: tuple[gpus_config.Program, ...] = ("plugin", "gfd")


def daemon_config(path: str, program: gpus_config.Program,
                  tmp_path: Path) -> gpus_config.Config:
    """The configuration ``program`` ("plugin" or "gfd") resolves in kustomization ``path``:
    its container's environment, with the config-file variables pointed at a copy of the
    ConfigMap's file."""
    config_map = only(rendered(path), "ConfigMap")
    environ = env_values(container(pod_spec(path), PLUGIN if program == "plugin" else GFD))
    for variable in ("CONFIG_FILE", "GFD_CONFIG_FILE"):
        if variable in environ:
            local = tmp_path / f"{program}-{Path(environ[variable]).name}"
            local.write_text(config_map["data"][Path(environ[variable]).name])
            environ[variable] = local.as_posix()
    parser = argparse.ArgumentParser()
    gpus_config.add_flags(parser, program)
    return gpus_config.resolve(parser.parse_args([]), environ)


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_daemons_resolve_the_manifest_settings(path: str, tmp_path: Path) -> None:
    mig, nvml, replicas = EXPECTED_SETTINGS[path]
    for program in PROGRAMS:
        resolved = daemon_config(path, program, tmp_path)
        assert resolved.flags.mig_strategy == mig, (path, program)
        assert resolved.flags.nvml == nvml, (path, program)
        shared = {r.name: r.replicas for r in resolved.sharing.time_slicing.resources}
        assert shared.get("nvidia.com/gpu") == replicas, (path, program)
        mps = {r.name: r.replicas for r in resolved.sharing.mps.resources}
        assert mps.get("nvidia.com/gpu") == EXPECTED_MPS_REPLICAS.get(path), (path, program)


@pytest.mark.parametrize("path", list(EXPECTED_MPS_REPLICAS))
def test_the_mps_control_daemon_commands_are_its_cli(path: str) -> None:
    # The init step and the daemon, as NVIDIA's chart runs them; argparse exits 2 on a
    # command or flag the console script does not have.
    (spec,) = pod_specs(path)[1:]
    commands = {c["name"]: c["command"] for c in all_containers(spec)}
    assert sorted(commands.values()) == [["mps-control-daemon"],
                                         ["mps-control-daemon", "mount-shm"]]
    for command in commands.values():
        args = mps_main.build_parser().parse_args(command[1:])
        assert args.command == (command[1] if len(command) > 1 else None)


@pytest.mark.parametrize("path", list(EXPECTED_MPS_REPLICAS))
def test_the_mps_control_daemon_resolves_the_plugins_settings(path: str,
                                                              tmp_path: Path) -> None:
    # The control daemon reads the plugin's config file, env and checks (mps-control-daemon's
    # flags are rows of the plugin's table): it must see the same MPS resources and root.
    config_map = only(rendered(path), "ConfigMap")
    (spec,) = pod_specs(path)[1:]
    environ = env_values(container(spec, MPS_CONTROL))
    local = tmp_path / Path(environ["CONFIG_FILE"]).name
    local.write_text(config_map["data"][local.name])
    environ["CONFIG_FILE"] = local.as_posix()
    resolved = gpus_config.resolve(mps_main.build_parser().parse_args([]), environ)
    plugin = daemon_config(path, "plugin", tmp_path)
    assert resolved.sharing == plugin.sharing and resolved.flags == plugin.flags
    assert resolved.flags.mps_root == "/run/nvidia/mps"


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_probe_age_covers_three_sleep_intervals(path: str, tmp_path: Path) -> None:
    # GFD refreshes its health file once per pass; the probes call a file older than
    # PROBE_MAX_AGE_SECONDS a hung GFD. Three missed passes, not one late one, must be needed.
    gfd = daemon_config(path, "gfd", tmp_path)
    assert not gfd.flags.gfd.oneshot  # a oneshot GFD would exit and never refresh it
    max_age = int(env_values(container(pod_spec(path), GFD))["PROBE_MAX_AGE_SECONDS"])
    assert 3 * gfd.flags.gfd.sleep_interval <= max_age, path


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_gfd_resolves_its_output_mode(path: str) -> None:
    environ = env_values(container(pod_spec(path), GFD))
    options = gfd_main.resolve_options(gfd_main.build_parser().parse_args([]), environ)
    assert options.output_mode == environ["GFD_OUTPUT_MODE"]
    assert options.node_name == "node-a"


# --------------------------------------------------------------------------------------------
# Every env var a manifest sets is one a daemon reads (a misspelt name is silently ignored).

# Set for someone other than the daemon: the probes' shell and the NVIDIA container runtime.
PROBE_ENV = {GFD: frozenset({"PROBE_MAX_AGE_SECONDS"}), PLUGIN: frozenset(),
             MPS_CONTROL: frozenset()}
RUNTIME_ENV = frozenset({"NVIDIA_VISIBLE_DEVICES", "NVIDIA_DRIVER_CAPABILITIES"})


def _documented_env(parser: argparse.ArgumentParser) -> set[str]:
    """The names in the ``[env A/B]`` of every option's help: gpus.config writes them from
    its settings table, the one resolve() reads."""
    names: set[str] = set()
    for action in parser._actions:
        for group in re.findall(r"\[env ([A-Z0-9_/]+)\]", action.help or ""):
            names.update(group.split("/"))
    return names


def env_read_by(name: str) -> frozenset[str]:
    """The environment variables the daemon in container ``name`` reads."""
    if name == PLUGIN:
        names = _documented_env(plugin_main.build_parser())
        names |= {READY_FILE_ENV, plugin_main.SOCKET_DIR_ENV}
    elif name == MPS_CONTROL:
        names = _documented_env(mps_main.build_parser())
    else:
        names = _documented_env(gfd_main.build_parser()) | set(gfd_main.OPTION_ENV_VARS)
    return frozenset(names)


def unread_env(ctr: Mapping[str, Any]) -> list[str]:
    """Env var names the container sets that nothing reads."""
    allowed = env_read_by(ctr["name"]) | PROBE_ENV[ctr["name"]] | RUNTIME_ENV
    return [e["name"] for e in ctr.get("env", []) if e["name"] not in allowed]


def test_env_tables_hold_what_the_daemons_read() -> None:
    # Guards the tests below: the tables come from the code, not from this file.
    assert {"MIG_STRATEGY", "NVML_BACKEND", "CONFIG_FILE", "DP_READY_FILE",
            "FAIL_ON_INIT_ERROR", "PLUGIN_SOCKET_DIR"} <= env_read_by(PLUGIN)
    assert {"GFD_MIG_STRATEGY", "GFD_CONFIG_FILE", "GFD_SLEEP_INTERVAL", "GFD_OUTPUT_MODE",
            "NODE_NAME", "GFD_HEALTH_FILE", "GFD_KUBECONFIG"} <= env_read_by(GFD)
    assert "GFD_OUTPUT_MODE" not in env_read_by(PLUGIN)
    misspelt = {"name": GFD, "env": [{"name": "GFD_MIGSTRATEGY", "value": "mixed"},
                                     {"name": "NODE_NAME", "value": "n"}]}
    assert unread_env(misspelt) == ["GFD_MIGSTRATEGY"]


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_every_manifest_env_var_is_read(path: str) -> None:
    for spec in pod_specs(path):
        for ctr in spec["containers"]:
            assert unread_env(ctr) == [], (path, ctr["name"])


# --------------------------------------------------------------------------------------------
# DaemonSets that may share a cluster never select each other's pods.


def selects(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """Does a LabelSelector (matchLabels and matchExpressions) match ``labels``?"""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    return all(_expression_matches(e, labels) for e in selector.get("matchExpressions", []))


def _daemonsets(objects: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == "DaemonSet"}


def another_profile(tmp_path: Path, profile: str) -> Path:
    """The simulated overlay copied for ``profile`` as docs/deploy.md says: "dgx-a100"
    replaced in its nameSuffix and simulated.yaml."""
    tree = copy_of_daemonset(tmp_path)
    copy_dir = tree / "overlays" / f"simulated-{profile}"
    shutil.copytree(tree / "overlays" / "simulated", copy_dir)
    for name in ("kustomization.yaml", "simulated.yaml"):
        text = (copy_dir / name).read_text()
        if name == "kustomization.yaml":
            text = text.replace("nameSuffix: -sim-dgx-a100", f"nameSuffix: -sim-{profile}")
        else:
            text = text.replace("dgx-a100", profile)
        (copy_dir / name).write_text(text)
    return copy_dir


def coexisting_daemonsets(tmp_path: Path) -> dict[str, list[dict[str, Any]]]:
    """Sets of DaemonSets one cluster may run together, by real kustomization: its own with
    the simulated overlay and a copy of it for another profile."""
    simulated = list(_daemonsets(rendered("daemonset/overlays/simulated")).values())
    t4 = list(_daemonsets(kustomize(another_profile(tmp_path, "t4"))).values())
    return {path: list(_daemonsets(rendered(path)).values()) + simulated + t4
            for path in KUSTOMIZATIONS if not path.endswith("simulated")}


def test_no_daemonset_selects_another_ones_pods(tmp_path: Path) -> None:
    for path, group in coexisting_daemonsets(tmp_path).items():
        names = [d["metadata"]["name"] for d in group]
        assert len(set(names)) == len(names) == 3 + len(EXTRA_DAEMONSETS.get(path, ())), names
        for owner in group:
            selector = owner["spec"]["selector"]
            assert selects(selector, owner["spec"]["template"]["metadata"]["labels"])
            for other in group:
                if other is not owner:
                    other_labels = other["spec"]["template"]["metadata"]["labels"]
                    assert not selects(selector, other_labels), (
                        owner["metadata"]["name"], other["metadata"]["name"])


def test_selector_overlap_check_notices_an_overlap() -> None:
    # Guards the test above: the base's selector would take the simulated pods if they kept
    # the base's name label.
    base = only(rendered("daemonset"), "DaemonSet")
    simulated = only(rendered("daemonset/overlays/simulated"), "DaemonSet")
    labels = dict(simulated["spec"]["template"]["metadata"]["labels"])
    assert not selects(base["spec"]["selector"], labels)
    labels["app.kubernetes.io/name"] = "nvidia-device-plugin"
    assert selects(base["spec"]["selector"], labels)


# --------------------------------------------------------------------------------------------
# The commands docs/deploy.md gives are checked against what the manifests render.

COMMANDS = ("kubectl", "python", "docker", "kind", "kustomize", "make")
PLACEHOLDER = re.compile(r"<[a-z-]+>")


def deploy_doc_commands(text: str) -> list[list[str]]:
    """Every command in docs/deploy.md (lines of ``sh`` blocks, and inline code spans that start
    with a command), as argv lists; ``&&`` and ``|`` separate commands."""
    lines = [line.strip() for block in re.findall(r"^```sh\n(.*?)^```", text, re.M | re.S)
             for line in block.splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    prose = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    lines += [span for span in re.findall(r"`([^`\n]+)`", prose)
              if span.split()[0] in COMMANDS and len(span.split()) > 1]
    commands: list[list[str]] = []
    for line in lines:
        lexer = shlex.shlex(line, posix=True, punctuation_chars="|&")
        lexer.whitespace_split = True
        current: list[str] = []
        for token in [*lexer, "&&"]:
            if token in ("&&", "|"):
                commands.append(current)
                current = []
            else:
                current.append(token)
    return commands


class DeployDocChecker:
    """Checks one command from docs/deploy.md; unknown commands fail (add a check for them)."""

    def __init__(self, gfd_labels: Iterable[str]) -> None:
        self.gfd_labels = set(gfd_labels)
        self.daemonsets = [d for path in (*KUSTOMIZATIONS, *EXPORTER_KUSTOMIZATIONS)
                           for d in _daemonsets(rendered(path)).values()]
        self.seen: set[str] = set()

    def check(self, argv: list[str]) -> None:
        """AssertionError when ``argv`` names something the manifests do not have."""
        handler = getattr(self, "_" + argv[0], None)
        assert handler is not None, f"no test checks {shlex.join(argv)!r}"
        handler(argv[1:])

    # ---------------------------------------------------------------- commands

    def _cd(self, args: list[str]) -> None:
        pass  # into the reader's own overlay (for kustomize edit)

    def _grep(self, args: list[str]) -> None:
        pass  # filters output

    def _make(self, args: list[str]) -> None:
        assert args == ["image"], args
        recipe = re.search(r"^image:.*\n\t(.*)", (REPO / "Makefile").read_text(), re.M)
        assert recipe is not None and recipe.group(1).startswith("docker build -t ")
        self.seen.add("make image")

    def _docker(self, args: list[str]) -> None:
        assert args[:2] == ["build", "-t"] and args[3:] == ["."], args
        self._image(args[2], tags=(project_version(), "<version>"))
        self.seen.add("docker build")

    def _kind(self, args: list[str]) -> None:
        assert args[:2] == ["load", "docker-image"], args
        self._image(args[2], tags=(project_version(),))

    def _kustomize(self, args: list[str]) -> None:
        assert args[:3] == ["edit", "set", "image"], args
        base = yaml.safe_load((REPO / "daemonset/base/kustomization.yaml").read_text())
        assert args[3].split("=", 1)[0] in {i["name"] for i in base["images"]}, args

    def _python(self, args: list[str]) -> None:
        # Only benchmarks: too slow to run here; they exist.
        assert args[0].startswith("bench/"), f"no test checks python {shlex.join(args)!r}"
        assert (REPO / args[0]).is_file(), args

    def _kubectl(self, args: list[str]) -> None:
        namespace, rest = None, list(args)
        if rest[0] in ("-n", "--namespace"):
            namespace, rest = rest[1], rest[2:]
        verb, operands = rest[0], rest[1:]
        if verb in ("apply", "delete", "diff") and operands[0] == "-k":
            assert operands[1].rstrip("/") in (*KUSTOMIZATIONS, *EXPORTER_KUSTOMIZATIONS), (
                operands)
        elif verb == "kustomize":
            path = operands[0].rstrip("/")
            assert len(operands) == 1 and path in (*KUSTOMIZATIONS, *EXPORTER_KUSTOMIZATIONS), (
                f"{operands}: not a kustomization these tests render")
            assert rendered(path), path  # it renders (through kubectl kustomize itself)
        elif verb == "rollout":
            assert operands[0] in ("status", "restart") and operands[1].startswith("daemonset/")
            self._daemonset(namespace, operands[1].split("/", 1)[1])
        elif verb == "get" and operands[0] == "pods":
            self._pod_selector(namespace, operands)
        elif verb == "get" and operands[0] == "nodes":
            assert operands[1] == "-L" and len(operands) == 3, operands
            assert set(operands[2].split(",")) <= self.gfd_labels, operands
        elif verb == "label" and operands[0] == "node":
            self._node_labels(operands[1:])
        elif verb == "taint" and operands[0] == "node":
            self._taint(operands[1:])
        elif verb in ("logs", "exec"):
            self._container(namespace, operands)
        elif verb in ("describe", "delete") and operands[0] in ("node", "pod"):
            assert PLACEHOLDER.fullmatch(operands[1]), operands
            if operands[0] == "pod":
                self._namespace(namespace)
        else:
            raise AssertionError(f"no test checks kubectl {shlex.join(args)!r}")
        self.seen.add(f"kubectl {verb}")

    # ---------------------------------------------------------------- checks

    def _image(self, image: str, tags: tuple[str, ...]) -> None:
        name, _, tag = image.rpartition(":")
        deployed = {c["image"].rpartition(":")[0] for d in self.daemonsets
                    for c in d["spec"]["template"]["spec"]["containers"]}
        assert deployed == {name} and tag in tags, image

    def _namespace(self, namespace: str | None) -> None:
        assert namespace in {d["metadata"]["namespace"] for d in self.daemonsets}, namespace

    def _daemonset(self, namespace: str | None, name: str) -> dict[str, Any]:
        self._namespace(namespace)
        found = [d for d in self.daemonsets if d["metadata"]["name"] == name
                 and d["metadata"]["namespace"] == namespace]
        assert found, f"no DaemonSet {namespace}/{name}"
        return found[0]

    def _pod_selector(self, namespace: str | None, operands: list[str]) -> None:
        self._namespace(namespace)
        assert operands[1] == "-l", operands
        wanted = dict(item.split("=", 1) for item in operands[2].split(","))
        owners = {d["metadata"]["name"] for d in self.daemonsets
                  if selects({"matchLabels": wanted}, d["spec"]["template"]["metadata"]["labels"])}
        assert len(owners) == 1, f"-l {operands[2]} lists the pods of {sorted(owners)}"

    def _node_labels(self, operands: list[str]) -> None:
        assert PLACEHOLDER.fullmatch(operands[0]), operands
        for item in operands[1:]:
            if item.endswith("-"):  # removing a label: one GFD writes
                assert item[:-1] in self.gfd_labels, item
                continue
            key, value = item.split("=", 1)
            assert any(schedulable(d["spec"]["template"]["spec"], {key: value})
                       for d in self.daemonsets), f"no DaemonSet runs on a node labelled {item}"

    def _taint(self, operands: list[str]) -> None:
        assert PLACEHOLDER.fullmatch(operands[0]) and len(operands) == 2, operands
        key_value, effect = operands[1].rsplit(":", 1)
        key, value = key_value.split("=", 1)
        taint = {"key": key, "value": value, "effect": effect}
        # The DaemonSets for nodes labelled key=value (the label command before) tolerate it.
        specs = [d["spec"]["template"]["spec"] for d in self.daemonsets]
        running = [spec for spec in specs if schedulable(spec, {key: value})]
        assert running, f"no DaemonSet runs on a node labelled {key_value}"
        assert all(schedulable(spec, {key: value}, [taint]) for spec in running), (
            f"the DaemonSet for {key_value} does not tolerate the taint {operands[1]}")

    def _container(self, namespace: str | None, operands: list[str]) -> None:
        self._namespace(namespace)
        assert PLACEHOLDER.fullmatch(operands[0]) and operands[1] == "-c", operands
        names = {c["name"] for d in self.daemonsets
                 for c in d["spec"]["template"]["spec"]["containers"]}
        assert operands[2] in names, operands


@pytest.fixture
def deploy_doc_checker(fake_snapshot: Any) -> DeployDocChecker:
    labels = node_labels(fake_snapshot("dgx-a100"), gpus_config.Config(), timestamp=1)
    return DeployDocChecker(labels)


def test_deploy_doc_commands_match_the_manifests(deploy_doc_checker: DeployDocChecker) -> None:
    commands = deploy_doc_commands(DOCS.read_text())
    for argv in commands:
        deploy_doc_checker.check(argv)
    # Guards the parsing: the commands that matter were found and checked.
    assert {"kubectl kustomize", "docker build", "make image", "kubectl rollout", "kubectl get",
            "kubectl label", "kubectl taint", "kubectl exec", "kubectl apply"} <= (
        deploy_doc_checker.seen)


@pytest.mark.parametrize(("command", "problem"), [
    ("kubectl -n default rollout status daemonset/nvidia-device-plugin-daemonset", "default"),
    ("kubectl -n kube-system rollout status daemonset/nvidia-device-plugin", "no DaemonSet"),
    ("kubectl -n kube-system get pods -l app.kubernetes.io/part-of=nvidia-k8s-py",
     "lists the pods of"),
    ("kubectl label node <n> nvk8s.io/simulated-gpu=dgx-a10", "no DaemonSet runs"),
    ("kubectl taint node <n> nvk8s.io/simulated=dgx-a100:NoSchedule", "no DaemonSet runs"),
    ("kubectl taint node <n> nvk8s.io/simulated-gpu=dgx-a100:NoExecute", "does not tolerate"),
    ("kubectl -n kube-system logs <pod> -c gfd", "gfd"),
    ("kubectl get nodes -L nvidia.com/gpu.model", "gpu.model"),
    ("kubectl kustomize daemonset/overlays/mig", "not a kustomization these tests render"),
    ("python daemonset/render.py daemonset/overlays/mig-mixed", "no test checks python"),
    ("kubectl scale daemonset x", "no test checks"),
    ("helm install x", "no test checks"),
])
def test_deploy_doc_checker_catches_mistakes(deploy_doc_checker: DeployDocChecker,
                                             command: str, problem: str) -> None:
    (argv,) = deploy_doc_commands(f"```sh\n{command}\n```\n")
    with pytest.raises(AssertionError) as info:
        deploy_doc_checker.check(argv)
    assert problem in f"{info.typename}: {info.value}"
