import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.transforms.passes.differentiable_forms import FORMS, differentiable_forms

SHAPE = [2, 4, 5, 5]


def _model(node: onnx.NodeProto, initializers: list[onnx.TensorProto] = ()) -> onnx.ModelProto:
    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, SHAPE) for name in ("x", "x2")
              if name in node.input]
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, SHAPE)],
                              list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    return model


CASES = {
    "HardSigmoid": (helper.make_node("HardSigmoid", ["x"], ["y"], alpha=0.25, beta=0.4), []),
    "HardSwish": (helper.make_node("HardSwish", ["x"], ["y"]), []),
    "PRelu": (helper.make_node("PRelu", ["x", "slope"], ["y"]),
              [numpy_helper.from_array(np.linspace(0.1, 0.4, 4, dtype=np.float32).reshape(4, 1, 1), "slope")]),
    "Elu": (helper.make_node("Elu", ["x"], ["y"], alpha=0.7), []),
    "Selu": (helper.make_node("Selu", ["x"], ["y"]), []),
    "Celu": (helper.make_node("Celu", ["x"], ["y"], alpha=2.0), []),
    "Softplus": (helper.make_node("Softplus", ["x"], ["y"]), []),
    "Softsign": (helper.make_node("Softsign", ["x"], ["y"]), []),
    "Mish": (helper.make_node("Mish", ["x"], ["y"]), []),
    "ThresholdedRelu": (helper.make_node("ThresholdedRelu", ["x"], ["y"], alpha=0.5), []),
    "Sum": (helper.make_node("Sum", ["x", "x2", "x"], ["y"]), []),
    "Mean": (helper.make_node("Mean", ["x", "x2", "x"], ["y"]), []),
}


def test_every_form_has_a_numerical_test():
    assert set(CASES) == set(FORMS)


@pytest.mark.parametrize("op", sorted(CASES))
def test_the_rewrite_computes_the_same_values(op: str) -> None:
    node, initializers = CASES[op]
    model = _model(node, initializers)
    graph = gs.import_onnx(model)
    assert differentiable_forms(graph) is True
    assert op not in {n.op for n in graph.nodes}
    assert [t.name for t in graph.outputs] == ["y"]
    rewritten = gs.export_onnx(graph)
    rewritten.ir_version = 8
    rng = np.random.default_rng(0)
    feeds = {name: (rng.standard_normal(SHAPE) * 4).astype(np.float32) for name in ("x", "x2")
             if name in node.input}
    expected = ort.InferenceSession(model.SerializeToString()).run(None, feeds)[0]
    got = ort.InferenceSession(rewritten.SerializeToString()).run(None, feeds)[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert differentiable_forms(graph) is False


def test_layer_norm_statistics_are_exposed_once():
    node = helper.make_node("LayerNormalization", ["x", "g", "b"], ["y"], name="ln", axis=-1)
    graph = gs.import_onnx(_model(node, [numpy_helper.from_array(np.ones(5, np.float32), "g"),
                                         numpy_helper.from_array(np.zeros(5, np.float32), "b")]))
    assert differentiable_forms(graph) is True
    assert [t.name for t in graph.nodes[0].outputs] == ["y", "ln.mean", "ln.inv_std_dev"]
    assert differentiable_forms(graph) is False
