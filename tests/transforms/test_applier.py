import numpy as np
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.transforms.applier import UnknownNameError, apply_commands
from onnxcompress.transforms.commands import DequantizeBias, DequantizeWeight, QuantizeDequantize, SetConstantInput


def _conv_without_bias():
    w = numpy_helper.from_array(np.full((2, 1, 1, 1), 0.5, np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="conv")]
    return gs.import_onnx(helper.make_model(helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 2, 2])], [w]),
        opset_imports=[helper.make_opsetid("", 17)]))


def _run(graph, x):
    model = gs.export_onnx(graph)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("reverse", [False, True])
def test_commands_quantize_weights_add_a_missing_bias_and_insert_qdq(reverse):
    """In any list order: the bias quantizer's phase comes after the input and weight quantizers it reads."""
    graph = _conv_without_bias()
    commands = [
        QuantizeDequantize("x", np.array(0.1, np.float32), np.array(128, np.uint8), ("conv",)),
        DequantizeWeight("conv", 1, np.array([[[[100]]], [[[-50]]]], np.int8), np.array([0.005, 0.01], np.float32), 0),
        DequantizeBias("conv", 2, np.array([10000, -20000], np.int32)),
    ]
    apply_commands(graph, commands[::-1] if reverse else commands)
    ops = sorted(n.op for n in graph.nodes)
    assert ops == ["Conv", "DequantizeLinear", "DequantizeLinear", "DequantizeLinear", "Mul", "QuantizeLinear"]
    conv = next(n for n in graph.nodes if n.op == "Conv")
    weight_dq, bias_dq = conv.inputs[1].inputs[0], conv.inputs[2].inputs[0]
    assert len(weight_dq.inputs) == 2  # Conv weights: the all-zero zero-point is left out
    # The bias scale is not stored: it is the product of the input and weight scales, computed in the graph.
    bias_scale_mul = bias_dq.inputs[1].inputs[0]
    assert bias_scale_mul.op == "Mul" and len(bias_dq.inputs) == 2
    assert bias_scale_mul.inputs == [conv.inputs[0].inputs[0].inputs[1], weight_dq.inputs[1]]
    x = np.array([[[[1.0, -1.0], [0.25, 12.0]]]], np.float32)  # 12.0 saturates at 127 levels × 0.1
    q = np.clip(np.round(x / 0.1) + 128, 0, 255) - 128
    expected = np.stack([q * 0.1 * 0.5 + 5.0, q * 0.1 * -0.5 - 20.0], axis=1)[:, :, 0]
    np.testing.assert_allclose(_run(graph, x), expected, rtol=1e-5, atol=1e-5)


def test_gemm_weights_keep_their_zero_point_for_onnx_runtime_fusion():
    w = numpy_helper.from_array(np.full((3, 2), 0.5, np.float32), "w")
    graph = gs.import_onnx(helper.make_model(helper.make_graph(
        [helper.make_node("Gemm", ["x", "w"], ["y"], name="fc")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], [w]),
        opset_imports=[helper.make_opsetid("", 17)]))
    apply_commands(graph, [DequantizeWeight("fc", 1, np.full((3, 2), 64, np.int8), np.array([0.5, 0.25], np.float32),
                                            1)])
    weight_dq = next(n for n in graph.nodes if n.op == "DequantizeLinear")
    assert len(weight_dq.inputs) == 3 and not weight_dq.inputs[2].values.any()


def test_bias_needs_dequantized_input_and_weight():
    graph = _conv_without_bias()
    with pytest.raises(UnknownNameError, match="bias of 'conv': its input and weight must be dequantized first"):
        apply_commands(graph, [DequantizeBias("conv", 2, np.array([1, 2], np.int32))])


def test_set_constant_input_and_unknown_names():
    graph = _conv_without_bias()
    apply_commands(graph, [SetConstantInput("conv", 2, np.array([1.0, 2.0], np.float32))])
    out = _run(graph, np.ones((1, 1, 2, 2), np.float32))
    np.testing.assert_allclose(out[0, :, 0, 0], [1.5, 2.5])
    with pytest.raises(UnknownNameError, match="no node named 'nope'"):
        apply_commands(graph, [SetConstantInput("nope", 2, np.zeros(2, np.float32))])
    with pytest.raises(UnknownNameError, match="no tensor named 'missing'"):
        apply_commands(graph, [QuantizeDequantize("missing", np.array(1.0), np.array(0, np.uint8), ("conv",))])


def _two_readers():
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="a"), helper.make_node("Neg", ["x"], ["b"], name="b")]
    return gs.import_onnx(helper.make_model(helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [4]) for n in "ab"]),
        opset_imports=[helper.make_opsetid("", 17)]))


def test_two_quantizers_on_one_tensor_get_their_own_names():
    graph = _two_readers()
    apply_commands(graph, [QuantizeDequantize("x", np.array(0.5, np.float32), np.array(0, np.int8), ("a",)),
                           QuantizeDequantize("x", np.array(0.25, np.float32), np.array(0, np.int8), ("b",))])
    node_names = [n.name for n in graph.nodes]
    assert len(node_names) == len(set(node_names)) and {"x_Q", "x.1_Q"} <= set(node_names)
    assert {"x_scale", "x.1_scale", "x_dq", "x.1_dq"} <= graph.tensors().keys()
    model = gs.export_onnx(graph)
    x = np.array([0.3, -0.8, 1.1, 40.0], np.float32)
    a, b = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_allclose(a, np.maximum(np.clip(np.round(x / 0.5), -128, 127) * 0.5, 0))
    np.testing.assert_allclose(b, -np.clip(np.round(x / 0.25), -128, 127) * 0.25)


def test_insertion_points_are_checked_before_anything_changes():
    graph = _two_readers()
    with pytest.raises(UnknownNameError, match="node 'a' does not read tensor 'b'"):
        apply_commands(graph, [QuantizeDequantize("b", np.array(1.0), np.array(0, np.uint8), ("a",))])
    with pytest.raises(UnknownNameError, match="tensor 'x' is not a graph output"):
        apply_commands(graph, [QuantizeDequantize("x", np.array(1.0), np.array(0, np.uint8), ("a",), True)])
    with pytest.raises(UnknownNameError, match="node 'a' has no input 3"):
        apply_commands(graph, [SetConstantInput("a", 3, np.zeros(1, np.float32))])
    assert [n.op for n in graph.nodes] == ["Relu", "Neg"]


@pytest.mark.parametrize("same_scale", [True, False])
def test_a_weight_two_nodes_share_is_stored_once_when_they_quantize_it_alike(same_scale):
    w = numpy_helper.from_array(np.full((2, 1, 1, 1), 0.5, np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["a"], name="a"), helper.make_node("Conv", ["x", "w"], ["b"], name="b")]
    graph = gs.import_onnx(helper.make_model(helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 2, 2])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 2, 2, 2]) for n in "ab"], [w]),
        opset_imports=[helper.make_opsetid("", 17)]))
    levels, scale = np.array([[[[100]]], [[[-50]]]], np.int8), np.array([0.005, 0.01], np.float32)
    other_scale = scale if same_scale else scale * 2
    apply_commands(graph, [DequantizeWeight("a", 1, levels, scale, 0), DequantizeWeight("b", 1, levels, other_scale, 0)])
    assert [n.op for n in graph.nodes].count("DequantizeLinear") == (1 if same_scale else 2)
    a, b = _run_all(graph, np.ones((1, 1, 2, 2), np.float32))
    np.testing.assert_allclose(b, a * (1 if same_scale else 2))


def _run_all(graph, x):
    model = gs.export_onnx(graph)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
