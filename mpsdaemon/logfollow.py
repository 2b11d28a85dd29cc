"""Following a control daemon's ``control.log`` into our log, as NVIDIA's daemon tails it."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

POLL_S = 0.5  # how often the file is checked for new lines


class LogFollower:
    """A thread passing each new line of ``path`` to ``on_line`` until :meth:`stop`.

    The file may appear later, be truncated or be replaced (a restarted daemon): reading starts
    over from its beginning then.
    """

    def __init__(self, path: Path, on_line: Callable[[str], None],
                 poll_interval: float = POLL_S) -> None:
        self.path = path
        self.on_line = on_line
        self.poll_interval = poll_interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"follow {path}", daemon=True)
        self._offset = 0
        self._inode: int | None = None
        self._partial = ""

    def start(self) -> None:
        """Start following."""
        self._thread.start()

    def stop(self) -> None:
        """Stop following and wait for the thread (the lines already there are passed on)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while True:
            stopping = self._stop.is_set()
            try:
                self._read_new()
            except OSError as error:
                log.debug("following %s: %s", self.path, error)
            if stopping or self._stop.wait(self.poll_interval):
                if not stopping:
                    continue  # one last read after stop() so nothing written before it is lost
                return

    def _read_new(self) -> None:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return
        if stat.st_ino != self._inode or stat.st_size < self._offset:
            self._inode, self._offset, self._partial = stat.st_ino, 0, ""
        if stat.st_size == self._offset:
            return
        with open(self.path, encoding="utf-8", errors="replace") as handle:
            handle.seek(self._offset)
            text = self._partial + handle.read()
            self._offset = handle.tell()
        *lines, self._partial = text.split("\n")
        for line in lines:
            if line.strip():
                self.on_line(line)
