import numpy as np
import onnx_graphsurgeon as gs
import onnxruntime as ort
from onnx import TensorProto, helper

from onnxcompress.transforms.passes import relu_before_concat


def _model(output_is_concat: bool = False):
    nodes = [helper.make_node("AveragePool", ["x"], ["p"], name="pool", kernel_shape=[1, 1]),
             helper.make_node("Neg", ["x"], ["n"], name="neg"),
             helper.make_node("Concat", ["p", "n"], ["c"], name="concat", axis=1),
             helper.make_node("Relu", ["c"], ["y"], name="relu")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 2, 2])]
    if output_is_concat:
        outputs.append(helper.make_tensor_value_info("c", TensorProto.FLOAT, [1, 4, 2, 2]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 2, 2])],
                              outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(graph: gs.Graph, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(gs.export_onnx(graph).SerializeToString()).run(["y"], {"x": x})[0]


def test_relu_moves_onto_the_concat_inputs_with_the_same_result():
    x = np.random.default_rng(0).standard_normal((1, 2, 2, 2)).astype(np.float32)
    graph = gs.import_onnx(_model())
    expected = _run(graph, x)
    assert relu_before_concat(graph) is True
    concat = next(n for n in graph.nodes if n.op == "Concat")
    assert [t.inputs[0].op for t in concat.inputs] == ["Relu", "Relu"]
    assert concat.outputs[0].name == "y" and [t.name for t in graph.outputs] == ["y"]
    np.testing.assert_array_equal(_run(graph, x), expected)
    assert relu_before_concat(graph) is False


def test_a_concat_read_elsewhere_is_left_alone():
    graph = gs.import_onnx(_model(output_is_concat=True))
    assert relu_before_concat(graph) is False
