"""``--version`` for every console script: the package version, the git commit where known,
and the Python and grpcio versions (what a bug report needs).

The commit comes from, in order: the file ``GIT_COMMIT`` next to this module (an image build
writes it; a checkout has none), then ``git rev-parse HEAD`` when the package is run from a
git checkout, else ``unknown``. Nothing here may fail: a version query must always answer.
The text is built only when ``--version`` is given, so start-up pays nothing for it.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DISTRIBUTION = "nvidia-k8s-py"
COMMIT_FILE = Path(__file__).with_name("GIT_COMMIT")
UNKNOWN = "unknown"
_GIT_TIMEOUT_S = 2.0


def package_version() -> str:
    """The installed distribution's version, or ``unknown`` when it is not installed."""
    from importlib import metadata  # ~5 ms; only --version needs it, not every start

    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return UNKNOWN


def git_commit(commit_file: Path = COMMIT_FILE, checkout: Path | None = None) -> str:
    """The commit this code was built from (see the module docstring); never raises."""
    try:
        text = commit_file.read_text(encoding="utf-8").strip()
        if text:
            return text
    except (OSError, UnicodeDecodeError):
        pass  # no build-time file: try the checkout
    root = checkout if checkout is not None else Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return UNKNOWN
    try:
        done = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], check=False,
                              capture_output=True, text=True, timeout=_GIT_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError, ValueError):
        return UNKNOWN
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and commit else UNKNOWN


def grpcio_version() -> str:
    """grpcio's version, from its metadata (importing grpc is not needed to know it)."""
    from importlib import metadata  # ~5 ms: only --version, as in package_version()

    try:
        return metadata.version("grpcio")
    except metadata.PackageNotFoundError:
        return UNKNOWN


def version_text(prog: str) -> str:
    """One line: ``<prog> <version> (commit <sha>) Python <x.y.z> grpcio <v>``."""
    return (f"{prog} {package_version()} (commit {git_commit()}) "
            f"Python {platform.python_version()} grpcio {grpcio_version()}")


class _VersionAction(argparse.Action):
    """Like argparse's ``version`` action, but the text is built only when asked for."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 default: Any = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings=option_strings, dest=dest, default=default, nargs=0,
                         help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        print(version_text(parser.prog))  # stdout, as argparse's own version action
        parser.exit()


def add_version_flag(parser: argparse.ArgumentParser) -> None:
    """Give ``parser`` NVIDIA's ``--version`` (prints :func:`version_text`, exits 0)."""
    parser.add_argument("--version", action=_VersionAction,
                        help="print the version, git commit, Python and grpcio versions, and exit")
