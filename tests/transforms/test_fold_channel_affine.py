import numpy as np
import onnx_graphsurgeon as gs
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


from onnxcompress.transforms.passes import fold_batchnorm, fold_channel_affine


def _model(scale_shape, producer="Conv"):
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.normal(size=scale_shape).astype(np.float32), "s"),
             numpy_helper.from_array(rng.normal(size=scale_shape).astype(np.float32), "t")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv")]
    if producer == "ConvTranspose":  # weight [in 3, out 4, 3, 3]
        inits[0] = numpy_helper.from_array(rng.normal(size=(3, 4, 3, 3)).astype(np.float32), "w")
        nodes = [helper.make_node("ConvTranspose", ["x", "w"], ["c"], name="up")]
    first = "c"
    if producer == "BatchNormalization":
        for name, values in (("g", rng.uniform(0.5, 2, 3)), ("b", rng.normal(size=3)), ("m", rng.normal(size=3)),
                             ("v", rng.uniform(0.5, 2, 3))):
            inits.append(numpy_helper.from_array(values.astype(np.float32), name))
        nodes = [helper.make_node("BatchNormalization", ["x", "g", "b", "m", "v"], ["c"], name="bn")]
    nodes += [helper.make_node("Mul", [first, "s"], ["scaled"], name="mul"),
              helper.make_node("Add", ["scaled", "t"], ["y"], name="add")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 5, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model, x):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_per_channel_mul_and_add_fold_into_conv_and_batchnorm():
    x = np.random.default_rng(1).normal(size=(2, 3, 5, 5)).astype(np.float32)
    for producer, shape in (("Conv", (4, 1, 1)), ("Conv", (1, 4, 1, 1)), ("Conv", (1,)),
                            ("ConvTranspose", (4, 1, 1)), ("BatchNormalization", (3, 1, 1))):
        model = _model(shape, producer)
        graph = gs.import_onnx(model)
        assert fold_channel_affine(graph) is True
        assert [n.op for n in graph.nodes] == [producer]
        np.testing.assert_allclose(_run(gs.export_onnx(graph), x), _run(model, x), rtol=1e-4, atol=1e-4)


def test_constants_that_vary_along_space_do_not_fold():
    graph = gs.import_onnx(_model((4, 1, 5)))
    assert fold_channel_affine(graph) is False
    assert fold_batchnorm(graph) is False
