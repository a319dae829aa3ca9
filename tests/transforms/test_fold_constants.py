import numpy as np
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.transforms.passes import fold_constants


def test_transposed_weight_becomes_an_initializer():
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    nodes = [helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0], name="t"),
             helper.make_node("MatMul", ["x", "wt"], ["y"], name="mm")]
    graph = gs.import_onnx(helper.make_model(helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], [numpy_helper.from_array(w, "w")]),
        opset_imports=[helper.make_opsetid("", 17)]))
    assert fold_constants(graph) is True
    assert [n.op for n in graph.nodes] == ["MatMul"]
    np.testing.assert_array_equal(graph.nodes[0].inputs[1].values, w.T)
