"""Signals every daemon obeys: SIGHUP reloads, SIGTERM and SIGINT stop.

Handlers only record the request and wake whoever waits; the daemon's own loop acts on it, so
nothing runs inside a signal handler.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any, Literal

Handler = Callable[[int, FrameType | None], Any] | int | None
Request = Literal["stop", "reload"]
_POLL_S = 1.0  # a wait re-checks the flags at least this often, whatever wakes it


class Signals:
    """Stop and reload requests, set by signal handlers (or by code), and an interruptible wait.

    ``stop`` stays set once requested; ``reload`` is taken (cleared) by :meth:`take_reload` or
    :meth:`wait`. Usable without installing handlers (tests call the ``request_*`` methods).
    """

    def __init__(self) -> None:
        """Nothing requested, no handler installed."""
        self.event = threading.Event()
        self.stop = False
        self.reload = False
        self._previous: dict[int, Handler] = {}

    def install(self) -> Signals:
        """Route SIGHUP, SIGTERM and SIGINT here (main thread only; elsewhere a no-op)."""
        if threading.current_thread() is not threading.main_thread():
            return self
        routes = {signal.SIGHUP: self.request_reload, signal.SIGTERM: self.request_stop,
                  signal.SIGINT: self.request_stop}
        for sig, handler in routes.items():
            self._previous[sig] = signal.signal(sig, handler)
        return self

    def restore(self) -> None:
        """Put back the handlers :meth:`install` replaced (a daemon may run inside a test)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def request_stop(self, *_: object) -> None:
        """SIGTERM/SIGINT: stop."""
        self.stop = True
        self.event.set()

    def request_reload(self, *_: object) -> None:
        """SIGHUP: reload the configuration."""
        self.reload = True
        self.event.set()

    def take_reload(self) -> bool:
        """True (once) when a reload was requested since the last call."""
        requested, self.reload = self.reload, False
        return requested

    def sleep(self, seconds: float) -> None:
        """Sleep up to ``seconds``, returning early when a request arrives."""
        self.event.wait(max(0.0, seconds))
        self.event.clear()

    def wait(self) -> Request:
        """Block until a stop or reload is requested; a stop wins over a pending reload."""
        while not self.stop and not self.reload:
            self.event.wait(_POLL_S)
            self.event.clear()
        if self.stop:
            return "stop"
        self.reload = False
        return "reload"
