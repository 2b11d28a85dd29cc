"""GFD's metrics hooks: API-server failures counted where the Node is read and patched.

The families live in gpus.runtime.metrics (:class:`GfdMetrics`); this wraps a
:class:`gfd.nodepatch.NodeApi` so the publisher's retries, backoff and logs stay as they are.
"""

from __future__ import annotations

import re
from typing import Any

from gfd.nodepatch import NodeApi, NodeApiError
from gpus.runtime.metrics import GfdMetrics

_HTTP = re.compile(r"HTTP (\d{3})")


def api_status(err: NodeApiError) -> str:
    """The HTTP status of a failed call, or "0" when the API server gave none."""
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
