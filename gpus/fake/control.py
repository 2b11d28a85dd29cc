"""The fake NVML's control socket: JSON lines over a Unix socket, served on a daemon thread.

Each request is one JSON object on one line; each reply is one line: ``{"ok": true, ...}`` or
``{"ok": false, "error": "<reason>"}``. Requests (``gpu`` is an index or a GPU/MIG UUID):

- ``{"op": "xid", "gpu": 0, "xid": 79, "gi": null, "ci": null}``
- ``{"op": "ecc", "gpu": 0, "double_bit": true}``
- ``{"op": "lose", "gpu": 0}`` / ``{"op": "restore", "gpu": 0}``
- ``{"op": "fail", "function": "nvmlDeviceGetUUID", "error": "NVML_ERROR_UNKNOWN", "count": 1}``
- ``{"op": "fail_event_wait", "error": "..."}`` / ``{"op": "fail_init", "error": "..."}``
- ``{"op": "clear"}`` / ``{"op": "status"}`` / ``{"op": "ping"}``
- ``{"op": "advance", "steps": 1}``: move the telemetry on (simulated seconds)
- ``{"op": "processes", "gpu": 0, "processes": [{"pid": 1234, "used_mib": 512, "sm_util": 30}]}``:
  what runs on a GPU or MIG device (an empty list: nothing)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from gpus.fake.telemetry import FakeProcess

if TYPE_CHECKING:  # the controller imports this module (it serves the control socket)
    from gpus.fake.controller import FakeNvml

log = logging.getLogger(__name__)

MAX_LINE = 64 * 1024
# How long ``fake-nvml inject`` waits for a daemon that is still starting to create its socket.
CONNECT_WAIT_S = 5.0
# How long a client waits for a reply to a request that does not wait itself.
REPLY_TIMEOUT_S = 5.0
_POLL_S = 0.05


class ControlError(Exception):
    """The control socket refused a request, or could not be reached."""


def _gpu(request: dict[str, Any]) -> int | str:
    gpu = request.get("gpu")
    if isinstance(gpu, bool) or not isinstance(gpu, (int, str)):
        raise ValueError("'gpu' must be an index or a UUID")
    return gpu


def _int(request: dict[str, Any], key: str, optional: bool = False) -> int | None:
    value = request.get(key)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key!r} must be an integer")
    return value


def _processes(request: dict[str, Any]) -> list[FakeProcess]:
    items = request.get("processes")
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise ValueError("'processes' must be a list of {pid, used_mib, sm_util} objects")
    result = []
    for item in items:
        unknown = set(item) - {"pid", "used_mib", "sm_util"}
        if unknown:
            raise ValueError(f"unknown process keys {sorted(unknown)}")
        result.append(FakeProcess(_int(item, "pid") or 0, _int(item, "used_mib") or 0,
                                  _int(item, "sm_util", optional=True) or 0))
    return result


# A request may hold the control connection this long waiting for a watcher, no longer.
MAX_EVENT_WAIT_S = 30.0


def _wait(request: dict[str, Any]) -> float:
    value = request.get("wait", 0)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("'wait' must be a number of seconds")
    if not 0 <= value <= MAX_EVENT_WAIT_S:
        raise ValueError(f"'wait' must be between 0 and {MAX_EVENT_WAIT_S:g} seconds")
    return float(value)


def _error(request: dict[str, Any], default: str) -> str | int:
    value = request.get("error", default)
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError("'error' must be an NVML error name or code")
    return value


def handle_request(fake: FakeNvml, request: Any) -> dict[str, Any]:
    """Apply one request to the fake; errors come back as ``{"ok": false, ...}``."""
    if not isinstance(request, dict):
        return {"ok": False, "error": "request must be a JSON object"}
    op = request.get("op")
    handlers: dict[str, Callable[[], Any]] = {
        "ping": lambda: None,
        "status": fake.status,
        "xid": lambda: {
            "delivered": fake.inject_xid(
                _gpu(request),
                _int(request, "xid") or 0,
                _int(request, "gi", True),
                _int(request, "ci", True),
                _wait(request),
            )
        },
        "ecc": lambda: {
            "delivered": fake.inject_ecc(
                _gpu(request), bool(request.get("double_bit", True)), _wait(request)
            )
        },
        "lose": lambda: fake.lose_gpu(_gpu(request)),
        "restore": lambda: fake.restore_gpu(_gpu(request)),
        "fail": lambda: fake.fail(
            str(request.get("function", "")),
            _error(request, "NVML_ERROR_UNKNOWN"),
            _int(request, "count", True),
        ),
        "fail_event_wait": lambda: fake.fail_event_wait(_error(request, "NVML_ERROR_UNKNOWN")),
        "fail_init": lambda: fake.fail_init(_error(request, "NVML_ERROR_DRIVER_NOT_LOADED")),
        "clear": fake.clear_faults,
        "advance": lambda: {"step": fake.advance_telemetry(_int(request, "steps") or 0)},
        "processes": lambda: fake.set_processes(_gpu(request), _processes(request)),
    }
    handler = handlers.get(op) if isinstance(op, str) else None
    if handler is None:
        return {"ok": False, "error": f"unknown op {op!r} (one of {', '.join(handlers)})"}
    try:
        result = handler()
    except ValueError as exc:
        return {"ok": False, "error": str(exc)}
    reply: dict[str, Any] = {"ok": True}
    if isinstance(result, dict):
        reply.update(result)
    return reply


class ControlServer:
    """Serves :func:`handle_request` on a Unix socket from a daemon thread."""

    def __init__(self, fake: FakeNvml, path: str) -> None:
        self.fake = fake
        self.path = path
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    def start(self) -> None:
        """Bind (replacing a stale socket file) and start serving."""
        if os.path.exists(self.path):
            os.unlink(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self.path)
            # Owner only, before listen(): whoever can connect can fail every GPU.
            os.chmod(self.path, 0o600)
            sock.listen(8)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self._thread = threading.Thread(target=self._serve, name="fake-nvml-control", daemon=True)
        self._thread.start()
        log.info("fake NVML control socket at %s", self.path)

    def stop(self) -> None:
        """Stop serving and remove the socket file."""
        self._stopping.set()
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def _serve(self) -> None:
        sock = self._sock
        while sock is not None and not self._stopping.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                return  # closed by stop()
            with conn:
                try:
                    self._handle_connection(conn)
                except OSError as exc:
                    log.warning("fake NVML control connection failed: %s", exc)

    def _handle_connection(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        reader = conn.makefile("rb")
        # readline with a limit: a peer that never sends a newline cannot grow our memory.
        while raw := reader.readline(MAX_LINE + 1):
            if len(raw) > MAX_LINE:
                conn.sendall(b'{"ok": false, "error": "request too long"}\n')
                return  # the rest of that line is unread: drop the connection
            reply: dict[str, Any]
            try:
                reply = handle_request(self.fake, json.loads(raw))
            except json.JSONDecodeError as exc:
                reply = {"ok": False, "error": f"not JSON: {exc}"}
            log.info("fake NVML control: %s -> %s", raw.strip()[:200], reply)
            conn.sendall(json.dumps(reply).encode() + b"\n")


def _pause(seconds: float) -> None:
    """Sleep between connection attempts (a seam: tests observe the wait through it)."""
    time.sleep(seconds)


def connect(path: str, timeout: float = REPLY_TIMEOUT_S, wait: float = 0.0) -> socket.socket:
    """A connection to the control socket at ``path``.

    While the socket file does not exist yet, or exists but nobody listens on it yet (a daemon
    between bind and listen, or a stale file of a stopped one), retry every 50 ms for up to
    ``wait`` seconds; then ControlError naming the path and how to serve one.
    """
    deadline = time.monotonic() + wait
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
            return sock
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            left = deadline - time.monotonic()
            if left <= 0:
                waited = f" after waiting {wait:g} s" if wait > 0 else ""
                raise ControlError(
                    f"cannot reach the fake NVML control socket {path}{waited}: {exc.strerror} "
                    f"(is a daemon running with --nvml 'fake:<profile>?control={path}'?)"
                ) from exc
            _pause(min(_POLL_S, left))
        except OSError as exc:
            sock.close()
            raise ControlError(f"cannot reach the fake NVML control socket {path}: {exc}") from exc


def send(
    path: str, request: dict[str, Any], timeout: float = REPLY_TIMEOUT_S, wait: float = 0.0
) -> dict[str, Any]:
    """Send one request to a control socket and return the reply (ControlError if not ok).

    ``wait``: seconds to wait for the socket to appear (see :func:`connect`).
    """
    try:
        with connect(path, timeout, wait) as sock:
            sock.sendall(json.dumps(request).encode() + b"\n")
            line = sock.makefile("rb").readline()
    except OSError as exc:
        raise ControlError(f"cannot reach the fake NVML control socket {path}: {exc}") from exc
    if not line:
        raise ControlError(f"no reply from the fake NVML control socket {path}")
    reply = json.loads(line)
    if not isinstance(reply, dict) or not reply.get("ok"):
        error = reply.get("error") if isinstance(reply, dict) else reply
        raise ControlError(f"fake NVML refused {request.get('op')!r}: {error}")
    return reply
