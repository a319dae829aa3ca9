"""Which ONNX Runtime integer kernels saturate on this CPU: worst-case QDQ layers (u8 activations at 255, every
weight at +127) run fused (ORT_ENABLE_ALL) and in float (ORT_DISABLE_ALL); any difference is kernel arithmetic.

Run it natively and under an emulated CPU without VNNI (qemu-user from Debian's `qemu-user` package):

    .venv/bin/python bench/isa_probe.py
    qemu-x86_64 -cpu Haswell .venv/bin/python bench/isa_probe.py

The op-table field `int16_pairs` records the result (transforms/op_table.py); docs/benchmarks.md has the table.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.runtime.cpu import cpu_features

CHANNELS = 16
CASES = {  # name: (op, input shape, weight shape, attributes, weight channel axis)
    "Conv 3x3": ("Conv", [1, CHANNELS, 6, 6], (8, CHANNELS, 3, 3), {"pads": [1, 1, 1, 1]}, 0),
    "Conv 1x1": ("Conv", [1, CHANNELS, 6, 6], (8, CHANNELS, 1, 1), {}, 0),
    "Conv, 3 input channels": ("Conv", [1, 3, 6, 6], (8, 3, 3, 3), {"pads": [1, 1, 1, 1]}, 0),
    "Conv depthwise": ("Conv", [1, CHANNELS, 6, 6], (CHANNELS, 1, 3, 3), {"pads": [1, 1, 1, 1], "group": CHANNELS}, 0),
    "Conv grouped (2)": ("Conv", [1, CHANNELS, 6, 6], (8, CHANNELS // 2, 3, 3), {"pads": [1, 1, 1, 1], "group": 2}, 0),
    "Gemm": ("Gemm", [4, 64], (8, 64), {"transB": 1}, 0),
    "MatMul": ("MatMul", [4, 64], (64, 8), {}, 1),
    "ConvTranspose": ("ConvTranspose", [1, CHANNELS, 6, 6], (CHANNELS, 8, 3, 3), {}, 1),
}


def _model(op: str, x_shape: list[int], w_shape: tuple[int, ...], attrs: dict, axis: int, zero_point: int) -> bytes:
    channels = w_shape[axis]
    initializers = [
        numpy_helper.from_array(np.array(1 / 255, np.float32), "xs"),
        numpy_helper.from_array(np.array(zero_point, np.uint8), "xz"),
        numpy_helper.from_array(np.full(w_shape, 127, np.int8), "wq"),
        numpy_helper.from_array(np.full(channels, 1 / 127, np.float32), "ws"),
        numpy_helper.from_array(np.zeros(channels, np.int8), "wz"),
        numpy_helper.from_array(np.array(1000 / 255, np.float32), "ys"),
        numpy_helper.from_array(np.array(0, np.uint8), "yz")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=axis),
             helper.make_node(op, ["xd", "wd"], ["y"], **attrs),
             helper.make_node("QuantizeLinear", ["y", "ys", "yz"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["out"])]
    graph = helper.make_graph(nodes, op, [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def _run(model: bytes, x: np.ndarray, level: ort.GraphOptimizationLevel) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.log_severity_level = 3
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _fused_ops(model: bytes) -> list[str]:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(Path(folder) / "opt.onnx")
        ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        ops = [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]
    return [op for op in ops if op not in ("QuantizeLinear", "DequantizeLinear")]


def main() -> None:
    print(cpu_features().describe())
    print(f"{'layer':24} {'activations':12} {'ORT kernel':14} {'max |fused - float|':>20} {'|float|':>8}")
    for zero_point in (0, 128):
        for name, (op, x_shape, w_shape, attrs, axis) in CASES.items():
            model = _model(op, x_shape, w_shape, attrs, axis, zero_point)
            x = np.full(x_shape, (255 - zero_point) / 255, np.float32)  # every u8 level at 255
            in_float = _run(model, x, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
            fused = _run(model, x, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
            kind = "u8" if zero_point == 0 else "u8 (zp 128)"
            print(f"{name:24} {kind:12} {','.join(_fused_ops(model)):14} "
                  f"{float(np.abs(fused - in_float).max()):>20.3g} {float(np.abs(in_float).max()):>8.3g}")


if __name__ == "__main__":
    main()
