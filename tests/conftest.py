"""Shared fixtures: a fake NVML beneath pynvml, its sysfs tree, and snapshots read through it.

- ``fake_nvml(profile="dgx-a100", control_socket=None) -> FakeNvml``: installs a fake NVML for a
  profile (name, path or Profile); every fake is uninstalled at teardown, newest first.
- ``sysfs_root(profile_or_fake="dgx-a100") -> str``: writes ``sys/bus/pci/devices/<bus>/
  {numa_node,class,vendor,config}`` for the profile's GPUs under a fresh temporary directory
  and returns it.
- ``fake_snapshot(profile="dgx-a100") -> Snapshot``: installs the fake, writes sysfs, reads a
  Snapshot through ``gpus.nvml`` (the fake stays installed for the test).
- ``sockdir -> str``: a short, fresh /tmp directory for Unix sockets, removed at teardown.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from test_server_support import short_tmpdir

from gpus.fake import FakeNvml, Profile, install, load_profile, write_sysfs
from gpus.model import Snapshot
from gpus.nvml import Nvml

FakeFactory = Callable[..., FakeNvml]


@pytest.fixture
def sockdir() -> Iterator[str]:
    """A short temporary directory for Unix sockets (AF_UNIX paths are limited to 107 bytes)."""
    with short_tmpdir() as path:
        yield path


@pytest.fixture
def fake_nvml() -> Iterator[FakeFactory]:
    """Factory installing fake NVMLs; all are uninstalled at teardown (newest first)."""
    installed: list[FakeNvml] = []

    def factory(
        profile: str | Path | Profile = "dgx-a100", control_socket: str | None = None
    ) -> FakeNvml:
        fake = install(profile, control_socket=control_socket)
        installed.append(fake)
        return fake

    yield factory
    for fake in reversed(installed):
        fake.uninstall()


@pytest.fixture
def sysfs_root(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., str]:
    """Factory writing a profile's fake sysfs tree into a new temporary directory."""

    def factory(profile: str | Path | Profile | FakeNvml = "dgx-a100") -> str:
        if isinstance(profile, FakeNvml):
            loaded = profile.profile
        elif isinstance(profile, Profile):
            loaded = profile
        else:
            loaded = load_profile(profile)
        root = tmp_path_factory.mktemp("sysfs")
        write_sysfs(loaded, root)
        return str(root)

    return factory


@pytest.fixture
def fake_snapshot(
    fake_nvml: FakeFactory, sysfs_root: Callable[..., str]
) -> Callable[..., Snapshot]:
    """Factory: install a profile's fake and read a Snapshot (with sysfs) through gpus.nvml."""

    def factory(profile: str | Path | Profile = "dgx-a100") -> Snapshot:
        fake = fake_nvml(profile)
        root = sysfs_root(fake)
        with Nvml() as nvml:
            return nvml.read_snapshot(root)

    return factory
