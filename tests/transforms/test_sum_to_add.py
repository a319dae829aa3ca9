import onnx_graphsurgeon as gs
from onnx import TensorProto, helper

from onnxcompress.transforms.passes import sum_to_add


def test_two_input_sum_becomes_add_and_wider_sums_stay():
    nodes = [helper.make_node("Sum", ["a", "b"], ["s2"], name="s2"),
             helper.make_node("Sum", ["a", "b", "s2"], ["y"], name="s3")]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2]) for n in ("a", "b")]
    graph = gs.import_onnx(helper.make_model(helper.make_graph(
        nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])))
    assert sum_to_add(graph) is True
    assert [n.op for n in graph.nodes] == ["Add", "Sum"]
    assert sum_to_add(graph) is False
