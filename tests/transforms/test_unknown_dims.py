from onnx import TensorProto, helper

from onnxcompress.transforms.passes import name_unknown_dims


def test_zero_and_negative_dims_get_names_and_static_ones_stay():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3, 0, "W"])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x],
                                                [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]))
    assert name_unknown_dims(model) is True
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["x_dim0", 3, "x_dim2", "W"]
    assert name_unknown_dims(model) is False
