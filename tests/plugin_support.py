"""Typed access to a started plugin's parts for the end-to-end tests (no tests here).

``DevicePlugin`` keeps its snapshot, health monitor, fake controller and manager as optional
attributes (they exist only while it runs); a test that reads them of a started plugin uses
these accessors, which fail the test with a clear message instead of an AttributeError on None.
"""

from __future__ import annotations

from deviceplugin.health import HealthMonitor
from deviceplugin.manager import PluginManager
from deviceplugin.plugin import DevicePlugin
from deviceplugin.server import PluginServer
from gpus.fake import FakeNvml
from gpus.model import Snapshot


def snapshot_of(plugin: DevicePlugin) -> Snapshot:
    """The running plugin's snapshot."""
    assert plugin.snapshot is not None, "the plugin has no snapshot (not started?)"
    return plugin.snapshot


def monitor_of(plugin: DevicePlugin) -> HealthMonitor:
    """The running plugin's health monitor."""
    assert plugin.health is not None, "the plugin has no health monitor (not started?)"
    return plugin.health


def controller_of(plugin: DevicePlugin) -> FakeNvml:
    """The controller of the fake NVML the plugin runs on."""
    controller = plugin.controller
    assert controller is not None, "the plugin runs on no fake NVML"
    return controller


def installed_fake(controller: FakeNvml | None) -> FakeNvml:
    """``controller`` (from ``select_backend``), which must be a fake."""
    assert controller is not None, "no fake NVML was installed"
    return controller


def manager_of(plugin: DevicePlugin) -> PluginManager:
    """The running plugin's manager."""
    assert plugin.manager is not None, "the plugin has no manager (not started?)"
    return plugin.manager


def server_of(manager: PluginManager, resource: str) -> PluginServer:
    """The manager's running server for ``resource``."""
    server = manager.server(resource)
    assert server is not None, f"no server is running for {resource}"
    return server
