# Set-up is part of every target: a fresh machine needs only Python 3.10-3.12 and these commands.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test test-no-vnni setup training-runtime

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

## The test suite (what CI runs), then its CPU-sensitive part again on an emulated CPU without VNNI.
test: setup training-runtime
	$(BIN)/python -m pytest -q
	$(MAKE) --no-print-directory test-no-vnni

## The quantization tests on an emulated x86 CPU with AVX2 and no VNNI (qemu-user), where ONNX Runtime's integer
## kernels add products in int16 pairs: a VNNI machine still proves the files exact on older CPUs. Tests that
## only evaluate in float are the same on every CPU and are not repeated (emulation is ~100x slower). On a host
## without VNNI the native run has just run them on such a CPU.
NO_VNNI_CPU := Haswell,-pcid,-x2apic,-tsc-deadline,-hle,-rtm,-invpcid
test-no-vnni: setup
	@if [ -r /proc/cpuinfo ] && [ "$$(uname -m)" = x86_64 ] && ! grep -qwE 'avx512_vnni|avx_vnni' /proc/cpuinfo; then \
		echo "SKIPPED the emulated no-VNNI run: this CPU has no VNNI, so the native test run covers it"; \
	elif command -v qemu-x86_64 >/dev/null; then \
		qemu-x86_64 -cpu $(NO_VNNI_CPU) $(BIN)/python -m pytest -q -p no:cacheprovider \
			tests/algorithms/test_int16_pairs.py tests/algorithms/test_ptq.py -k "not in_float_evaluation"; \
	else echo "SKIPPED the emulated no-VNNI run: qemu-user is not installed (apt-get install qemu-user)"; fi
