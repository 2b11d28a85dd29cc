"""The plugin's MPS gate: served only once the resource's daemon is started and answers."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from deviceplugin.mpsgate import mps_gate
from gpus.config import SharingStrategy
from gpus.fake.mpscontrol import FAIL_ENV, inject, install_as
from gpus.model import GPU
from gpus.mps import MpsRoot
from gpus.resources import Device, Resource

NAME = "nvidia.com/gpu"


def resource(sharing: SharingStrategy) -> Resource:
    gpu = GPU(index=0, uuid="GPU-0", name="X", memory_bytes=1 << 30, compute_capability=(8, 0),
              architecture="ampere", brand="Nvidia", minor=0, pci_bus_id="00000000:01:00.0")
    devices = tuple(Device(id=f"GPU-0::{n}", uuid="GPU-0", gpu=gpu, replica=n) for n in range(2))
    return Resource(name=NAME, devices=devices, replicas=2, sharing=sharing)


def environ(tmp_path: Path) -> dict[str, str]:
    bindir = install_as(tmp_path / "bin").parent
    env = {k: v for k, v in os.environ.items() if k != FAIL_ENV}
    env["PATH"] = f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    return env


def test_gate_waits_for_started_then_for_an_answer(tmp_path: Path) -> None:
    root = MpsRoot(str(tmp_path / "mps"))
    env = environ(tmp_path)
    gate = mps_gate(root.path, env)
    mps = resource(SharingStrategy.MPS)
    # Not started: the marker names what is missing.
    assert gate(mps) == ("its MPS control daemon is not started and configured yet "
                         f"(no {root.started_file(NAME)})")
    # Started (marker present) and answering: served.
    root.control(NAME, environ=env).start_daemon()
    root.started_file(NAME).touch()
    assert gate(mps) is None
    # Dead since: NVIDIA's check fails, and says so.
    inject(root.pipe_dir(NAME), running=False)
    reason = gate(mps)
    assert reason is not None and reason.startswith(
        "its MPS control daemon does not answer: get_default_active_thread_percentage: ")


def test_gate_lets_other_resources_through(tmp_path: Path) -> None:
    gate = mps_gate(str(tmp_path / "mps"), environ(tmp_path))
    assert gate(resource(SharingStrategy.TIME_SLICING)) is None
    assert gate(dataclasses.replace(resource(SharingStrategy.NONE), replicas=1)) is None
