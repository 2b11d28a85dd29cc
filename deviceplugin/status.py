"""What the plugin reports in its status (:mod:`deviceplugin.readiness`): device counts per
served resource and every known problem."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from deviceplugin.readiness import ResourceStatus
from gpus.resources import ResourceMap


def plugin_status(served: ResourceMap | None, errors: Mapping[str, str],
                  extra_problems: Sequence[str]) -> tuple[dict[str, ResourceStatus], list[str]]:
    """Counts per resource of ``served`` (None: nothing served), and the problems: the map's
    own (invalid MIG layouts), resources that cannot be served (``errors``), then
    ``extra_problems`` (MIG devices left out of the CDI spec, an initialisation error)."""
    resources: dict[str, ResourceStatus] = {}
    problems: list[str] = []
    if served is not None:
        for name, resource in served.resources.items():
            healthy = sum(1 for d in resource.devices if d.healthy)
            resources[name] = ResourceStatus(len(resource.devices), healthy)
        problems += served.problems
        problems += (f"cannot serve {name}: {error}" for name, error in sorted(errors.items()))
    problems += extra_problems
    return resources, problems
