"""The exporter's manifests (daemonset/exporter and its hpa-example): rendering, schemas, wiring.

Rendered with ``kubectl kustomize`` through test_manifests' helpers (skip without kubectl, fail
under CI). Core objects are validated strictly with kubernetes-validate; the Prometheus
operator's ServiceMonitor and PrometheusRule against the operator's published CRD schemas,
vendored in tests/data/prometheus-operator (README there: version, licence, what the
ServiceMonitor excerpt leaves out). The PrometheusRule's groups go through ``promtool check
rules`` and the unit tests in tests/data/promtool (every alert fires on an injected fault and
stays quiet otherwise); without promtool those tests skip, under CI they fail.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from test_manifests import (
    CPU_NODE,
    EXPORTER_KUSTOMIZATIONS,
    REAL_NFD_NODE,
    REAL_OPERATOR_NODE,
    SCHEMA_VERSIONS,
    SIM_NODE,
    container,
    env_values,
    in_ci,
    mount_source,
    only,
    project_version,
    rendered,
    schedulable,
)

from exporter.fields import DEFAULT_COLLECTORS, FIELDS_BY_NAME

REPO = Path(__file__).resolve().parent.parent
EXPORTER, HPA_EXAMPLE = EXPORTER_KUSTOMIZATIONS
CRDS = REPO / "tests" / "data" / "prometheus-operator"
PROMTOOL_TESTS = REPO / "tests" / "data" / "promtool" / "gpu-alerts.test.yaml"
NAME = "gpu-metrics-exporter"
OPERATOR_GROUP = "monitoring.coreos.com/v1"
# The exporter's own series the alerts and panels may use besides the DCGM fields.
OWN_SERIES = {"gpu_exporter_gpu_lost", "gpu_exporter_sample_age_seconds", "up"}
# Resident set size measured for the exporter (see the DaemonSet's resources comment).
MEASURED_RSS_MIB = 53

PROMTOOL_MISSING = ("promtool is not installed (Debian: apt-get install prometheus): the alert "
                    "rules are checked with `promtool check rules` and `promtool test rules`")


def promtool(environ: Mapping[str, str] | None = None) -> str:
    """promtool's path; skip without it, fail under CI (rules would go unchecked)."""
    environ = os.environ if environ is None else environ
    found = shutil.which("promtool", path=environ.get("PATH", os.defpath))
    if found is None:
        if in_ci(environ):
            pytest.fail(f"{PROMTOOL_MISSING}; CI is set, so this is an error, not a skip")
        pytest.skip(PROMTOOL_MISSING)
    return found


def objects(path: str = EXPORTER) -> list[dict[str, Any]]:
    return rendered(path)


def by_kind(path: str, kind: str) -> dict[str, Any]:
    return only(objects(path), kind)


def exporter_pod() -> dict[str, Any]:
    spec: dict[str, Any] = by_kind(EXPORTER, "DaemonSet")["spec"]["template"]["spec"]
    return spec


def is_custom(obj: Mapping[str, Any]) -> bool:
    return bool(obj["apiVersion"] == OPERATOR_GROUP)


# --------------------------------------------------------------------------------------------
# Rendering and schemas.


def test_renders_the_expected_objects() -> None:
    assert sorted(o["kind"] for o in objects()) == [
        "ConfigMap", "DaemonSet", "PrometheusRule", "Service", "ServiceMonitor"]
    assert {o["metadata"]["namespace"] for o in objects()} == {"kube-system"}
    assert sorted(o["kind"] for o in objects(HPA_EXAMPLE)) == [
        "ConfigMap", "Deployment", "HorizontalPodAutoscaler"]


@pytest.mark.parametrize("version", SCHEMA_VERSIONS)
@pytest.mark.parametrize("path", EXPORTER_KUSTOMIZATIONS)
def test_core_objects_validate_strictly(path: str, version: str) -> None:
    core = [o for o in objects(path) if not is_custom(o)]
    assert core
    for obj in core:
        kubernetes_validate.validate(obj, version, strict=True)


def strict(schema: Any) -> Any:
    """``schema`` with unknown properties refused wherever properties are listed (the API
    server's strict field validation; a CRD schema itself only prunes them)."""
    if isinstance(schema, dict):
        out = {key: strict(value) for key, value in schema.items()}
        if "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    return schema


def crd_schema(kind: str) -> dict[str, Any]:
    """The vendored openAPIV3Schema of the operator's ``kind``, made strict."""
    for path in sorted(CRDS.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        if crd["spec"]["names"]["kind"] == kind:
            (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
            schema: dict[str, Any] = strict(version["schema"]["openAPIV3Schema"])
            return schema
    raise AssertionError(f"no vendored CRD for {kind}")


def validate_custom(obj: Mapping[str, Any]) -> None:
    assert obj["apiVersion"] == OPERATOR_GROUP
    jsonschema.Draft7Validator(crd_schema(obj["kind"])).validate(obj)
    # metadata is `type: object` in every CRD (the API server checks it as ObjectMeta).
    assert set(obj["metadata"]) <= {"name", "namespace", "labels", "annotations"}
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", obj["metadata"]["name"])


@pytest.mark.parametrize("kind", ["ServiceMonitor", "PrometheusRule"])
def test_operator_objects_validate_against_the_published_crds(kind: str) -> None:
    validate_custom(by_kind(EXPORTER, kind))


@pytest.mark.parametrize(("kind", "spoil"), [
    ("ServiceMonitor", lambda o: o["spec"]["endpoints"][0].update(scrapeTimout="10s")),
    ("ServiceMonitor", lambda o: o["spec"]["endpoints"][0].update(interval="15 seconds")),
    ("ServiceMonitor", lambda o: o["spec"].pop("selector")),
    ("PrometheusRule", lambda o: o["spec"]["groups"][0]["rules"][0].update(fro="5m")),
    ("PrometheusRule", lambda o: o["spec"]["groups"][0]["rules"][1].update({"for": "5 min"})),
    ("PrometheusRule", lambda o: o["spec"]["groups"][0]["rules"][0].pop("expr")),
])
def test_crd_validation_refuses_a_broken_object(kind: str, spoil: Any) -> None:
    # Guards the test above: a misspelt field, a bad duration, a missing required field.
    obj = copy.deepcopy(by_kind(EXPORTER, kind))
    spoil(obj)
    with pytest.raises(jsonschema.ValidationError):
        validate_custom(obj)


# --------------------------------------------------------------------------------------------
# The DaemonSet.


def test_runs_the_exporter_with_pod_mapping_from_the_shared_image() -> None:
    ctr = container(exporter_pod(), NAME)
    assert ctr["command"] == ["gpu-metrics-exporter", "-k"]
    assert ctr["image"] == f"nvidia-k8s-py:{project_version()}"
    assert env_values(ctr, "node-a")["NODE_NAME"] == "node-a"  # the Hostname label
    assert env_values(ctr)["NVML_BACKEND"] == "real"
    assert ctr["ports"] == [{"name": "metrics", "containerPort": 9400, "protocol": "TCP"}]


def test_pod_resources_socket_is_mounted_read_only() -> None:
    spec = exporter_pod()
    ctr = container(spec, NAME)
    volume = mount_source(spec, ctr, "/var/lib/kubelet/pod-resources")
    assert volume["hostPath"]["path"] == "/var/lib/kubelet/pod-resources"
    mounts = {m["mountPath"]: m for m in ctr["volumeMounts"]}
    assert mounts["/var/lib/kubelet/pod-resources"]["readOnly"] is True
    # Every host path is read-only: the exporter writes nothing to the node.
    host = {v["name"] for v in spec["volumes"] if "hostPath" in v}
    assert all(m.get("readOnly") is True for m in mounts.values() if m["name"] in host)
    # Per-pod values on shared GPUs need host PIDs and the kubelet's container log links.
    assert spec["hostPID"] is True
    assert {"/var/log/containers", "/var/log/pods"} <= set(mounts)


def test_least_privilege() -> None:
    spec = exporter_pod()
    ctr = container(spec, NAME)
    sc = ctr["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert "privileged" not in sc
    # uid 0 only to connect to the kubelet's root-owned PodResources socket (the DaemonSet
    # explains); no capability, no token.
    assert spec["securityContext"]["runAsUser"] == 0
    assert spec["automountServiceAccountToken"] is False


def test_probes_ask_health() -> None:
    ctr = container(exporter_pod(), NAME)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert ctr[probe]["httpGet"] == {"path": "/health", "port": "metrics"}, probe
    # Liveness gives up only well after /health turns 503 (three collect intervals, 90 s at
    # the default), so one slow NVML read is not a restart.
    live = ctr["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] >= 90


def mebibytes(quantity: str) -> float:
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024}
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi)", quantity)
    assert match, quantity
    return int(match.group(1)) * units[match.group(2)]


def test_memory_from_the_measured_rss() -> None:
    ctr = container(exporter_pod(), NAME)
    resources = ctr["resources"]
    request = mebibytes(resources["requests"]["memory"])
    limit = mebibytes(resources["limits"]["memory"])
    assert MEASURED_RSS_MIB * 1.3 <= request <= MEASURED_RSS_MIB * 2
    assert limit >= 3 * MEASURED_RSS_MIB
    assert limit < 512  # dcgm-exporter's chart limit, which its users outgrow
    text = (REPO / "daemonset" / "exporter" / "daemonset.yaml").read_text()
    assert f"~{MEASURED_RSS_MIB} MiB RSS measured" in text


def test_runs_on_gpu_nodes_only() -> None:
    spec = exporter_pod()
    taint = [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]
    assert schedulable(spec, REAL_NFD_NODE, taint)
    assert schedulable(spec, REAL_OPERATOR_NODE, taint)
    assert not schedulable(spec, CPU_NODE)
    assert not schedulable(spec, SIM_NODE)


# --------------------------------------------------------------------------------------------
# Service, ServiceMonitor.


def test_service_and_servicemonitor_reach_the_pods() -> None:
    pod_labels = by_kind(EXPORTER, "DaemonSet")["spec"]["template"]["metadata"]["labels"]
    service = by_kind(EXPORTER, "Service")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    assert port == {"name": "metrics", "port": 9400, "targetPort": "metrics", "protocol": "TCP"}
    monitor = by_kind(EXPORTER, "ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"][
        "labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == port["name"] and endpoint["path"] == "/metrics"
    # The workload's pod/namespace labels survive; the exporter pod's own are dropped.
    assert endpoint["honorLabels"] is True
    drops = [r for r in endpoint["relabelings"] if r["action"] == "labeldrop"]
    assert [r["regex"] for r in drops] == ["(pod|namespace|container)"]
    assert duration_s(endpoint["scrapeTimeout"]) < duration_s(endpoint["interval"])


def duration_s(text: str) -> float:
    match = re.fullmatch(r"(\d+)(ms|s|m|h)", text)
    assert match, text
    return int(match.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[match.group(2)]


# --------------------------------------------------------------------------------------------
# PrometheusRule: promtool.


def rule_groups() -> dict[str, Any]:
    return {"groups": by_kind(EXPORTER, "PrometheusRule")["spec"]["groups"]}


def alerts() -> list[dict[str, Any]]:
    return [rule for group in rule_groups()["groups"] for rule in group["rules"]]


def run_promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, check=False)


def write_rules(tmp_path: Path, groups: Mapping[str, Any]) -> Path:
    shutil.copy(PROMTOOL_TESTS, tmp_path / PROMTOOL_TESTS.name)
    rules = tmp_path / "gpu-alerts.rules.yaml"
    rules.write_text(yaml.safe_dump(dict(groups)))
    return rules


def test_promtool_checks_the_rules(tmp_path: Path) -> None:
    rules = write_rules(tmp_path, rule_groups())
    done = run_promtool("check", "rules", rules.name, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in done.stdout


def test_every_alert_fires_on_its_fault_and_stays_quiet_otherwise(tmp_path: Path) -> None:
    write_rules(tmp_path, rule_groups())
    done = run_promtool("test", "rules", PROMTOOL_TESTS.name, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


def promtool_cases() -> Iterator[tuple[str, bool]]:
    """(alert name, whether the case expects it firing) for every case in the unit tests."""
    for test in yaml.safe_load(PROMTOOL_TESTS.read_text())["tests"]:
        for case in test["alert_rule_test"]:
            yield case["alertname"], bool(case["exp_alerts"])


def test_the_unit_tests_cover_every_alert_both_ways() -> None:
    cases = set(promtool_cases())
    for rule in alerts():
        assert (rule["alert"], True) in cases, f"{rule['alert']} never expected to fire"
        assert (rule["alert"], False) in cases, f"{rule['alert']} never expected quiet"


@pytest.mark.parametrize(("alert", "old", "new"), [
    ("GPUTemperatureHigh", "> 85", "> 95"),  # a threshold that misses the fault
    ("GPUTemperatureHigh", "> 85", "> 80"),  # one that fires on a healthy GPU
    ("GPUXidError", " offset 10m", ""),  # an alert that would never fire on the last XID
    ("GPURowRemapFailure", "> 0", ">= 0"),
    ("GPULost", "> 0", "< 0"),
    ("GPUMetricsStale", "> 120", "> 600"),
    ("GPUMetricsExporterDown", "== 0", "== 1"),
])
def test_the_unit_tests_catch_a_broken_rule(tmp_path: Path, alert: str, old: str,
                                             new: str) -> None:
    # Guards the promtool test: each alert's unit test fails when its rule is wrong.
    groups = rule_groups()
    (rule,) = [r for g in groups["groups"] for r in g["rules"] if r["alert"] == alert]
    assert old in rule["expr"]
    rule["expr"] = rule["expr"].replace(old, new)
    write_rules(tmp_path, groups)
    done = run_promtool("test", "rules", PROMTOOL_TESTS.name, cwd=tmp_path)
    assert done.returncode != 0 and alert in done.stdout + done.stderr


def test_promtool_missing_skips_locally_and_fails_in_ci(tmp_path: Path) -> None:
    empty = {"PATH": tmp_path.as_posix()}
    with pytest.raises(pytest.skip.Exception, match="promtool is not installed"):
        promtool(empty)
    with pytest.raises(pytest.fail.Exception, match="CI is set"):
        promtool({**empty, "CI": "true"})


def test_alerts_have_severity_and_text() -> None:
    for rule in alerts():
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


# --------------------------------------------------------------------------------------------
# Series names the rules, dashboard and adapter use exist.

SERIES_NAME = re.compile(r"\b(DCGM_(?:FI|EXP)_[A-Z0-9_]+|gpu_exporter_[a-z_]+|up)\b")


def known_series() -> set[str]:
    return set(FIELDS_BY_NAME) | OWN_SERIES


def test_rules_name_only_series_the_exporter_serves() -> None:
    used = {name for rule in alerts() for name in SERIES_NAME.findall(rule["expr"])}
    assert used and used <= known_series(), used - known_series()


def dashboard() -> dict[str, Any]:
    configmap = by_kind(EXPORTER, "ConfigMap")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    (text,) = configmap["data"].values()
    board: dict[str, Any] = json.loads(text)
    return board


def test_dashboard_has_dcgm_exporters_panels_and_per_pod_utilisation() -> None:
    board = dashboard()
    exprs = {panel["title"]: panel["targets"][0]["expr"] for panel in board["panels"]}
    sel = '{instance=~"$instance", gpu=~"$gpu"}'
    # dcgm-exporter's dashboard (grafana.com 12239): its panels and queries.
    for title, expr in {
        "GPU Temperature": f"DCGM_FI_DEV_GPU_TEMP{sel}",
        "GPU Avg. Temp": f"avg(DCGM_FI_DEV_GPU_TEMP{sel})",
        "GPU Power Usage": f"DCGM_FI_DEV_POWER_USAGE{sel}",
        "GPU Power Total": f"sum(DCGM_FI_DEV_POWER_USAGE{sel})",
        "GPU SM Clocks": f"DCGM_FI_DEV_SM_CLOCK{sel} * 1000000",
        "GPU Utilization": f"DCGM_FI_DEV_GPU_UTIL{sel}",
        "GPU Framebuffer Mem Used": f"DCGM_FI_DEV_FB_USED{sel}",
        "Tensor Core Utilization": f"DCGM_FI_PROF_PIPE_TENSOR_ACTIVE{sel}",
    }.items():
        assert exprs[title] == expr
    per_pod = exprs["GPU Utilization per Pod"]
    assert per_pod.startswith("sum by (namespace, pod) (DCGM_FI_DEV_GPU_UTIL{")
    assert 'shared!="true"' in per_pod  # copies of a shared device's value are not summed
    names = {v["name"] for v in board["templating"]["list"]}
    assert names == {"datasource", "instance", "gpu"}
    assert len({p["id"] for p in board["panels"]}) == len(board["panels"])
    used = {name for expr in exprs.values() for name in SERIES_NAME.findall(expr)}
    assert used <= {c.name for c in DEFAULT_COLLECTORS}


# --------------------------------------------------------------------------------------------
# prometheus-adapter rule and HPA.


def test_hpa_scales_the_deployment_on_the_adapters_metric() -> None:
    hpa = by_kind(HPA_EXAMPLE, "HorizontalPodAutoscaler")
    deployment = by_kind(HPA_EXAMPLE, "Deployment")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert hpa["metadata"]["namespace"] == deployment["metadata"]["namespace"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    config = yaml.safe_load(by_kind(HPA_EXAMPLE, "ConfigMap")["data"]["config.yaml"])
    (rule,) = config["rules"]
    assert rule["name"]["as"] == metric["pods"]["metric"]["name"]
    assert re.fullmatch(rule["name"]["matches"], "DCGM_FI_DEV_GPU_UTIL")
    assert rule["seriesQuery"].startswith("DCGM_FI_DEV_GPU_UTIL{")
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"},
                                              "pod": {"resource": "pod"}}
    assert 'shared!="true"' in rule["metricsQuery"]
    for placeholder in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"):
        assert placeholder in rule["metricsQuery"]
    limits = deployment["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == 1
