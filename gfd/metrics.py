"""GFD's metrics hooks: API-server failures counted where GFD's outputs are read and written.

The families live in gpus.runtime.metrics (:class:`GfdMetrics`); this wraps a
:class:`gfd.nodepatch.NodeApi` (node-api output) or a :class:`gfd.nodefeature.NodeFeatureApi`
(NodeFeature output) so the publishers' retries, backoff and logs stay as they are.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, TypeVar

from gfd.nodefeature import CrdMissing, NodeFeatureApi, Obj
from gfd.nodepatch import NodeApi, NodeApiError
from gpus.runtime.metrics import GfdMetrics

_HTTP = re.compile(r"HTTP (\d{3})")


_T = TypeVar("_T")


def api_status(err: NodeApiError) -> str:
    """The HTTP status of a failed call, or "0" when the API server gave none."""
    if isinstance(err, CrdMissing):  # the API server's 404 for the kind, named more clearly
        return "404"
    match = _HTTP.match(err.state)
    return match.group(1) if match else "0"


class CountingNodeApi:
    """A :class:`NodeApi` counting failed calls in ``metrics.api_errors``."""

    def __init__(self, api: NodeApi, metrics: GfdMetrics) -> None:
        self._api = api
        self._errors = metrics.api_errors

    def get_node(self, name: str) -> dict[str, Any]:
        """The Node as JSON (counted on failure)."""
        try:
            return self._api.get_node(name)
        except NodeApiError as err:
            self._errors.labels("get_node", api_status(err)).inc()
            raise

    def patch_node(self, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        """Apply a JSON merge patch (counted on failure)."""
        try:
            return self._api.patch_node(name, patch)
        except NodeApiError as err:
            self._errors.labels("patch_node", api_status(err)).inc()
            raise


class CountingNodeFeatureApi:
    """A :class:`NodeFeatureApi` counting failed calls in ``metrics.api_errors``
    (operations ``get_nodefeature``, ``create_nodefeature``, ``update_nodefeature``,
    ``get_pod``)."""

    def __init__(self, api: NodeFeatureApi, metrics: GfdMetrics) -> None:
        self._api = api
        self._errors = metrics.api_errors

    def _counted(self, operation: str, call: Callable[[], _T]) -> _T:
        try:
            return call()
        except NodeApiError as err:
            self._errors.labels(operation, api_status(err)).inc()
            raise

    def get(self, namespace: str, name: str) -> Obj | None:
        """The NodeFeature, or None when it does not exist (counted on failure)."""
        return self._counted("get_nodefeature", lambda: self._api.get(namespace, name))

    def create(self, namespace: str, body: Obj) -> Obj:
        """POST the NodeFeature (counted on failure)."""
        return self._counted("create_nodefeature", lambda: self._api.create(namespace, body))

    def replace(self, namespace: str, name: str, body: Obj) -> Obj:
        """PUT the NodeFeature (counted on failure, a 409 conflict included)."""
        return self._counted("update_nodefeature",
                             lambda: self._api.replace(namespace, name, body))

    def get_pod(self, namespace: str, name: str) -> Obj:
        """GFD's own Pod, for owner references (counted on failure)."""
        return self._counted("get_pod", lambda: self._api.get_pod(namespace, name))
