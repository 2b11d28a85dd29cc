"""A fake ``nvidia-cuda-mps-control`` for tests and the simulated node.

It speaks the real program's interface as NVIDIA's device plugin uses it:

* ``-d``: start the control daemon "in the background" for ``CUDA_MPS_PIPE_DIRECTORY``
  (default ``/tmp/nvidia-mps``), creating that directory and ``CUDA_MPS_LOG_DIRECTORY``
  (default ``/var/log/nvidia-mps``) with a ``control.log``. A second ``-d`` on a running daemon
  fails, as the real one does.
* no argument: a client. Commands are read from stdin, one per line (the last line may lack
  its newline): ``set_default_active_thread_percentage N``,
  ``set_default_device_pinned_mem_limit <device> <limit>`` (``<n>[KMG]``),
  ``get_default_active_thread_percentage`` (prints e.g. ``25.0``),
  ``get_default_device_pinned_mem_limit <device>``, ``get_server_list``, ``quit``.
  Without a running daemon it fails.

No process stays behind: the "daemon" is a JSON state file in the pipe directory
(``fake-mps-state.json``), updated under a lock, recording what it was told (``commands``,
``active_thread_percentage``, ``pinned_mem_limits``, ``running``); every command is also
logged to ``control.log``. To make it fail: ``FAKE_MPS_CONTROL_FAIL`` (``all``, ``start``, or a
comma list of command names), or :func:`inject` a failure or a death into the state file.

``fake-mps-control --install-as DIR`` writes ``DIR/nvidia-cuda-mps-control``, a script running
this module with this Python, for PATH use.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import re
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

from gpus.runtime.version import add_version_flag

REAL_NAME = "nvidia-cuda-mps-control"
STATE_FILE = "fake-mps-state.json"
CONTROL_LOG = "control.log"
FAIL_ENV = "FAKE_MPS_CONTROL_FAIL"
DEFAULT_PIPE_DIR = "/tmp/nvidia-mps"
DEFAULT_LOG_DIR = "/var/log/nvidia-mps"
_LIMIT = re.compile(r"\d+(\.\d+)?[KMG]?")


class ControlFailure(Exception):
    """The command fails: message on stderr, exit status 1."""


def state_path(pipe_dir: str | Path) -> Path:
    """The fake daemon's state file for a pipe directory."""
    return Path(pipe_dir) / STATE_FILE


def read_state(pipe_dir: str | Path) -> dict[str, Any]:
    """What the fake daemon of ``pipe_dir`` was told ({} when it never started)."""
    path = state_path(pipe_dir)
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    return data


@contextlib.contextmanager
def _locked_state(pipe_dir: Path) -> Iterator[dict[str, Any]]:
    """The state, read and written back under an exclusive lock (concurrent clients)."""
    pipe_dir.mkdir(parents=True, exist_ok=True)
    with open(pipe_dir / (STATE_FILE + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        state = read_state(pipe_dir)
        yield state
        temp = state_path(pipe_dir).with_suffix(".tmp")
        temp.write_text(json.dumps(state, indent=1, sort_keys=True) + "\n")
        os.replace(temp, state_path(pipe_dir))


def inject(pipe_dir: str | Path, *, fail: Sequence[str] | None = None,
           running: bool | None = None) -> None:
    """For tests: make commands fail (``fail``: names, ``all``) or the daemon die
    (``running=False``: later clients find no daemon, as after a crash)."""
    with _locked_state(Path(pipe_dir)) as state:
        if fail is not None:
            state["fail"] = list(fail)
        if running is not None:
            state["running"] = running


def _log(state: dict[str, Any], text: str) -> None:
    log_dir = state.get("log_dir")
    if not log_dir:
        return
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    with open(Path(log_dir) / CONTROL_LOG, "a") as log:
        log.write(f"[{stamp} Control {state.get('pid', 0)}] {text}\n")


def _failing(state: dict[str, Any], environ: dict[str, str], name: str) -> bool:
    wanted = {part.strip() for part in environ.get(FAIL_ENV, "").split(",") if part.strip()}
    wanted |= set(state.get("fail", []))
    return "all" in wanted or name in wanted


def start_daemon(pipe_dir: Path, log_dir: Path, environ: dict[str, str]) -> None:
    """``-d``: create the directories and the control log; mark the daemon running."""
    with _locked_state(pipe_dir) as state:
        if _failing(state, environ, "start"):
            raise ControlFailure("fake MPS control daemon: start failed (injected)")
        if state.get("running"):
            raise ControlFailure("An instance of this daemon is already running")
        log_dir.mkdir(parents=True, exist_ok=True)
        state.update(running=True, pid=os.getpid(), log_dir=str(log_dir),
                     starts=state.get("starts", 0) + 1, active_thread_percentage=100.0,
                     pinned_mem_limits={})
        state.setdefault("commands", [])
        _log(state, f"Starting control daemon using socket {pipe_dir}/control")


def _command(state: dict[str, Any], words: list[str]) -> str:
    """One client command against a running daemon; its output."""
    name, args = words[0], words[1:]
    if name == "set_default_active_thread_percentage" and len(args) == 1:
        value = float(args[0])
        if not 0 < value <= 100:
            raise ControlFailure(f"Invalid active thread percentage {args[0]}")
        state["active_thread_percentage"] = value
        return ""
    if name == "get_default_active_thread_percentage" and not args:
        return f"{state.get('active_thread_percentage', 100.0):.1f}\n"
    if name == "set_default_device_pinned_mem_limit" and len(args) == 2:
        if not args[0].isdigit() or not _LIMIT.fullmatch(args[1]):
            raise ControlFailure(f"Invalid device or limit: {' '.join(args)}")
        state.setdefault("pinned_mem_limits", {})[args[0]] = args[1]
        return ""
    if name == "get_default_device_pinned_mem_limit" and len(args) == 1:
        return f"{state.get('pinned_mem_limits', {}).get(args[0], '0')}\n"
    if name == "get_server_list" and not args:
        return ""
    if name == "quit" and not args:
        state["running"] = False
        return ""
    raise ControlFailure(f"Unknown command: {' '.join(words)}")


def run_client(pipe_dir: Path, stdin: TextIO, stdout: TextIO,
               environ: dict[str, str]) -> None:
    """Client mode: each stdin line is a command for the daemon of ``pipe_dir``."""
    lines = [line.split() for line in stdin.read().splitlines() if line.strip()]
    with _locked_state(pipe_dir) as state:
        if not state.get("running"):
            raise ControlFailure(f"Cannot find MPS control daemon process (pipe {pipe_dir})")
        for words in lines:
            if _failing(state, environ, words[0]):
                _log(state, f"Cmd failed: {' '.join(words)} (injected)")
                raise ControlFailure(f"{words[0]}: failed (injected)")
            state["commands"].append(" ".join(words))
            _log(state, f"Cmd: {' '.join(words)}")
            stdout.write(_command(state, words))
            if words[0] == "quit":
                _log(state, "Exit")


def install_as(directory: str | Path) -> Path:
    """Write ``<directory>/nvidia-cuda-mps-control`` running this fake with this Python."""
    target = Path(directory) / REAL_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(f"#!/bin/sh\nexec {sys.executable} -m gpus.fake.mpscontrol \"$@\"\n")
    target.chmod(0o755)
    return target


def main(argv: Sequence[str] | None = None) -> int:
    """The fake ``nvidia-cuda-mps-control``; exit 0 on success, 1 with a message on failure."""
    parser = argparse.ArgumentParser(
        prog="fake-mps-control", description="A fake nvidia-cuda-mps-control (see "
        "gpus/fake/mpscontrol.py): -d starts the control daemon, else commands on stdin.")
    parser.add_argument("-d", dest="daemon", action="store_true",
                        help="start the control daemon for CUDA_MPS_PIPE_DIRECTORY")
    parser.add_argument("--install-as", metavar="DIR",
                        help=f"write DIR/{REAL_NAME} running this fake, and exit")
    add_version_flag(parser)
    args = parser.parse_args(argv)
    if args.install_as:
        print(install_as(args.install_as))
        return 0
    environ = dict(os.environ)
    pipe_dir = Path(environ.get("CUDA_MPS_PIPE_DIRECTORY") or DEFAULT_PIPE_DIR)
    log_dir = Path(environ.get("CUDA_MPS_LOG_DIRECTORY") or DEFAULT_LOG_DIR)
    try:
        if args.daemon:
            start_daemon(pipe_dir, log_dir, environ)
        else:
            run_client(pipe_dir, sys.stdin, sys.stdout, environ)
    except (ControlFailure, OSError, ValueError) as error:
        print(error, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
