"""A fake NVML beneath the real ``pynvml`` binding, driven by machine profiles.

``install("dgx-a100")`` makes every pynvml call in this process answer as that machine would;
the returned :class:`FakeNvml` injects faults (XIDs, ECC errors, lost GPUs, failing calls).
"""

from gpus.fake.controller import FakeNvml, install, write_driver_root, write_sysfs
from gpus.fake.profile import Profile, ProfileError, list_profiles, load_profile
from gpus.fake.telemetry import FakeProcess

__all__ = [
    "FakeProcess",
    "FakeNvml",
    "Profile",
    "ProfileError",
    "install",
    "list_profiles",
    "load_profile",
    "write_driver_root",
    "write_sysfs",
]
