"""GFD's NodeFeature mode end to end (main() over the fake NVML and the test API server), how
the output mode is chosen, and the node-feature-api overlay's RBAC against what GFD calls."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import pytest
from apiserver import FakeApiServer
from test_manifests import container, env_values, only, pod_spec, rendered

from gfd.main import build_parser, main, resolve_options
from gfd.nodefeature import NODE_NAME_LABEL, object_name
from gpus.config import resolve

NODE, NS, POD = "node-a", "kube-system", "gfd-pod-1"
OVERLAY = "daemonset/overlays/node-feature-api"
DAEMONSET = {"apiVersion": "apps/v1", "kind": "DaemonSet",
             "name": "nvidia-device-plugin-daemonset", "uid": "ds-1", "controller": True}


@pytest.fixture
def server() -> Iterator[FakeApiServer]:
    with FakeApiServer() as srv:
        srv.install_nodefeature_crd()
        yield srv


def run(server: FakeApiServer, tmp_path: Path, *extra: str, env: dict[str, str] | None = None
        ) -> int:
    environ = {"NODE_NAME": NODE, "NAMESPACE": NS, "POD_NAME": POD, **(env or {})}
    return main(["--oneshot", "--nvml", "fake:gb200-nvl", "--no-timestamp", "--health-file", "",
                 "--sysfs-root", str(tmp_path / "sys-root"), "-o", str(tmp_path / "features"),
                 "--kubeconfig", server.kubeconfig(str(tmp_path / "kc")), *extra],
                environ=environ)


def test_oneshot_writes_the_node_feature(server: FakeApiServer, tmp_path: Path) -> None:
    server.add_pod(NS, POD, [DAEMONSET])
    assert run(server, tmp_path, "--use-node-feature-api") == 0
    stored = server.nodefeature(NS, object_name(NODE))
    assert stored is not None
    assert stored["metadata"]["labels"] == {NODE_NAME_LABEL: NODE}
    labels = stored["spec"]["labels"]
    assert labels["nvidia.com/gpu.product"] == "NVIDIA-GB200"
    assert labels["nvidia.com/gpu.clique"] == "6f1c3a52-9d4e-4b8a-a0f7-2c5e8d1b3a90.32766"
    assert labels["nvidia.com/vgpu.present"] == "false"
    assert [o["kind"] for o in stored["metadata"]["ownerReferences"]] == ["DaemonSet", "Pod"]
    assert not (tmp_path / "features").exists()  # as NVIDIA: the object replaces the file
    assert run(server, tmp_path, env={"USE_NODE_FEATURE_API": "true"}) == 0
    assert [r.method for r in server.requests() if r.method in ("POST", "PUT")] == ["POST"]


def test_missing_crd_fails_a_oneshot_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                         ) -> None:
    with FakeApiServer() as bare:
        bare.add_pod(NS, POD, [DAEMONSET])
        assert run(bare, tmp_path, "--output-mode", "node-feature") == 1


def _mode(argv: list[str], environ: dict[str, str], tmp_path: Path, text: str = "") -> str:
    if text:
        (tmp_path / "c.yaml").write_text(text)
        argv = [*argv, "--config-file", str(tmp_path / "c.yaml")]
    args: argparse.Namespace = build_parser().parse_args(argv)
    environ = {"NODE_NAME": NODE, **environ}
    return resolve_options(args, environ, resolve(args, environ)).output_mode


def test_how_the_output_mode_is_chosen(tmp_path: Path) -> None:
    assert _mode([], {}, tmp_path) == "file"  # unset: our historical default (docs/gfd.md)
    assert _mode(["--use-node-feature-api"], {}, tmp_path) == "node-feature"
    assert _mode(["--use-node-feature-api=false"], {}, tmp_path) == "file"
    assert _mode([], {"GFD_USE_NODE_FEATURE_API": "true"}, tmp_path) == "node-feature"
    assert _mode([], {}, tmp_path, "flags: {useNodeFeatureAPI: true}\n") == "node-feature"
    assert _mode([], {}, tmp_path, "flags: {useNodeFeatureAPI: false}\n") == "file"
    # --output-mode (our manifests set GFD_OUTPUT_MODE) always wins.
    assert _mode(["--use-node-feature-api"], {"GFD_OUTPUT_MODE": "node-api"}, tmp_path) \
        == "node-api"


def test_node_feature_mode_needs_the_node_name(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--oneshot", "--output-mode", "node-feature"], environ={}) == 2
    assert "NODE_NAME" in capsys.readouterr().err


# --------------------------------------------------------------------------- the overlay


def test_overlay_runs_gfd_in_node_feature_mode() -> None:
    env = env_values(container(pod_spec(OVERLAY), "gpu-feature-discovery"))
    assert env["GFD_OUTPUT_MODE"] == "node-feature"
    gfd = container(pod_spec(OVERLAY), "gpu-feature-discovery")
    refs = {e["name"]: e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
            for e in gfd["env"]}
    assert refs["NAMESPACE"] == "metadata.namespace" and refs["POD_NAME"] == "metadata.name"


VERBS = {"GET": "get", "POST": "create", "PUT": "update"}


def test_overlay_rbac_covers_every_call_gfd_makes(server: FakeApiServer, tmp_path: Path) -> None:
    objects = rendered(OVERLAY)
    role, binding = only(objects, "Role"), only(objects, "RoleBinding")
    account = only(objects, "ServiceAccount")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"],
                                    "namespace": account["metadata"]["namespace"]}]
    assert role["metadata"]["namespace"] == only(objects, "DaemonSet")["metadata"]["namespace"]
    allowed = {(group, resource, verb) for rule in role["rules"]
               for group in rule["apiGroups"] for resource in rule["resources"]
               for verb in rule["verbs"]}
    assert allowed == {("nfd.k8s-sigs.io", "nodefeatures", v)
                       for v in ("get", "list", "watch", "create", "update")} | {
                           ("", "pods", "get")}
    server.add_pod(NS, POD, [DAEMONSET])
    assert run(server, tmp_path, "--output-mode", "node-feature") == 0
    server.change_nodefeature(NS, object_name(NODE), {})
    assert run(server, tmp_path, "--output-mode", "node-feature") == 0  # an update too
    used = set()
    for request in server.requests():
        group = "nfd.k8s-sigs.io" if request.path.startswith("/apis/nfd.k8s-sigs.io/") else ""
        resource = "nodefeatures" if group else "pods"
        used.add((group, resource, VERBS[request.method]))
    assert ("nfd.k8s-sigs.io", "nodefeatures", "update") in used
    assert used <= allowed
