"""GFD's NodeFeature output against the test API server: create, no-op and update passes,
conflicts, a missing CRD, owner references and the client-side rate limit."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from apiserver import FakeApiServer

from gfd.nodefeature import (
    CRD_NAME,
    NODE_NAME_LABEL,
    CrdMissing,
    KubeNodeFeatureApi,
    NodeFeaturePublisher,
    TokenBucket,
    desired_object,
    object_name,
    plan_update,
)
from gfd.nodepatch import NodeApiError

NODE, NS, POD = "gpu-node-1", "gpu-operator", "gfd-abcde"
NAME = object_name(NODE)
TS = "nvidia.com/gfd.timestamp"
LABELS = {"nvidia.com/gpu.count": "8", "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-40GB",
          TS: "1700000000"}
DAEMONSET = {"apiVersion": "apps/v1", "kind": "DaemonSet", "name": "nvidia-device-plugin",
             "uid": "ds-uid-1", "controller": True, "blockOwnerDeletion": True}


class FakeClock:
    """Monotonic time that only moves when a test (or the bucket's sleep) moves it."""

    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


@pytest.fixture
def server() -> Iterator[FakeApiServer]:
    with FakeApiServer() as srv:
        srv.install_nodefeature_crd()
        yield srv


def make_api(server: FakeApiServer, tmp_path: Path, qps: float = 1000, burst: int = 1000,
             clock: FakeClock | None = None) -> KubeNodeFeatureApi:
    clock = clock or FakeClock()
    limiter = TokenBucket(qps, burst, clock=clock, sleep=clock.sleep)
    return KubeNodeFeatureApi.from_environment(server.kubeconfig(str(tmp_path / "kc")), limiter)


def make_publisher(api: Any, pod: str = "") -> NodeFeaturePublisher:
    return NodeFeaturePublisher(api, NODE, NS, pod, clock=FakeClock(), refresh_only={TS})


def writes(server: FakeApiServer) -> list[str]:
    return [r.method for r in server.requests() if r.method in ("POST", "PUT")]


# --------------------------------------------------------------------------- passes


def test_create_then_no_op_then_update(server: FakeApiServer, tmp_path: Path) -> None:
    publisher = make_publisher(make_api(server, tmp_path))
    assert publisher.publish(LABELS)
    stored = server.nodefeature(NS, NAME)
    assert stored is not None
    assert stored["apiVersion"] == "nfd.k8s-sigs.io/v1alpha1" and stored["kind"] == "NodeFeature"
    assert stored["metadata"]["labels"] == {NODE_NAME_LABEL: NODE}
    assert stored["spec"] == {"features": {"flags": {}, "attributes": {}, "instances": {}},
                              "labels": LABELS}
    assert "ownerReferences" not in stored["metadata"]
    version = stored["metadata"]["resourceVersion"]

    assert publisher.publish(LABELS)  # same labels: GET only
    assert publisher.publish({**LABELS, TS: "1700000060"})  # a new timestamp alone: GET only
    assert writes(server) == ["POST"]
    assert server.nodefeature(NS, NAME)["metadata"]["resourceVersion"] == version  # type: ignore[index]

    changed = {**LABELS, "nvidia.com/gpu.count": "7", TS: "1700000120"}
    assert publisher.publish(changed)
    assert writes(server) == ["POST", "PUT"]
    stored = server.nodefeature(NS, NAME)
    assert stored is not None and stored["spec"]["labels"] == changed  # timestamp refreshed too
    assert stored["metadata"]["resourceVersion"] != version
    assert (publisher.creates, publisher.updates) == (1, 1)


def test_a_missing_timestamp_is_written(server: FakeApiServer, tmp_path: Path) -> None:
    publisher = make_publisher(make_api(server, tmp_path))
    without = {k: v for k, v in LABELS.items() if k != TS}
    assert publisher.publish(without)
    assert publisher.publish(LABELS)
    assert writes(server) == ["POST", "PUT"]
    assert server.nodefeature(NS, NAME)["spec"]["labels"][TS] == LABELS[TS]  # type: ignore[index]


def test_labels_changed_by_someone_else_are_restored(server: FakeApiServer,
                                                     tmp_path: Path) -> None:
    publisher = make_publisher(make_api(server, tmp_path))
    assert publisher.publish(LABELS)
    server.change_nodefeature(NS, NAME, {"foo": "bar"})
    assert publisher.publish(LABELS)
    assert server.nodefeature(NS, NAME)["spec"]["labels"] == LABELS  # type: ignore[index]


class RacingApi(KubeNodeFeatureApi):
    """Someone rewrites the object between our GET and our PUT (once)."""

    server: FakeApiServer
    raced = False

    def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        found = super().get(namespace, name)
        if found is not None and not self.raced:
            self.raced = True
            self.server.change_nodefeature(namespace, name, {"other": "writer"})
        return found


def test_a_stale_update_conflicts_and_the_retry_rereads(server: FakeApiServer,
                                                         tmp_path: Path) -> None:
    api = make_api(server, tmp_path)
    api.__class__ = RacingApi
    assert isinstance(api, RacingApi)
    api.server = server
    publisher = make_publisher(api)
    assert publisher.publish(LABELS)  # create: no GET race (nothing to read yet)
    assert not publisher.publish({**LABELS, "nvidia.com/gpu.count": "4"})
    assert [r.answered for r in server.requests("PUT")] == [409]
    assert publisher.retry_in() is not None and not publisher.converged
    assert publisher.retry()
    stored = server.nodefeature(NS, NAME)
    assert stored is not None and stored["spec"]["labels"]["nvidia.com/gpu.count"] == "4"
    assert "other" not in stored["spec"]["labels"]
    assert publisher.converged


def test_missing_crd_is_one_clear_error(tmp_path: Path,
                                        caplog: pytest.LogCaptureFixture) -> None:
    with FakeApiServer() as server:
        api = make_api(server, tmp_path)
        with pytest.raises(CrdMissing, match=CRD_NAME):
            api.get(NS, NAME)
        with pytest.raises(CrdMissing, match="install node-feature-discovery's CRDs"):
            api.create(NS, desired_object(NODE, NS, LABELS, []))
        publisher = make_publisher(api)
        with caplog.at_level(logging.WARNING, logger="gfd.nodefeature"):
            assert not publisher.publish(LABELS)
            assert not publisher.retry()
        errors = [r for r in caplog.records if CRD_NAME in r.getMessage()]
        assert len(errors) == 1 and errors[0].levelno == logging.ERROR  # once per state
        server.install_nodefeature_crd()
        assert publisher.retry()
        assert server.nodefeature(NS, NAME) is not None


def test_a_missing_object_is_not_a_missing_crd(server: FakeApiServer, tmp_path: Path) -> None:
    assert make_api(server, tmp_path).get(NS, NAME) is None


# --------------------------------------------------------------------------- owners


def test_owned_by_the_daemonset_and_the_pod(server: FakeApiServer, tmp_path: Path) -> None:
    pod_uid = server.add_pod(NS, POD, [DAEMONSET])
    publisher = make_publisher(make_api(server, tmp_path), pod=POD)
    assert publisher.publish(LABELS)
    assert publisher.publish({**LABELS, "nvidia.com/gpu.count": "7"})
    stored = server.nodefeature(NS, NAME)
    assert stored is not None
    assert stored["metadata"]["ownerReferences"] == [
        {"apiVersion": "apps/v1", "kind": "DaemonSet", "name": "nvidia-device-plugin",
         "uid": "ds-uid-1", "controller": True},
        {"apiVersion": "v1", "kind": "Pod", "name": POD, "uid": pod_uid},
    ]
    pod_gets = [r for r in server.requests("GET") if "/pods/" in r.path]
    assert len(pod_gets) == 1  # looked up once


def test_a_pod_not_owned_by_a_daemonset_gives_no_owner(server: FakeApiServer,
                                                       tmp_path: Path) -> None:
    server.add_pod(NS, POD, [{**DAEMONSET, "kind": "ReplicaSet"}])
    publisher = make_publisher(make_api(server, tmp_path), pod=POD)
    assert publisher.publish(LABELS)
    assert "ownerReferences" not in server.nodefeature(NS, NAME)["metadata"]  # type: ignore[index]


def test_a_missing_pod_fails_the_pass_until_it_is_found(server: FakeApiServer,
                                                        tmp_path: Path) -> None:
    publisher = make_publisher(make_api(server, tmp_path), pod=POD)
    assert not publisher.publish(LABELS)
    assert server.nodefeature(NS, NAME) is None  # never written without its owners
    server.add_pod(NS, POD, [DAEMONSET])
    assert publisher.retry()
    assert len(server.nodefeature(NS, NAME)["metadata"]["ownerReferences"]) == 2  # type: ignore[index]


def test_owner_changes_alone_update_the_object(server: FakeApiServer, tmp_path: Path) -> None:
    api = make_api(server, tmp_path)
    assert make_publisher(api).publish(LABELS)
    server.add_pod(NS, POD, [DAEMONSET])
    assert make_publisher(api, pod=POD).publish(LABELS)
    assert writes(server) == ["POST", "PUT"]


# --------------------------------------------------------------------------- pure parts


def test_plan_update_ignores_only_the_timestamp() -> None:
    current = desired_object(NODE, NS, LABELS, [])
    current["metadata"]["resourceVersion"] = "5"
    assert plan_update(current, desired_object(NODE, NS, {**LABELS, TS: "1"}, []), {TS}) is None
    assert plan_update(current, desired_object(NODE, NS, {**LABELS, TS: "1"}, []), ()) is not None
    updated = plan_update(current, desired_object(NODE, NS, {"a": "b"}, []), {TS})
    assert updated is not None and updated["metadata"]["resourceVersion"] == "5"
    assert updated["spec"]["labels"] == {"a": "b"}


def test_plan_update_refuses_an_object_without_resource_version() -> None:
    current = desired_object(NODE, NS, {}, [])
    with pytest.raises(NodeApiError, match="resourceVersion"):
        plan_update(current, desired_object(NODE, NS, LABELS, []))


# --------------------------------------------------------------------------- rate limit


def test_token_bucket_allows_a_burst_then_paces() -> None:
    clock = FakeClock()
    bucket = TokenBucket(qps=2, burst=3, clock=clock, sleep=clock.sleep)
    assert [bucket.take() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take() == pytest.approx(0.5)
    assert bucket.take() == pytest.approx(0.5)
    clock.now += 10  # refills, but never beyond the burst
    assert [bucket.take() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take() == pytest.approx(0.5)


def test_every_api_request_takes_a_token(server: FakeApiServer, tmp_path: Path) -> None:
    clock = FakeClock()
    api = make_api(server, tmp_path, qps=1, burst=2, clock=clock)
    publisher = make_publisher(api)
    assert publisher.publish(LABELS)  # GET + POST: the burst
    assert clock.slept == []
    assert publisher.publish({**LABELS, "nvidia.com/gpu.count": "1"})  # GET + PUT: paced
    assert clock.slept == [pytest.approx(1.0), pytest.approx(1.0)]
    assert len(server.requests()) == 4


@pytest.mark.parametrize(("qps", "burst"), [(0, 1), (1, 0), (-1, 5)])
def test_token_bucket_refuses_nonsense(qps: float, burst: int) -> None:
    with pytest.raises(ValueError):
        TokenBucket(qps, burst)


# --------------------------------------------------------------------------- the stub itself


def test_stub_semantics(server: FakeApiServer, tmp_path: Path) -> None:
    api = make_api(server, tmp_path)
    body = desired_object(NODE, NS, LABELS, [])
    created = api.create(NS, body)
    with pytest.raises(NodeApiError, match="HTTP 409"):
        api.create(NS, body)  # AlreadyExists
    with pytest.raises(NodeApiError, match="HTTP 422"):
        api.replace(NS, NAME, body)  # no resourceVersion
    same = api.replace(NS, NAME, created)
    assert same["metadata"]["resourceVersion"] == created["metadata"]["resourceVersion"]
    changed = {**created, "spec": {**created["spec"], "labels": {"x": "y"}}}
    newer = api.replace(NS, NAME, changed)
    assert newer["metadata"]["resourceVersion"] != created["metadata"]["resourceVersion"]
    assert newer["metadata"]["generation"] == 2
    with pytest.raises(NodeApiError, match="HTTP 409"):
        api.replace(NS, NAME, changed)  # stale
    with pytest.raises(NodeApiError, match="HTTP 422"):
        api.create(NS, {**desired_object("n2", NS, {}, []), "spec": None})
