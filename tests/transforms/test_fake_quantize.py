"""Trainable fake quantizers: the float subgraph computes the paper's quantize-dequantize, and QuantizeLinear /
DequantizeLinear with `trained_step_and_zero_point` reproduce it bit for bit, also after the ranges moved."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.transforms.applier import UnknownNameError, apply_commands
from onnxcompress.transforms.commands import (
    DequantizeBias,
    DequantizeWeight,
    FakeQuantize,
    FakeQuantizeBias,
    FakeQuantizeWeight,
    QuantizeDequantize,
    TrainableQuantizer,
    bias_scale,
)
from onnxcompress.transforms.fake_quantize import trained_step_and_zero_point

RNG = np.random.default_rng(0)
WEIGHT = (RNG.standard_normal((4, 3)) * 0.5).astype(np.float32)
BIAS = (RNG.standard_normal(4) * 0.1).astype(np.float32)


def build_gemm() -> onnx.ModelProto:
    """x[N,3] → Relu → Gemm(W[4,3]ᵀ, b) → y[N,4]."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"], name="relu"),
         helper.make_node("Gemm", ["r", "W", "b"], ["y"], name="fc", transB=1)],
        "gemm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(WEIGHT, "W"), numpy_helper.from_array(BIAS, "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options).run(None, {"x": x})[0]


def quantizers(asymmetric: bool) -> tuple[TrainableQuantizer, TrainableQuantizer]:
    activation = TrainableQuantizer("act", np.float32(0.02), 0, 255, lr_scale=3.0, asymmetric=asymmetric,
                                    zero_point0=12.0 if asymmetric else 0.0)
    weight_step = (np.abs(WEIGHT).max(axis=1) / 7).astype(np.float32)  # 4-bit weights
    return activation, TrainableQuantizer("w", weight_step, -7, 7, lr_scale=3.0)


def fake_quantized(asymmetric: bool, deltas: dict[str, np.ndarray]) -> onnx.ModelProto:
    activation, weight = quantizers(asymmetric)
    graph = gs.import_onnx(build_gemm())
    apply_commands(graph, [FakeQuantize("r", activation, ("fc",)), FakeQuantizeWeight("fc", 1, weight, axis=0),
                           FakeQuantizeBias("fc", 2, activation.step_name, weight.step_name)])
    for tensor in graph.tensors().values():
        if tensor.name in deltas:
            tensor.values = deltas[tensor.name]
    return gs.export_onnx(graph)


def exported(asymmetric: bool, deltas: dict[str, np.ndarray]) -> onnx.ModelProto:
    """The QDQ model the QAT export builds from the same parameters."""
    activation, weight = quantizers(asymmetric)
    a_step, a_zero = trained_step_and_zero_point(activation, deltas)
    w_step, _ = trained_step_and_zero_point(weight, deltas)
    w_q = np.clip(np.round(WEIGHT / w_step[:, None]), -7, 7).astype(np.int8)
    b_step = bias_scale(a_step, w_step)
    graph = gs.import_onnx(build_gemm())
    apply_commands(graph, [QuantizeDequantize("r", a_step, np.asarray(a_zero).astype(np.uint8), ("fc",)),
                           DequantizeWeight("fc", 1, w_q, w_step, 0),
                           DequantizeBias("fc", 2, np.round(BIAS / b_step).astype(np.int32))])
    return gs.export_onnx(graph)


@pytest.mark.parametrize("asymmetric", [False, True])
@pytest.mark.parametrize("moved", [False, True])
def test_export_reproduces_the_fake_quantizer_exactly(asymmetric: bool, moved: bool) -> None:
    names = ["act.low_delta", "act.range_delta"] if asymmetric else ["act.scale_delta"]
    deltas = {name: np.float32(0.05 * (i + 1) if moved else 0.0) for i, name in enumerate(names)}
    deltas["w.scale_delta"] = np.linspace(-0.1, 0.1, 4).astype(np.float32) if moved else np.zeros(4, np.float32)
    x = RNG.standard_normal((64, 3)).astype(np.float32) * 3
    np.testing.assert_array_equal(run(fake_quantized(asymmetric, deltas), x), run(exported(asymmetric, deltas), x))


def test_symmetric_activation_matches_the_paper_formula() -> None:
    """r = s · clamp(round(x / s), 0, 255) with s = step0 · (1 + k·δ); here k·δ = 0.3."""
    graph = gs.import_onnx(build_gemm())
    activation, _ = quantizers(asymmetric=False)
    apply_commands(graph, [FakeQuantize("r", activation, ("fc",))])
    fake_quantized_input = next(n for n in graph.nodes if n.name == "fc").inputs[0]
    graph.outputs = [fake_quantized_input]
    for tensor in graph.tensors().values():
        if tensor.name == "act.scale_delta":
            tensor.values = np.float32(0.1)
    x = np.linspace(-1, 8, 200, dtype=np.float32).reshape(-1, 1).repeat(3, axis=1)
    step = np.float32(0.02) * np.float32(1.3)
    expected = np.clip(np.round(np.maximum(x, 0) / step), 0, 255) * step
    np.testing.assert_allclose(run(gs.export_onnx(graph), x), expected, rtol=1e-6)


def test_shared_quantizer_builds_its_parameters_once() -> None:
    activation, _ = quantizers(asymmetric=False)
    graph = gs.import_onnx(build_gemm())
    apply_commands(graph, [FakeQuantize("x", activation, ("relu",)), FakeQuantize("r", activation, ("fc",))])
    model = gs.export_onnx(graph)
    onnx.checker.check_model(model)
    assert [i.name for i in model.graph.initializer].count("act.scale_delta") == 1
    assert sum(n.op_type == "Round" for n in model.graph.node) == 2


def test_bias_before_its_quantizers_is_an_error() -> None:
    graph = gs.import_onnx(build_gemm())
    with pytest.raises(UnknownNameError, match="insert its quantizers first"):
        apply_commands(graph, [FakeQuantizeBias("fc", 2, "act.step", "w.step")])
