"""The simulated GPU node behind ``make run``: device plugin, GFD and the mock kubelet together.

It lives outside ``deviceplugin`` and ``gfd`` because it is the one place allowed to import
both (the layering contracts in pyproject.toml keep the daemons independent).
"""
