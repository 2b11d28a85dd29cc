"""exporter.series: names, types, label order and pod attribution, as pure functions."""

from __future__ import annotations

from types import MappingProxyType

from test_exporter_attribution import G0, G1, MIG_A, snapshot

from exporter.attribution import Attribution, DeviceKey, PodRef
from exporter.fields import DEFAULT_COLLECTORS
from exporter.pods import PodOwner, parse_cgroup, parse_log_name
from exporter.series import (
    MAX_LABELS,
    Family,
    Inputs,
    SeriesOptions,
    build_families,
    cardinality,
)
from exporter.xid import XidView
from gpus.telemetry import DeviceSample, ProcessSample, Sample

RES = "nvidia.com/gpu.shared"
HOST = SeriesOptions(hostname="gpu-node-1")


def sample(*devices: DeviceSample) -> Sample:
    return Sample(0.0, 0.001, devices)


def gpu0(**values: object) -> DeviceSample:
    return DeviceSample(uuid=G0, gpu_uuid=G0, **values)  # type: ignore[arg-type]  # fields a test names


def families(inputs: Inputs, options: SeriesOptions = HOST) -> dict[str, Family]:
    return {f.name: f for f in build_families(inputs, DEFAULT_COLLECTORS, options)}


def inputs(*devices: DeviceSample, pods: dict[DeviceKey, tuple[PodRef, ...]] | None = None,
           owners: dict[int, PodOwner] | None = None, xids: XidView | None = None) -> Inputs:
    return Inputs(snapshot(), sample(*devices), Attribution(MappingProxyType(pods or {})),
                  owners or {}, xids)


def test_label_names_and_order_are_dcgm_exporters() -> None:
    fams = families(inputs(gpu0(gpu_util=87, power_w=312.457)))
    util = fams["DCGM_FI_DEV_GPU_UTIL"]
    assert (util.type, util.help) == ("gauge", "GPU utilization (in %).")
    (series,) = util.series
    assert [k for k, _ in series.labels] == [
        "gpu", "UUID", "pci_bus_id", "device", "modelName", "Hostname", "DCGM_FI_DRIVER_VERSION"]
    labels = dict(series.labels)
    assert labels["UUID"] == G0 and labels["device"] == "nvidia0"
    assert labels["DCGM_FI_DRIVER_VERSION"] == "570.124.06" and series.value == 87
    assert fams["DCGM_FI_DEV_POWER_USAGE"].help == "Power draw (in W)."
    assert fams["DCGM_FI_DEV_POWER_USAGE"].value_format.value == "float"


def test_unsupported_values_are_omitted_not_zero() -> None:
    fams = families(inputs(gpu0(gpu_util=5)))
    assert "DCGM_FI_DEV_MEMORY_TEMP" not in fams and "DCGM_FI_PROF_GR_ENGINE_ACTIVE" not in fams
    assert "DCGM_FI_DEV_XID_ERRORS" not in fams  # no XID yet


def test_a_lost_gpu_has_no_series() -> None:
    fams = families(inputs(gpu0(gpu_util=5)))
    assert all(dict(s.labels)["UUID"] == G0 for f in fams.values() for s in f.series)


def test_mig_series_carry_instance_labels_and_pods() -> None:
    mig = DeviceSample(uuid=MIG_A, gpu_uuid=G1, gpu_instance_id=1, fb_used_mib=100)
    ref = PodRef("ml", "job", "main", "nvidia.com/mig-3g.20gb")
    fams = families(inputs(gpu0(), DeviceSample(uuid=G1, gpu_uuid=G1, fb_used_mib=5), mig,
                           pods={DeviceKey(G1, 1): (ref,)}))
    series = [s for s in fams["DCGM_FI_DEV_FB_USED"].series if ("GPU_I_ID", "1") in s.labels]
    (one,) = series
    assert [k for k, _ in one.labels] == [
        "gpu", "UUID", "pci_bus_id", "device", "modelName", "GPU_I_PROFILE", "GPU_I_ID",
        "Hostname", "DCGM_FI_DRIVER_VERSION", "container", "namespace", "pod"]
    assert dict(one.labels)["UUID"] == G1 and dict(one.labels)["pod"] == "job"


def test_one_holder_gets_plain_pod_labels() -> None:
    ref = PodRef("ml", "job-0", "trainer", "nvidia.com/gpu")
    fams = families(inputs(gpu0(gpu_util=87), pods={DeviceKey(G0): (ref,)}))
    (series,) = fams["DCGM_FI_DEV_GPU_UTIL"].series
    assert series.labels[-3:] == (("container", "trainer"), ("namespace", "ml"), ("pod", "job-0"))


def test_shared_gpu_splits_per_process_values_per_pod() -> None:
    a, b = PodRef("ns", "a", "c", RES), PodRef("ns", "b", "c", RES)
    procs = (ProcessSample(10, 1000, 30), ProcessSample(11, 500, 5), ProcessSample(20, 200, 10))
    owners = {10: PodOwner("ns", "a", "c"), 11: PodOwner("ns", "a", "c"),
              20: PodOwner("ns", "b", "c")}
    fams = families(inputs(gpu0(gpu_util=45, fb_used_mib=1700, gpu_temp_c=60, processes=procs),
                           pods={DeviceKey(G0): (a, b)}, owners=owners))
    used = {dict(s.labels)["pod"]: (s.value, dict(s.labels).get("shared"))
            for s in fams["DCGM_FI_DEV_FB_USED"].series}
    assert used == {"a": (1500, None), "b": (200, None)}
    util = {dict(s.labels)["pod"]: s.value for s in fams["DCGM_FI_DEV_GPU_UTIL"].series}
    assert util == {"a": 35, "b": 10}
    temps = fams["DCGM_FI_DEV_GPU_TEMP"].series
    assert [(dict(s.labels)["pod"], dict(s.labels)["shared"], s.value) for s in temps] == [
        ("a", "true", 60), ("b", "true", 60)]


def test_shared_gpu_with_an_unmapped_process_marks_copies() -> None:
    a, b = PodRef("ns", "a", "c", RES), PodRef("ns", "b", "c", RES)
    fams = families(inputs(gpu0(fb_used_mib=700, processes=(ProcessSample(10, 700, 3),)),
                           pods={DeviceKey(G0): (a, b)}, owners={}))
    assert [(dict(s.labels)["shared"], s.value) for s in fams["DCGM_FI_DEV_FB_USED"].series] == [
        ("true", 700), ("true", 700)]


def test_flags_shape_labels() -> None:
    ref = PodRef("ml", "job", "main", "nvidia.com/gpu")
    options = SeriesOptions(hostname=None, replace_blanks_in_model_name=True,
                            use_old_namespace=True)
    fams = families(inputs(gpu0(gpu_util=1), pods={DeviceKey(G0): (ref,)}), options)
    (series,) = fams["DCGM_FI_DEV_GPU_UTIL"].series
    names = [k for k, _ in series.labels]
    assert "Hostname" not in names and names[1] == "uuid"
    assert names[-3:] == ["container_name", "pod_name", "pod_namespace"]
    assert " " not in dict(series.labels)["modelName"]


def test_xid_last_and_windowed_count() -> None:
    from exporter.fields import FIELDS_BY_NAME, Collector

    rows = (*DEFAULT_COLLECTORS, Collector(FIELDS_BY_NAME["DCGM_EXP_XID_ERRORS_COUNT"],
                                           FIELDS_BY_NAME["DCGM_EXP_XID_ERRORS_COUNT"].prom_type,
                                           "XIDs"))
    xids = XidView({DeviceKey(G0): 79}, {DeviceKey(G0): {79: 2, 13: 1}}, 300000)
    fams = {f.name: f for f in build_families(
        inputs(gpu0(), DeviceSample(uuid=G1, gpu_uuid=G1), xids=xids), rows, HOST)}
    (last,) = fams["DCGM_FI_DEV_XID_ERRORS"].series
    assert last.labels[-2:] == (("err_code", "79"), ("err_msg", "GPU has fallen off the bus"))
    counts = [(dict(s.labels)["UUID"], dict(s.labels).get("xid"), s.value)
              for s in fams["DCGM_EXP_XID_ERRORS_COUNT"].series]
    assert counts == [(G0, "13", 1), (G0, "79", 2), (G1, None, 0)]
    assert all(dict(s.labels)["window_size_in_ms"] == "300000"
               for s in fams["DCGM_EXP_XID_ERRORS_COUNT"].series)


def test_labels_per_series_stay_under_the_limit() -> None:
    ref = PodRef("ns", "a", "c", RES)
    fams = build_families(inputs(gpu0(gpu_util=1, power_w=1.0), pods={DeviceKey(G0): (ref, ref)}),
                          DEFAULT_COLLECTORS, HOST)
    per_gpu, widest = cardinality(fams)
    assert widest < MAX_LABELS and per_gpu[G0] >= 2


def test_cgroup_paths_of_every_runtime() -> None:
    cid = "a" * 64
    uid = "12345678-1234-1234-1234-123456789abc"
    cases = [
        f"12:memory:/kubepods/burstable/pod{uid}/{cid}",
        f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod"
        f"{uid.replace('-', '_')}.slice/cri-containerd-{cid}.scope",
        f"0::/kubepods.slice/kubepods-pod{uid.replace('-', '_')}.slice/crio-{cid}.scope",
        f"0::/kubepods.slice/kubepods-pod{uid.replace('-', '_')}.slice/docker-{cid}.scope",
    ]
    for text in cases:
        ids = parse_cgroup("1:name=systemd:/user.slice\n" + text + "\n")
        assert (ids.pod_uid, ids.container_id) == (uid, cid), text
    assert parse_cgroup("0::/user.slice/session-1.scope\n").pod_uid is None
    assert parse_log_name(f"job-0_ml_trainer-{cid}.log") == (cid, PodOwner("ml", "job-0",
                                                                            "trainer"))
    assert parse_log_name("random.log") is None


def test_xid_counts_leave_the_window_but_the_last_xid_stays() -> None:
    from exporter.xid import XidTracker

    now = [100.0]
    tracker = XidTracker(window_ms=10_000, clock=lambda: now[0])
    key = DeviceKey(G0)
    tracker.record(key, 79)
    now[0] += 5
    tracker.record(key, 79)
    tracker.record(key, 13)
    assert tracker.view().counts == {key: {79: 2, 13: 1}}
    now[0] += 6  # the first 79 is 11 s old
    assert tracker.view().counts == {key: {79: 1, 13: 1}}
    now[0] += 10
    view = tracker.view()
    assert view.counts == {} and view.last == {key: 13}


def test_device_name_gpu_ids_resolve_by_index() -> None:
    import pytest

    from exporter.service import gpu_id_resolver

    snap = snapshot()
    resolve = gpu_id_resolver(snap, "device-name")
    gpu1 = snap.gpus[1]
    assert resolve(f"nvidia{gpu1.index}") == DeviceKey(gpu1.uuid)
    assert resolve(G0) == DeviceKey(G0) and resolve("nvidia99") is None
    assert gpu_id_resolver(snap, "uid")(f"nvidia{gpu1.index}") is None
    with pytest.raises(ValueError, match="uid or device-name"):
        gpu_id_resolver(snap, "bogus")


def test_device_label_is_nvidia_and_the_gpu_index_not_the_minor() -> None:
    import dataclasses

    snap = snapshot()
    permuted = dataclasses.replace(snap, gpus=(dataclasses.replace(snap.gpus[0], minor=5),
                                               snap.gpus[1]))
    fams = {f.name: f for f in build_families(
        Inputs(permuted, sample(gpu0(gpu_util=1)), Attribution(), {}), DEFAULT_COLLECTORS, HOST)}
    (series,) = fams["DCGM_FI_DEV_GPU_UTIL"].series
    assert dict(series.labels)["device"] == "nvidia0"
