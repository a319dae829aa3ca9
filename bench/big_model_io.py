"""Push a synthetic model over protobuf's 2 GiB limit through save_model, load_model, onnxruntime and quantize.

Builds a chain of float32 [N, N] MatMuls (3 x 14000^2 x 4 B = 2.35 GB by default), saves it with
automatic external data, loads it back, checks every weight and the onnxruntime output against
numpy, quantizes it to INT8 (the calibration session gets the weights as arrays) and checks the INT8 output's
SQNR, and prints the time and memory of each step. All files are deleted at the end.

    .venv/bin/python bench/big_model_io.py [--dir DIR] [--size 14000] [--layers 3]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import psutil
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.api import quantize
from onnxcompress.runtime.model_io import load_model, model_file_size, save_model

GB = 1e9


def weight(layer: int, size: int) -> np.ndarray:
    """Deterministic weights, regenerated on demand instead of being kept in memory."""
    rng = np.random.default_rng(layer)
    return rng.standard_normal((size, size), dtype=np.float32) / np.float32(np.sqrt(size))


def build_model(size: int, layers: int) -> onnx.ModelProto:
    names = ["x", *(f"h{i}" for i in range(1, layers)), "y"]
    nodes = [helper.make_node("MatMul", [names[i], f"W{i}"], [names[i + 1]]) for i in range(layers)]
    graph = helper.make_graph(
        nodes,
        "big_matmul_chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, size])],
    )
    for layer in range(layers):
        # Filled in place: passing tensors to make_graph would hold them all twice.
        tensor = graph.initializer.add()
        tensor.name, tensor.data_type = f"W{layer}", TensorProto.FLOAT
        tensor.dims.extend([size, size])
        tensor.raw_data = weight(layer, size).tobytes()
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def rss_gb() -> float:
    return float(psutil.Process().memory_info().rss) / GB


def reset_peak_rss() -> None:
    """Restart the kernel's peak-RSS counter (Linux >= 4.0), so each step reports its own peak."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss_gb() -> float:
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) * 1024 / GB


PEAKS: list[float] = []


@contextmanager
def step(name: str) -> Iterator[None]:
    reset_peak_rss()
    start = time.perf_counter()
    yield
    elapsed = time.perf_counter() - start
    PEAKS.append(peak_rss_gb())
    print(f"{name:<38} {elapsed:6.1f} s   rss after {rss_gb():5.2f} GB   peak rss {PEAKS[-1]:5.2f} GB", flush=True)


def load_and_check(path: Path, size: int, x: np.ndarray) -> np.ndarray:
    """load_model the saved file, compare every weight with numpy and return numpy's output for `x`."""
    with step("load_model"):
        loaded = load_model(path)
    print(f"loaded: ir_version {loaded.ir_version}, opset {loaded.opset_import[0].version}")
    expected = x
    with step("compare weights with numpy"):
        for layer, tensor in enumerate(loaded.graph.initializer):
            w = weight(layer, size)
            assert np.array_equal(numpy_helper.to_array(tensor), w), f"weight {layer} differs"
            expected = expected @ w
    return expected


def run(folder: Path, size: int, layers: int) -> None:
    path = folder / "big.onnx"
    x = np.random.default_rng(1234).standard_normal((1, size), dtype=np.float32)

    with step(f"build {layers} x [{size}, {size}] model"):
        model = build_model(size, layers)
    with step("save_model (automatic external data)"):
        save_model(model, path)
    del model
    files = {p.name: p.stat().st_size for p in folder.iterdir()}
    print(f"files: {files}; model_file_size = {model_file_size(path) / GB:.3f} GB")

    expected = load_and_check(path, size, x)
    # A >2 GiB ModelProto cannot be serialized for onnxruntime: it reads the saved files instead.
    with step("onnxruntime session from path"):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with step("onnxruntime run"):
        (y,) = session.run(None, {"x": x})
    error = float(np.max(np.abs(y - expected)))
    print(f"max |ort - numpy| = {error:.2e} (max |y| {np.max(np.abs(expected)):.2f})")
    assert np.allclose(y, expected, rtol=1e-3, atol=1e-3), "onnxruntime output differs from numpy"
    del session
    quantize_and_check(path, folder / "big.int8.onnx", size, x, expected)
    print(f"OK; highest peak RSS of any step: {max(PEAKS):.2f} GB")


def quantize_and_check(path: Path, output: Path, size: int, x: np.ndarray, expected: np.ndarray) -> None:
    rng = np.random.default_rng(7)
    calibration = [{"x": rng.standard_normal((1, size), dtype=np.float32)} for _ in range(8)]
    with step("onnxcompress quantize (8 samples)"):
        quantized = quantize(path, calibration, progress=False)
    with step("save_model INT8"):
        save_model(quantized, output)
    del quantized
    print(f"INT8 file {model_file_size(output) / GB:.3f} GB ({model_file_size(output) / model_file_size(path):.3f}x)")
    with step("onnxruntime INT8 session + run"):
        (y,) = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    noise = float(np.sum((y.astype(np.float64) - expected) ** 2))
    sqnr = 10 * np.log10(float(np.sum(expected.astype(np.float64) ** 2)) / noise)
    print(f"INT8 output SQNR vs numpy FP32: {sqnr:.1f} dB")
    assert sqnr > 25, "INT8 output too far from float"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=None, help="parent folder for the temporary files")
    parser.add_argument("--size", type=int, default=14000, help="side of each square weight")
    parser.add_argument("--layers", type=int, default=3)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="big_model_io.", dir=args.dir))
    try:
        run(folder, args.size, args.layers)
    finally:
        shutil.rmtree(folder)
        print(f"removed {folder}")


if __name__ == "__main__":
    main()
