"""Publishing labels straight onto the Node object (no node-feature-discovery needed).

One JSON merge patch per change sets our labels and deletes (null) the labels we set before and
no longer produce. Which labels are ours is recorded on the Node itself, in the annotation
``nvidia.com/gfd.labels`` (comma-separated names without the ``nvidia.com/`` prefix, like NFD's
``nfd.node.kubernetes.io/feature-labels``), so ownership survives restarts and no other label
is ever touched, other ``nvidia.com/`` labels included. The patch carries the Node's
``resourceVersion``: if someone changed the Node between our read and our write the API server
answers 409 and we simply read again.

The planning is pure (:func:`plan_patch`); :class:`NodePublisher` adds the API calls, the retry
schedule (capped exponential backoff) and logs once per change of state, not once per failure.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Collection, Mapping
from typing import Any, Protocol

from gpus.backoff import Backoff
from gpus.errors import ApiServerError
from gpus.records import record

log = logging.getLogger(__name__)

PREFIX = "nvidia.com/"
OWNERSHIP_ANNOTATION = "nvidia.com/gfd.labels"
MERGE_PATCH = "application/merge-patch+json"
# Never written nor deleted, whatever an (edited) ownership annotation or a labeler claims:
# the device plugin's per-node config selector belongs to the cluster admin, and gpu.present
# (set by the admin or the GPU operator) decides where the DaemonSets, the simulated one
# included, are scheduled: deleting it would evict GFD from its own node.
PROTECTED = frozenset({"nvidia.com/device-plugin.config", "nvidia.com/gpu.present"})
# (connect, read) seconds for every API call: a hung API server fails the call (retried with
# backoff) instead of blocking the labelling loop forever.
REQUEST_TIMEOUT = (5.0, 10.0)


# --------------------------------------------------------------------------- pure planning


def owned_keys(annotations: Mapping[str, str] | None) -> set[str]:
    """The full label keys our ownership annotation lists."""
    raw = (annotations or {}).get(OWNERSHIP_ANNOTATION, "")
    keys = set()
    for name in raw.split(","):
        name = name.strip()
        if name:
            keys.add(name if "/" in name else PREFIX + name)
    return keys


def ownership_value(keys: set[str] | frozenset[str]) -> str:
    """The annotation value for ``keys``: sorted short names, comma-separated."""
    return ",".join(sorted(k[len(PREFIX):] if k.startswith(PREFIX) else k for k in keys))


@record
class NodeMeta:
    """The parts of a Node's metadata that planning reads, checked for shape."""

    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    resource_version: str  # never empty: every patch we send is pinned to it


def node_meta(node: Any, name: str | None = None) -> NodeMeta:
    """Validate what the API server sent; raises NodeApiError("bad response") on a bad shape.

    A proxy, a broken API server or a faulty client can answer 200 with something that is not
    a Node: a Status, a list, a Node without ``metadata`` or of another name. Planning on it
    would crash the labelling loop or, worse, send a patch that is not pinned to a
    ``resourceVersion`` and rewrites our ownership annotation from nothing, after which owned
    stale labels are never deleted. As a NodeApiError it is retried with backoff like any other
    failed call. With ``name`` (the Node we asked for), ``kind``, ``apiVersion`` and
    ``metadata.name`` must say it is that Node.
    """
    if not isinstance(node, Mapping):
        raise _bad_response("the Node is not a JSON object", node)
    if name is not None and (node.get("kind"), node.get("apiVersion")) != ("Node", "v1"):
        raise _bad_response("not a v1 Node",
                            {"kind": node.get("kind"), "apiVersion": node.get("apiVersion")})
    metadata = node.get("metadata")
    if not isinstance(metadata, Mapping):
        raise _bad_response("no metadata object", metadata)
    if name is not None and metadata.get("name") != name:
        raise _bad_response(f"not the Node {name!r}", metadata.get("name"))
    labels = _string_map(metadata.get("labels"), "metadata.labels")
    annotations = _string_map(metadata.get("annotations"), "metadata.annotations")
    version = metadata.get("resourceVersion")
    if not isinstance(version, str) or not version:
        raise _bad_response("no metadata.resourceVersion string", version)
    return NodeMeta(labels, annotations, version)


def pinned(patch: dict[str, Any]) -> dict[str, Any]:
    """``patch`` itself when it carries a ``metadata.resourceVersion``; raises UnpinnedPatch.

    An unpinned merge patch would overwrite the ownership annotation whatever was written since
    our read, losing track of labels we own. Checked where a patch is built and again where it
    is sent, so no code path can send one.
    """
    metadata = patch.get("metadata") if isinstance(patch, Mapping) else None
    version = metadata.get("resourceVersion") if isinstance(metadata, Mapping) else None
    if not isinstance(version, str) or not version:
        raise UnpinnedPatch("unpinned patch", "refusing to send a Node patch without "
                            f"metadata.resourceVersion: {repr(patch)[:80]}")
    return patch


def _string_map(value: Any, what: str) -> Mapping[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _bad_response(f"{what} is not an object", value)
    for key, item in value.items():
        if not isinstance(key, str) or not isinstance(item, str):
            raise _bad_response(f"{what} holds a value that is not a string", {key: item})
    return value


def _bad_response(problem: str, value: Any) -> NodeApiError:
    return NodeApiError("bad response", f"{problem}: {repr(value)[:80]}")


def plan_patch(node: Mapping[str, Any], desired: Mapping[str, str],
               refresh_only: Collection[str] = (), name: str | None = None
               ) -> dict[str, Any] | None:
    """The merge patch that makes ``node`` carry ``desired``, or None when nothing changes.

    ``node`` is the Node as JSON, checked by :func:`node_meta` (``name``: the Node asked for);
    a bad shape raises NodeApiError.
    Sets the desired labels whose value differs, nulls labels we own but no longer produce,
    updates the ownership annotation when the set of our keys changes, and pins the read
    ``resourceVersion``. A label in ``refresh_only`` (the pass timestamp) is only refreshed
    along with another change: a new value alone is no reason to patch, a missing label is.
    """
    meta = node_meta(node, name)
    current, annotations = meta.labels, meta.annotations
    # Only nvidia.com/ labels are ever ours, whatever the annotation (anyone with patch rights
    # on the Node can edit it) or a labeler claims: kubernetes.io/ and other labels stay as
    # they are.
    wanted = {k: v for k, v in desired.items() if k.startswith(PREFIX) and k not in PROTECTED}
    previously = {k for k in owned_keys(annotations) if k.startswith(PREFIX)} - PROTECTED

    label_changes: dict[str, str | None] = {
        k: v for k, v in wanted.items() if current.get(k) != v
    }
    for stale in sorted(previously - wanted.keys()):
        if stale in current:
            label_changes[stale] = None
    new_owned = ownership_value(set(wanted))
    annotation_changes: dict[str, str | None] = {}
    if annotations.get(OWNERSHIP_ANNOTATION) != new_owned:
        annotation_changes[OWNERSHIP_ANNOTATION] = new_owned if wanted else None
        if not wanted and OWNERSHIP_ANNOTATION not in annotations:
            annotation_changes = {}

    if not annotation_changes and all(
            k in refresh_only and k in current for k in label_changes):
        return None
    patch_meta: dict[str, Any] = {}
    if label_changes:
        patch_meta["labels"] = label_changes
    if annotation_changes:
        patch_meta["annotations"] = annotation_changes
    patch_meta["resourceVersion"] = meta.resource_version
    return pinned({"metadata": patch_meta})


# --------------------------------------------------------------------------- API access


class NodeApiError(ApiServerError):
    """A failed API call; ``state`` is a short stable description used for state-change logs."""

    def __init__(self, state: str, detail: str) -> None:
        """``state`` like ``HTTP 500`` or ``connection error``; ``detail`` the full message."""
        super().__init__(f"{state}: {detail}")
        self.state = state
        self.detail = detail


class UnpinnedPatch(NodeApiError):
    """A Node patch without ``metadata.resourceVersion``: a bug, never sent."""


class KubeConfigError(ApiServerError):
    """No usable Kubernetes client configuration (not in a cluster, no kubeconfig)."""

    summary = "cannot configure the Kubernetes client"


class NodeApi(Protocol):
    """The two calls the publisher needs."""

    def get_node(self, name: str) -> dict[str, Any]:
        """The Node as JSON."""
        ...

    def patch_node(self, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        """Apply a JSON merge patch; returns the updated Node as JSON."""
        ...


def kube_api_client(kubeconfig: str | None) -> Any:
    """A kubernetes ApiClient: in-cluster config, else ``kubeconfig`` (or the default
    kubeconfig) outside a cluster; KubeConfigError when none is usable.

    The kubernetes client is imported here, not at module level: it is heavy (GFD's node-api
    loop uses ~74 MiB against ~30 MiB in file mode, docs/benchmarks.md) and file mode never
    needs it.
    """
    from kubernetes import client
    from kubernetes import config as kube_config

    configuration = client.Configuration()
    try:
        if kubeconfig:
            kube_config.load_kube_config(config_file=kubeconfig,
                                         client_configuration=configuration)
        else:
            try:
                kube_config.load_incluster_config(client_configuration=configuration)
            except kube_config.ConfigException:
                kube_config.load_kube_config(client_configuration=configuration)
        # Retries are ours (backoff across passes), not urllib3's hidden ones.
        configuration.retries = False
        return client.ApiClient(configuration)
    except Exception as err:
        # Whatever the file holds (bad YAML, a list, missing keys, a bad certificate), the
        # client raises its own mix of exceptions: all mean "no usable configuration".
        raise KubeConfigError(_kubeconfig_problem(err, kubeconfig)) from err


class KubeNodeApi:
    """:class:`NodeApi` over the official ``kubernetes`` client (imported only here)."""

    def __init__(self, core_v1: Any,
                 request_timeout: tuple[float, float] = REQUEST_TIMEOUT) -> None:
        """``core_v1`` is a ``kubernetes.client.CoreV1Api``; ``request_timeout`` is
        (connect, read) seconds, passed to every call."""
        self._core = core_v1
        self.request_timeout = request_timeout

    @classmethod
    def from_environment(cls, kubeconfig: str | None = None,
                         request_timeout: tuple[float, float] = REQUEST_TIMEOUT) -> KubeNodeApi:
        """In-cluster config, or ``kubeconfig`` (or the default kubeconfig) outside a cluster."""
        from kubernetes import client  # heavy, node-api mode only: see kube_api_client

        return cls(client.CoreV1Api(kube_api_client(kubeconfig)), request_timeout)

    def get_node(self, name: str) -> dict[str, Any]:
        """GET /api/v1/nodes/{name}, as plain JSON (skips the slow model deserialisation)."""
        return self._call(lambda: self._core.read_node(
            name, _preload_content=False, _request_timeout=self.request_timeout))

    def patch_node(self, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        """PATCH /api/v1/nodes/{name} with ``application/merge-patch+json``; only a patch
        pinned to a ``resourceVersion`` is sent (else UnpinnedPatch)."""
        pinned(patch)
        return self._call(lambda: self._core.patch_node(
            name, patch, _content_type=MERGE_PATCH, _preload_content=False,
            _request_timeout=self.request_timeout))

    @staticmethod
    def _call(request: Callable[[], Any]) -> dict[str, Any]:
        # The kubernetes client and its urllib3: node-api mode only (see kube_api_client).
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError, NewConnectionError, TimeoutError

        try:
            response = request()
        except ApiException as err:
            raise NodeApiError(f"HTTP {err.status}", str(err.reason or err)) from err
        except NewConnectionError as err:  # refused, unreachable: a TimeoutError in urllib3 2
            raise NodeApiError("connection error", str(err)) from err
        except TimeoutError as err:
            raise NodeApiError("timeout", str(err)) from err
        except (HTTPError, OSError) as err:
            raise NodeApiError("connection error", str(err)) from err
        data = response.data
        try:
            parsed = json.loads(data)
        except ValueError as err:
            raise NodeApiError("bad response", f"not JSON: {data[:80]!r}") from err
        if not isinstance(parsed, dict):
            raise NodeApiError("bad response", "not a JSON object")
        return parsed


def _kubeconfig_problem(err: Exception, path: str | None) -> str:
    """One line about a kubeconfig that cannot be used, naming the file but never quoting it
    (it holds credentials): the client's own messages for a missing file or missing entries,
    the position of a YAML error, only the exception's type for anything else."""
    # PyYAML (~11 ms) and the kubernetes client: node-api mode only (see kube_api_client).
    import yaml
    from kubernetes.config import ConfigException

    where = path or "the kubeconfig ($KUBECONFIG or ~/.kube/config)"
    if isinstance(err, (ConfigException, OSError)):
        detail = " ".join(str(err).split())
        if path and path not in detail:
            detail = f"{path}: {detail}"
    elif isinstance(err, yaml.YAMLError):
        mark = getattr(err, "problem_mark", None)
        position = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        detail = f"{where}: not valid YAML{position}"
    else:
        detail = f"{where}: not a usable kubeconfig ({type(err).__name__})"
    return detail or f"{where}: {type(err).__name__}"


# --------------------------------------------------------------------------- retry + publish


class RetryingPublisher:
    """Keeps an API object equal to the latest desired labels, retrying with backoff until
    they converge: the scheduling every GFD output that talks to the API server shares.

    Subclasses implement :meth:`_apply` (one attempt, raising :class:`NodeApiError`) and say
    how a failure and a recovery are logged.
    """

    def __init__(self, backoff: Backoff | None, clock: Callable[[], float],
                 refresh_only: Collection[str]) -> None:
        """``clock`` is monotonic seconds (injectable for tests); ``refresh_only`` are labels
        whose new value alone does not warrant a write (see :func:`plan_patch`)."""
        self.backoff = backoff or Backoff()
        self._clock = clock
        self.refresh_only = frozenset(refresh_only)
        self._desired: dict[str, str] | None = None
        self._retry_at: float | None = None
        self._state = "ok"

    @property
    def converged(self) -> bool:
        """True when the last attempt succeeded."""
        return self._retry_at is None and self._state == "ok"

    def retry_in(self) -> float | None:
        """Seconds until the next retry is due (0 when overdue), None when nothing is pending."""
        if self._retry_at is None:
            return None
        return max(0.0, self._retry_at - self._clock())

    def publish(self, labels: Mapping[str, str]) -> bool:
        """Make the object carry ``labels``; True on success, else a retry is scheduled."""
        self._desired = dict(labels)
        return self._attempt()

    def retry(self) -> bool:
        """Try again with the latest desired labels (no-op success when nothing is pending)."""
        if self._desired is None:
            return True
        return self._attempt()

    def _attempt(self) -> bool:
        assert self._desired is not None
        try:
            self._apply(self._desired)
        except NodeApiError as err:
            delay = self.backoff.next_delay()
            self._retry_at = self._clock() + delay
            self._log_failure(err, err.state != self._state, delay)
            self._state = err.state
            return False
        if self._state != "ok":
            self._log_recovery()
        self._state = "ok"
        self._retry_at = None
        self.backoff.reset()
        return True

    def _apply(self, desired: dict[str, str]) -> None:
        """One attempt to make the object carry ``desired``; NodeApiError on failure."""
        raise NotImplementedError

    def _log_failure(self, err: NodeApiError, new_state: bool, delay: float) -> None:
        """Log a failed attempt (``new_state``: the first of its kind in a row)."""
        raise NotImplementedError

    def _log_recovery(self) -> None:
        """Log the first success after failures."""
        raise NotImplementedError


class NodePublisher(RetryingPublisher):
    """Keeps a Node's GFD labels equal to the latest desired set, retrying until they converge."""

    def __init__(
        self,
        api: NodeApi,
        node_name: str,
        backoff: Backoff | None = None,
        clock: Callable[[], float] = time.monotonic,
        refresh_only: Collection[str] = (),
    ) -> None:
        """``clock`` is monotonic seconds (injectable for tests); ``refresh_only`` are labels
        whose new value alone does not warrant a patch (see :func:`plan_patch`)."""
        super().__init__(backoff, clock, refresh_only)
        self.api = api
        self.node_name = node_name
        self.patches = 0  # successful PATCH requests (tests read it; the bench counts its own)

    def _apply(self, desired: dict[str, str]) -> None:
        node = self.api.get_node(self.node_name)
        patch = plan_patch(node, desired, self.refresh_only, name=self.node_name)
        if patch is not None:
            self.api.patch_node(self.node_name, pinned(patch))
            self.patches += 1
            log.info("node %s: patched %d labels", self.node_name,
                     len(patch["metadata"].get("labels", {})))

    def _log_failure(self, err: NodeApiError, new_state: bool, delay: float) -> None:
        if new_state:
            log.warning("node %s: cannot update labels (%s); retrying with backoff up to %.0fs",
                        self.node_name, err, self.backoff.cap)
        else:
            log.debug("node %s: still failing (%s); next try in %.1fs", self.node_name, err,
                      delay)

    def _log_recovery(self) -> None:
        log.info("node %s: labels converged; API server reachable again", self.node_name)
