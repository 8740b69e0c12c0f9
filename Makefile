# Two entry points: `make demo` and `make test`. Both install what is missing first (idempotent).
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
APT_PACKAGES := libopencv-dev libturbojpeg0-dev pkg-config dataset-fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
export OMP_NUM_THREADS ?= 2

.PHONY: setup apt demo test test-fast test-slow bench clean

setup: $(STAMP)

# Debian packages: only when one is missing, after a single `apt-get update`.
apt:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi

$(STAMP): pyproject.toml | apt
	@[ -x $(BIN)/python ] || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q numpy
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

DEMO_OUT ?= runs/demo

demo: setup
	@[ -f data/fashion-mnist/meta.json ] || $(BIN)/nps convert fashion-mnist --out data/fashion-mnist
	$(BIN)/nps run demo --out $(DEMO_OUT)
	@if $(BIN)/nps report --help >/dev/null 2>&1; then \
	  $(BIN)/nps report $(DEMO_OUT)/results.h5 --out $(DEMO_OUT)/report --force; \
	else $(BIN)/nps status $(DEMO_OUT)/results.h5; fi

# The suite runs on both cores (pytest-xdist), a test file per worker so that module fixtures are built once.
TEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test: setup
	$(PYTEST)

# The inner loop: unit tests only (no training on the dataset, no other process, not the architecture zoo).
test-fast: setup
	$(PYTEST) -m "not slow and not e2e and not zoo"

test-slow: setup
	$(PYTEST) -m slow

bench: setup
	$(BIN)/python tools/bench_sampler.py

clean:
	rm -rf $(VENV) runs build *.egg-info
