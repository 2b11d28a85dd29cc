"""Where the plugin's sockets go, and why a directory cannot be used (checked before serving).

The kubelet resolves the endpoint we register, a base name, in its own directory, so sockets
go to the kubelet socket's directory; ``--socket-dir`` (env ``PLUGIN_SOCKET_DIR``) may name
another only when registration is off (``--kubelet-socket ""``).
"""

from __future__ import annotations

import os

from deviceplugin.server import socket_dir_unusable as unusable
from gpus.config import Config, PluginFlags

SOCKET_DIR_ENV = "PLUGIN_SOCKET_DIR"


def socket_dir_for(config: Config, override: str = "") -> str:
    """Where plugin sockets go: ``override``, else the kubelet socket's directory."""
    if override:
        return override
    kubelet_socket = config.flags.plugin.kubelet_socket
    if kubelet_socket:
        return os.path.dirname(kubelet_socket) or "."
    return os.path.dirname(PluginFlags().kubelet_socket)


def socket_dir_problem(config: Config, override: str) -> str | None:
    """Why ``override`` (--socket-dir) cannot be used with ``config``'s kubelet socket, or None.

    Register sends only the socket's base name and the kubelet looks for it in its own
    directory, so plugin sockets anywhere else would register and never be reached.
    """
    kubelet_socket = config.flags.plugin.kubelet_socket
    if not override or not kubelet_socket:
        return None
    kubelet_dir = os.path.dirname(kubelet_socket) or "."
    if os.path.realpath(override) == os.path.realpath(kubelet_dir):
        return None
    return (f"--socket-dir {override!r} differs from the kubelet socket's directory "
            f"{kubelet_dir!r}: the kubelet could not reach our sockets; drop --socket-dir "
            "or set --kubelet-socket \"\" (no registration)")


def socket_dir_unusable(config: Config, override: str) -> str | None:
    """Why no plugin socket can be created where they go, naming the setting that chose the
    directory, or None.

    Checked once before any server starts: otherwise each resource would fail with the same
    reason, logged by the manager and then printed again as the start-up error.
    """
    directory = socket_dir_for(config, override)
    problem = unusable(directory)
    if problem is None:
        return None
    if override:
        return f"{problem} (--socket-dir, env {SOCKET_DIR_ENV})"
    kubelet_socket = config.flags.plugin.kubelet_socket
    if not kubelet_socket:
        return f"{problem} (no registration: choose the directory with --socket-dir)"
    return (f"{problem}: it is the directory of the kubelet socket {kubelet_socket!r}; set "
            "--kubelet-socket (env KUBELET_SOCKET) to the kubelet's device-plugins socket, "
            "or set it to \"\" and choose a directory with --socket-dir to serve without "
            "registering")
