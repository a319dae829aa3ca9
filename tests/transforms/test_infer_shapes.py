import numpy as np
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.transforms.passes import infer_shapes


def test_annotates_intermediates_without_touching_weights():
    weight = numpy_helper.from_array(np.ones((64, 32), np.float32), "w")  # large: replaced in the skeleton
    shape = numpy_helper.from_array(np.array([0, 4, 8], np.int64), "shape")  # small: kept for data propagation
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Reshape", ["h", "shape"], ["y"])]
    model = helper.make_model(helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [weight, shape]),
        opset_imports=[helper.make_opsetid("", 17)])
    assert infer_shapes(model) is True
    info = {v.name: v.type.tensor_type for v in model.graph.value_info}
    assert [d.dim_param or d.dim_value for d in info["h"].shape.dim] == ["N", 32]
    assert [i.name for i in model.graph.input] == ["x"]
    assert len(model.graph.initializer) == 2 and model.graph.initializer[0].raw_data == weight.raw_data
    assert infer_shapes(model) is False
