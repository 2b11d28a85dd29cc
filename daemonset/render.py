"""A small offline kustomize renderer for the manifests in this directory.

CI machines have Python but no kubectl, so the manifest tests render the kustomizations with
this module; where kubectl is installed the tests also compare its output with ours. Only what
these manifests use is supported, and anything else is refused with a RenderError rather than
silently ignored:

- ``resources``: YAML files (several documents allowed) and directories with a kustomization;
- ``patches`` (``path`` or inline ``patch``, optional ``target``) and ``patchesStrategicMerge``:
  strategic-merge patches with the merge keys of the pod spec lists used here;
- ``images`` (``name``, ``newName``, ``newTag``, ``digest``);
- ``namePrefix`` / ``nameSuffix``, with the name references the manifests hold updated;
- ``namespace``, including ServiceAccount subjects of role bindings whose namespace was not
  written in the source (kustomize's ``defaultOnly`` behaviour).

Usage: ``python daemonset/render.py daemonset/overlays/simulated`` prints the rendered YAML.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

LOG = logging.getLogger("daemonset.render")

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
SUPPORTED_KEYS = frozenset({
    "apiVersion", "kind", "resources", "patches", "patchesStrategicMerge", "images",
    "namePrefix", "nameSuffix", "namespace",
})
# Strategic-merge keys of the lists these manifests patch (from the Kubernetes API types).
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "ports": "containerPort",
    "imagePullSecrets": "name",
}
# Kinds without a namespace (only those that could appear here).
CLUSTER_SCOPED_KINDS = frozenset({
    "ClusterRole", "ClusterRoleBinding", "Namespace", "PriorityClass", "RuntimeClass",
    "CustomResourceDefinition", "StorageClass", "PersistentVolume", "Node",
})
WORKLOAD_KINDS = frozenset({"DaemonSet", "Deployment", "StatefulSet", "ReplicaSet", "Job"})
# Marks, for the namespace transformer, subjects whose namespace no source file wrote.
_SUBJECT_NS_UNSET = "_render_subject_namespace_unset"


class RenderError(ValueError):
    """A kustomization this renderer cannot build; the message names the file and the reason."""


@dataclass
class Resource:
    """One Kubernetes object and the name it had in its source file (patches target that)."""

    obj: dict[str, Any]
    original_name: str
    source: str

    @property
    def kind(self) -> str:
        """The object's kind."""
        return str(self.obj.get("kind", ""))

    @property
    def name(self) -> str:
        """The object's current name."""
        return str(self.obj.get("metadata", {}).get("name", ""))


@dataclass
class _Renames:
    """Old name -> new name per kind, collected while prefixing/suffixing."""

    by_kind: dict[str, dict[str, str]] = field(default_factory=dict)

    def add(self, kind: str, old: str, new: str) -> None:
        self.by_kind.setdefault(kind, {})[old] = new

    def get(self, kind: str, old: str) -> str:
        return self.by_kind.get(kind, {}).get(old, old)


def render(path: str | Path) -> list[dict[str, Any]]:
    """Build the kustomization in directory ``path``; returns the objects, in source order."""
    return _strip_internal_marks(resource.obj for resource in _build(Path(path).resolve(), ()))


def to_yaml(objects: Iterable[dict[str, Any]]) -> str:
    """Serialise objects as one multi-document YAML stream."""
    return yaml.safe_dump_all(list(objects), sort_keys=False, default_flow_style=False)


def _kustomization_file(directory: Path) -> Path:
    for name in KUSTOMIZATION_FILES:
        candidate = directory / name
        if candidate.is_file():
            return candidate
    raise RenderError(f"{directory}: no kustomization file ({', '.join(KUSTOMIZATION_FILES)})")


def _load_kustomization(directory: Path) -> tuple[Path, dict[str, Any]]:
    path = _kustomization_file(directory)
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise RenderError(f"{path}: expected a mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - SUPPORTED_KEYS)
    if unknown:
        raise RenderError(f"{path}: unsupported field(s) {', '.join(unknown)}")
    return path, data


def _build(directory: Path, stack: tuple[Path, ...]) -> list[Resource]:
    if directory in stack:
        raise RenderError(f"{directory}: kustomization cycle via {' -> '.join(map(str, stack))}")
    path, data = _load_kustomization(directory)
    LOG.debug("building %s", path)
    resources: list[Resource] = []
    for entry in _string_list(data, "resources", path):
        resources.extend(_load_resource_entry(directory, entry, path, (*stack, directory)))
    for patch, target in _patches(directory, data, path):
        _apply_patch(resources, patch, target, path)
    for image in _list(data, "images", path):
        _set_image(resources, image, path)
    if data.get("namePrefix") or data.get("nameSuffix"):
        _rename(resources, str(data.get("namePrefix") or ""), str(data.get("nameSuffix") or ""))
    if data.get("namespace"):
        _set_namespace(resources, str(data["namespace"]))
    return resources


def _list(data: dict[str, Any], key: str, path: Path) -> list[Any]:
    value = data.get(key) or []
    if not isinstance(value, list):
        raise RenderError(f"{path}: {key} must be a list, got {type(value).__name__}")
    return value


def _string_list(data: dict[str, Any], key: str, path: Path) -> list[str]:
    items = _list(data, key, path)
    for item in items:
        if not isinstance(item, str):
            raise RenderError(f"{path}: {key} entries must be strings, got {item!r}")
    return items


def _local(directory: Path, entry: str, path: Path) -> Path:
    # kustomize refuses absolute paths and URLs; so do we (and we never fetch anything).
    if "://" in entry or entry.startswith(("/", "github.com/")):
        raise RenderError(f"{path}: only relative local paths are supported, got {entry!r}")
    return (directory / entry).resolve()


def _load_resource_entry(
    directory: Path, entry: str, path: Path, stack: tuple[Path, ...]
) -> list[Resource]:
    target = _local(directory, entry, path)
    if target.is_dir():
        return _build(target, stack)
    if not target.is_file():
        raise RenderError(f"{path}: resource {entry!r} does not exist")
    return [Resource(obj, _metadata_name(obj, target), str(target))
            for obj in _load_objects(target)]


def _load_objects(path: Path) -> Iterator[dict[str, Any]]:
    try:
        documents = list(yaml.safe_load_all(path.read_text()))
    except yaml.YAMLError as err:
        raise RenderError(f"{path}: invalid YAML: {err}") from err
    for document in documents:
        if document is None:
            continue
        if not isinstance(document, dict) or "kind" not in document:
            raise RenderError(f"{path}: every document must be a Kubernetes object")
        _mark_unset_subject_namespaces(document)
        yield document


def _metadata_name(obj: dict[str, Any], path: Path) -> str:
    name = obj.get("metadata", {}).get("name")
    if not isinstance(name, str) or not name:
        raise RenderError(f"{path}: {obj.get('kind')} without metadata.name")
    return name


def _mark_unset_subject_namespaces(obj: dict[str, Any]) -> None:
    if obj.get("kind") not in ("RoleBinding", "ClusterRoleBinding"):
        return
    for subject in obj.get("subjects") or []:
        if subject.get("kind") == "ServiceAccount" and "namespace" not in subject:
            subject[_SUBJECT_NS_UNSET] = True


# --------------------------------------------------------------------------------------------
# Patches.


def _patches(
    directory: Path, data: dict[str, Any], path: Path
) -> Iterator[tuple[dict[str, Any], dict[str, Any] | None]]:
    for entry in _list(data, "patches", path):
        if not isinstance(entry, dict) or not ({"path", "patch"} & set(entry)):
            raise RenderError(f"{path}: a patches entry needs path or patch, got {entry!r}")
        unknown = sorted(set(entry) - {"path", "patch", "target"})
        if unknown:
            raise RenderError(f"{path}: unsupported patches option(s) {', '.join(unknown)}")
        text = (_local(directory, entry["path"], path).read_text() if "path" in entry
                else str(entry["patch"]))
        yield _parse_patch(text, path), entry.get("target")
    for entry in _string_list(data, "patchesStrategicMerge", path):
        yield _parse_patch(_local(directory, entry, path).read_text(), path), None


def _parse_patch(text: str, path: Path) -> dict[str, Any]:
    patch = yaml.safe_load(text)
    if not isinstance(patch, dict) or "kind" not in patch:
        # A list is a JSON 6902 patch: not used here, so refused.
        raise RenderError(f"{path}: only strategic-merge patches (one object) are supported")
    return patch


def _matches(resource: Resource, patch: dict[str, Any], target: dict[str, Any] | None) -> bool:
    if target is not None:
        unknown = sorted(set(target) - {"kind", "name", "group", "version"})
        if unknown:
            raise RenderError(f"unsupported patch target field(s) {', '.join(unknown)}")
        return all(
            _target_field(resource, key) == value for key, value in target.items()
        )
    names = (resource.name, resource.original_name)
    patch_name = patch.get("metadata", {}).get("name")
    return (resource.kind == patch.get("kind") and patch_name in names
            and _group(resource.obj) == _group(patch))


def _target_field(resource: Resource, key: str) -> str:
    api_version = str(resource.obj.get("apiVersion", ""))
    if key == "kind":
        return resource.kind
    if key == "name":
        return resource.original_name
    if key == "group":
        return _group(resource.obj)
    return api_version.rsplit("/", 1)[-1]


def _group(obj: dict[str, Any]) -> str:
    api_version = str(obj.get("apiVersion", ""))
    return api_version.rsplit("/", 1)[0] if "/" in api_version else ""


def _apply_patch(
    resources: list[Resource], patch: dict[str, Any], target: dict[str, Any] | None, path: Path
) -> None:
    matched = [r for r in resources if _matches(r, patch, target)]
    if not matched:
        described = target or {"kind": patch.get("kind"),
                               "name": patch.get("metadata", {}).get("name")}
        raise RenderError(f"{path}: patch matches no resource: {described}")
    for resource in matched:
        body = copy.deepcopy(patch)
        if target is not None:
            # A targeted patch may name another object; the target decides, not its metadata.
            body.pop("metadata", None)
            body.pop("kind", None)
            body.pop("apiVersion", None)
        merged = strategic_merge(resource.obj, body)
        if not isinstance(merged, dict):
            raise RenderError(f"{path}: patch deletes {resource.kind}/{resource.name}")
        resource.obj = merged


def strategic_merge(original: Any, patch: Any, key: str = "") -> Any:
    """Strategic-merge ``patch`` into a copy of ``original`` (``key`` is the field name).

    Maps merge recursively, a null value deletes its key, ``$patch: replace`` replaces a map and
    ``$patch: delete`` removes a list element; lists in MERGE_KEYS merge by their key, other lists
    are replaced, as the Kubernetes API types declare.
    """
    if isinstance(patch, dict):
        directive = patch.get("$patch")
        body = {k: v for k, v in patch.items() if k != "$patch"}
        if directive == "replace" or not isinstance(original, dict):
            return copy.deepcopy(body)
        if directive not in (None, "merge"):
            raise RenderError(f"unsupported $patch directive {directive!r} in {key or 'object'}")
        result = copy.deepcopy(original)
        for field_name, value in body.items():
            if value is None:
                result.pop(field_name, None)
            elif field_name in result:
                result[field_name] = strategic_merge(result[field_name], value, field_name)
            else:
                result[field_name] = strategic_merge(None, value, field_name)
        return result
    if isinstance(patch, list) and isinstance(original, list) and key in MERGE_KEYS:
        return _merge_list(original, patch, MERGE_KEYS[key])
    if isinstance(patch, list):
        return [strategic_merge(None, item, key) for item in patch]
    return copy.deepcopy(patch)


def _merge_list(original: list[Any], patch: list[Any], merge_key: str) -> list[Any]:
    # kustomize's order: the patch's elements first (merged with their originals, in patch
    # order), then the original elements the patch does not mention, in their order.
    def key_of(item: Any) -> Any:
        if not isinstance(item, dict) or merge_key not in item:
            raise RenderError(f"list element {item!r} lacks its merge key {merge_key!r}")
        return item[merge_key]

    originals = {key_of(item): item for item in original}
    mentioned = {key_of(item) for item in patch}
    result: list[Any] = []
    for item in patch:
        if item.get("$patch") == "delete":
            continue
        base = originals.get(item[merge_key])
        result.append(strategic_merge(base, item))
    result.extend(copy.deepcopy(item) for item in original if key_of(item) not in mentioned)
    return result


# --------------------------------------------------------------------------------------------
# Images, names, namespaces.


def _pod_spec(obj: dict[str, Any]) -> dict[str, Any] | None:
    if obj.get("kind") in WORKLOAD_KINDS:
        spec = obj.get("spec", {}).get("template", {}).get("spec")
        return spec if isinstance(spec, dict) else None
    return None


def _containers(obj: dict[str, Any]) -> Iterator[dict[str, Any]]:
    spec = _pod_spec(obj)
    if spec is None:
        return
    for key in ("initContainers", "containers"):
        yield from spec.get(key) or []


def _image_name(image: str) -> str:
    without_digest = image.split("@", 1)[0]
    last = without_digest.rsplit("/", 1)[-1]
    if ":" in last:
        return without_digest[: len(without_digest) - len(last)] + last.split(":", 1)[0]
    return without_digest


def _set_image(resources: list[Resource], image: Any, path: Path) -> None:
    if not isinstance(image, dict) or "name" not in image:
        raise RenderError(f"{path}: an images entry needs a name, got {image!r}")
    unknown = sorted(set(image) - {"name", "newName", "newTag", "digest"})
    if unknown:
        raise RenderError(f"{path}: unsupported images option(s) {', '.join(unknown)}")
    for resource in resources:
        for container in _containers(resource.obj):
            current = str(container.get("image", ""))
            if _image_name(current) != image["name"]:
                continue
            name = str(image.get("newName", image["name"]))
            if "digest" in image:
                container["image"] = f"{name}@{image['digest']}"
            elif "newTag" in image:
                container["image"] = f"{name}:{image['newTag']}"
            else:
                container["image"] = name + current[len(_image_name(current)):]


def _rename(resources: list[Resource], prefix: str, suffix: str) -> None:
    renames = _Renames()
    for resource in resources:
        new = f"{prefix}{resource.name}{suffix}"
        renames.add(resource.kind, resource.name, new)
        resource.obj["metadata"]["name"] = new
    for resource in resources:
        _update_references(resource.obj, renames)


def _update_references(obj: dict[str, Any], renames: _Renames) -> None:
    spec = _pod_spec(obj)
    if spec is not None:
        if "serviceAccountName" in spec:
            spec["serviceAccountName"] = renames.get("ServiceAccount", spec["serviceAccountName"])
        for volume in spec.get("volumes") or []:
            if "configMap" in volume:
                volume["configMap"]["name"] = renames.get("ConfigMap", volume["configMap"]["name"])
            if "secret" in volume:
                volume["secret"]["secretName"] = renames.get(
                    "Secret", volume["secret"]["secretName"])
        for container in _containers(obj):
            _update_env_references(container, renames)
    if obj.get("kind") in ("RoleBinding", "ClusterRoleBinding"):
        role_ref = obj.get("roleRef", {})
        role_ref["name"] = renames.get(str(role_ref.get("kind")), role_ref.get("name", ""))
        for subject in obj.get("subjects") or []:
            if subject.get("kind") == "ServiceAccount":
                subject["name"] = renames.get("ServiceAccount", subject["name"])


def _update_env_references(container: dict[str, Any], renames: _Renames) -> None:
    for env in container.get("env") or []:
        ref = (env.get("valueFrom") or {}).get("configMapKeyRef")
        if ref is not None:
            ref["name"] = renames.get("ConfigMap", ref["name"])
    for source in container.get("envFrom") or []:
        ref = source.get("configMapRef")
        if ref is not None:
            ref["name"] = renames.get("ConfigMap", ref["name"])


def _set_namespace(resources: list[Resource], namespace: str) -> None:
    service_accounts = {r.name for r in resources if r.kind == "ServiceAccount"}
    for resource in resources:
        if resource.kind not in CLUSTER_SCOPED_KINDS:
            resource.obj.setdefault("metadata", {})["namespace"] = namespace
        for subject in resource.obj.get("subjects") or []:
            # Like kustomize, only subjects whose namespace no source file wrote follow the
            # kustomization's namespace, and only for ServiceAccounts defined here.
            if subject.get(_SUBJECT_NS_UNSET) and subject.get("name") in service_accounts:
                subject["namespace"] = namespace


def _strip_internal_marks(objects: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    result = copy.deepcopy(list(objects))
    for obj in result:
        for subject in obj.get("subjects") or []:
            subject.pop(_SUBJECT_NS_UNSET, None)
    return result


def main(argv: list[str] | None = None) -> int:
    """Print the rendered kustomization in the given directory (like ``kubectl kustomize``)."""
    parser = argparse.ArgumentParser(description="Render a kustomization offline.")
    parser.add_argument("directory", type=Path, help="directory holding kustomization.yaml")
    args = parser.parse_args(argv)
    try:
        objects = render(args.directory)
    except (RenderError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    sys.stdout.write(to_yaml(objects))
    return 0


if __name__ == "__main__":
    sys.exit(main())
