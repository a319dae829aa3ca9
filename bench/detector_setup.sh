#!/usr/bin/env bash
# Create the detector venv (bench/.venv-detector): torch 2.14.1 + torchvision 0.29.1 + ultralytics + onnx.
#
# Bench-only. It exists to *train* a small YOLOv8n detector from scratch on a synthetic data set
# (bench/detector_prepare.py) and export it to ONNX; the evaluation (bench/detector_eval.py) runs in
# the main venv and never needs torch.
#
# torch/torchvision are installed first, in this exact pair (both lie on this machine's disk, as do the
# CUDA runtime wheels the 2.14.1 build links against: torch cannot even be imported without them, although
# everything here runs on the CPU). ultralytics is then installed with --no-deps plus an explicit list of
# its runtime deps, so that it can never pull another torch build and so that only the headless OpenCV is
# installed (ultralytics asks for the GUI `opencv-python`, which would clash with the headless cv2).
#
# usage: bash bench/detector_setup.sh [PYTHON]     (PYTHON defaults to python3; must be 3.11)
#        DETECTOR_VENV=/some/dir bash bench/detector_setup.sh
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="${1:-python3}"
VENV="${DETECTOR_VENV:-$HERE/.venv-detector}"
TORCH=torch==2.14.1
TORCHVISION=torchvision==0.29.1
# importing ultralytics writes a settings file into its config dir: keep it under bench/out, not in ~/.config
export YOLO_CONFIG_DIR="${YOLO_CONFIG_DIR:-$HERE/out/detector/ultralytics-config}"
export YOLO_OFFLINE=1
# ultralytics' runtime requirements (its METADATA), minus torch/torchvision (already there) and with the
# headless OpenCV instead of opencv-python.
ULTRA_DEPS=("numpy>=1.23.0" "matplotlib>=3.3.0" "opencv-python-headless>=4.7.0" "pillow>=7.1.2"
            "pyyaml>=5.3.1" "requests>=2.23.0" "psutil>=5.8.0" "polars>=0.20.0" "nvidia-ml-py>=12.0.0"
            "ultralytics-thop>=2.2.3" "ultralytics-platform>=0.1.45" onnx
            # not an ultralytics dep: detector_prepare.py runs the exported ONNX file once as a check
            onnxruntime)

check() {  # exit 0 iff the venv is complete
    [ -x "$VENV/bin/python" ] || return 1
    "$VENV/bin/python" - <<'EOF' 2>/dev/null
import importlib.metadata as md, sys
v = {p: md.version(p) for p in ("torch", "torchvision", "ultralytics", "onnx", "opencv-python-headless")}
assert v["torch"].split("+")[0] == "2.14.1" and v["torchvision"].split("+")[0] == "0.29.1", v
try:
    md.version("opencv-python")
    sys.exit(1)  # the GUI OpenCV must not be there (it shadows the headless cv2)
except md.PackageNotFoundError:
    pass
import torch, torchvision, cv2, onnx, onnxruntime, ultralytics, matplotlib, PIL, numpy  # noqa: F401
EOF
}

if check; then
    echo "[detector-setup] $VENV already complete, nothing to do"
else
    PYV="$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
    if [ "$PYV" != "3.11" ]; then
        echo "[detector-setup] ERROR: $PY is Python $PYV; the local torch 2.14.1 wheels are cp311 only" >&2
        exit 1
    fi
    if [ ! -x "$VENV/bin/python" ]; then
        echo "[detector-setup] creating $VENV with $PY ($("$PY" --version))"
        "$PY" -m venv "$VENV"
    fi
    PIP=("$VENV/bin/python" -m pip)
    # pip prints a warning for every local index without the package; hide only those lines
    quiet() { "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; return "${PIPESTATUS[0]}"; }

    echo "[detector-setup] installing $TORCH $TORCHVISION (+ their CUDA runtime wheels, from local disk)"
    quiet "${PIP[@]}" install -q "$TORCH" "$TORCHVISION"

    # ultralytics itself, without deps, then its deps with the torch pair pinned so nothing can move it.
    PINS="$(mktemp)"
    trap 'rm -f "$PINS"' EXIT
    "$VENV/bin/python" -c 'import importlib.metadata as md
for p in ("torch", "torchvision"): print(f"{p}=={md.version(p)}")' > "$PINS"
    echo "[detector-setup] installing ultralytics (--no-deps) + ${ULTRA_DEPS[*]}"
    quiet "${PIP[@]}" install -q --no-deps ultralytics
    quiet "${PIP[@]}" install -q -c "$PINS" "${ULTRA_DEPS[@]}"
    echo "[detector-setup] (pip's note that ultralytics requires opencv-python is expected: opencv-python-headless provides cv2)"
    if "$VENV/bin/python" -m pip show -q opencv-python >/dev/null 2>&1; then
        quiet "${PIP[@]}" uninstall -q -y opencv-python
        quiet "${PIP[@]}" install -q --force-reinstall --no-deps opencv-python-headless
    fi
    if ! check; then
        echo "[detector-setup] ERROR: $VENV is incomplete after installing" >&2
        exit 1
    fi
fi

"$VENV/bin/python" - <<'EOF'
import importlib.metadata as md
for p in ("torch", "torchvision", "ultralytics", "onnx", "onnxruntime", "numpy", "pillow", "opencv-python-headless", "matplotlib"):
    print(f"[detector-setup] {p:24s} {md.version(p)}")
print("[detector-setup] OK:", __import__("sys").executable)
EOF
