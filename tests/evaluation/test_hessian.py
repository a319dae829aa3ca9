"""Hutchinson's estimate through the training runtime matches the exact Hessian trace of a softmax classifier's
cross-entropy, and ranks a weight that feeds large activations above one that feeds small ones."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.errors import EvaluationError
from onnxcompress.evaluation.hessian import hawq_sensitivity, hessian_traces

D, K, N = 8, 4, 64


def _classifier(weight: np.ndarray) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["xw"], name="fc"), helper.make_node("Add", ["xw", "b"], ["logits"])],
        "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", D])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", K])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(np.zeros(K, np.float32), "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_the_estimate_matches_the_exact_trace_of_a_softmax_classifier(runtime) -> None:
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((D, K)).astype(np.float32)
    x = rng.standard_normal((N, D)).astype(np.float32)
    labels = rng.integers(0, K, N).astype(np.int64)
    logits = x @ weight
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    # H = mean_i x_i x_iᵀ ⊗ (diag p_i − p_i p_iᵀ): its trace is mean_i ‖x_i‖² (1 − ‖p_i‖²).
    exact = float(np.mean(np.sum(x ** 2, 1) * (1 - np.sum(p ** 2, 1)))) / (D * K)
    batches = [({"x": x[:32]}, labels[:32]), ({"x": x[32:]}, labels[32:])]
    traces = hessian_traces(_classifier(weight), batches, ["w"], probes=48, runtime=runtime, progress=False)
    assert traces["w"] == pytest.approx(exact, rel=0.12)
    # The same weights reading inputs 10× larger: the trace grows with ‖x‖² (where softmax is not saturated).
    scaled = hessian_traces(_classifier(weight / 10), [({"x": x * 10}, labels)], ["w"], probes=8,
                            runtime=runtime, progress=False)
    assert scaled["w"] > 20 * traces["w"]
    assert hawq_sensitivity(2.0, np.ones(3, np.float32), np.zeros(3, np.float32)) == 6.0
    with pytest.raises(EvaluationError, match="at least one probe"):
        hessian_traces(_classifier(weight), batches, ["w"], probes=0, runtime=runtime)


def test_the_squared_error_to_the_float_outputs_gives_the_gauss_newton_trace(runtime) -> None:
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((D, K)).astype(np.float32)
    x = rng.standard_normal((N, D)).astype(np.float32)
    # L = mean over the N × K outputs of (x W − x W₀)²: H = 2/(N K) · I_K ⊗ XᵀX, whose trace per weight is
    # 2 ‖X‖² / (N D K).
    exact = 2 * float(np.sum(x.astype(np.float64) ** 2)) / (N * D * K)
    batches = [({"x": x[:32]}, x[:32] @ weight), ({"x": x[32:]}, x[32:] @ weight)]
    traces = hessian_traces(_classifier(weight), batches, ["w"], probes=48, loss="mse", runtime=runtime,
                            progress=False)
    assert traces["w"] == pytest.approx(exact, rel=0.12)


def test_the_loss_follows_the_first_output(tmp_path) -> None:
    from onnxcompress.api import _hessian_batches
    from onnxcompress.evaluation.metrics import EvalSet

    weight = np.random.default_rng(2).standard_normal((D, K)).astype(np.float32)
    x = np.random.default_rng(3).standard_normal((40, D)).astype(np.float32)
    path = tmp_path / "linear.onnx"
    onnx.save(_classifier(weight), path)
    batches, loss = _hessian_batches(EvalSet.from_arrays({"x": x}, ["x"]), path)
    assert loss == "cross_entropy" and sum(len(t) for _, t in batches) == 32
    np.testing.assert_array_equal(np.concatenate([t for _, t in batches]), (x[:32] @ weight).argmax(1))
    model = _classifier(weight)
    model.graph.output[0].type.tensor_type.shape.Clear()
    model.graph.node.append(helper.make_node("Unsqueeze", ["logits", "axis"], ["out"]))
    model.graph.initializer.append(numpy_helper.from_array(np.array([1], np.int64), "axis"))
    model.graph.output[0].name = "out"
    onnx.save(model, path)
    batches, loss = _hessian_batches(EvalSet.from_arrays({"x": x}, ["x"]), path)
    assert loss == "mse" and batches[0][1].shape[1:] == (1, K) and batches[0][1].dtype == np.float32
