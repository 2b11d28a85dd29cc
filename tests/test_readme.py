"""The README's promises: its first lines give `make run` and `make test`, `make run` works, the
first install shows its progress, and the hand-run block runs as written and stops what it
started."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ACTIVATE = "make venv && . .venv/bin/activate"


def _first_code_block(text: str) -> list[str]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("```"))
    end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("```"))
    return lines[start + 1 : end]


def test_readme_opens_with_the_two_commands() -> None:
    block = _first_code_block((ROOT / "README.md").read_text())
    commands = [line.split("#")[0].strip() for line in block]
    assert commands[:2] == ["make run", "make test"]


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_run_exits_after_the_requested_time() -> None:
    venv = Path(sys.prefix)
    if not (venv / ".installed").exists():
        pytest.skip("tests are not running from the Makefile's virtualenv")
    result = subprocess.run(
        ["make", "-s", "run", f"VENV={venv}", "RUN_ARGS=--exit-after 1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "nvidia.com/gpu: 8 devices, 8 healthy" in out
    assert "[Allocate] nvidia.com/gpu" in out
    assert "nvidia.com/gpu.product=NVIDIA-A100-SXM4-40GB" in out


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_first_install_shows_pips_progress(tmp_path: Path) -> None:
    # The first `make run` / `make test` installs for a minute or more: it must not be silent.
    # Not through the parent make's flags (`make test` runs this): its -w would add lines.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    recipe = subprocess.run(["make", "--no-print-directory", "-n", "-B", "venv",
                             f"VENV={tmp_path / 'venv'}"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60, check=True).stdout
    lines = recipe.splitlines()
    assert lines[0].startswith("echo ") and "Setting up" in lines[0], lines
    (install,) = [line for line in lines if "pip install" in line and "-e" in line.split()]
    assert not {"-q", "--quiet", "-qq"} & set(install.split()), install


def hand_run_block(text: str) -> list[str]:
    """The lines of the README's "Running each piece by hand" block, activation line included."""
    lines = text.splitlines()
    start = lines.index(ACTIVATE)
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("```"))
    return lines[start:end]


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if entry.name.isdigit() and text.encode() in cmdline:
            found.append(int(entry.name))
    return found


def _inject_waits_for_its_socket(bin_dir: Path) -> bool:
    usage = subprocess.run([bin_dir / "fake-nvml", "inject", "--help"], capture_output=True,
                           text=True, timeout=60, check=False).stdout
    return "--wait" in usage


def test_hand_run_block_runs_as_written_and_stops_its_jobs(tmp_path: Path) -> None:
    bin_dir = Path(sys.prefix) / "bin"
    if not (bin_dir / "fake-nvml").exists():
        pytest.skip("the console scripts are not installed in this interpreter's environment")
    if not _inject_waits_for_its_socket(bin_dir):
        pytest.skip("`fake-nvml inject` does not wait for its control socket yet, so the block "
                    "races the plugin's start")
    block = hand_run_block((ROOT / "README.md").read_text())
    # Everything after the activation line, verbatim, with /tmp moved into this test's directory.
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    script = "set -euo pipefail\n" + "\n".join(block[1:]).replace("/tmp/", f"{scratch}/")
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    log = tmp_path / "output.log"
    with log.open("w") as output:
        # Output to a file, not a pipe: a job left running would hold a pipe open.
        shell = subprocess.Popen(["bash", "-c", script], cwd=ROOT, env=env, stdout=output,
                                 stderr=subprocess.STDOUT, start_new_session=True)
    try:
        shell.wait(timeout=120)
        left = _processes_mentioning(str(scratch))
    finally:
        with contextlib.suppress(ProcessLookupError):  # the session it started, if any is left
            os.killpg(shell.pid, signal.SIGKILL)
        shell.wait()
    out = log.read_text()
    assert shell.returncode == 0, out
    assert left == [], f"the block left {left} running:\n{out}"
    assert '{"delivered": 1}' in out  # the XID reached the plugin's fake NVML
    assert "[Allocate] nvidia.com/gpu" in out
    assert re.search(r"^nvidia.com/gpu.product +NVIDIA-A100-SXM4-40GB$", out, re.M), out
    assert sorted(p.name for p in scratch.iterdir()) == ["gfd-features"]  # $d and $c removed


def test_hand_run_block_stops_every_background_job() -> None:
    # Static, and so also where the block cannot run: each `&` job's PID is kept, killed and
    # waited for (Ctrl-C reaches only the foreground job).
    block = hand_run_block((ROOT / "README.md").read_text())
    text = "\n".join(line.split("#")[0] for line in block)
    started = re.findall(r"&\s*(\w+)=\$!", text)
    assert started and len(started) == len(re.findall(r"(?<!&)&(?!&)", text)), text
    kill = re.search(r"^kill ([$\w ]+);\s*wait ([$\w ]+)", text, re.M)
    assert kill is not None, text
    for name in started:
        assert f"${name}" in kill.group(1).split() and f"${name}" in kill.group(2).split(), name
