"""Fault injection: kubelet restarts, NVML faults, API server faults, config reloads."""
