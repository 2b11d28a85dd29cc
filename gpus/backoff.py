"""Capped exponential backoff, shared by every retry loop (kubelet registration, NVML event
waits, Node patches) so they all grow, cap and reset the same way."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(kw_only=True)
class Backoff:
    """Delays of ``initial``, ``initial * factor``, ... up to ``cap``; :meth:`reset` after a
    success starts over."""

    initial: float = 1.0
    cap: float = 60.0
    factor: float = 2.0
    _next: float = field(default=0.0, init=False, repr=False)

    def next_delay(self) -> float:
        """The delay before the next attempt; each call grows it until the cap."""
        delay = min(self._next or self.initial, self.cap)
        self._next = min(delay * self.factor, self.cap)
        return delay

    def reset(self) -> None:
        """Back to the initial delay (after a success)."""
        self._next = 0.0
