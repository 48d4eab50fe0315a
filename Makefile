# `make demo`: set up and run the demo evolution. `make test`: set up and run the whole test suite.
PYTHON ?= python3
VENV := .venv
# Where a machine keeps a local CPU build of torch, use it instead of downloading a CUDA build.
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels)

# pip -qq: errors only, not a warning for every package index page that lacks a package.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -qq $(FIND_LINKS) -e '.[test]'
	touch $@

setup: $(VENV)/.installed

# Browser test: Debian's chromium (system binary, driven by playwright; no browser download).
/usr/bin/chromium:
	apt-get update -qq && apt-get install -y -qq chromium >/dev/null

demo: setup
	RAY_AUTH_MODE=disabled $(VENV)/bin/evo-sft run configs/demo.yaml

test: setup /usr/bin/chromium
	RAY_AUTH_MODE=disabled $(VENV)/bin/python -m pytest -q

.PHONY: setup demo test
