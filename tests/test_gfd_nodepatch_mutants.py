"""gfd.nodepatch guards that mutation testing found unprotected (docs/testing.md)."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from apiserver import FakeApiServer, merge_patch
from kubernetes import client
from kubernetes.config import ConfigException, incluster_config, kube_config
from urllib3.exceptions import NewConnectionError, ProtocolError, ReadTimeoutError

from gfd.nodepatch import (
    OWNERSHIP_ANNOTATION,
    KubeConfigError,
    KubeNodeApi,
    NodeApiError,
    NodePublisher,
    UnpinnedPatch,
    _kubeconfig_problem,
    kube_api_client,
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


# --------------------------------------------------------------------------- client configuration
# Which configuration reaches the kubernetes client: the loaders fill the Configuration we hand
# them (without one they would set the client's process-wide default instead, which our
# ApiClient never reads).


@pytest.fixture
def no_default_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keeps the client's process-wide default Configuration out of (and unchanged by) a test."""
    monkeypatch.setattr(client.Configuration, "_default", None)


@pytest.mark.usefixtures("no_default_configuration")
def test_in_a_cluster_the_service_account_configures_the_client(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    token, ca = tmp_path / "token", tmp_path / "ca.crt"
    token.write_text("s3cret")
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    monkeypatch.setattr(incluster_config, "SERVICE_TOKEN_FILENAME", str(token))
    monkeypatch.setattr(incluster_config, "SERVICE_CERT_FILENAME", str(ca))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    configuration = kube_api_client(None).configuration
    assert configuration.host == "https://10.96.0.1:443"
    assert configuration.ssl_ca_cert == str(ca)
    assert configuration.api_key["BearerToken"] == "bearer s3cret"
    assert configuration.retries is False  # our backoff, not urllib3's hidden retries


@pytest.fixture
def stub() -> Iterator[FakeApiServer]:
    with FakeApiServer() as server:
        server.add_node("n1")
        yield server


@pytest.mark.usefixtures("no_default_configuration")
def test_outside_a_cluster_the_default_kubeconfig_reaches_the_api_server(
        stub: FakeApiServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION",
                        stub.kubeconfig(str(tmp_path / "config")))
    api = KubeNodeApi.from_environment()
    assert api.get_node("n1")["metadata"]["name"] == "n1"


def test_an_unusable_kubeconfig_is_one_line_naming_the_file(tmp_path: Path) -> None:
    # The stderr line after "cannot configure the Kubernetes client: ".
    missing = tmp_path / "missing"
    with pytest.raises(KubeConfigError) as info:
        kube_api_client(str(missing))
    assert str(info.value).startswith(f"{missing}: ")
    assert "No configuration found" in str(info.value)
    broken = tmp_path / "broken"
    broken.write_text("token: s3cret\n::: [x\n")
    with pytest.raises(KubeConfigError) as info:
        kube_api_client(str(broken))
    assert str(info.value) == f"{broken}: not valid YAML at line 3, column 1"


# --------------------------------------------------------------------------- failed calls
# What a failed call becomes: the state (a new one is warned about, a repeat goes to debug)
# and the detail an operator reads in "cannot update labels (<state>: <detail>)". Through the
# real kubernetes client and urllib3 against the local API server stub.


def failed_call(api: KubeNodeApi) -> NodeApiError:
    with pytest.raises(NodeApiError) as info:
        api.get_node("n1")
    assert str(info.value) == f"{info.value.state}: {info.value.detail}"
    return info.value


def stub_api(server: FakeApiServer, tmp_path: Path,
             request_timeout: tuple[float, float] = (5.0, 10.0)) -> KubeNodeApi:
    return KubeNodeApi.from_environment(server.kubeconfig(str(tmp_path / "kubeconfig")),
                                        request_timeout)


NOT_JSON = b"<html>" + b"x" * 200 + b"</html>"


@pytest.mark.parametrize(("fault", "state", "detail"), [
    # The status and its reason phrase, not the client's multi-line dump of headers and body.
    (lambda s: s.fail_next(1, 500), "HTTP 500", "Internal Server Error"),
    (lambda s: s.fail_next(1, 403), "HTTP 403", "Forbidden"),
    # A proxy's page: named, and quoted up to 80 bytes.
    (lambda s: s.answer_next(1, NOT_JSON), "bad response", f"not JSON: {NOT_JSON[:80]!r}"),
    (lambda s: s.answer_next(1, b"[1, 2]"), "bad response", "not a JSON object"),
], ids=["http-500", "http-403", "not-json", "json-list"])
def test_a_failed_call_names_its_state_and_detail(
        stub: FakeApiServer, tmp_path: Path, fault: Any, state: str, detail: str) -> None:
    fault(stub)
    err = failed_call(stub_api(stub, tmp_path))
    assert (err.state, err.detail) == (state, detail)


def test_a_closed_connection_is_a_connection_error(stub: FakeApiServer,
                                                   tmp_path: Path) -> None:
    stub.close_next(1)
    err = failed_call(stub_api(stub, tmp_path))
    assert err.state == "connection error"
    assert isinstance(err.__cause__, ProtocolError)
    assert err.detail == str(err.__cause__) and "Connection aborted" in err.detail


def test_a_refused_connection_is_a_connection_error_not_a_timeout(tmp_path: Path) -> None:
    # urllib3 2's NewConnectionError is also a TimeoutError: a refused connection must not
    # read as a slow API server.
    server = FakeApiServer()
    api = stub_api(server, tmp_path)
    server.stop()  # nothing listens on the port any more
    err = failed_call(api)
    assert err.state == "connection error"
    assert isinstance(err.__cause__, NewConnectionError)
    assert err.detail == str(err.__cause__) and "Connection refused" in err.detail


def test_a_hung_api_server_is_a_timeout(stub: FakeApiServer, tmp_path: Path) -> None:
    stub.delay_next(1, 60)  # answered long after the read timeout (stopping cuts it short)
    err = failed_call(stub_api(stub, tmp_path, request_timeout=(5.0, 0.1)))
    assert err.state == "timeout"
    assert isinstance(err.__cause__, ReadTimeoutError)
    assert err.detail == str(err.__cause__) and "Read timed out" in err.detail


# --------------------------------------------------------------------------- RetryingPublisher


def test_a_fresh_publisher_has_nothing_pending() -> None:
    # The daemon's loop asks retry_in() whether a retry is due, and oneshot waits on converged.
    publisher = NodePublisher(ScriptedApi(), "n1", clock=lambda: 100.0)
    assert publisher.retry_in() is None
    assert publisher.converged


def test_successes_without_a_failure_log_no_recovery(caplog: pytest.LogCaptureFixture) -> None:
    # "API server reachable again" only after failures, never on the first or a later success.
    publisher = NodePublisher(ScriptedApi(), "n1", clock=lambda: 100.0)
    with caplog.at_level("INFO", logger="gfd.nodepatch"):
        assert publisher.publish({"nvidia.com/gpu.count": "8"})
        assert publisher.publish({"nvidia.com/gpu.count": "4"})
    assert [r.getMessage() for r in caplog.records] == ["node n1: patched 1 labels"] * 2
    assert publisher.converged
