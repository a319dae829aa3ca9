#!/usr/bin/env bash
# Create the peer-benchmark venv (bench/.venv-peers) with NNCF 3.4.0 + ONNX Runtime + OpenVINO.
#
# The peers live in their own venv so that NNCF's pins can never disturb the main venv (.venv).
# torch must never be installed (it drags GBs of CUDA wheels): the resolution is dry-run first and,
# if anything torch-like shows up, NNCF is installed with --no-deps plus its ONNX-backend deps.
#
# usage: bash bench/setup.sh [PYTHON]        (PYTHON defaults to python3; needs 3.10-3.12)
#        PEERS_VENV=/some/dir bash bench/setup.sh
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="${1:-python3}"
VENV="${PEERS_VENV:-$HERE/.venv-peers}"
# sympy: needed by onnxruntime.quantization.shape_inference.quant_pre_process (symbolic shape inference)
# tokenizers: the real-encoder case tokenizes its text with the tokenizer.json its package ships
# onnx_ir: onnxruntime's MatMulNBitsQuantizer (bench/compress_weights_peer.py) imports it
PKGS=(nncf==3.4.0 onnx onnxruntime openvino scikit-learn psutil tqdm numpy sympy tokenizers onnx_ir)
# NNCF's own requirements minus anything torch-related (used only in the --no-deps fallback).
NNCF_DEPS=(jsonschema jstyleson natsort networkx ninja "numpy>=1.24" openvino-telemetry packaging
           psutil pydot pymoo rich safetensors scikit-learn scipy tabulate tqdm ml_dtypes)

if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV with $PY"
    "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip)
"${PIP[@]}" install -q --upgrade pip

REPORT="$(mktemp)"
trap 'rm -f "$REPORT"' EXIT
echo "[setup] resolving: ${PKGS[*]}"
"${PIP[@]}" install -q --dry-run --ignore-installed --report "$REPORT" "${PKGS[@]}" >/dev/null
RESOLVED="$("$VENV/bin/python" - "$REPORT" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
print(" ".join(f"{i['metadata']['name']}=={i['metadata']['version']}" for i in r["install"]))
EOF
)"
echo "[setup] pip would install: $RESOLVED"

if echo " $RESOLVED " | tr 'A-Z' 'a-z' | grep -qE ' (torch|torchvision|nvidia-[a-z0-9_-]+|triton)=='; then
    echo "[setup] WARNING: resolution pulls torch/CUDA -> installing nncf with --no-deps"
    "${PIP[@]}" install -q --no-deps nncf==3.4.0
    "${PIP[@]}" install -q onnx onnxruntime openvino scikit-learn psutil tqdm sympy "${NNCF_DEPS[@]}"
else
    "${PIP[@]}" install -q "${PKGS[@]}"
fi

# Hard guarantee: no torch in the peers venv.
if "$VENV/bin/python" -c "import importlib.util,sys; sys.exit(0 if importlib.util.find_spec('torch') else 1)"; then
    echo "[setup] ERROR: torch ended up installed in $VENV" >&2
    exit 1
fi

"$VENV/bin/python" - <<'EOF'
import importlib.metadata as md
for p in ("nncf", "onnx", "onnxruntime", "openvino", "numpy", "scikit-learn", "psutil", "sympy"):
    print(f"[setup] {p:14s} {md.version(p)}")
import nncf, onnxruntime.quantization  # noqa: F401  (import check)
print("[setup] OK:", __import__("sys").executable)
EOF
