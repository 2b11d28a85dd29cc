"""Shared helpers for the health monitor tests (no tests here)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

WAIT_S = 5.0  # generous upper bound for event waits; tests never sleep


class Changes:
    """Records on_change calls; lets a test wait for a given set."""

    def __init__(self) -> None:
        self.seen: list[frozenset[str]] = []
        self.cond = threading.Condition()

    def __call__(self, unhealthy: frozenset[str]) -> None:
        with self.cond:
            self.seen.append(unhealthy)
            self.cond.notify_all()

    def wait_for(self, expected: set[str]) -> None:
        """Wait until the latest change reported is ``expected``."""
        with self.cond:
            ok = self.cond.wait_for(lambda: bool(self.seen) and self.seen[-1] == expected, WAIT_S)
        assert ok, f"never saw {expected}; saw {self.seen}"


class Clock:
    """An injected monotonic clock that tests move by hand."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FailingOnce(Clock):
    """A clock whose next reading raises once ``fail`` is set (a probe pass that blows up)."""

    fail = False

    def __call__(self) -> float:
        if self.fail:
            self.fail = False
            raise RuntimeError("clock broke")
        return self.now


class LogWaiter(logging.Handler):
    """Collects log messages; :meth:`wait_for` blocks (bounded) until one contains a text.

    For events that leave no other trace, such as an XID on a device that is already unhealthy.
    """

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []
        self.cond = threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        with self.cond:
            self.messages.append(record.getMessage())
            self.cond.notify_all()

    def wait_for(self, text: str) -> bool:
        """Wait until a message contains ``text``; False after WAIT_S."""
        with self.cond:
            return self.cond.wait_for(lambda: any(text in m for m in self.messages), WAIT_S)


@contextmanager
def watching_log(name: str) -> Iterator[LogWaiter]:
    """A LogWaiter on logger ``name``, at DEBUG, for the duration of the block."""
    waiter = LogWaiter()
    logger = logging.getLogger(name)
    level = logger.level
    logger.addHandler(waiter)
    logger.setLevel(logging.DEBUG)
    try:
        yield waiter
    finally:
        logger.removeHandler(waiter)
        logger.setLevel(level)
