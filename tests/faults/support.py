"""Helpers shared by the fault and fuzz tests (no tests here).

Every wait is bounded: event-driven where the code under test offers an event (mock kubelet
conditions, ListAndWatch streams, log records); :func:`wait_until` polls only for things that
have no event at all (file-descriptor and thread counts).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
from plugin_support import installed_fake, manager_of, monitor_of

from deviceplugin.main import DevicePlugin, replace_flags, replace_plugin_flags
from deviceplugin.server import advertised_state
from gpus.config import Config
from protos.deviceplugin.v1beta1 import api_pb2, api_pb2_grpc

TIMEOUT = 10.0
GPU = "nvidia.com/gpu"


def plugin_config(directory: str, profile: str = "dgx-a100", base: Config | None = None,
                  *, kubelet: bool = True, **plugin_flags: Any) -> Config:
    """``base`` (default Config()) on the fake ``profile``, everything under ``directory``."""
    config = replace_flags(base or Config(), nvml=f"fake:{profile}",
                           sysfs_root=os.path.join(directory, "root"))
    flags: dict[str, Any] = {
        "kubelet_socket": os.path.join(directory, "kubelet.sock") if kubelet else "",
        "cdi_spec_dir": os.path.join(directory, "cdi"),
        "health_recovery_interval": 0.02,
        "health_quiet_period": 0.1,
    }
    flags.update(plugin_flags)
    return replace_plugin_flags(config, **flags)


def start_plugin(config: Config, *, socket_dir: str = "", poll_interval: float = 0.01,
                 **kwargs: Any) -> DevicePlugin:
    """A started DevicePlugin on its fake backend, with the fake's sysfs tree written."""
    plugin = DevicePlugin(config, {}, socket_dir=socket_dir, poll_interval=poll_interval,
                          **kwargs)
    controller = installed_fake(plugin.select_backend())
    controller.write_sysfs(Path(config.flags.sysfs_root))
    try:
        plugin.start()
    except BaseException:
        plugin.close()
        raise
    return plugin


def run_main_while(run_main: Callable[[], int], operate: Callable[[], None],
                   outcome: dict[str, Any]) -> int:
    """Run ``run_main`` here (signals reach only the main thread) while ``operate`` drives it
    from another thread; SIGTERM then ends it. What ``operate`` raises goes to
    ``outcome["error"]``, for the test thread to report. Returns ``run_main``'s exit status."""

    def operator() -> None:
        try:
            operate()
        except BaseException as err:  # reported by the test thread
            outcome["error"] = err
        finally:
            os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=operator)
    thread.start()
    code = run_main()
    thread.join(TIMEOUT)
    return code


def served_state(plugin: DevicePlugin) -> dict[str, Any]:
    """Everything a request could change: each served resource's visible list, health marks."""
    state: dict[str, Any] = {
        server.name: advertised_state(server.resource) for server in manager_of(plugin).servers()
    }
    state["<unhealthy>"] = monitor_of(plugin).unhealthy if plugin.health is not None else None
    return state


def watch_until(socket_path: str, predicate: Callable[[api_pb2.ListAndWatchResponse], bool],
                timeout: float = TIMEOUT) -> api_pb2.ListAndWatchResponse:
    """Follow a plugin's ListAndWatch until a response satisfies ``predicate`` (bounded)."""
    with grpc.insecure_channel(f"unix:{socket_path}") as channel:
        stream = api_pb2_grpc.DevicePluginStub(channel).ListAndWatch(
            api_pb2.Empty(), timeout=timeout)
        response: api_pb2.ListAndWatchResponse
        try:
            for response in stream:
                if predicate(response):
                    return response
        finally:
            stream.cancel()
    raise AssertionError(f"ListAndWatch on {socket_path} ended without a matching list")


class LogWatcher(logging.Handler):
    """Collects log records; :meth:`wait_for` blocks (bounded) until one contains a text."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self._cond = threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        with self._cond:
            self.records.append(record)
            self._cond.notify_all()

    def messages(self, level: int = logging.DEBUG) -> list[str]:
        """Messages at ``level`` or above so far."""
        with self._cond:
            return [r.getMessage() for r in self.records if r.levelno >= level]

    def wait_for(self, text: str, timeout: float = TIMEOUT, count: int = 1) -> bool:
        """Wait until ``count`` messages contain ``text``."""
        with self._cond:
            return self._cond.wait_for(
                lambda: sum(text in r.getMessage() for r in self.records) >= count, timeout)


@contextmanager
def watching_logs(*names: str) -> Iterator[LogWatcher]:
    """A LogWatcher on the named loggers (DEBUG and up) for the duration of the block."""
    watcher = LogWatcher()
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(watcher)
        logger.setLevel(logging.DEBUG)
    try:
        yield watcher
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.removeHandler(watcher)
            logger.setLevel(level)


_AUTO_NAME = re.compile(r"^Thread-\d+ ")
_WORKER = re.compile(r"^(?P<pool>.+)_(?P<index>\d+)$")


def thread_kinds(names: list[str]) -> tuple[Counter[str], list[str]]:
    """Threads by kind (auto-numbering dropped) and thread-pool workers seen twice.

    A pool's workers are ``<prefix>_<n>``; how many a pool has started depends on how calls
    overlapped, so pools are compared by prefix only. A pool that outlived its server (a leak)
    shows as a second ``<prefix>_0`` beside the new one's.
    """
    kinds: Counter[str] = Counter()
    seen: set[str] = set()
    duplicates: list[str] = []
    for name in names:
        worker = _WORKER.match(name)
        if worker is not None:
            kinds[worker["pool"] + "_*"] = 1
            if name in seen:
                duplicates.append(name)
            seen.add(name)
        else:
            kinds[_AUTO_NAME.sub("Thread-* ", name)] += 1
    return kinds, duplicates


@dataclasses.dataclass(frozen=True)
class Resources:
    """What a leak would grow: open descriptors, Python threads, files in the socket dir."""

    fds: int
    threads: Counter[str]
    duplicate_workers: tuple[str, ...]
    files: tuple[str, ...]

    @classmethod
    def count(cls, directory: str) -> Resources:
        """Count them now."""
        kinds, duplicates = thread_kinds([t.name for t in threading.enumerate()])
        return cls(
            fds=len(os.listdir("/proc/self/fd")),
            threads=kinds,
            duplicate_workers=tuple(duplicates),
            files=tuple(sorted(os.listdir(directory))),
        )


def wait_until(predicate: Callable[[], bool], timeout: float = TIMEOUT,
               interval: float = 0.01) -> bool:
    """Poll ``predicate`` until true or ``timeout``: only for states that raise no event
    (descriptor and thread counts settle as gRPC closes connections in the background)."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        pause.wait(interval)
    return True
