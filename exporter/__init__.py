"""gpu-metrics-exporter: dcgm-exporter-compatible GPU metrics from NVML, with pod attribution.

Phase 1 holds the parts that need neither NVML telemetry nor the daemon runtime:
:mod:`exporter.fields` (the collectors CSV and the table of known fields) and
:mod:`exporter.attribution` (devices to pods through the kubelet's PodResources API).
"""
