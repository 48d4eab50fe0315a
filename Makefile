# `make demo`: set up and run the demo evolution, each time in a new run folder (runs/demo-1, runs/demo-2, ...).
# `make test`: set up and run the whole test suite.
PYTHON ?= python3
VENV := .venv
# Where a machine keeps a local CPU build of torch, use it instead of downloading a CUDA build.
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels)
# More arguments for the demo's `evo-sft run`, e.g. ARGS="--set evolution.generations=2" (default: none).
ARGS ?=

# pip -qq: errors only, not a warning for every package index page that lacks a package.
# evo-sft and what it runs with: all the demo needs.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -qq $(FIND_LINKS) -e .
	touch $@

# The test tools besides.
$(VENV)/.installed-test: $(VENV)/.installed
	$(VENV)/bin/pip install -qq $(FIND_LINKS) -e '.[test]'
	touch $@

setup: $(VENV)/.installed

# Browser test: Debian's chromium (system binary, driven by playwright; no browser download).
/usr/bin/chromium:
	apt-get update -qq && apt-get install -y -qq chromium >/dev/null

# The first runs/demo-N that does not exist is made here (mkdir is atomic: two demos never share one).
DEMO_RUN = $(VENV)/bin/evo-sft run configs/demo.yaml --run-dir runs/demo-$$n $(ARGS)
demo: setup
	@mkdir -p runs; n=1; until mkdir runs/demo-$$n 2>/dev/null; do n=$$((n + 1)); done; \
	echo $(DEMO_RUN); RAY_AUTH_MODE=disabled $(DEMO_RUN)

# Two pytest-xdist workers, a module's tests on one worker (tests/conftest.py); PYTEST_WORKERS=0:
# one process.
PYTEST_WORKERS ?= 2
test: $(VENV)/.installed-test /usr/bin/chromium
	RAY_AUTH_MODE=disabled $(VENV)/bin/python -m pytest -q -n $(PYTEST_WORKERS) --no-loadscope-reorder

.PHONY: setup demo test
