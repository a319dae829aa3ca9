# Set-up is part of every target: a fresh machine needs only Python 3.10-3.12 and these commands.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test setup

$(BIN)/onnxcompress: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

setup: $(BIN)/onnxcompress

## Main job: quantize the bundled digits CNN, compile to OpenVINO, benchmark, print before/after.
demo: setup
	$(BIN)/onnxcompress demo

## The test suite (what CI runs).
test: setup
	$(BIN)/python -m pytest -q
