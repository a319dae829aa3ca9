# Set-up is part of every target: a fresh machine needs only Python 3.10-3.12 and these commands.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test setup training-runtime

$(BIN)/onnxcompress: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

setup: $(BIN)/onnxcompress

## Main job: quantize the bundled digits CNN, compile to OpenVINO, benchmark, print before/after.
demo: setup
	$(BIN)/onnxcompress demo

## The private onnxruntime-training runtime used for fine-tuning (own folder under ~/.cache, own process; see
## runtime/training_env.py). Idempotent: a complete install is only checked. Skipped where it cannot exist.
training-runtime: setup
	$(BIN)/python -m onnxcompress.runtime.training_env --install --skip-unsupported

## The test suite (what CI runs).
test: setup training-runtime
	$(BIN)/python -m pytest -q
