# Every target creates (once) and reuses a virtualenv in .venv, so a fresh machine with only
# Python 3.11, pip and gcc needs nothing else.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test lint protos bench image clean venv mutate prometheus

venv: $(STAMP)

# The first install takes a minute or two: pip lists what it collects and installs (no -q) so
# that the wait is visible; progress bars appear on a terminal.
$(STAMP): pyproject.toml
	@echo "Setting up $(VENV) (once, about a minute; later runs reuse it)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

# Device plugin + GFD + metrics exporter + mock kubelet on a simulated DGX A100.
# RUN_ARGS='--exit-after 5' stops it.
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

# Mutation testing (docs/testing.md); not part of CI. MODULES picks source files, e.g.
# `make mutate MODULES=deviceplugin/allocator.py`; results accumulate in mutants/ across runs.
MODULES ?= deviceplugin/allocator.py deviceplugin/shared_policy.py deviceplugin/rm.py \
	gpus/resources.py deviceplugin/allocate.py deviceplugin/extras.py \
	deviceplugin/health.py deviceplugin/healthpolicy.py deviceplugin/kubelet.py \
	gfd/labels.py gfd/nodepatch.py $(wildcard gpus/config/*.py) gpus/atomicfile.py
MUTATE_JOBS ?= 2
# Address-space cap per process (KiB): a mutant that grows a list forever must fail, not take
# the machine's memory with it.
MUTATE_VMEM_KIB ?= 4194304
mutate: $(STAMP)
	ulimit -v $(MUTATE_VMEM_KIB) && nice -n 10 $(VENV)/bin/mutmut run --max-children $(MUTATE_JOBS) \
		$(foreach m,$(MODULES),'$(subst /,.,$(m:.py=)).*')
	$(VENV)/bin/mutmut results | grep -v ': not checked$$' || true

# The image tag follows the package version (a test keeps them equal). Needs BuildKit.
IMAGE ?= nvidia-k8s-py:$(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
image:
	docker build -t $(IMAGE) .

clean:
	rm -rf $(VENV) mutants build *.egg-info .pytest_cache .mypy_cache .ruff_cache
