"""gfd.nodepatch guards that mutation testing found unprotected (docs/testing.md)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml
from apiserver import merge_patch
from kubernetes.config import ConfigException

from gfd.nodepatch import (
    OWNERSHIP_ANNOTATION,
    NodeApiError,
    NodePublisher,
    UnpinnedPatch,
    _kubeconfig_problem,
    node_meta,
    owned_keys,
    ownership_value,
    pinned,
)
from gpus.backoff import Backoff

DEFAULT = "the kubeconfig ($KUBECONFIG or ~/.kube/config)"


def yaml_error(text: str) -> yaml.YAMLError:
    try:
        yaml.safe_load(text)
    except yaml.YAMLError as err:
        return err
    raise AssertionError("valid YAML")


@pytest.mark.parametrize(("err", "path", "line"), [
    # The client's own words, on one line, with the file named once.
    (ConfigException("Invalid kube-config file.\n  No configuration found."), "/etc/kc",
     "/etc/kc: Invalid kube-config file. No configuration found."),
    (ConfigException("/etc/kc: no current context"), "/etc/kc", "/etc/kc: no current context"),
    (ConfigException("Service host/port is not set."), None, "Service host/port is not set."),
    (FileNotFoundError(2, "No such file or directory"), "/etc/kc",
     "/etc/kc: [Errno 2] No such file or directory"),
    # YAML errors: the position only, never the text (it may hold a token).
    (yaml_error("token: s3cret\n::: [x\n"), "/etc/kc", "/etc/kc: not valid YAML at line 3, "
     "column 1"),
    (yaml_error("::: [x\n"), None, f"{DEFAULT}: not valid YAML at line 2, column 1"),
    (yaml.YAMLError("s3cret"), "/etc/kc", "/etc/kc: not valid YAML"),
    # Anything else: the exception's type only.
    (TypeError("s3cret"), "/etc/kc", "/etc/kc: not a usable kubeconfig (TypeError)"),
    (KeyError("s3cret"), None, f"{DEFAULT}: not a usable kubeconfig (KeyError)"),
    # A client error without words still says which file and what went wrong.
    (ConfigException(""), None, f"{DEFAULT}: ConfigException"),
], ids=["config-multiline", "config-names-path", "config-no-path", "oserror", "yaml-mark",
        "yaml-default-path", "yaml-no-mark", "other", "other-default-path", "config-empty"])
def test_kubeconfig_problem_is_one_line_without_secrets(
        err: Exception, path: str | None, line: str) -> None:
    assert _kubeconfig_problem(err, path) == line


def test_a_bad_answer_is_quoted_briefly() -> None:
    # The log line names the problem and quotes at most 80 characters of what came back.
    answer = ["x" * 200]
    with pytest.raises(NodeApiError) as info:
        node_meta(answer)
    assert info.value.state == "bad response"
    assert info.value.detail == "the Node is not a JSON object: " + repr(answer)[:80]
    assert str(info.value) == f"bad response: {info.value.detail}"


class ScriptedApi:
    """A NodeApi whose reads fail with the queued errors, then serve an empty Node."""

    def __init__(self, *failures: NodeApiError) -> None:
        self.failures = list(failures)
        self.patched: list[dict[str, Any]] = []

    def get_node(self, name: str) -> dict[str, Any]:
        if self.failures:
            raise self.failures.pop(0)
        return {"kind": "Node", "apiVersion": "v1",
                "metadata": {"name": name, "resourceVersion": "1"}}

    def patch_node(self, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        self.patched.append(patch)
        return {}


def test_each_new_failure_state_warns_and_repeats_go_to_debug(
        caplog: pytest.LogCaptureFixture) -> None:
    api = ScriptedApi(NodeApiError("HTTP 500", "boom"), NodeApiError("HTTP 500", "boom"),
                      NodeApiError("timeout", "slow"))
    now = [100.0]
    publisher = NodePublisher(api, "n1", Backoff(initial=1, cap=8), clock=lambda: now[0])
    assert publisher.retry()  # nothing pending: nothing to do, and that is success
    with caplog.at_level("DEBUG", logger="gfd.nodepatch"):
        assert not publisher.publish({"nvidia.com/gpu.count": "8"})
        assert not publisher.retry()
        assert not publisher.retry()
        assert publisher.retry_in() == 4.0
        now[0] += 10
        assert publisher.retry_in() == 0.0  # overdue
        assert publisher.retry()
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", "node n1: cannot update labels (HTTP 500: boom); retrying with backoff up "
                    "to 8s"),
        ("DEBUG", "node n1: still failing (HTTP 500: boom); next try in 2.0s"),
        ("WARNING", "node n1: cannot update labels (timeout: slow); retrying with backoff up "
                    "to 8s"),
        ("INFO", "node n1: patched 1 labels"),
        ("INFO", "node n1: labels converged; API server reachable again"),
    ]
    assert publisher.converged
    assert publisher.retry_in() is None


def test_ownership_annotation_round_trips_keys_of_any_prefix() -> None:
    keys = {"nvidia.com/gpu.count", "nvidia.com/gfd.timestamp", "example.com/x"}
    value = ownership_value(keys)
    assert value == "example.com/x,gfd.timestamp,gpu.count"
    assert owned_keys({OWNERSHIP_ANNOTATION: value}) == keys


# --------------------------------------------------------------------------- bad answers
# What the operator reads in "cannot update labels (bad response: ...)": the problem and a
# short quote of the offending part of the answer.


def bad_response(node: Any, name: str | None = None) -> str:
    with pytest.raises(NodeApiError) as info:
        node_meta(node, name)
    assert info.value.state == "bad response"
    return info.value.detail


def test_a_node_of_another_kind_is_quoted_by_kind_and_api_version() -> None:
    status = {"kind": "Status", "apiVersion": "v1", "status": "Failure",
              "metadata": {"name": "n1", "resourceVersion": "1"}}
    assert bad_response(status, "n1") == "not a v1 Node: {'kind': 'Status', 'apiVersion': 'v1'}"
    old = {"kind": "Node", "apiVersion": "v1beta1", "metadata": {"name": "n1"}}
    assert bad_response(old, "n1") == \
        "not a v1 Node: {'kind': 'Node', 'apiVersion': 'v1beta1'}"


@pytest.mark.parametrize("field", ["labels", "annotations"])
def test_a_string_map_of_the_wrong_shape_is_named_and_quoted(field: str) -> None:
    def node(value: Any) -> dict[str, Any]:
        return {"kind": "Node", "apiVersion": "v1",
                "metadata": {"name": "n1", "resourceVersion": "1", field: value}}

    assert bad_response(node(["a=b"]), "n1") == f"metadata.{field} is not an object: ['a=b']"
    # Only the offending entry is quoted, not the whole map.
    assert bad_response(node({"a": "b", "nvidia.com/gpu.count": 8}), "n1") == \
        f"metadata.{field} holds a value that is not a string: {{'nvidia.com/gpu.count': 8}}"


# --------------------------------------------------------------------------- NodePublisher


class StoredNodeApi:
    """A NodeApi over one in-memory Node that applies merge patches and bumps its version."""

    def __init__(self, labels: dict[str, str], annotations: dict[str, str]) -> None:
        self.node: dict[str, Any] = {
            "kind": "Node", "apiVersion": "v1",
            "metadata": {"name": "n1", "resourceVersion": "1", "labels": labels,
                         "annotations": annotations}}
        self.patched: list[dict[str, Any]] = []

    def get_node(self, name: str) -> dict[str, Any]:
        return copy.deepcopy(self.node)

    def patch_node(self, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        self.patched.append(patch)
        patch = copy.deepcopy(patch)
        version = int(patch["metadata"].pop("resourceVersion"))
        self.node = merge_patch(self.node, patch)
        self.node["metadata"]["resourceVersion"] = str(version + 1)
        return copy.deepcopy(self.node)


TS = "nvidia.com/gfd.timestamp"


def test_publisher_does_not_patch_for_a_new_timestamp_alone() -> None:
    # The publisher hands its refresh_only labels to the planning: a pass whose only change
    # is the timestamp sends no PATCH.
    api = StoredNodeApi({"nvidia.com/gpu.count": "8", TS: "1000"},
                        {OWNERSHIP_ANNOTATION: "gfd.timestamp,gpu.count"})
    publisher = NodePublisher(api, "n1", refresh_only={TS})
    assert publisher.publish({"nvidia.com/gpu.count": "8", TS: "1060"})
    assert api.patched == [] and publisher.patches == 0
    assert publisher.publish({"nvidia.com/gpu.count": "4", TS: "1120"})
    assert api.node["metadata"]["labels"] == {"nvidia.com/gpu.count": "4", TS: "1120"}


def test_publisher_counts_every_patch() -> None:
    api = StoredNodeApi({}, {})
    publisher = NodePublisher(api, "n1")
    for count in ("8", "4", "2"):
        assert publisher.publish({"nvidia.com/gpu.count": count})
    assert publisher.publish({"nvidia.com/gpu.count": "2"})  # no change, no patch
    assert len(api.patched) == 3 and publisher.patches == 3


@pytest.mark.parametrize(("node", "detail"), [
    ({"kind": "Node", "apiVersion": "v1", "metadata": "n1"}, "no metadata object: 'n1'"),
    ({"kind": "Node", "apiVersion": "v1", "metadata": {"name": "n2", "resourceVersion": "1"}},
     "not the Node 'n1': 'n2'"),
    ({"kind": "Node", "apiVersion": "v1", "metadata": {"name": "n1", "resourceVersion": 7}},
     "no metadata.resourceVersion string: 7"),
], ids=["no-metadata", "other-node", "numeric-version"])
def test_a_bad_node_names_the_problem_and_quotes_the_part(node: Any, detail: str) -> None:
    assert bad_response(node, "n1") == detail


# --------------------------------------------------------------------------- pinned


@pytest.mark.parametrize("patch", [["metadata"], {"metadata": {"labels": {"x": "y" * 100}}}],
                         ids=["not-a-map", "long"])
def test_an_unpinned_patch_is_refused_with_a_short_quote(patch: Any) -> None:
    with pytest.raises(UnpinnedPatch) as info:
        pinned(patch)
    assert info.value.state == "unpinned patch"
    assert info.value.detail == ("refusing to send a Node patch without "
                                 "metadata.resourceVersion: " + repr(patch)[:80])
