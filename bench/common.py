"""Shared helpers for the peer-comparison benchmark (stdlib + numpy only, importable from both venvs)."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
DEFAULT_OUT_DIR = BENCH_DIR / "out"
DEFAULT_PEERS_PYTHON = BENCH_DIR / ".venv-peers" / "bin" / "python"
DEFAULT_MATERIALIZE = Path("/work/shared/tools/materialize_light_models.py")

# The nine real architectures shipped weight-stripped in the onnx wheel (see materialize_light_models.py).
LIGHT_MODELS = ["resnet50", "densenet121", "inception_v1", "inception_v2", "shufflenet",
                "squeezenet", "vgg19", "bvlc_alexnet", "zfnet512"]
# Bundled samples of onnxcompress.models used when --models all (extended at run time if the
# package exposes a listing function).
BUNDLED_MODELS = ["digits_cnn"]
TOOLS = ["onnxcompress", "nncf", "ort"]
SUBSET_SIZE = 300

N_CALIB = 300
N_TEST = 100
CALIB_SEED = 20240
TEST_SEED = 20241
BENCH_INPUT_SEED = 20242


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sqnr_db(ref: np.ndarray, q: np.ndarray) -> float:
    """10*log10(sum(ref^2) / sum((ref-q)^2)), in float64; +inf when identical."""
    ref = np.asarray(ref, np.float64)
    q = np.asarray(q, np.float64).reshape(ref.shape)
    noise = float(np.sum((ref - q) ** 2))
    sig = float(np.sum(ref ** 2))
    if noise == 0.0:
        return float("inf")
    return float(10.0 * np.log10(sig / noise))


def load_single_input_npz(path: str | os.PathLike, input_name: str | None = None) -> np.ndarray:
    """Return the sample array of a one-input calibration/test npz (axis 0 enumerates samples)."""
    with np.load(path) as z:
        keys = [k for k in z.files if k != "labels"]
        if input_name is not None and input_name in z.files:
            return z[input_name]
        if len(keys) == 1:
            return z[keys[0]]
        raise KeyError(f"{path}: cannot pick the input array among {z.files} (wanted {input_name!r})")


def json_default(o):
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o))


def write_json(path: str | os.PathLike, obj) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=json_default, allow_nan=True)
    os.replace(tmp, path)
