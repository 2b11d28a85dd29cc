"""GFD's labels as an NFD ``NodeFeature`` object (NVIDIA's default output since v0.19).

One ``nfd.k8s-sigs.io/v1alpha1`` ``NodeFeature`` per node, named ``nvidia-features-for-<node>``
in ``--namespace``, labelled ``nfd.node.kubernetes.io/node-name=<node>`` (how nfd-master finds
it), with ``spec.labels`` = the GFD labels and empty ``spec.features``. With ``--pod-name`` the
object is owned by GFD's DaemonSet (controller) and pod, looked up once, so it is garbage
collected with the DaemonSet.

Each pass GETs the object, creates it when missing and replaces it only when its content
really differs. Unlike NVIDIA's GFD, a new ``gfd.timestamp`` alone is not a difference (else
every pass would write every node's object): the timestamp is refreshed along with any other
change and written when missing. A stale update answers 409 and the next attempt re-reads.
A missing CRD gets one clear error naming ``nodefeatures.nfd.k8s-sigs.io``.

Every API request first takes a token from a small token bucket (``--kube-api-qps``,
``--kube-api-burst``), the client-side rate limiting client-go does for NVIDIA's GFD.

The planning (:func:`desired_object`, :func:`plan_update`, :func:`owner_references`) is pure;
:class:`KubeNodeFeatureApi` holds the official client's ``CustomObjectsApi`` and ``CoreV1Api``;
:class:`NodeFeaturePublisher` has :class:`gfd.nodepatch.NodePublisher`'s interface (publish,
retry, retry_in, converged) so the daemon drives either the same way.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import threading
import time
from collections.abc import Callable, Collection, Mapping
from typing import Any, Protocol

from gfd.nodepatch import (
    REQUEST_TIMEOUT,
    KubeNodeApi,
    NodeApiError,
    RetryingPublisher,
    kube_api_client,
)
from gpus.backoff import Backoff

log = logging.getLogger(__name__)

GROUP = "nfd.k8s-sigs.io"
VERSION = "v1alpha1"
PLURAL = "nodefeatures"
KIND = "NodeFeature"
API_VERSION = f"{GROUP}/{VERSION}"
CRD_NAME = f"{PLURAL}.{GROUP}"
NODE_NAME_LABEL = "nfd.node.kubernetes.io/node-name"
NAME_PREFIX = "nvidia-features-for-"

Obj = dict[str, Any]


class CrdMissing(NodeApiError):
    """The API server does not serve NodeFeature objects: NFD's CRD is not installed."""


# --------------------------------------------------------------------------- pure planning


def object_name(node_name: str) -> str:
    """``nvidia-features-for-<node>``, as NVIDIA names it."""
    return NAME_PREFIX + node_name


def owner_references(pod: Mapping[str, Any]) -> list[Obj]:
    """[DaemonSet (controller), Pod] when the pod is owned by a DaemonSet, else [] (NVIDIA's
    rule: only a DaemonSet-owned GFD owns its NodeFeature)."""
    metadata = pod.get("metadata") if isinstance(pod, Mapping) else None
    if not isinstance(metadata, Mapping):
        raise NodeApiError("bad response", "the Pod has no metadata object")
    owners = metadata.get("ownerReferences") or []
    daemonset = next((o for o in owners if isinstance(o, Mapping) and o.get("controller")
                      and o.get("kind") == "DaemonSet"), None)
    if daemonset is None:
        return []
    return [
        {"apiVersion": daemonset.get("apiVersion", "apps/v1"), "kind": "DaemonSet",
         "name": daemonset.get("name"), "uid": daemonset.get("uid"), "controller": True},
        {"apiVersion": "v1", "kind": "Pod", "name": metadata.get("name"),
         "uid": metadata.get("uid")},
    ]


def desired_object(node_name: str, namespace: str, labels: Mapping[str, str],
                   owners: list[Obj]) -> Obj:
    """The NodeFeature GFD wants for ``node_name``."""
    metadata: Obj = {"name": object_name(node_name), "namespace": namespace,
                     "labels": {NODE_NAME_LABEL: node_name}}
    if owners:
        metadata["ownerReferences"] = copy.deepcopy(owners)
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": metadata,
            "spec": {"features": {"flags": {}, "attributes": {}, "instances": {}},
                     "labels": dict(labels)}}


def _content(obj: Mapping[str, Any], ignore: Collection[str]) -> Any:
    """What an update could change, ``ignore``d label keys left out."""
    metadata = obj.get("metadata") or {}
    spec = dict(obj.get("spec") or {})
    spec["labels"] = {k: v for k, v in (spec.get("labels") or {}).items() if k not in ignore}
    return (metadata.get("labels") or {}, metadata.get("ownerReferences") or [], spec)


def plan_update(current: Mapping[str, Any], desired: Mapping[str, Any],
                refresh_only: Collection[str] = ()) -> Obj | None:
    """The object to PUT over ``current`` (its resourceVersion kept), or None when nothing
    really changes: a new value of a ``refresh_only`` label alone is no change, a missing one
    is."""
    current_labels = (current.get("spec") or {}).get("labels") or {}
    wanted_labels = desired["spec"]["labels"]
    missing = any(k in wanted_labels and k not in current_labels for k in refresh_only)
    if not missing and _content(current, refresh_only) == _content(desired, refresh_only):
        return None
    metadata = current.get("metadata")
    if not isinstance(metadata, Mapping):
        raise NodeApiError("bad response", "the NodeFeature has no metadata object")
    version = metadata.get("resourceVersion")
    if not isinstance(version, str) or not version:
        raise NodeApiError("bad response", "the NodeFeature has no metadata.resourceVersion")
    updated = copy.deepcopy(dict(current))
    updated["metadata"] = dict(metadata)
    updated["metadata"]["labels"] = dict(desired["metadata"]["labels"])
    if "ownerReferences" in desired["metadata"]:
        updated["metadata"]["ownerReferences"] = desired["metadata"]["ownerReferences"]
    else:
        updated["metadata"].pop("ownerReferences", None)
    updated["spec"] = copy.deepcopy(desired["spec"])
    return updated


# --------------------------------------------------------------------------- rate limiting


class TokenBucket:
    """``burst`` tokens, refilled at ``qps`` per second; :meth:`take` waits for one."""

    def __init__(self, qps: float, burst: int, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        """``clock`` and ``sleep`` are injectable so tests need no real waiting."""
        if qps <= 0 or burst < 1:
            raise ValueError(f"rate limit needs qps > 0 and burst >= 1, got {qps}, {burst}")
        self.qps, self.burst = float(qps), int(burst)
        self._clock, self._sleep = clock, sleep
        self._tokens = float(burst)
        self._stamp = clock()
        self._lock = threading.Lock()

    def take(self) -> float:
        """Take a token, first waiting until one is there; returns the seconds waited."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.qps)
            self._stamp = now
            self._tokens -= 1
            wait = 0.0 if self._tokens >= 0 else -self._tokens / self.qps
        if wait:
            self._sleep(wait)
        return wait


# --------------------------------------------------------------------------- API access


class NodeFeatureApi(Protocol):
    """The calls the publisher needs."""

    def get(self, namespace: str, name: str) -> Obj | None:
        """The object, or None when it does not exist (CrdMissing without the CRD)."""
        ...

    def create(self, namespace: str, body: Obj) -> Obj:
        """POST the object."""
        ...

    def replace(self, namespace: str, name: str, body: Obj) -> Obj:
        """PUT the object (its resourceVersion pins it)."""
        ...

    def get_pod(self, namespace: str, name: str) -> Obj:
        """The Pod."""
        ...


class KubeNodeFeatureApi:
    """:class:`NodeFeatureApi` over the official client's CustomObjectsApi and CoreV1Api."""

    def __init__(self, custom: Any, core: Any, limiter: TokenBucket,
                 request_timeout: tuple[float, float] = REQUEST_TIMEOUT) -> None:
        """``custom``/``core``: ``kubernetes.client.CustomObjectsApi``/``CoreV1Api``."""
        self._custom, self._core = custom, core
        self.limiter = limiter
        self.request_timeout = request_timeout

    @classmethod
    def from_environment(cls, kubeconfig: str | None, limiter: TokenBucket
                         ) -> KubeNodeFeatureApi:
        """In-cluster config, else ``kubeconfig`` (or the default kubeconfig)."""
        from kubernetes import client  # heavy, node-api mode only: see kube_api_client

        api_client = kube_api_client(kubeconfig)
        return cls(client.CustomObjectsApi(api_client), client.CoreV1Api(api_client), limiter)

    def get(self, namespace: str, name: str) -> Obj | None:
        """GET the NodeFeature; None on a 404 that names it."""
        try:
            return self._call(lambda: self._custom.get_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name, _preload_content=False,
                _request_timeout=self.request_timeout))
        except _NotFound as err:
            if err.names(name):
                return None
            raise _crd_missing(namespace) from err

    def create(self, namespace: str, body: Obj) -> Obj:
        """POST the NodeFeature."""
        return self._crd_call(namespace, lambda: self._custom.create_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, body, _preload_content=False,
            _request_timeout=self.request_timeout))

    def replace(self, namespace: str, name: str, body: Obj) -> Obj:
        """PUT the NodeFeature."""
        return self._crd_call(namespace, lambda: self._custom.replace_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name, body, _preload_content=False,
            _request_timeout=self.request_timeout))

    def get_pod(self, namespace: str, name: str) -> Obj:
        """GET the Pod."""
        try:
            return self._call(lambda: self._core.read_namespaced_pod(
                name, namespace, _preload_content=False, _request_timeout=self.request_timeout))
        except _NotFound as err:
            raise NodeApiError("HTTP 404", f"pod {namespace}/{name} (--pod-name) not "
                               "found") from err

    def _crd_call(self, namespace: str, request: Callable[[], Any]) -> Obj:
        try:
            return self._call(request)
        except _NotFound as err:
            if err.details_name:
                raise NodeApiError("HTTP 404", err.message) from err
            raise _crd_missing(namespace) from err

    def _call(self, request: Callable[[], Any]) -> Obj:
        from kubernetes.client.exceptions import ApiException  # see kube_api_client

        self.limiter.take()
        try:
            return KubeNodeApi._call(request)
        except NodeApiError as err:
            cause = err.__cause__
            if isinstance(cause, ApiException) and cause.status == 404:
                raise _NotFound(cause) from cause
            raise


class _NotFound(NodeApiError):
    """A 404, with what its Status body said."""

    def __init__(self, cause: Any) -> None:
        body: Any = {}
        with contextlib.suppress(TypeError, ValueError):
            body = json.loads(cause.body or "{}")
        details = body.get("details") if isinstance(body, dict) else None
        self.details_name = details.get("name") if isinstance(details, dict) else None
        self.message = str(body.get("message") if isinstance(body, dict) else "") or "not found"
        super().__init__("HTTP 404", self.message)

    def names(self, name: str) -> bool:
        """True when the 404 is about the object ``name`` (not about its kind)."""
        return self.details_name == name


def _crd_missing(namespace: str) -> CrdMissing:
    return CrdMissing("CRD missing", f"the API server does not serve {CRD_NAME} (namespace "
                      f"{namespace}): install node-feature-discovery's CRDs, or choose another "
                      "--output-mode / --use-node-feature-api=false")


# --------------------------------------------------------------------------- publishing


class NodeFeaturePublisher(RetryingPublisher):
    """Keeps the node's NodeFeature equal to the latest labels, retrying with backoff."""

    def __init__(self, api: NodeFeatureApi, node_name: str, namespace: str, pod_name: str = "",
                 backoff: Backoff | None = None, clock: Callable[[], float] = time.monotonic,
                 refresh_only: Collection[str] = ()) -> None:
        """``pod_name`` (GFD's own pod) makes the object owned by the pod's DaemonSet."""
        super().__init__(backoff, clock, refresh_only)
        self.api = api
        self.node_name = node_name
        self.namespace = namespace
        self.pod_name = pod_name
        self._owners: list[Obj] | None = None if pod_name else []
        self.creates = 0
        self.updates = 0

    def _owner_references(self) -> list[Obj]:
        if self._owners is None:  # looked up once: a pod's owner never changes
            self._owners = owner_references(self.api.get_pod(self.namespace, self.pod_name))
            if not self._owners:
                log.info("pod %s/%s is not owned by a DaemonSet: the NodeFeature has no owner",
                         self.namespace, self.pod_name)
        return self._owners

    def _apply(self, desired_labels: dict[str, str]) -> None:
        name = object_name(self.node_name)
        desired = desired_object(self.node_name, self.namespace, desired_labels,
                                 self._owner_references())
        current = self.api.get(self.namespace, name)
        if current is None:
            self.api.create(self.namespace, desired)
            self.creates += 1
            log.info("NodeFeature %s/%s created with %d labels", self.namespace, name,
                     len(desired_labels))
        else:
            updated = plan_update(current, desired, self.refresh_only)
            if updated is not None:
                self.api.replace(self.namespace, name, updated)
                self.updates += 1
                log.info("NodeFeature %s/%s updated", self.namespace, name)

    def _log_failure(self, err: NodeApiError, new_state: bool, delay: float) -> None:
        if new_state:
            level = logging.ERROR if isinstance(err, CrdMissing) else logging.WARNING
            log.log(level, "NodeFeature for node %s: %s; retrying with backoff up to %.0fs",
                    self.node_name, err, self.backoff.cap)

    def _log_recovery(self) -> None:
        log.info("NodeFeature %s/%s: up to date again", self.namespace,
                 object_name(self.node_name))
