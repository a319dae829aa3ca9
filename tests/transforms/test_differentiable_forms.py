from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.runtime.training import TrainingRuntimeSession
from onnxcompress.transforms.passes.differentiable_forms import FORMS, differentiable_forms

SHAPE = [2, 4, 5, 5]


def _model(node: onnx.NodeProto, initializers: list[onnx.TensorProto] = ()) -> onnx.ModelProto:
    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, SHAPE) for name in ("x", "x2")
              if name in node.input]
    output_shape = None if node.op_type in ("Pad", "ReduceMax", "ReduceMin") else SHAPE
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                                                                   output_shape)],
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
    # two axes at once, one of them padded by the axis length - 1 (the most reflect allows)
    "Pad": (helper.make_node("Pad", ["x", "pads"], ["y"], mode="reflect"),
            [numpy_helper.from_array(np.array([0, 0, 2, 4, 0, 1, 1, 0], np.int64), "pads")]),
    "ReduceMax": (helper.make_node("ReduceMax", ["x", "axes"], ["y"], keepdims=0),
                  [numpy_helper.from_array(np.array([1, -1], np.int64), "axes")]),
    "ReduceMin": (helper.make_node("ReduceMin", ["x"], ["y"]), []),
    "Sqrt": (helper.make_node("Sqrt", ["x"], ["y"]), []),
}


def test_every_form_has_a_numerical_test():
    assert set(CASES) == set(FORMS)


@pytest.mark.parametrize("op", sorted(CASES))
def test_the_rewrite_computes_the_same_values(op: str) -> None:
    node, initializers = CASES[op]
    model = _model(node, initializers)
    graph = gs.import_onnx(model)
    assert differentiable_forms(graph) is True
    # the forms of ReduceMax, ReduceMin and Sqrt keep the op where it needs no gradient or has a finite one
    assert all(n.op != op or ".grad_form." in n.name for n in graph.nodes)
    assert [t.name for t in graph.outputs] == ["y"]
    rewritten = gs.export_onnx(graph)
    rewritten.ir_version = 8
    rng = np.random.default_rng(0)
    feeds = {name: (rng.standard_normal(SHAPE) * 4).astype(np.float32) for name in ("x", "x2")
             if name in node.input}
    if op == "Sqrt":  # its domain, zeros included
        feeds["x"] = np.maximum(feeds["x"], 0.0)
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


@pytest.mark.parametrize("mode, pads, axes", [
    ("edge", [1, 3, 2, 0], [2, -1]),
    ("reflect", [2, 1], [-2]),
])
def test_pad_with_axes_matches_the_runtime(mode: str, pads: list[int], axes: list[int]) -> None:
    node = helper.make_node("Pad", ["x", "pads", "", "axes"], ["y"], mode=mode)
    model = _model(node, [numpy_helper.from_array(np.array(pads, np.int64), "pads"),
                          numpy_helper.from_array(np.array(axes, np.int64), "axes")])
    graph = gs.import_onnx(model)
    assert differentiable_forms(graph) is True
    assert "Pad" not in {n.op for n in graph.nodes}
    x = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)
    expected = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    rewritten = gs.export_onnx(graph)
    rewritten.ir_version = 8
    np.testing.assert_array_equal(ort.InferenceSession(rewritten.SerializeToString()).run(None, {"x": x})[0], expected)


def test_constant_pad_and_pads_computed_at_run_time_stay() -> None:
    constant = helper.make_node("Pad", ["x", "pads"], ["y"])
    assert differentiable_forms(gs.import_onnx(_model(
        constant, [numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads")]))) is False
    computed = helper.make_node("Pad", ["x", "x_shape"], ["y"], mode="reflect")
    shape = helper.make_node("Shape", ["x"], ["x_shape"])
    graph = helper.make_graph([shape, computed], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, SHAPE)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    assert differentiable_forms(gs.import_onnx(helper.make_model(graph))) is False


def test_reduce_max_of_tied_values_with_axes_attribute_before_opset_18() -> None:
    """Exact when many elements tie, as in a quantized tensor."""
    node = helper.make_node("ReduceMax", ["x"], ["y"], axes=[1, 3], keepdims=1)
    model = _model(node)
    model.opset_import[0].version = 11
    graph = gs.import_onnx(model)
    assert differentiable_forms(graph) is True
    rewritten = gs.export_onnx(graph)
    rewritten.ir_version = 8
    x = (np.round(np.random.default_rng(2).standard_normal(SHAPE)) / 3).astype(np.float32)
    np.testing.assert_array_equal(ort.InferenceSession(rewritten.SerializeToString()).run(None, {"x": x})[0],
                                  x.max(axis=(1, 3), keepdims=True))


@pytest.mark.parametrize("op", ["Pad", "ReduceMax", "Sqrt"])
def test_the_training_runtime_differentiates_the_form(op: str, runtime, tmp_path: Path) -> None:
    """One SGD step with learning rate 1 on loss = Σ c · op(x · w) moves w by exactly minus the gradient."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal(SHAPE).astype(np.float32)
    w = rng.uniform(0.5, 1.5, SHAPE).astype(np.float32)
    node, initializers = CASES[op]
    xw = x * w
    if op == "Pad":
        pads = [(0, 0), (0, 1), (2, 1), (4, 0)]
        index = np.pad(np.arange(xw.size).reshape(SHAPE), pads, mode="reflect")
        c = rng.standard_normal(index.shape).astype(np.float32)
        gradient = np.bincount(index.ravel(), c.ravel().astype(np.float64), xw.size).reshape(SHAPE)
    elif op == "ReduceMax":
        extreme = xw.max(axis=(1, 3), keepdims=True)
        c = rng.standard_normal(extreme.squeeze((1, 3)).shape).astype(np.float32)
        gradient = (xw == extreme) * np.expand_dims(c, (1, 3))
    else:  # Sqrt, of zeros too: the gradient there is 0
        x = np.maximum(x, 0.0)
        xw = x * w
        c = rng.standard_normal(SHAPE).astype(np.float32)
        gradient = np.where(xw > 0, c * 0.5 / np.sqrt(np.where(xw > 0, xw, 1.0)), 0.0)
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x_in", "w"], ["x"]), node, helper.make_node("Mul", ["y", "c"], ["yc"]),
         helper.make_node("ReduceSum", ["yc"], ["loss"], keepdims=0)], "g",
        [helper.make_tensor_value_info("x_in", TensorProto.FLOAT, SHAPE)],
        [helper.make_tensor_value_info("loss", TensorProto.FLOAT, [])],
        [*initializers, numpy_helper.from_array(w, "w"), numpy_helper.from_array(c, "c")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    rewritten = gs.import_onnx(onnx.shape_inference.infer_shapes(model))  # as preprocessing leaves it
    assert differentiable_forms(rewritten) is True
    path = tmp_path / "model.onnx"
    onnx.save(gs.export_onnx(rewritten), path)
    with TrainingRuntimeSession(runtime) as session:
        artifacts = session.generate_artifacts(path, tmp_path / "artifacts", trainable=["w"], loss="none",
                                               optimizer="sgd")
        session.open(artifacts.directory, learning_rate=1.0)
        session.train_step({"x_in": x})
        stepped = session.get_parameters(["w"])["w"]
    np.testing.assert_allclose(w - stepped, gradient * x, rtol=1e-4, atol=1e-5)
