"""The bounds a machine profile is validated against: sizes, counts, ids and NVML's C types."""

from __future__ import annotations

from gpus.model import MIB

# Limits: a profile is data from outside (a ConfigMap, a path on the command line), and the
# fake turns it into NVML answers and O(GPUs^2) topology matrices, so everything is bounded.
# The shipped profiles are at most a few KiB.
MAX_PROFILE_BYTES = 1 << 20
# Real nodes have at most a few dozen GPUs (16 on an HGX-16, 72 per NVL72 rack across 18 nodes).
MAX_GPUS = 64
# GPU instance profiles go up to 8 slices (NVML_GPU_INSTANCE_PROFILE_8_SLICE): at most 8 compute
# slices, so at most 8 MIG devices per GPU.
MAX_MIG_SLICES = 8
# GPU instance ids the driver's mig-minors file has slots for (gpu<g>/gi0..gi14).
MAX_GPU_INSTANCE_ID = 14
# /dev/nvidia<minor>: the driver numbers GPUs 0..254; minor 255 is /dev/nvidiactl.
MAX_MINOR = 254
MAX_NUMA_NODE = 1023  # Linux's MAX_NUMNODES at its largest (CONFIG_NODES_SHIFT=10)
MAX_EXTENDS_DEPTH = 8
# The C types NVML reports values in.
C_INT_MAX = (1 << 31) - 1
C_UINT_MAX = (1 << 32) - 1
C_ULLONG_MAX = (1 << 64) - 1
# Buffer sizes of the string calls (NUL included), as pynvml allocates them.
DRIVER_VERSION_BUFFER = 80  # NVML_SYSTEM_DRIVER_VERSION_BUFFER_SIZE (NVML version too)
NAME_BUFFER = 96  # NVML_DEVICE_NAME_V2_BUFFER_SIZE (GPU instance profile names too)
UUID_BUFFER = 96  # NVML_DEVICE_UUID_V2_BUFFER_SIZE
NVLINK_MAX_LINKS = 18  # NVML_NVLINK_MAX_LINKS of the NVML the shipped driver versions carry

ENGINE_FIELDS = ("copy_engines", "decoders", "encoders", "jpeg", "ofa")
# (low, high, what NVML reports the value as) for FieldReader.get_int.
C_INT_BOUNDS = (0, C_INT_MAX, "NVML reports it as an int")
C_UINT_BOUNDS = (0, C_UINT_MAX, "NVML reports it as an unsigned int")
PCI_CLASS_BOUNDS = (0, 0xFFFFFF, "a 24-bit PCI class code")
NVLINK_BOUNDS = (0, NVLINK_MAX_LINKS, "NVML_NVLINK_MAX_LINKS")
MIG_SLICE_BOUNDS = (0, MAX_MIG_SLICES, "GPU instance profiles have at most 8 slices")
GI_ID_BOUNDS = (0, MAX_GPU_INSTANCE_ID, "the driver's GPU instance ids")
MINOR_BOUNDS = (0, MAX_MINOR, "/dev/nvidia<minor>; 255 is nvidiactl")
NUMA_BOUNDS = (-C_INT_MAX - 1, MAX_NUMA_NODE, "Linux NUMA node ids; negative is none")
MIG_PROFILE_BOUNDS = {
    "id": C_UINT_BOUNDS,
    "slices": (1, MAX_MIG_SLICES, "GPU instance profiles have 1..8 slices"),
    "instances": (1, MAX_MIG_SLICES, "at most one instance per slice"),
    "memory_mib": (1, C_ULLONG_MAX // MIB, "NVML reports bytes as an unsigned long long"),
    "multiprocessors": C_UINT_BOUNDS,
    **{k: C_UINT_BOUNDS for k in ENGINE_FIELDS},
}
