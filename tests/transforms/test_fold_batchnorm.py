import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.transforms.passes import fold_batchnorm


def _conv_bn(with_bias: bool, extra_reader: bool = False):
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.uniform(0.5, 2, 4).astype(np.float32), "gamma"),
             numpy_helper.from_array(rng.normal(size=4).astype(np.float32), "beta"),
             numpy_helper.from_array(rng.normal(size=4).astype(np.float32), "mean"),
             numpy_helper.from_array(rng.uniform(0.5, 2, 4).astype(np.float32), "var")]
    conv_inputs = ["x", "w"]
    if with_bias:
        inits.append(numpy_helper.from_array(rng.normal(size=4).astype(np.float32), "b"))
        conv_inputs.append("b")
    nodes = [helper.make_node("Conv", conv_inputs, ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["y"], epsilon=1e-3,
                              name="bn")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if extra_reader:
        nodes.append(helper.make_node("Relu", ["c"], ["side"], name="side"))
        outputs.append(helper.make_tensor_value_info("side", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8, 8])],
                              outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model, x):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})


def test_folds_into_conv_and_matches_float_output():
    for with_bias in (True, False):
        model = _conv_bn(with_bias)
        graph = gs.import_onnx(model)
        assert fold_batchnorm(graph) is True
        assert [n.op for n in graph.nodes] == ["Conv"]
        folded = gs.export_onnx(graph)
        x = np.random.default_rng(1).normal(size=(2, 3, 8, 8)).astype(np.float32)
        np.testing.assert_allclose(_run(folded, x)[0], _run(model, x)[0], rtol=1e-4, atol=1e-4)


def test_keeps_batchnorm_when_conv_output_has_another_reader():
    graph = gs.import_onnx(_conv_bn(True, extra_reader=True))
    assert fold_batchnorm(graph) is False
    assert "BatchNormalization" in [n.op for n in graph.nodes]


def _producer_bn(producer: onnx.NodeProto, inits: list, x_shape: list[int], channels: int):
    rng = np.random.default_rng(2)
    inits = inits + [numpy_helper.from_array(rng.uniform(0.5, 2, channels).astype(np.float32), "gamma"),
                     numpy_helper.from_array(rng.normal(size=channels).astype(np.float32), "beta"),
                     numpy_helper.from_array(rng.normal(size=channels).astype(np.float32), "mean"),
                     numpy_helper.from_array(rng.uniform(0.5, 2, channels).astype(np.float32), "var")]
    nodes = [producer, helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["y"],
                                        name="bn")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_gemm_bias_scaled_by_beta_folds_exactly():
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.normal(size=(6, 4)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.normal(size=6).astype(np.float32), "b")]
    model = _producer_bn(helper.make_node("Gemm", ["x", "w", "b"], ["c"], name="fc", transB=1, alpha=2.0, beta=0.5),
                         inits, [3, 4], 6)
    graph = gs.import_onnx(model)
    assert fold_batchnorm(graph) is True
    assert [n.op for n in graph.nodes] == ["Gemm"] and graph.nodes[0].attrs["beta"] == 1.0
    x = rng.normal(size=(3, 4)).astype(np.float32)
    np.testing.assert_allclose(_run(gs.export_onnx(graph), x)[0], _run(model, x)[0], rtol=1e-4, atol=1e-4)


def test_conv_transpose_folds_only_without_groups():
    rng = np.random.default_rng(4)
    for group, folds in ((1, True), (2, False)):
        inits = [numpy_helper.from_array(rng.normal(size=(4, 6 // group, 3, 3)).astype(np.float32), "w")]
        model = _producer_bn(helper.make_node("ConvTranspose", ["x", "w"], ["c"], name="up", group=group,
                                              strides=[2, 2]), inits, [1, 4, 5, 5], 6)
        graph = gs.import_onnx(model)
        assert fold_batchnorm(graph) is folds
        x = rng.normal(size=(1, 4, 5, 5)).astype(np.float32)
        np.testing.assert_allclose(_run(gs.export_onnx(graph), x)[0], _run(model, x)[0], rtol=1e-4, atol=1e-4)
