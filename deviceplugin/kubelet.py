"""Registration with the kubelet, and the watch that keeps it registered.

The kubelet never reconnects by itself: when it restarts it wipes every socket in its directory
and recreates ``kubelet.sock``, and the plugin must notice, rebind and register again. The stdlib
has no inotify, so :class:`RegistrationLoop` polls ``os.stat`` of the kubelet socket and of our
own sockets every ``poll_interval`` (100 ms by default, well inside the 1 s we must react in);
a stat per socket per tick costs microseconds.

Logging: states (kubelet up or missing, a failing Register) are logged when they change, not on
every tick. A re-registration after a loss is logged at INFO every time, with its cause and how
long recovery took, so an operator can see from our log alone that recovery worked; at most
``RECOVERY_LOG_BURST`` such lines per resource per ``RECOVERY_LOG_WINDOW_S``, the rest counted.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import grpc

from gpus.backoff import Backoff
from gpus.errors import KubeletError
from gpus.records import record
from protos.deviceplugin.v1beta1 import api_pb2, api_pb2_grpc

if TYPE_CHECKING:  # prometheus_client: imported only with --metrics-address
    from gpus.runtime.metrics import PluginMetrics

log = logging.getLogger(__name__)

API_VERSION = "v1beta1"
REGISTER_TIMEOUT_S = 5.0
POLL_INTERVAL_S = 0.1
BACKOFF_INITIAL_S = 0.1
BACKOFF_CAP_S = 5.0
# Each re-registration is news for an operator (recovery worked), but a socket deleted in a
# loop must not flood the log: at most this many lines per resource per window.
RECOVERY_LOG_BURST = 10
RECOVERY_LOG_WINDOW_S = 600.0


class RegistrationError(KubeletError, RuntimeError):
    """The kubelet refused or did not answer a Register call (retried with backoff)."""


def plugin_options() -> api_pb2.DevicePluginOptions:
    """Our options, as both Register and GetDevicePluginOptions report them."""
    return api_pb2.DevicePluginOptions(
        pre_start_required=False, get_preferred_allocation_available=True
    )


def register(
    kubelet_socket: str,
    endpoint: str,
    resource_name: str,
    timeout: float = REGISTER_TIMEOUT_S,
) -> None:
    """Register one resource whose server listens on ``<kubelet dir>/<endpoint>``.

    The plugin's server must already be serving: the kubelet dials it back during Register.
    Raises RegistrationError with the kubelet's reason.
    """
    request = api_pb2.RegisterRequest(
        version=API_VERSION,
        endpoint=endpoint,
        resource_name=resource_name,
        options=plugin_options(),
    )
    with grpc.insecure_channel(f"unix:{kubelet_socket}") as channel:
        try:
            api_pb2_grpc.RegistrationStub(channel).Register(request, timeout=timeout)
        except grpc.RpcError as err:
            code = err.code() if isinstance(err, grpc.Call) else None
            details = err.details() if isinstance(err, grpc.Call) else str(err)
            name = code.name if code is not None else "UNKNOWN"
            raise RegistrationError(
                f"registering {resource_name} with the kubelet at {kubelet_socket} failed: "
                f"{name}: {details}"
            ) from err


@record
class SocketState:
    """What a stat of the kubelet socket path says; ``identity`` changes when it is recreated."""

    problem: str | None  # None when it is a socket we can dial
    identity: tuple[int, int, int] | None = None  # (st_dev, st_ino, st_ctime_ns)
    # Nothing at the path: the normal state while the kubelet starts, not an error.
    missing: bool = False

    @property
    def ready(self) -> bool:
        """True when the path is a socket."""
        return self.problem is None


def kubelet_socket_state(path: str) -> SocketState:
    """Stat the kubelet socket; a missing path or a non-socket is a problem with a reason."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return SocketState(problem=f"kubelet socket {path} does not exist (yet)", missing=True)
    except OSError as err:
        return SocketState(problem=f"cannot stat kubelet socket {path}: {err.strerror}")
    if not stat.S_ISSOCK(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a socket"
        return SocketState(problem=f"kubelet socket {path} is {kind}")
    return SocketState(problem=None, identity=(st.st_dev, st.st_ino, st.st_ctime_ns))


class StateLog:
    """Logs a message only when it differs from the last one for the same key."""

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger
        self._last: dict[str, str] = {}

    def set(self, key: str, level: int, message: str) -> None:
        """Record the state for ``key``; log it if it changed."""
        if self._last.get(key) != message:
            self._last[key] = message
            self._logger.log(level, "%s", message)

    def forget(self, key: str) -> None:
        """Drop the state for ``key`` (so its next state is logged)."""
        self._last.pop(key, None)

    def note(self, key: str, message: str) -> None:
        """Record ``message`` as the state for ``key`` without logging it (logged elsewhere)."""
        self._last[key] = message


class RateLimitedLog:
    """Logs at most ``burst`` messages per key in any ``window`` seconds.

    The rest go to DEBUG, and the next message logged says how many were left out, so the
    log stays bounded however often an event repeats and still shows that it did.
    """

    def __init__(self, logger: logging.Logger, burst: int, window: float) -> None:
        self._logger = logger
        self._burst = burst
        self._window = window
        self._times: dict[str, deque[float]] = {}
        self._dropped: dict[str, int] = {}

    def log(self, key: str, level: int, message: str, now: float) -> bool:
        """Log ``message`` unless ``key`` used up its burst; True when it was logged."""
        times = self._times.setdefault(key, deque())
        while times and now - times[0] >= self._window:
            times.popleft()
        if len(times) >= self._burst:
            self._dropped[key] = self._dropped.get(key, 0) + 1
            self._logger.debug("%s", message)
            return False
        times.append(now)
        dropped = self._dropped.pop(key, 0)
        if dropped:
            message += f" ({dropped} similar messages not logged before this one)"
        self._logger.log(level, "%s", message)
        return True

    def forget(self, key: str) -> None:
        """Drop the history of ``key``."""
        self._times.pop(key, None)
        self._dropped.pop(key, None)


class Endpoint(Protocol):
    """What the loop needs of a plugin server (deviceplugin.server.PluginServer)."""

    name: str
    generation: int

    @property
    def endpoint(self) -> str: ...

    def intact(self) -> bool: ...

    def restart(self) -> None: ...


@dataclass
class _Registration:
    identity: tuple[int, int, int] | None = None
    generation: int = -1
    next_try: float = 0.0
    backoff: Backoff | None = None
    # When (time.monotonic()) and why a registration we had was lost; None while registered
    # or before the first registration. Reported with the re-registration.
    lost_at: float | None = None
    lost_why: str = ""

    def lose(self, why: str) -> None:
        """Note that this registration no longer holds (the first cause counts)."""
        if self.lost_at is None and (self.identity is not None or self.generation >= 0):
            self.lost_at, self.lost_why = time.monotonic(), why


class RegistrationLoop:
    """Keeps every served resource registered with the current kubelet, in one thread.

    Each tick: stat the kubelet socket; rebind servers whose socket vanished; register every
    server not yet registered with this kubelet incarnation (socket identity) and this server
    generation, with capped backoff per resource on failure. ``kubelet_socket == ""`` only
    rebinds vanished sockets and never registers.
    """

    def __init__(
        self,
        kubelet_socket: str,
        servers: Callable[[], Sequence[Endpoint]],
        poll_interval: float = POLL_INTERVAL_S,
        register_fn: Callable[[str, str, str], None] = register,
        on_tick: Callable[[], None] | None = None,
        metrics: PluginMetrics | None = None,
    ) -> None:
        """``on_tick()`` runs after each tick of the thread, and before a tick's Register calls
        when a registration was lost (readiness checks: the loss is reported before a Register
        that may wait for its timeout), on the watch thread."""
        self.kubelet_socket = kubelet_socket
        self._servers = servers
        self._poll = poll_interval
        self._register = register_fn
        self._on_tick = on_tick
        # The kubelet socket's identity at the last tick; None while it is missing or broken.
        self._identity: tuple[int, int, int] | None = None
        # The last kubelet socket identity seen up: another one later is a kubelet restart.
        self._known_kubelet: tuple[int, int, int] | None = None
        self._metrics = metrics
        self._state: dict[str, _Registration] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._log = StateLog(log)
        self._recoveries = RateLimitedLog(log, RECOVERY_LOG_BURST, RECOVERY_LOG_WINDOW_S)
        self._lock = threading.Lock()
        self._ticked = threading.Event()  # set once the thread finished its first tick
        self.last_problem: str | None = None

    def start(self) -> None:
        """Start the watch thread (ticks once at once)."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._ticked.clear()
        self._thread = threading.Thread(target=self._run, name="kubelet-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and wait for it."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def wait_first_tick(self, timeout: float) -> bool:
        """Wait until the thread finished its first tick since :meth:`start` (every served
        resource had its first Register, whatever the answer); False after ``timeout``."""
        return self._ticked.wait(timeout)

    def wake(self) -> None:
        """Tick now (a new resource needs registering)."""
        self._wake.set()

    def registered(self) -> dict[str, bool]:
        """Resource name -> registered with the current kubelet (for status and tests)."""
        with self._lock:
            return {name: reg.identity is not None for name, reg in self._state.items()}

    def all_registered(self) -> bool:
        """True when every served resource is registered with the kubelet that is up now.

        Without a kubelet socket (serve only) every server's socket must be intact. Used for
        the readiness file: a kubelet restart makes this False until we registered again.
        """
        servers = list(self._servers())
        if not all(server.intact() for server in servers):
            return False
        if not self.kubelet_socket:
            return True
        with self._lock:
            identity = self._identity
            if identity is None:
                return not servers
            for server in servers:
                reg = self._state.get(server.name)
                if reg is None or reg.identity != identity or reg.generation != server.generation:
                    return False
        return True

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # the watch must survive anything a tick meets
                log.exception("kubelet watch tick failed")
            self._report()
            self._ticked.set()
            self._wake.wait(self._poll)
            self._wake.clear()

    def _report(self) -> None:
        if self._on_tick is None:
            return
        try:
            self._on_tick()
        except Exception:
            log.exception("kubelet watch tick callback failed")

    def tick(self, now: float | None = None) -> None:
        """One pass of the watch; public so tests can drive it without the thread."""
        now = time.monotonic() if now is None else now
        servers = list(self._servers())
        self._rebind_vanished(servers)
        if not self.kubelet_socket:
            return
        kubelet = kubelet_socket_state(self.kubelet_socket)
        self.last_problem = kubelet.problem
        with self._lock:
            self._identity = kubelet.identity
            if kubelet.problem is not None:
                for reg in self._state.values():
                    reg.lose("the kubelet socket went away")
        if kubelet.problem is not None:
            level = logging.INFO if kubelet.missing else logging.ERROR
            self._log.set("kubelet", level, kubelet.problem + "; waiting for the kubelet")
            return
        self._log.set("kubelet", logging.INFO, f"kubelet socket {self.kubelet_socket} is up")
        self._note_kubelet(kubelet.identity)
        with self._lock:
            names = {s.name for s in servers}
            for gone in set(self._state) - names:
                del self._state[gone]
                self._log.forget(gone)
                self._recoveries.forget(gone)
        due = [s for s in servers if self._due(s, kubelet.identity, now)]
        if any(self._lost(s.name) for s in due):
            # Readiness must turn false before we wait on a Register (up to its timeout): a
            # re-bound socket is not registered until the kubelet says so.
            self._report()
        for server in due:
            self._register_one(server, kubelet.identity, now)

    def _note_kubelet(self, identity: tuple[int, int, int] | None) -> None:
        if identity is None or identity == self._known_kubelet:
            return
        if self._known_kubelet is not None and self._metrics is not None:
            self._metrics.kubelet_restarts.inc()
        self._known_kubelet = identity

    def _count(self, name: str, result: str) -> None:
        if self._metrics is not None:
            self._metrics.registrations.labels(name, result).inc()

    def _rebind_vanished(self, servers: Sequence[Endpoint]) -> None:
        for server in servers:
            if server.intact():
                continue
            with self._lock:
                reg = self._state.get(server.name)
                if reg is not None:
                    reg.lose("our socket was removed")
            try:
                server.restart()
            except Exception as err:  # keep serving the others; retry next tick
                self._log.set(server.name, logging.ERROR, f"cannot rebind {server.name}: {err}")

    def _due(self, server: Endpoint, identity: tuple[int, int, int] | None, now: float) -> bool:
        """True when ``server`` must (and may, backoff permitting) Register now."""
        with self._lock:
            reg = self._state.setdefault(server.name, _Registration())
            if reg.identity == identity and reg.generation == server.generation:
                return False
            if reg.identity is not None:
                # Registered with an older kubelet or an older bind of our socket: start over.
                reg.lose("the kubelet restarted" if reg.identity != identity
                         else "our socket was rebound")
                reg.identity, reg.next_try, reg.backoff = None, 0.0, None
            return now >= reg.next_try

    def _lost(self, name: str) -> bool:
        with self._lock:
            reg = self._state.get(name)
            return reg is not None and reg.lost_at is not None

    def _register_one(
        self, server: Endpoint, identity: tuple[int, int, int] | None, now: float
    ) -> None:
        with self._lock:
            reg = self._state.setdefault(server.name, _Registration())
        try:
            self._register(self.kubelet_socket, server.endpoint, server.name)
        except Exception as err:
            with self._lock:
                reg.backoff = reg.backoff or Backoff(initial=BACKOFF_INITIAL_S, cap=BACKOFF_CAP_S)
                reg.next_try = now + reg.backoff.next_delay()
            self._log.set(server.name, logging.WARNING, f"{err}; retrying with backoff")
            self._count(server.name, "failed")
            return
        self._count(server.name, "ok")
        with self._lock:
            lost_at, why = reg.lost_at, reg.lost_why
            reg.identity, reg.generation, reg.backoff, reg.next_try = (
                identity,
                server.generation,
                None,
                0.0,
            )
            reg.lost_at, reg.lost_why = None, ""
        message = f"registered {server.name} (endpoint {server.endpoint}) with the kubelet"
        if lost_at is None:
            self._log.set(server.name, logging.INFO, message)
        else:
            # StateLog would suppress this repeat; an operator needs to see recovery worked.
            self._log.note(server.name, message)
            finished = time.monotonic()
            self._recoveries.log(
                server.name,
                logging.INFO,
                f"re-{message} {finished - lost_at:.2f} s after the registration was lost "
                f"({why})",
                finished,
            )
