"""A local Kubernetes API server stub: GET and PATCH of ``/api/v1/nodes/{name}``, NFD's
``NodeFeature`` custom resources and GET of pods.

Enough of the real thing for GFD's Node-label mode: JSON merge patch (RFC 7386: null deletes,
objects merge recursively, anything else replaces), the ``application/merge-patch+json``
content type (anything else is 415), 404 for unknown nodes, a ``resourceVersion`` bumped on
every change and checked when a patch carries one (409 on mismatch), and fault injection:
the next N requests (of one method, if asked) answer an HTTP status, answer a body of the
test's choosing (malformed JSON, a list, a Node of the wrong shape), answer the real answer
altered by the test (a Node without ``metadata``, of another name or kind: what a broken
proxy or server could send with a 200; nothing is applied), have their connection closed
without an answer, or are delayed.

Custom resources (``/apis/nfd.k8s-sigs.io/v1alpha1/namespaces/{ns}/nodefeatures[/{name}]``:
GET, POST to the collection, PUT of an object) exist only once the test installs NFD's CRD
(:meth:`FakeApiServer.install_nodefeature_crd`); before that every such path answers the
API server's plain 404 ("the server could not find the requested resource", no details), which
is how a client tells a missing CRD from a missing object (404 with ``details.name``). As for
real custom resources: create answers 201 (409 AlreadyExists when the name is taken); an update
must carry ``metadata.resourceVersion`` (422 without, 409 when stale); an update that changes
nothing keeps the resourceVersion; ``spec`` is required and ``spec.labels`` must map strings to
strings (422). Pods (``/api/v1/namespaces/{ns}/pods/{name}``, GET only) are added by the test.

Not collected by pytest (no ``test_`` prefix); tests import :class:`FakeApiServer`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MERGE_PATCH = "application/merge-patch+json"
NODE_PATH = "/api/v1/nodes/"
NFD_GROUP = "nfd.k8s-sigs.io"
NFD_API = "/apis/nfd.k8s-sigs.io/"
NODEFEATURES = re.compile(r"^/apis/nfd\.k8s-sigs\.io/v1alpha1/namespaces/([^/]+)/nodefeatures"
                          r"(?:/([^/]+))?$")
PODS = re.compile(r"^/api/v1/namespaces/([^/]+)/pods/([^/]+)$")
NOT_FOUND = "the server could not find the requested resource"


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch of ``patch`` onto ``target`` (returns a new value)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


@dataclass
class Fault:
    """One injected behaviour for the next ``count`` requests."""

    kind: str  # "status", "body", "mangle", "close" or "delay"
    count: int
    status: int = 500
    delay: float = 0.0
    body: bytes = b""  # what a "body" fault answers, verbatim
    change: Callable[[dict[str, Any]], Any] | None = None  # what a "mangle" fault answers
    method: str | None = None  # only requests of this method; None: any

    def matches(self, method: str) -> bool:
        """True when this fault applies to a request of ``method``."""
        return self.count > 0 and self.method in (None, method)


@dataclass
class Request:
    """A request the server received (after fault handling)."""

    method: str
    path: str
    content_type: str
    body: Any
    answered: int  # the status sent, or 0 when the connection was closed


@dataclass
class _State:
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)
    nodefeatures: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    pods: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    crd_installed: bool = False
    faults: list[Fault] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)
    version: int = 1


class FakeApiServer:
    """The stub server, on 127.0.0.1 and a free port, served from a thread."""

    def __init__(self) -> None:
        """Create (not start) the server."""
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._state = _State()
        self._stopping = threading.Event()  # wakes delayed requests when the server stops
        # Open keep-alive connections and their handler threads: stop() closes and joins them,
        # so no test inherits another's threads (the fault suite counts threads for leaks).
        self._connections: dict[socket.socket, threading.Thread] = {}
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        # A short poll interval keeps shutdown (and so test teardown) fast.
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        kwargs={"poll_interval": 0.02}, daemon=True)

    # ---------------------------------------------------------------- lifecycle

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> FakeApiServer:
        """Start serving in the background."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket (also fine when never started)."""
        self._stopping.set()
        if self._thread.is_alive():
            self._httpd.shutdown()
            self._thread.join(timeout=5)
        self._httpd.server_close()
        with self._lock:
            connections = dict(self._connections)
        for conn, thread in connections.items():
            with contextlib.suppress(OSError):  # the client may have hung up already
                conn.shutdown(socket.SHUT_RDWR)
            thread.join(timeout=5)

    def __enter__(self) -> FakeApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def kubeconfig(self, path: str) -> str:
        """Write a kubeconfig pointing at this server to ``path``; returns ``path``."""
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": "stub",
            "clusters": [{"name": "stub", "cluster": {"server": self.url}}],
            "users": [{"name": "stub", "user": {"token": "stub-token"}}],
            "contexts": [{"name": "stub", "context": {"cluster": "stub", "user": "stub"}}],
        }
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(config, handle)
        return path

    # ---------------------------------------------------------------- test controls

    def add_node(self, name: str, labels: Mapping[str, str] | None = None,
                 annotations: Mapping[str, str] | None = None) -> None:
        """Create (or replace) a Node."""
        with self._lock:
            self._state.version += 1
            self._state.nodes[name] = {
                "apiVersion": "v1", "kind": "Node",
                "metadata": {"name": name, "labels": dict(labels or {}),
                             "annotations": dict(annotations or {}),
                             "resourceVersion": str(self._state.version)},
            }

    def node(self, name: str) -> dict[str, Any]:
        """A copy of the stored Node."""
        with self._lock:
            return copy.deepcopy(self._state.nodes[name])

    def labels(self, name: str) -> dict[str, str]:
        """The Node's labels."""
        return dict(self.node(name)["metadata"].get("labels") or {})

    def annotations(self, name: str) -> dict[str, str]:
        """The Node's annotations."""
        return dict(self.node(name)["metadata"].get("annotations") or {})

    def set_labels(self, name: str, labels: Mapping[str, str | None]) -> None:
        """Change labels behind GFD's back (None deletes), bumping the resourceVersion."""
        self._apply(name, {"metadata": {"labels": dict(labels)}})

    def install_nodefeature_crd(self) -> None:
        """Install NFD's CRD (nodefeatures.nfd.k8s-sigs.io): its paths start to exist."""
        with self._lock:
            self._state.crd_installed = True

    def nodefeature(self, namespace: str, name: str) -> dict[str, Any] | None:
        """A copy of a stored NodeFeature, or None."""
        with self._lock:
            found = self._state.nodefeatures.get((namespace, name))
            return copy.deepcopy(found) if found is not None else None

    def change_nodefeature(self, namespace: str, name: str,
                           labels: Mapping[str, str]) -> None:
        """Someone else rewrites the object's ``spec.labels`` (bumping its resourceVersion)."""
        with self._lock:
            stored = self._state.nodefeatures[(namespace, name)]
            stored["spec"]["labels"] = dict(labels)
            self._state.version += 1
            stored["metadata"]["resourceVersion"] = str(self._state.version)

    def add_pod(self, namespace: str, name: str,
                owners: list[dict[str, Any]] | None = None) -> str:
        """Create a Pod with these ownerReferences; returns its uid."""
        uid = str(uuid.uuid4())
        with self._lock:
            self._state.version += 1
            self._state.pods[(namespace, name)] = {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": namespace, "uid": uid,
                             "resourceVersion": str(self._state.version),
                             "ownerReferences": copy.deepcopy(owners or [])},
                "spec": {}}
        return uid

    def requests(self, method: str | None = None) -> list[Request]:
        """Requests received so far, optionally only one method."""
        with self._lock:
            return [r for r in self._state.requests if method is None or r.method == method]

    def fail_next(self, count: int, status: int = 500) -> None:
        """The next ``count`` requests answer ``status`` with a Status body."""
        with self._lock:
            self._state.faults.append(Fault("status", count, status=status))

    def answer_next(self, count: int, body: bytes, status: int = 200,
                    method: str | None = None) -> None:
        """The next ``count`` requests (of ``method``, if given) answer ``status`` with
        ``body`` as is (nothing applied).

        For a proxy or a broken server that answers something other than a Node.
        """
        with self._lock:
            self._state.faults.append(Fault("body", count, status=status, body=body,
                                            method=method))

    def mangle_next(self, count: int, change: Callable[[dict[str, Any]], Any],
                    method: str = "GET") -> None:
        """The next ``count`` ``method`` requests answer 200 with ``change(node)``, where
        ``node`` is a copy of the stored Node the request names (nothing is applied).

        For a lying server: a 200 whose body is almost the Node (no ``metadata``, another
        name, no ``resourceVersion``, ...). A request for an unknown Node gets its 404.
        """
        with self._lock:
            self._state.faults.append(Fault("mangle", count, change=change, method=method))

    def close_next(self, count: int) -> None:
        """The next ``count`` requests get their connection closed without an answer."""
        with self._lock:
            self._state.faults.append(Fault("close", count))

    def delay_next(self, count: int, seconds: float) -> None:
        """The next ``count`` requests are answered after ``seconds`` (like a hung server).

        A delayed request is recorded, and a PATCH applied, only after the delay, as a real
        API server may still apply a request its client gave up on. Stopping the server
        cuts the delay short.
        """
        with self._lock:
            self._state.faults.append(Fault("delay", count, delay=seconds))

    def wait_for(self, predicate: Any, timeout: float = 10.0) -> bool:
        """Wait until ``predicate(server)`` holds, re-checking after every request."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                seen = len(self._state.requests)
            if predicate(self):
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            with self._changed:
                self._changed.wait_for(self._more_requests_than(seen), remaining)

    # ---------------------------------------------------------------- internals

    def _more_requests_than(self, seen: int) -> Callable[[], bool]:
        return lambda: len(self._state.requests) != seen

    def _next_fault(self, method: str) -> Fault | None:
        with self._lock:
            self._state.faults = [f for f in self._state.faults if f.count > 0]
            for fault in self._state.faults:
                if fault.matches(method):
                    fault.count -= 1
                    return fault
        return None

    def _record(self, request: Request) -> None:
        with self._changed:
            self._state.requests.append(request)
            self._changed.notify_all()

    def _apply(self, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            node = self._state.nodes[name]
            merged = merge_patch(node, patch)
            self._state.version += 1
            merged["metadata"]["resourceVersion"] = str(self._state.version)
            self._state.nodes[name] = merged
            return copy.deepcopy(merged)

    def _get(self, name: str) -> tuple[int, dict[str, Any]]:
        with self._lock:
            node = self._state.nodes.get(name)
            if node is None:
                return 404, _status(404, "NotFound", f'nodes "{name}" not found')
            return 200, copy.deepcopy(node)

    def _patch(self, name: str, content_type: str, body: Any) -> tuple[int, dict[str, Any]]:
        if content_type.split(";")[0].strip() != MERGE_PATCH:
            return 415, _status(415, "UnsupportedMediaType",
                                f"the body of the request was in an unknown format - "
                                f"accepted media types include: {MERGE_PATCH}")
        if not isinstance(body, dict):
            return 400, _status(400, "BadRequest", "patch body must be a JSON object")
        with self._lock:
            node = self._state.nodes.get(name)
            if node is None:
                return 404, _status(404, "NotFound", f'nodes "{name}" not found')
            wanted = (body.get("metadata") or {}).get("resourceVersion")
            if wanted is not None and wanted != node["metadata"]["resourceVersion"]:
                return 409, _status(409, "Conflict",
                                    f'Operation cannot be fulfilled on nodes "{name}": the '
                                    "object has been modified; please apply your changes to "
                                    "the latest version and try again")
        return 200, self._apply(name, body)

    def _custom(self, method: str, path: str, body: Any) -> tuple[int, dict[str, Any]]:
        """NodeFeature and Pod requests (the caller routed ``path`` here)."""
        pod = PODS.match(path)
        if pod is not None:
            if method != "GET":
                return 405, _status(405, "MethodNotAllowed", "only GET is served for pods")
            with self._lock:
                found = self._state.pods.get((pod.group(1), pod.group(2)))
            if found is None:
                return 404, _status(404, "NotFound", f'pods "{pod.group(2)}" not found',
                                    {"name": pod.group(2), "kind": "pods"})
            return 200, copy.deepcopy(found)
        match = NODEFEATURES.match(path)
        with self._lock:
            installed = self._state.crd_installed
        if match is None or not installed:
            return 404, _status(404, "NotFound", NOT_FOUND)
        namespace, name = match.group(1), match.group(2)
        if name is None:
            if method != "POST":
                return 405, _status(405, "MethodNotAllowed", "list is not served by this stub")
            return self._create_nodefeature(namespace, body)
        if method == "GET":
            with self._lock:
                found = self._state.nodefeatures.get((namespace, name))
            if found is None:
                return 404, _nf_not_found(name)
            return 200, copy.deepcopy(found)
        if method == "PUT":
            return self._update_nodefeature(namespace, name, body)
        return 405, _status(405, "MethodNotAllowed", f"{method} is not served by this stub")

    def _create_nodefeature(self, namespace: str, body: Any) -> tuple[int, dict[str, Any]]:
        problem = _nodefeature_problem(body, namespace)
        if problem is not None:
            return problem
        name = body["metadata"]["name"]
        with self._lock:
            if (namespace, name) in self._state.nodefeatures:
                return 409, _status(409, "AlreadyExists",
                                    f'nodefeatures.{NFD_GROUP} "{name}" already exists',
                                    {"name": name, "group": NFD_GROUP, "kind": "nodefeatures"})
            self._state.version += 1
            stored = copy.deepcopy(body)
            stored["metadata"].update({
                "namespace": namespace, "uid": str(uuid.uuid4()), "generation": 1,
                "resourceVersion": str(self._state.version),
                "creationTimestamp": "2026-01-01T00:00:00Z"})
            self._state.nodefeatures[(namespace, name)] = stored
            return 201, copy.deepcopy(stored)

    def _update_nodefeature(self, namespace: str, name: str,
                            body: Any) -> tuple[int, dict[str, Any]]:
        problem = _nodefeature_problem(body, namespace)
        if problem is not None:
            return problem
        if body["metadata"]["name"] != name:
            return 400, _status(400, "BadRequest", "the name of the object "
                                f"({body['metadata']['name']}) does not match the name on the URL "
                                f"({name})")
        wanted = body["metadata"].get("resourceVersion")
        if not wanted:
            return 422, _status(422, "Invalid", f'NodeFeature.{NFD_GROUP} "{name}" is invalid: '
                                "metadata.resourceVersion: Invalid value: 0x0: must be specified "
                                "for an update")
        with self._lock:
            stored = self._state.nodefeatures.get((namespace, name))
            if stored is None:
                return 404, _nf_not_found(name)
            if wanted != stored["metadata"]["resourceVersion"]:
                return 409, _status(409, "Conflict", "Operation cannot be fulfilled on "
                                    f'nodefeatures.{NFD_GROUP} "{name}": the object has been '
                                    "modified; please apply your changes to the latest version "
                                    "and try again")
            updated = copy.deepcopy(body)
            server_set = ("namespace", "uid", "generation", "resourceVersion",
                          "creationTimestamp")
            for key in server_set:
                if key in stored["metadata"]:
                    updated["metadata"][key] = stored["metadata"][key]
            if updated == stored:
                return 200, copy.deepcopy(stored)  # a no-op update writes nothing
            if updated.get("spec") != stored.get("spec"):
                updated["metadata"]["generation"] = stored["metadata"]["generation"] + 1
            self._state.version += 1
            updated["metadata"]["resourceVersion"] = str(self._state.version)
            self._state.nodefeatures[(namespace, name)] = updated
            return 200, copy.deepcopy(updated)

    def _answer(self, method: str, path: str, content_type: str,
                body: Any) -> tuple[int, bytes] | None:
        """The status and body bytes for one request, recorded; None: close the connection."""
        fault = self._next_fault(method)
        if fault is not None and fault.kind == "delay":
            self._stopping.wait(fault.delay)
            fault = None
        if fault is not None and fault.kind == "close":
            self._record(Request(method, path, content_type, body, 0))
            return None
        data: bytes | None = None  # set: sent verbatim instead of ``payload``
        if fault is not None and fault.kind == "body":
            status, data = fault.status, fault.body
        elif fault is not None:
            status, payload = self._fault_payload(fault, path)
        else:
            status, payload = self._route(method, path, content_type, body)
        self._record(Request(method, path, content_type, body, status))
        if data is None:
            data = json.dumps(payload).encode()
        return status, data

    def _fault_payload(self, fault: Fault, path: str) -> tuple[int, Any]:
        """What a "mangle" or "status" fault answers."""
        if fault.kind == "mangle":
            assert fault.change is not None
            status, payload = self._get(path[len(NODE_PATH):].split("?")[0])
            if status == 200:
                return status, fault.change(payload)
            return status, payload
        return fault.status, _status(fault.status, "Injected", "injected fault")

    def _route(self, method: str, path: str, content_type: str,
               body: Any) -> tuple[int, dict[str, Any]]:
        """The answer of the API server proper (no fault)."""
        if path.split("?")[0].startswith((NFD_API, "/api/v1/namespaces/")):
            return self._custom(method, path.split("?")[0], body)
        if not path.startswith(NODE_PATH) or "/" in path[len(NODE_PATH):]:
            return 404, _status(404, "NotFound", "the server could not "
                                "find the requested resource")
        name = path[len(NODE_PATH):].split("?")[0]
        if method == "GET":
            return self._get(name)
        return self._patch(name, content_type, body)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                with server._lock:
                    server._connections[self.connection] = threading.current_thread()
                # Headers and body go out in separate writes; without this, Nagle plus the
                # client's delayed ACK adds ~40 ms to every keep-alive answer.
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def finish(self) -> None:
                try:
                    super().finish()
                finally:
                    with server._lock:
                        server._connections.pop(self.connection, None)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass  # keep test output quiet

            def do_GET(self) -> None:  # noqa: N802
                self._serve("GET")

            def do_PATCH(self) -> None:  # noqa: N802
                self._serve("PATCH")

            def do_POST(self) -> None:  # noqa: N802
                self._serve("POST")

            def do_PUT(self) -> None:  # noqa: N802
                self._serve("PUT")

            def _serve(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                content_type = self.headers.get("Content-Type", "")
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = raw.decode("utf-8", "replace")
                answer = server._answer(method, self.path, content_type, body)
                if answer is None:  # a "close" fault
                    self.close_connection = True
                    self.connection.close()
                    return
                status, data = answer
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    # The client gave up (timed out) while the answer was delayed.
                    self.close_connection = True

        return Handler


def _status(code: int, reason: str, message: str,
            details: Mapping[str, str] | None = None) -> dict[str, Any]:
    status: dict[str, Any] = {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                              "message": message, "reason": reason, "code": code}
    if details:
        status["details"] = dict(details)
    return status


def _nf_not_found(name: str) -> dict[str, Any]:
    return _status(404, "NotFound", f'nodefeatures.{NFD_GROUP} "{name}" not found',
                   {"name": name, "group": NFD_GROUP, "kind": "nodefeatures"})


def _nodefeature_problem(body: Any, namespace: str) -> tuple[int, dict[str, Any]] | None:
    """Why a NodeFeature body is refused (as the API server and the CRD schema would)."""
    if not isinstance(body, dict) or body.get("apiVersion") != f"{NFD_GROUP}/v1alpha1" \
            or body.get("kind") != "NodeFeature":
        return 400, _status(400, "BadRequest", "expected a nfd.k8s-sigs.io/v1alpha1 NodeFeature")
    metadata = body.get("metadata")
    if not isinstance(metadata, dict) or not isinstance(metadata.get("name"), str) \
            or not metadata["name"]:
        return 422, _status(422, "Invalid", "metadata.name: Required value")
    if metadata.get("namespace", namespace) != namespace:
        return 400, _status(400, "BadRequest", "the namespace of the provided object does not "
                            "match the namespace sent on the request")
    spec = body.get("spec")
    if not isinstance(spec, dict):
        return 422, _status(422, "Invalid", "spec: Required value")
    labels = spec.get("labels", {})
    if not isinstance(labels, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        return 422, _status(422, "Invalid", "spec.labels: Invalid value: must map strings to "
                            "strings")
    return None
