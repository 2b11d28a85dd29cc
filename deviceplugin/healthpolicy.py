"""Which XIDs mark a device unhealthy: ``DP_DISABLE_HEALTHCHECKS`` / ``DP_ENABLE_HEALTHCHECKS``.

Part of the device plugin's health checks (:mod:`deviceplugin.health`, whose monitor applies the
policy and which re-exports these names). As NVIDIA's plugin does, XIDs 13, 31, 43, 45, 68 and
109 (application errors) are ignored by default.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import field

from gpus.records import record

DEFAULT_IGNORED_XIDS = frozenset({13, 31, 43, 45, 68, 109})
DISABLE_ENV = "DP_DISABLE_HEALTHCHECKS"
ENABLE_ENV = "DP_ENABLE_HEALTHCHECKS"


@record
class HealthPolicy:
    """Which XIDs mark a device unhealthy (from the two environment variables)."""

    enabled: bool = True
    ignored: frozenset[int] = DEFAULT_IGNORED_XIDS
    reenabled: frozenset[int] = frozenset()
    all_reenabled: bool = False
    # Entries that could not be parsed; logged, and otherwise ignored as NVIDIA does, so a typo
    # in an environment variable does not stop the plugin.
    problems: tuple[str, ...] = field(default=())

    def is_critical(self, xid: int) -> bool:
        """True when this XID should mark the device unhealthy."""
        if not self.enabled:
            return False
        if self.all_reenabled or xid in self.reenabled:
            return True
        return xid not in self.ignored


def _split(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def _parse_xids(env: str, items: Iterable[str], problems: list[str]) -> set[int]:
    xids: set[int] = set()
    for item in items:
        try:
            xid = int(item, 10)
        except ValueError:
            problems.append(f"{env}: ignoring {item!r}: not an XID number")
            continue
        if xid < 0:
            problems.append(f"{env}: ignoring {item!r}: XIDs are not negative")
            continue
        xids.add(xid)
    return xids


def parse_health_env(environ: Mapping[str, str]) -> HealthPolicy:
    """The policy from the variables in ``environ`` (see :func:`health_policy`)."""
    return health_policy(environ.get(DISABLE_ENV, ""), environ.get(ENABLE_ENV, ""))


def health_policy(disable_value: str, enable_value: str) -> HealthPolicy:
    """Build the policy from ``DP_DISABLE_HEALTHCHECKS`` and ``DP_ENABLE_HEALTHCHECKS``
    (the daemon resolves them through gpus.config: ``config.daemon.plugin``).

    - ``DP_DISABLE_HEALTHCHECKS`` containing ``all`` or ``xids`` (case-insensitive) turns health
      checks off entirely, whatever ``DP_ENABLE_HEALTHCHECKS`` says; otherwise its entries are
      extra XIDs to ignore on top of the defaults.
    - ``DP_ENABLE_HEALTHCHECKS``: XIDs that are critical even if ignored (by default or by the
      variable above); ``all`` makes every XID critical.
    - Entries that are not non-negative integers are reported in ``problems`` and skipped.
    """
    problems: list[str] = []
    disable = [item.lower() for item in _split(disable_value)]
    if "all" in disable or "xids" in disable:
        return HealthPolicy(enabled=False)
    ignored = set(DEFAULT_IGNORED_XIDS) | _parse_xids(DISABLE_ENV, disable, problems)
    enable = [item.lower() for item in _split(enable_value)]
    all_reenabled = "all" in enable
    reenabled = _parse_xids(ENABLE_ENV, (i for i in enable if i != "all"), problems)
    return HealthPolicy(
        enabled=True,
        ignored=frozenset(ignored),
        reenabled=frozenset(reenabled),
        all_reenabled=all_reenabled,
        problems=tuple(problems),
    )
