import onnx_graphsurgeon as gs
from onnx import TensorProto, helper

from onnxcompress.transforms.passes import remove_identity


def _model():
    nodes = [helper.make_node("Identity", ["x"], ["i1"], name="id1"),
             helper.make_node("Relu", ["i1"], ["r"], name="relu"),
             helper.make_node("Dropout", ["r"], ["d"], name="drop"),
             helper.make_node("Identity", ["d"], ["y"], name="id_out")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_bypasses_identities_but_keeps_graph_output_names():
    graph = gs.import_onnx(_model())
    assert remove_identity(graph) is True
    assert [n.name for n in graph.nodes] == ["relu", "id_out"]
    assert graph.nodes[0].inputs[0].name == "x"
    assert [t.name for t in graph.outputs] == ["y"]
    assert remove_identity(graph) is False
