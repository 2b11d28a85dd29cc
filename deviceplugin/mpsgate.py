"""The plugin's MPS readiness gate: an MPS resource is served only once its daemon answers.

NVIDIA's plugin (``internal/plugin/server.go`` Start -> ``waitForDaemon``) runs
``nvidia-cuda-mps-control`` with the resource's pipe directory and sends
``get_default_active_thread_percentage`` before serving; a failure aborts its start. Ours holds
the resource back instead (:class:`deviceplugin.manager.PluginManager`'s gate): not registered,
the status names why, and it is checked again with backoff until the daemon answers.

We improve on one point: NVIDIA's check passes as soon as the daemon answers, before the
control daemon has set the per-client limits (its TODO: check the ready file). Ours also
needs the resource's ``.started`` marker, which the control daemon writes once the limits
are set, so no client is admitted without them.

Where the plugin sees the MPS root: at ``/mps`` in its pod (NVIDIA's chart and our overlay
mount the host root there), else at ``--mps-root`` itself (a plugin run on the host).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from gpus.mps import MpsError, MpsRoot
from gpus.resources import Resource

log = logging.getLogger(__name__)


def mps_gate(root: str, environ: Mapping[str, str]) -> Callable[[Resource], str | None]:
    """A gate for :class:`~deviceplugin.manager.PluginManager`: None for a resource that may
    be served (not MPS, or its daemon answers), else why not."""
    mps_root = MpsRoot(root)

    def gate(resource: Resource) -> str | None:
        if not resource.mps:
            return None
        started = mps_root.started_file(resource.name)
        if not started.exists():
            return f"its MPS control daemon is not started and configured yet (no {started})"
        try:
            mps_root.control(resource.name, environ=environ).assert_healthy()
        except MpsError as error:
            return f"its MPS control daemon does not answer: {error}"
        log.info("%s: the MPS control daemon answers", resource.name)
        return None

    return gate
