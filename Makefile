# MicroFarm: `make demo` renders a demo animation on a local farm; `make test` runs the test suite.
# Both set up what they need: a .venv with Python 3.11 (bpy 5.0.1 exists for CPython 3.11 only).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast lint bench clean system-deps test-system-deps stock-blenders

# System programs the farm uses: ffmpeg for videos; the web tests also drive Debian's Chromium.
# Installed with apt-get when missing (as root, or with sudo).
APT_INSTALL = if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq
system-deps:
	@command -v ffmpeg >/dev/null 2>&1 || { echo "installing ffmpeg"; $(APT_INSTALL) ffmpeg >/dev/null; }

test-system-deps: system-deps
	@command -v chromium >/dev/null 2>&1 || { echo "installing chromium"; $(APT_INSTALL) chromium >/dev/null; }

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "MicroFarm needs Python 3.11 (PyPI bpy 5.0.1 is built for it); set PYTHON=/path/to/python3.11")'
	@$(PYTHON) -m venv --help >/dev/null 2>&1 || { echo "python3.11-venv is missing: sudo apt-get install python3.11-venv"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP) system-deps
	$(PY) -m tools.demo

# The version matrix: stock bpy 4.2, 4.5, 5.0 (CPython 3.11) and 5.3 (CPython 3.13, from PATH or pyenv), one
# cached venv each (tools.bpyenv). Without a CPython 3.13 its tests are skipped, except under CI=true.
stock-blenders: $(STAMP)
	@$(PY) -m tools.bpyenv || [ "$$CI" != true ]

test: $(STAMP) test-system-deps stock-blenders
	$(PY) -m pytest -q

# The unit group (tests/conftest.py: no subprocess, bpy, browser or farm server): seconds, and no system programs.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m unit

lint: $(STAMP)
	$(PY) -m ruff check .

bench: $(STAMP)
	$(PY) -m tools.bench overhead

clean:
	rm -rf $(VENV) demo_output
