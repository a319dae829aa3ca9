"""MaskWeight: weight · mask in the graph, read by the node and by any later command on the same input."""

import numpy as np
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.transforms.applier import UnknownNameError, apply_commands
from onnxcompress.transforms.commands import FakeQuantizeWeight, MaskWeight, TrainableQuantizer

WEIGHT = np.arange(1, 9, dtype=np.float32).reshape(2, 4) / 8  # Gemm transB: [out, in]
MASK = np.array([[1, 0, 1, 0], [0, 0, 1, 1]], np.float32)


def _gemm() -> gs.Graph:
    nodes = [helper.make_node("Gemm", ["x", "w"], ["y"], name="fc", transB=1)]
    return gs.import_onnx(helper.make_model(helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], [numpy_helper.from_array(WEIGHT, "w")]),
        opset_imports=[helper.make_opsetid("", 17)]))


def _run(graph: gs.Graph, x: np.ndarray) -> np.ndarray:
    model = gs.export_onnx(graph)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_the_node_reads_the_masked_weight_and_the_weight_stays_a_constant() -> None:
    graph = apply_commands(_gemm(), [MaskWeight("fc", 1, "fc.weight_mask", MASK)])
    x = np.array([[1.0, 2.0, 3.0, 4.0]], np.float32)
    np.testing.assert_allclose(_run(graph, x), x @ (WEIGHT * MASK).T, rtol=1e-6)
    mul = next(n for n in graph.nodes if n.op == "Mul")
    assert [t.name for t in mul.inputs] == ["w", "fc.weight_mask"] and mul.outputs[0].name == "fc.weight_mask.applied"
    assert isinstance(mul.inputs[0], gs.Constant)  # still the trainable float weight


def test_a_weight_quantizer_after_the_mask_quantizes_the_masked_weight() -> None:
    quantizer = TrainableQuantizer("w.quantizer", np.full(2, 1 / 127, np.float32), -127, 127, 1.0)
    commands = [MaskWeight("fc", 1, "fc.weight_mask", MASK), FakeQuantizeWeight("fc", 1, quantizer, 0)]
    graph = apply_commands(_gemm(), commands)
    x = np.eye(4, dtype=np.float32)[:1]
    expected = np.round(WEIGHT * MASK * 127) / 127
    np.testing.assert_allclose(_run(graph, x), x @ expected.T, atol=1e-6)
    assert _run(graph, np.eye(4, dtype=np.float32)[1:2])[0, 0] == 0.0  # a masked weight is an exact zero


def test_wrong_mask_shape_and_unknown_node_are_errors() -> None:
    with pytest.raises(ValueError, match=r"shaped \[4, 2\], the weight of 'fc' \[2, 4\]"):
        apply_commands(_gemm(), [MaskWeight("fc", 1, "m", MASK.T)])
    with pytest.raises(UnknownNameError, match="no node named 'conv'"):
        apply_commands(_gemm(), [MaskWeight("conv", 1, "m", MASK)])
    with pytest.raises(UnknownNameError, match="input 0 of node 'fc' is not a constant weight"):
        apply_commands(_gemm(), [MaskWeight("fc", 0, "m", MASK)])


def test_a_second_mask_multiplies_the_first() -> None:
    graph = _gemm()
    first = np.ones_like(WEIGHT)
    first[0] = 0
    second = np.ones_like(WEIGHT)
    second[:, 1] = 0
    apply_commands(graph, [MaskWeight("fc", 1, "fc.filter_mask", first), MaskWeight("fc", 1, "fc.weight_mask", second)])
    x = np.arange(1, 5, dtype=np.float32)[None]
    np.testing.assert_allclose(_run(graph, x), x @ (WEIGHT * first * second).T, rtol=1e-6)
