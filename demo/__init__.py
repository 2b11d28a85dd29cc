"""The simulated GPU node behind ``make run``: device plugin, GFD, metrics exporter and the mock
kubelet together.

It lives outside ``deviceplugin``, ``gfd`` and ``exporter`` because it is the one place allowed
to import several daemons (the layering contracts in pyproject.toml keep them independent).
"""
