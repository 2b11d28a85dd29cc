"""Node-label mode against the local API server stub, through the real kubernetes client."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from apiserver import FakeApiServer, merge_patch

from gfd.nodepatch import (
    OWNERSHIP_ANNOTATION,
    REQUEST_TIMEOUT,
    KubeNodeApi,
    NodeApiError,
    NodePublisher,
    UnpinnedPatch,
    owned_keys,
    plan_patch,
)
from gpus.backoff import Backoff

NODE = "gpu-node-1"
FOREIGN = {"kubernetes.io/hostname": NODE, "nvidia.com/device-plugin.config": "a100",
           "nvidia.com/gpu.deploy.driver": "true", "team": "ml"}


@pytest.fixture
def server() -> Iterator[FakeApiServer]:
    with FakeApiServer() as srv:
        srv.add_node(NODE, labels=FOREIGN)
        yield srv


def make_api(server: FakeApiServer, tmp_path: Path) -> KubeNodeApi:
    return KubeNodeApi.from_environment(server.kubeconfig(str(tmp_path / "kubeconfig")))


class Clock:
    """A manual monotonic clock, so retry scheduling is tested without sleeping."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def publisher(server: FakeApiServer, tmp_path: Path, clock: Clock | None = None
              ) -> NodePublisher:
    return NodePublisher(make_api(server, tmp_path), NODE, Backoff(initial=1, cap=8),
                         clock=clock or Clock())


# --------------------------------------------------------------------------- pure planning


def test_merge_patch_rfc7386() -> None:
    target = {"a": "b", "c": {"d": "e", "f": "g"}}
    assert merge_patch(target, {"a": "z", "c": {"f": None}}) == {"a": "z", "c": {"d": "e"}}
    assert merge_patch({"a": [1]}, {"a": [2]}) == {"a": [2]}
    assert merge_patch({"a": "b"}, {"a": {"x": None, "y": 1}}) == {"a": {"y": 1}}
    assert target == {"a": "b", "c": {"d": "e", "f": "g"}}  # not mutated


def test_plan_sets_labels_and_records_ownership() -> None:
    node = {"metadata": {"labels": dict(FOREIGN), "resourceVersion": "7"}}
    patch = plan_patch(node, {"nvidia.com/gpu.count": "8", "nvidia.com/gpu.product": "X"})
    assert patch == {"metadata": {
        "labels": {"nvidia.com/gpu.count": "8", "nvidia.com/gpu.product": "X"},
        "annotations": {OWNERSHIP_ANNOTATION: "gpu.count,gpu.product"},
        "resourceVersion": "7"}}


def test_plan_nothing_when_in_sync() -> None:
    node = {"metadata": {"labels": {"nvidia.com/gpu.count": "8"}, "resourceVersion": "7",
                         "annotations": {OWNERSHIP_ANNOTATION: "gpu.count"}}}
    assert plan_patch(node, {"nvidia.com/gpu.count": "8"}) is None


def test_plan_deletes_only_owned_stale_labels() -> None:
    node = {"metadata": {
        "labels": {"nvidia.com/gpu.count": "8", "nvidia.com/mig.strategy": "single",
                   "nvidia.com/gpu.deploy.driver": "true"},
        "annotations": {OWNERSHIP_ANNOTATION: "gpu.count,mig.strategy,gone.already"},
        "resourceVersion": "7"}}
    patch = plan_patch(node, {"nvidia.com/gpu.count": "8"})
    assert patch == {"metadata": {"labels": {"nvidia.com/mig.strategy": None},
                                  "annotations": {OWNERSHIP_ANNOTATION: "gpu.count"},
                                  "resourceVersion": "7"}}


def test_plan_never_touches_protected_labels_even_if_claimed() -> None:
    node = {"metadata": {
        "labels": {"nvidia.com/device-plugin.config": "a100"},
        "annotations": {OWNERSHIP_ANNOTATION: "device-plugin.config"}, "resourceVersion": "7"}}
    patch = plan_patch(node, {"nvidia.com/device-plugin.config": "other"})
    assert patch == {"metadata": {"annotations": {OWNERSHIP_ANNOTATION: None},
                                  "resourceVersion": "7"}}


def test_plan_never_touches_gpu_present() -> None:
    # The DaemonSets' node affinity (the simulated overlay's included) reads gpu.present.
    node = {"metadata": {
        "labels": {"nvidia.com/gpu.present": "true", "nvidia.com/gpu.count": "8"},
        "annotations": {OWNERSHIP_ANNOTATION: "gpu.count,gpu.present"}, "resourceVersion": "7"}}
    assert plan_patch(node, {"nvidia.com/gpu.count": "8"}) == {
        "metadata": {"annotations": {OWNERSHIP_ANNOTATION: "gpu.count"}, "resourceVersion": "7"}}
    patch = plan_patch(node, {"nvidia.com/gpu.count": "4", "nvidia.com/gpu.present": "false"})
    assert patch == {"metadata": {"labels": {"nvidia.com/gpu.count": "4"},
                                  "annotations": {OWNERSHIP_ANNOTATION: "gpu.count"},
                                  "resourceVersion": "7"}}


def test_owned_keys_parsing() -> None:
    assert owned_keys({OWNERSHIP_ANNOTATION: " a, b ,,example.com/c"}) == {
        "nvidia.com/a", "nvidia.com/b", "example.com/c"}
    assert owned_keys(None) == set()


def test_backoff_grows_to_cap_and_resets() -> None:
    backoff = Backoff(initial=1, factor=2, cap=5)
    assert [backoff.next_delay() for _ in range(5)] == [1, 2, 4, 5, 5]
    backoff.reset()
    assert backoff.next_delay() == 1


# --------------------------------------------------------------------------- against the stub


def test_labels_set_foreign_untouched(server: FakeApiServer, tmp_path: Path) -> None:
    pub = publisher(server, tmp_path)
    assert pub.publish({"nvidia.com/gpu.count": "8", "nvidia.com/gpu.product": "A100"})
    labels = server.labels(NODE)
    assert labels == FOREIGN | {"nvidia.com/gpu.count": "8", "nvidia.com/gpu.product": "A100"}
    assert server.annotations(NODE)[OWNERSHIP_ANNOTATION] == "gpu.count,gpu.product"
    patches = server.requests("PATCH")
    assert len(patches) == 1
    assert patches[0].content_type == "application/merge-patch+json"


def test_stale_labels_removed_foreign_kept(server: FakeApiServer, tmp_path: Path) -> None:
    pub = publisher(server, tmp_path)
    pub.publish({"nvidia.com/gpu.count": "8", "nvidia.com/mig.strategy": "single",
                 "nvidia.com/mig-1g.5gb.count": "7"})
    pub.publish({"nvidia.com/gpu.count": "8"})
    assert server.labels(NODE) == FOREIGN | {"nvidia.com/gpu.count": "8"}
    assert server.annotations(NODE)[OWNERSHIP_ANNOTATION] == "gpu.count"


def test_ownership_survives_a_restart(server: FakeApiServer, tmp_path: Path) -> None:
    publisher(server, tmp_path).publish({"nvidia.com/gpu.count": "8",
                                         "nvidia.com/gpu.product": "A100"})
    # A new process knows nothing but what is on the Node.
    restarted = publisher(server, tmp_path)
    assert restarted.publish({"nvidia.com/gpu.count": "4"})
    assert server.labels(NODE) == FOREIGN | {"nvidia.com/gpu.count": "4"}


def test_no_patch_when_nothing_changed(server: FakeApiServer, tmp_path: Path) -> None:
    pub = publisher(server, tmp_path)
    pub.publish({"nvidia.com/gpu.count": "8"})
    pub.publish({"nvidia.com/gpu.count": "8"})
    publisher(server, tmp_path).publish({"nvidia.com/gpu.count": "8"})
    assert len(server.requests("PATCH")) == 1
    assert pub.patches == 1


def test_label_edited_behind_our_back_is_restored(server: FakeApiServer,
                                                   tmp_path: Path) -> None:
    pub = publisher(server, tmp_path)
    pub.publish({"nvidia.com/gpu.count": "8"})
    server.set_labels(NODE, {"nvidia.com/gpu.count": None})
    pub.publish({"nvidia.com/gpu.count": "8"})
    assert server.labels(NODE)["nvidia.com/gpu.count"] == "8"


@pytest.mark.parametrize("fault", ["500", "409", "403", "close"])
def test_retries_converge_after_faults(server: FakeApiServer, tmp_path: Path,
                                       fault: str) -> None:
    clock = Clock()
    pub = publisher(server, tmp_path, clock)
    if fault == "close":
        server.close_next(2)
    else:
        server.fail_next(2, int(fault))
    want = {"nvidia.com/gpu.count": "8"}
    assert not pub.publish(want)
    assert pub.retry_in() == 1
    clock.now += 1
    assert not pub.retry()
    assert pub.retry_in() == 2  # exponential
    clock.now += 2
    assert pub.retry()
    assert pub.retry_in() is None and pub.converged
    assert server.labels(NODE) == FOREIGN | want
    # The stub recorded what each faulted request got: 0 for a closed connection.
    answered = [r.answered for r in server.requests()]
    assert answered[:2] == [0 if fault == "close" else int(fault)] * 2
    assert answered[2:] and all(a == 200 for a in answered[2:])


def test_conflict_from_a_concurrent_writer_rereads(server: FakeApiServer,
                                                   tmp_path: Path) -> None:
    api = make_api(server, tmp_path)
    node = api.get_node(NODE)
    server.set_labels(NODE, {"team": "infra"})  # someone else writes in between
    patch = plan_patch(node, {"nvidia.com/gpu.count": "8"})
    assert patch is not None
    with pytest.raises(Exception, match="409"):
        api.patch_node(NODE, patch)
    pub = NodePublisher(api, NODE)
    assert pub.publish({"nvidia.com/gpu.count": "8"})
    assert server.labels(NODE)["team"] == "infra"


def test_connection_refused_then_server_returns(tmp_path: Path) -> None:
    server = FakeApiServer()
    kubeconfig = server.kubeconfig(str(tmp_path / "kubeconfig"))
    server.stop()  # nothing listens on the port any more
    clock = Clock()
    pub = NodePublisher(KubeNodeApi.from_environment(kubeconfig), NODE,
                        Backoff(initial=1, factor=2, cap=4), clock=clock)
    assert not pub.publish({"nvidia.com/gpu.count": "8"})
    assert not pub.retry()
    assert pub.retry_in() == 2


def test_unknown_node_is_a_retryable_404(server: FakeApiServer, tmp_path: Path) -> None:
    pub = NodePublisher(make_api(server, tmp_path), "no-such-node", clock=Clock())
    assert not pub.publish({"nvidia.com/gpu.count": "8"})
    assert pub.retry_in() is not None


def test_state_changes_logged_once(server: FakeApiServer, tmp_path: Path,
                                   caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    pub = publisher(server, tmp_path, clock)
    server.fail_next(3, 500)
    with caplog.at_level("INFO", logger="gfd.nodepatch"):
        for _ in range(3):
            pub.publish({"nvidia.com/gpu.count": "8"})
            clock.now += 10
        pub.publish({"nvidia.com/gpu.count": "8"})
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "HTTP 500" in warnings[0].getMessage()
    assert sum("converged" in r.getMessage() for r in caplog.records) == 1


def test_protected_labels_survive_on_a_real_patch(server: FakeApiServer,
                                                  tmp_path: Path) -> None:
    protected = {"nvidia.com/gpu.present": "true", "nvidia.com/device-plugin.config": "a100"}
    server.add_node(NODE, labels=FOREIGN | protected, annotations={
        OWNERSHIP_ANNOTATION: "gpu.present,device-plugin.config,gpu.count"})
    pub = publisher(server, tmp_path)
    assert pub.publish({"nvidia.com/gpu.count": "8", "nvidia.com/gpu.present": "false"})
    assert pub.publish({"nvidia.com/gpu.count": "8"})
    assert server.labels(NODE) == FOREIGN | protected | {"nvidia.com/gpu.count": "8"}
    assert server.annotations(NODE)[OWNERSHIP_ANNOTATION] == "gpu.count"


def test_every_call_carries_a_request_timeout() -> None:
    class Response:
        data = b'{"metadata": {}}'

    class RecordingCore:
        """Stands in for CoreV1Api; records the keyword arguments of each call."""

        def __init__(self) -> None:
            self.calls: list[dict[str, object]] = []

        def read_node(self, name: str, **kwargs: object) -> Response:
            self.calls.append(kwargs)
            return Response()

        def patch_node(self, name: str, body: object, **kwargs: object) -> Response:
            self.calls.append(kwargs)
            return Response()

    core = RecordingCore()
    KubeNodeApi(core).get_node(NODE)
    KubeNodeApi(core).patch_node(NODE, {"metadata": {"resourceVersion": "7"}})
    KubeNodeApi(core, request_timeout=(1.0, 2.0)).get_node(NODE)
    assert [c["_request_timeout"] for c in core.calls] == [REQUEST_TIMEOUT, REQUEST_TIMEOUT,
                                                           (1.0, 2.0)]
    assert all(c["_preload_content"] is False for c in core.calls)


def test_slow_api_server_times_out_backs_off_and_converges(
        server: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    api = KubeNodeApi.from_environment(server.kubeconfig(str(tmp_path / "kubeconfig")),
                                       request_timeout=(2.0, 0.2))
    pub = NodePublisher(api, NODE, Backoff(initial=1, cap=8), clock=clock)
    server.delay_next(2, 60)  # far beyond the read timeout: a hung API server
    want = {"nvidia.com/gpu.count": "8"}
    with caplog.at_level("WARNING", logger="gfd.nodepatch"):
        assert not pub.publish(want)
        assert pub.retry_in() == 1
        clock.now += 1
        assert not pub.retry()
    assert pub.retry_in() == 2  # backing off
    assert [r.getMessage() for r in caplog.records if "timeout" in r.getMessage()]
    assert "nvidia.com/gpu.count" not in server.labels(NODE)
    clock.now += 2  # the server is fast again
    assert pub.retry()
    assert pub.converged and server.labels(NODE) == FOREIGN | want


def test_stub_rejects_wrong_content_type(server: FakeApiServer) -> None:
    import json
    import urllib.error
    import urllib.request

    request = urllib.request.Request(
        f"{server.url}/api/v1/nodes/{NODE}", method="PATCH",
        data=json.dumps({"metadata": {"labels": {"x": "y"}}}).encode(),
        headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=5)
    assert info.value.code == 415
    assert "x" not in server.labels(NODE)



# --------------------------------------------------------------------------- malformed answers

BAD_BODIES = {
    "not JSON": b"<html>502 Bad Gateway</html>",
    "a JSON list": b"[1, 2]",
    "metadata a list": b'{"metadata": []}',
    "labels a list": b'{"metadata": {"labels": ["nvidia.com/gpu.count"]}}',
    "a label not a string": b'{"metadata": {"labels": {"nvidia.com/gpu.count": 8}}}',
    "annotations a string": b'{"metadata": {"annotations": "x"}}',
    "ownership not a string": b'{"metadata": {"annotations": {"nvidia.com/gfd.labels": 5}}}',
    "resourceVersion a number": b'{"metadata": {"resourceVersion": 7}}',
}


@pytest.mark.parametrize("body", BAD_BODIES.values(), ids=BAD_BODIES.keys())
def test_malformed_node_is_a_retried_bad_response(server: FakeApiServer, tmp_path: Path,
                                                  body: bytes,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    pub = publisher(server, tmp_path, clock)
    server.answer_next(2, body)
    want = {"nvidia.com/gpu.count": "8"}
    with caplog.at_level("WARNING", logger="gfd.nodepatch"):
        assert not pub.publish(want)
        clock.now += 1
        assert not pub.retry()
    assert pub.retry_in() == 2  # backing off like any other failure
    assert [r.getMessage() for r in caplog.records if "bad response" in r.getMessage()]
    assert server.requests("PATCH") == []  # nothing planned on a bad answer
    assert server.labels(NODE) == FOREIGN
    clock.now += 2
    assert pub.retry() and pub.converged
    assert server.labels(NODE) == FOREIGN | want


RV = {"resourceVersion": "7"}


@pytest.mark.parametrize("node", [
    None, [], {"metadata": "x"}, {"metadata": {"labels": {"a": None}} | RV},
    {"metadata": {"labels": {1: "a"}} | RV}, {"metadata": {"annotations": []} | RV},
    {"metadata": {"annotations": {"a": 1}} | RV},
    # Regression (issue 10): a Node without metadata, or without a resourceVersion, was
    # planned on as an empty Node: an unpinned patch that forgot the labels we own.
    {}, {"metadata": None}, {"metadata": {}}, {"metadata": {"resourceVersion": ""}},
    {"metadata": {"resourceVersion": None}},
])
def test_plan_refuses_a_malformed_node(node: object) -> None:
    with pytest.raises(NodeApiError, match="bad response"):
        plan_patch(node, {"nvidia.com/gpu.count": "8"})  # type: ignore[arg-type]


def test_plan_accepts_missing_or_null_labels_and_annotations() -> None:
    # The API server leaves empty maps out of its answer.
    want = {"nvidia.com/gpu.count": "8"}
    expected = {"metadata": {"labels": want,
                             "annotations": {OWNERSHIP_ANNOTATION: "gpu.count"}} | RV}
    for node in ({"metadata": RV}, {"metadata": {"labels": None, "annotations": None} | RV}):
        assert plan_patch(node, want) == expected


def a_node(name: str = NODE, **metadata: object) -> dict[str, object]:
    """A minimal well-formed v1 Node, as the API server answers a GET."""
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "resourceVersion": "7"} | metadata}


@pytest.mark.parametrize("node", [
    a_node("gpu-node-2"), a_node("gpu-node-1x"), {"apiVersion": "v1", "kind": "Node",
                                                  "metadata": RV},
    a_node() | {"kind": "Pod"}, a_node() | {"kind": None}, a_node() | {"apiVersion": "v2"},
    {"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE}},
])
def test_plan_for_a_named_node_refuses_any_other_object(node: dict[str, object]) -> None:
    with pytest.raises(NodeApiError, match="bad response"):
        plan_patch(node, {"nvidia.com/gpu.count": "8"}, name=NODE)


def test_plan_for_a_named_node() -> None:
    patch = plan_patch(a_node(), {"nvidia.com/gpu.count": "8"}, name=NODE)
    assert patch is not None and patch["metadata"]["resourceVersion"] == "7"


class ScriptedApi:
    """A NodeApi answering GETs from a list (the last one repeats); PATCHes are recorded."""

    def __init__(self, *answers: object) -> None:
        self.answers = list(answers)
        self.patches: list[dict[str, object]] = []

    def get_node(self, name: str) -> dict[str, object]:
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        return answer  # type: ignore[return-value]

    def patch_node(self, name: str, patch: dict[str, object]) -> dict[str, object]:
        self.patches.append(patch)
        return {}


def test_a_malformed_node_from_any_api_does_not_escape_the_publisher() -> None:
    api = ScriptedApi({"metadata": {"labels": "oops"}}, a_node())
    clock = Clock()
    pub = NodePublisher(api, NODE, Backoff(initial=1, cap=8), clock=clock)
    assert not pub.publish({"nvidia.com/gpu.count": "8"})
    assert api.patches == [] and pub.retry_in() == 1
    clock.now += 1
    assert pub.retry() and len(api.patches) == 1


# --------------------------------------------------------------------------- the timestamp

TS = "nvidia.com/gfd.timestamp"


def test_plan_a_new_timestamp_alone_is_no_change() -> None:
    node: dict[str, Any] = {"metadata": {"labels": {"nvidia.com/gpu.count": "8", TS: "1000"},
                         "annotations": {OWNERSHIP_ANNOTATION: "gfd.timestamp,gpu.count"},
                         "resourceVersion": "7"}}
    desired = {"nvidia.com/gpu.count": "8", TS: "1060"}
    assert plan_patch(node, desired, refresh_only={TS}) is None
    assert plan_patch(node, desired) is not None  # without the option every pass patches
    # Refreshed along with any other change...
    patch = plan_patch(node, {"nvidia.com/gpu.count": "4", TS: "1060"}, refresh_only={TS})
    assert patch is not None
    assert patch["metadata"]["labels"] == {"nvidia.com/gpu.count": "4", TS: "1060"}
    # ... and written when missing (first pass, or deleted by someone).
    del node["metadata"]["labels"][TS]
    assert plan_patch(node, desired, refresh_only={TS}) == {
        "metadata": {"labels": {TS: "1060"}, "resourceVersion": "7"}}
    # Turning the timestamp off still removes it.
    node["metadata"]["labels"][TS] = "1000"
    assert plan_patch(node, {"nvidia.com/gpu.count": "8"}, refresh_only={TS}) == {
        "metadata": {"labels": {TS: None}, "annotations": {OWNERSHIP_ANNOTATION: "gpu.count"},
                     "resourceVersion": "7"}}


# --------------------------------------------------------------------------- lying servers

OWNED = {"nvidia.com/gpu.count": "8", "nvidia.com/mig.strategy": "single"}


def _without(key: str) -> Callable[[dict[str, Any]], Any]:
    def change(node: dict[str, Any]) -> Any:
        node.pop(key)
        return node
    return change


def _meta(**changes: Any) -> Callable[[dict[str, Any]], Any]:
    """Set (or, for the value ``...``, drop) metadata fields of the real answer."""
    def change(node: dict[str, Any]) -> Any:
        for key, value in changes.items():
            if value is ...:
                node["metadata"].pop(key)
            else:
                node["metadata"][key] = value
        return node
    return change


def _status_success(node: dict[str, Any]) -> Any:
    return {"kind": "Status", "apiVersion": "v1", "status": "Success", "metadata": {}}


def _node_list(node: dict[str, Any]) -> Any:
    return {"kind": "NodeList", "apiVersion": "v1", "items": [node],
            "metadata": {"resourceVersion": node["metadata"]["resourceVersion"]}}


# Each is a 200 answer to GET /api/v1/nodes/gpu-node-1 that is not that Node.
LIES: dict[str, Callable[[dict[str, Any]], Any]] = {
    "no metadata": _without("metadata"),
    "metadata null": lambda n: n | {"metadata": None},
    "no resourceVersion": _meta(resourceVersion=...),
    "empty resourceVersion": _meta(resourceVersion=""),
    "another Node": _meta(name="gpu-node-2"),
    "no name": _meta(name=...),
    "no kind": _without("kind"),
    "kind Pod": lambda n: n | {"kind": "Pod"},
    "another apiVersion": lambda n: n | {"apiVersion": "example.com/v1"},
    "a Status": _status_success,
    "a NodeList": _node_list,
    "labels a list": _meta(labels=["nvidia.com/gpu.count"]),
    "labels a string": _meta(labels="nvidia.com/gpu.count=8"),
    "annotations a list": _meta(annotations=[OWNERSHIP_ANNOTATION]),
}


@pytest.mark.parametrize("lie", LIES.values(), ids=LIES.keys())
def test_a_lying_server_gets_no_patch_and_stale_owned_labels_still_go(
        server: FakeApiServer, tmp_path: Path, lie: Callable[[dict[str, Any]], Any],
        caplog: pytest.LogCaptureFixture) -> None:
    """Regression (issue 10): a 200 without ``metadata`` was planned on as an empty Node: an
    unpinned patch rewrote the ownership annotation, and the owned stale label stayed forever.
    Now every such answer is a bad response, retried with backoff, and nothing is sent."""
    server.add_node(NODE, labels=FOREIGN | OWNED,
                    annotations={OWNERSHIP_ANNOTATION: "gpu.count,mig.strategy"})
    clock = Clock()
    pub = publisher(server, tmp_path, clock)
    server.mangle_next(2, lie)
    want = {"nvidia.com/gpu.count": "8"}
    with caplog.at_level("WARNING", logger="gfd.nodepatch"):
        assert not pub.publish(want)
        assert pub.retry_in() == 1
        clock.now += 1
        assert not pub.retry()
    assert pub.retry_in() == 2  # backing off like any other failure
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "bad response" in warnings[0], warnings  # once per state
    assert [r.answered for r in server.requests("GET")] == [200, 200]
    assert server.requests("PATCH") == []
    assert server.annotations(NODE)[OWNERSHIP_ANNOTATION] == "gpu.count,mig.strategy"
    clock.now += 2  # the server tells the truth again
    assert pub.retry() and pub.converged
    assert server.labels(NODE) == FOREIGN | want  # the stale owned label is gone
    assert server.annotations(NODE)[OWNERSHIP_ANNOTATION] == "gpu.count"
    (patch,) = server.requests("PATCH")
    assert patch.body["metadata"]["resourceVersion"]


def test_the_stub_mangles_only_what_it_is_asked_to(server: FakeApiServer,
                                                   tmp_path: Path) -> None:
    api = make_api(server, tmp_path)
    server.mangle_next(1, _without("metadata"))
    assert "metadata" not in api.get_node(NODE)
    assert api.get_node(NODE)["metadata"]["name"] == NODE  # one answer only
    rv = api.get_node(NODE)["metadata"]["resourceVersion"]
    server.mangle_next(1, _without("metadata"))  # GETs only: a PATCH is applied as usual
    patched = api.patch_node(NODE, {"metadata": {"labels": {"x": "y"}, "resourceVersion": rv}})
    assert patched["metadata"]["labels"]["x"] == "y"
    assert "metadata" not in api.get_node(NODE)
    server.mangle_next(1, _without("metadata"))
    with pytest.raises(NodeApiError, match="HTTP 404"):  # an unknown Node is still a 404
        api.get_node("no-such-node")


def test_an_unpinned_patch_is_never_sent_by_the_client() -> None:
    class Core:
        def __init__(self) -> None:
            self.patches: list[object] = []

        def patch_node(self, name: str, body: object, **kwargs: object) -> object:
            self.patches.append(body)
            raise AssertionError("sent")

    core = Core()
    for patch in ({"metadata": {"labels": {"nvidia.com/gpu.count": "8"}}},
                  {"metadata": {"resourceVersion": ""}}, {"metadata": None}, {}):
        with pytest.raises(UnpinnedPatch):
            KubeNodeApi(core).patch_node(NODE, patch)
    assert core.patches == []


def test_an_unpinned_plan_is_never_sent_by_the_publisher(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever the planner returns and whatever NodeApi is used, the publisher refuses to
    send a patch without a resourceVersion, and retries with backoff."""
    def unpinned_plan(*_: object, **__: object) -> dict[str, Any]:
        return {"metadata": {"labels": {"nvidia.com/gpu.count": "8"}}}

    monkeypatch.setattr("gfd.nodepatch.plan_patch", unpinned_plan)
    api = ScriptedApi(a_node())
    clock = Clock()
    pub = NodePublisher(api, NODE, Backoff(initial=1, cap=8), clock=clock)
    assert not pub.publish({"nvidia.com/gpu.count": "8"})
    assert api.patches == [] and pub.retry_in() == 1
