# Two entry points for a fresh Debian/Ubuntu machine:
#   make demo   installs everything, then runs the main job on the embedded default
#   make test   installs everything, then runs the test suite (what .ci/run calls)
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# torch 2.14.1 / torchvision 0.29.1 are the newest pair that installs offline on the project's machines.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.deltatl-installed

.PHONY: install system-deps demo test clean

install: system-deps $(STAMP)

# postgresql: the tests start a throwaway server on loopback for `deltatl search --storage postgresql://`
system-deps:
	@dpkg -s dataset-fashion-mnist postgresql >/dev/null 2>&1 || { \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq dataset-fashion-mnist postgresql; }

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: install
	$(VENV)/bin/deltatl demo

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
