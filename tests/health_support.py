"""Shared helpers for the health monitor tests (no tests here)."""

from __future__ import annotations

import threading

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
