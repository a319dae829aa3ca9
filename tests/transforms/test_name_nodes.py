import onnx_graphsurgeon as gs
from onnx import TensorProto, helper

from onnxcompress.transforms.passes import name_nodes


def test_names_unnamed_and_duplicate_nodes_uniquely():
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Relu", ["a"], ["b"], name="dup"),
             helper.make_node("Relu", ["b"], ["y"], name="dup")]
    graph = gs.import_onnx(helper.make_model(helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])))
    assert name_nodes(graph) is True
    names = [n.name for n in graph.nodes]
    assert len(set(names)) == 3 and names[1] == "dup" and all(names)
    assert name_nodes(graph) is False
