"""``--metrics-address``: parsed without importing prometheus_client.

The daemons read the option at every start, but prometheus_client and its HTTP server cost
~30 ms of import (docs/benchmarks.md, start -> registered): :mod:`gpus.runtime.metrics` is
imported only when an address is set.
"""

from __future__ import annotations


class MetricsAddressError(ValueError):
    """A ``--metrics-address`` that is not ``[host]:port``."""


def parse_address(text: str) -> tuple[str, int] | None:
    """``host:port`` / ``:port`` / ``[v6]:port`` -> (host, port); "" -> None (metrics off)."""
    text = text.strip()
    if not text:
        return None
    host, sep, port = text.rpartition(":")
    # ASCII only: str.isdigit() is also true of "²" (int() refuses it) and "٣" (int() reads 3).
    if not sep or not (port.isascii() and port.isdigit()) or not 0 <= int(port) <= 65535:
        raise MetricsAddressError(
            f"--metrics-address {text!r}: expected [host]:port, e.g. :9401 or 127.0.0.1:9401")
    return host.strip("[]"), int(port)
