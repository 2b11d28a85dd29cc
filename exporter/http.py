"""/metrics and /health over a ThreadingHTTPServer (a slow client holds only its own thread).

Text format: prometheus_client's families written by :func:`generate_text`, which differs from
``prometheus_client.exposition.generate_latest`` in three dcgm-exporter compatible ways: labels
keep their dcgm-exporter order (generate_latest sorts them), a counter keeps its own name
(``DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION``, not ``..._total`` in HELP/TYPE), and DCGM values use
dcgm-exporter's formats (integers as integers, doubles as ``%f``). Escaping and the exporter's
own metrics' values are prometheus_client's. OpenMetrics (``Accept:
application/openmetrics-text``) is prometheus_client's own writer; there DCGM counters whose
names lack ``_total`` are typed ``unknown`` (OpenMetrics requires the suffix on counters and
adding it would rename the series).

``--web-config-file``: exporter-toolkit's YAML; ``tls_server_config`` (``cert_file``,
``key_file``, optional ``client_ca_file`` + ``client_auth_type``) is supported.
``basic_auth_users`` needs bcrypt, which is not a dependency: such a file is refused with a
clear error rather than served without the authentication it asks for.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.core import Metric
from prometheus_client.openmetrics import exposition as om_exposition
from prometheus_client.registry import Collector as PromCollector
from prometheus_client.utils import floatToGoString

from exporter.fields import ValueFormat
from gpus.records import record

log = logging.getLogger(__name__)

TEXT_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS = "application/openmetrics-text"
# How often the accept loop checks for stop(): shutdown() waits up to this long (socketserver's
# default, 0.5 s, made every exporter stop take half a second).
SHUTDOWN_POLL_S = 0.1


def _value(value: float, fmt: ValueFormat | None) -> str:
    if fmt is ValueFormat.INT and float(value).is_integer():
        return str(int(value))
    if fmt is ValueFormat.FLOAT:
        return f"{value:.6f}"
    text: str = floatToGoString(value)
    return text


def _escape_help(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")


def _escape_label(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n").replace('"', r'\"')


def generate_text(collector: PromCollector, formats: dict[str, ValueFormat]) -> bytes:
    """Prometheus text format 0.0.4, labels in the order the collector gave them."""
    out: list[str] = []
    # A device's labels repeat in every family: escape each label set once per scrape.
    rendered: dict[tuple[tuple[str, str], ...], str] = {}
    for metric in collector.collect():
        name = metric.name
        if metric.type == "counter" and any(s.name == f"{name}_total" for s in metric.samples):
            name = f"{name}_total"
        kind = {"unknown": "untyped", "info": "gauge", "stateset": "gauge"}.get(
            metric.type, metric.type)
        out.append(f"# HELP {name} {_escape_help(metric.documentation)}\n")
        out.append(f"# TYPE {name} {kind}\n")
        fmt = formats.get(metric.name)
        for sample in metric.samples:
            if sample.name.endswith("_created"):
                continue
            items = tuple(sample.labels.items())
            labels = rendered.get(items)
            if labels is None:
                joined = ",".join(f'{k}="{_escape_label(v)}"' for k, v in items)
                labels = rendered[items] = f"{{{joined}}}" if joined else ""
            out.append(f"{sample.name}{labels} {_value(sample.value, fmt)}\n")
    return "".join(out).encode()


class _OpenMetricsView(PromCollector):
    """The collector's families as OpenMetrics allows them (see the module docstring)."""

    def __init__(self, collector: PromCollector) -> None:
        self._collector = collector

    def collect(self) -> Iterator[Metric]:
        for metric in self._collector.collect():
            if metric.type == "counter" and any(s.name == metric.name for s in metric.samples):
                copy = Metric(metric.name, metric.documentation, "unknown")
                copy.samples = list(metric.samples)
                yield copy
            else:
                yield metric


def generate_openmetrics(collector: PromCollector) -> bytes:
    """OpenMetrics 1.0.0 text via prometheus_client."""
    return bytes(om_exposition.generate_latest(_OpenMetricsView(collector)))


class WebConfigError(ValueError):
    """A --web-config-file that cannot be used."""


@record
class WebConfig:
    """The supported part of exporter-toolkit's web config."""

    cert_file: str | None = None
    key_file: str | None = None
    client_ca_file: str | None = None
    client_auth_required: bool = False

    def ssl_context(self) -> ssl.SSLContext | None:
        """A server TLS context, or None for plain HTTP."""
        if self.cert_file is None:
            return None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert_file, self.key_file)
        if self.client_ca_file:
            context.load_verify_locations(self.client_ca_file)
            context.verify_mode = (ssl.CERT_REQUIRED if self.client_auth_required
                                   else ssl.CERT_OPTIONAL)
        return context


def load_web_config(path: str) -> WebConfig:
    """Read a web config file; WebConfigError names the file and the problem."""
    try:
        raw: Any = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as err:
        raise WebConfigError(f"{path}: cannot read: {err}") from None
    if not isinstance(raw, dict):
        raise WebConfigError(f"{path}: expected a mapping at the top level")
    unknown = set(raw) - {"tls_server_config", "basic_auth_users", "http_server_config"}
    if unknown:
        raise WebConfigError(f"{path}: unknown keys {sorted(unknown)}; known: "
                             "tls_server_config, basic_auth_users, http_server_config")
    if raw.get("basic_auth_users"):
        raise WebConfigError(f"{path}: basic_auth_users is not supported yet (bcrypt hashes need "
                             "a bcrypt library this exporter does not ship); use TLS client "
                             "certificates (client_ca_file) or a proxy")
    tls = raw.get("tls_server_config") or {}
    if not isinstance(tls, dict):
        raise WebConfigError(f"{path}: tls_server_config must be a mapping")
    cert, key = tls.get("cert_file"), tls.get("key_file")
    if bool(cert) != bool(key):
        raise WebConfigError(f"{path}: tls_server_config needs both cert_file and key_file")
    base = Path(path).parent

    def resolve(name: Any) -> str | None:
        return None if not name else str(base / str(name))

    auth = str(tls.get("client_auth_type", "NoClientCert"))
    config = WebConfig(resolve(cert), resolve(key), resolve(tls.get("client_ca_file")),
                       auth in ("RequireAndVerifyClientCert", "RequireAnyClientCert"))
    try:
        config.ssl_context()
    except (OSError, ssl.SSLError) as err:
        raise WebConfigError(f"{path}: TLS: {err}") from None
    return config


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hung up or spoke plain HTTP to TLS: its problem, one debug line.
        log.debug("connection from %s failed", client_address, exc_info=True)


class _Server6(_Server):
    address_family = socket.AF_INET6


class MetricsServer:
    """Serves /metrics and /health on ``address`` (host, port); port 0 picks a free one."""

    def __init__(self, address: tuple[str, int], collector: PromCollector,
                 formats: dict[str, ValueFormat], healthy: Callable[[], bool],
                 web_config: WebConfig | None = None) -> None:
        handler = _handler(collector, formats, healthy)
        # An IPv6 host ("::", from -a [::]:9400) needs an IPv6 socket.
        server_class = _Server6 if ":" in address[0] else _Server
        self._server = server_class(address, handler)
        self._server.daemon_threads = True
        context = None if web_config is None else web_config.ssl_context()
        if context is not None:
            # The handshake happens on the connection's own thread (first read), not in
            # accept(): a client that stalls its handshake must not stall the accept loop.
            self._server.socket = context.wrap_socket(
                self._server.socket, server_side=True, do_handshake_on_connect=False)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The port bound."""
        return int(self._server.server_address[1])

    def start(self) -> None:
        """Serve on a daemon thread."""
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        args=(SHUTDOWN_POLL_S,), name="metrics-http",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._thread is not None:  # shutdown() waits for a serve_forever that never ran
            self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(5.0)


def _handler(collector: PromCollector, formats: dict[str, ValueFormat],
             healthy: Callable[[], bool]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                if OPENMETRICS in self.headers.get("Accept", ""):
                    body = generate_openmetrics(collector)
                    content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8"
                else:
                    body, content_type = generate_text(collector, formats), TEXT_CONTENT_TYPE
                self._send(200, body, content_type)
            elif path == "/health":
                ok = healthy()
                self._send(200 if ok else 503, b"OK\n" if ok else b"stale sample\n",
                           "text/plain; charset=utf-8")
            elif path == "/":
                self._send(200, b'<html><body><a href="/metrics">Metrics</a></body></html>\n',
                           "text/html; charset=utf-8")
            else:
                self._send(404, b"not found\n", "text/plain; charset=utf-8")

        def _send(self, code: int, body: bytes, content_type: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            log.debug("%s " + format, self.address_string(), *args)

    return Handler
