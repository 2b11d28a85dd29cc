"""The IMEX labeler: ``nvidia.com/gpu.clique`` from NVML's GPU fabric info.

As NVIDIA's (``internal/lm/imex.go`` with go-nvlib's ``IsFabricAttached``): over the GPUs
attached to a multi-node NVLink fabric (registration completed, status success, non-zero cluster
UUID; see :attr:`gpus.model.GpuFabric.attached`), exactly one cluster UUID and one clique id give
``gpu.clique=<clusterUUID>.<cliqueId>``; GPUs that disagree give no label and a warning; no
attached GPU gives no label. GPUs without fabric info (NOT_SUPPORTED, old drivers) are simply not
attached.

One difference: where NVIDIA's labeler fails the whole pass on any other NVML error from the
fabric query, ours leaves out only this label and reports why (``imex_problems``).
"""

from __future__ import annotations

from gpus.model import GPU, Snapshot

CLIQUE_LABEL = "nvidia.com/gpu.clique"


def _queried(snapshot: Snapshot) -> list[GPU]:
    return sorted((g for g in snapshot.gpus if g.fabric is not None), key=lambda g: g.index)


def _failed(snapshot: Snapshot) -> list[GPU]:
    return [g for g in _queried(snapshot) if g.fabric is not None and g.fabric.error]


def _ids(snapshot: Snapshot) -> tuple[dict[str, list[int]], dict[int, list[int]]]:
    """Cluster UUID -> GPU indices and clique id -> GPU indices, over attached GPUs."""
    clusters: dict[str, list[int]] = {}
    cliques: dict[int, list[int]] = {}
    for gpu in _queried(snapshot):
        fabric = gpu.fabric
        if fabric is None or not fabric.attached:
            continue
        clusters.setdefault(fabric.cluster_uuid, []).append(gpu.index)
        cliques.setdefault(fabric.clique_id, []).append(gpu.index)
    return clusters, cliques


def imex_labels(snapshot: Snapshot) -> dict[str, str]:
    """``gpu.clique`` when every fabric-attached GPU names the same cluster and clique."""
    if _failed(snapshot):
        return {}
    clusters, cliques = _ids(snapshot)
    if len(clusters) != 1 or len(cliques) != 1:
        return {}
    (cluster,), (clique,) = clusters, cliques
    return {CLIQUE_LABEL: f"{cluster}.{clique}"}


def imex_problems(snapshot: Snapshot) -> tuple[str, ...]:
    """Why ``gpu.clique`` is missing although some GPU is on a fabric (logged as warnings)."""
    failed = _failed(snapshot)
    if failed:
        return tuple(f"GPU {g.index}: fabric info failed ({g.fabric.error if g.fabric else ''});"
                     " no gpu.clique label" for g in failed)
    clusters, cliques = _ids(snapshot)
    problems = []
    if len(clusters) > 1:
        problems.append(f"fabric-attached GPUs disagree on the cluster UUID ({_describe(clusters)})"
                        "; no gpu.clique label")
    if len(cliques) > 1:
        problems.append(f"fabric-attached GPUs disagree on the clique id ({_describe(cliques)})"
                        "; no gpu.clique label")
    return tuple(problems)


def _describe(groups: dict[str, list[int]] | dict[int, list[int]]) -> str:
    return ", ".join(f"{key}: GPUs {', '.join(map(str, indices))}"
                     for key, indices in sorted(groups.items(), key=lambda kv: kv[1]))
