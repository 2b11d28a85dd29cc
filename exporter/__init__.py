"""gpu-metrics-exporter: dcgm-exporter-compatible GPU metrics from NVML, with pod attribution.

- :mod:`exporter.fields`: the collectors CSV and the table of known fields;
- :mod:`exporter.attribution`: devices to pods through the kubelet's PodResources API;
- :mod:`exporter.pods`: GPU processes to pods (cgroup paths and the kubelet's log names);
- :mod:`exporter.xid`: the XID event listener, last XID and windowed counts;
- :mod:`exporter.series`: pure functions from a sample and a mapping to metric families;
- :mod:`exporter.collector`: the sampler thread and the prometheus_client collector;
- :mod:`exporter.http`: /metrics (text and OpenMetrics) and /health, TLS web config;
- :mod:`exporter.service`: :func:`~exporter.service.build_exporter` assembles them.

NVML telemetry itself is read by :mod:`gpus.telemetry`. What is exported: docs/metrics.md.
"""
