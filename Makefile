# Every target creates (once) and reuses a virtualenv in .venv, so a fresh machine with only
# Python 3.11, pip and gcc needs nothing else.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test lint protos bench image clean venv prometheus

venv: $(STAMP)

# The first install takes a minute or two: pip lists what it collects and installs (no -q) so
# that the wait is visible; progress bars appear on a terminal.
$(STAMP): pyproject.toml
	@echo "Setting up $(VENV) (once, about a minute; later runs reuse it)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

# Device plugin + GFD + mock kubelet on a simulated DGX A100. RUN_ARGS='--exit-after 5' stops it.
run: $(STAMP)
	$(PY) -m demo $(RUN_ARGS)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

# Debian's prometheus and promtool, for tests/test_exporter_prometheus.py and the promtool
# checks (skipped without them, failed without them when CI is set). Needs root for apt-get.
prometheus:
	@if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then \
		echo "prometheus and promtool are installed"; \
	else \
		apt-get update && apt-get install -y --no-install-recommends prometheus; \
	fi

protos: $(STAMP)
	$(PY) -m protos.generate

bench: $(STAMP)
	$(PY) bench/run_all.py

# The image tag follows the package version (a test keeps them equal). Needs BuildKit.
IMAGE ?= nvidia-k8s-py:$(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
image:
	docker build -t $(IMAGE) .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
