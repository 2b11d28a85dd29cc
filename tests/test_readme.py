"""The README's promise: its first lines give `make run` and `make test`, and `make run` works."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


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
