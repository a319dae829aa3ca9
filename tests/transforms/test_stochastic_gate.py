"""StochasticGateWeight and ComplexityLoss: gates are [logit > 0] with the noise off and random with it on; the loss
is weight · (mean sigmoid(s) - density)²."""

import numpy as np
import onnx_graphsurgeon as gs
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.transforms.applier import apply_commands
from onnxcompress.transforms.commands import ComplexityLoss, StochasticGateWeight

WEIGHT = np.arange(1, 9, dtype=np.float32).reshape(2, 4)


def _gated(logit0: float, noise: float) -> tuple[gs.Graph, StochasticGateWeight]:
    nodes = [helper.make_node("Gemm", ["x", "w"], ["y"], name="fc", transB=1)]
    graph = gs.import_onnx(helper.make_model(helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], [numpy_helper.from_array(WEIGHT, "w")]),
        opset_imports=[helper.make_opsetid("", 17)]))
    gate = StochasticGateWeight("fc", 1, "fc.rb_gate", logit0, lr_scale=2.0, noise="noise", seed=1.0)
    apply_commands(graph, [gate, ComplexityLoss("loss", (gate.logits,), "density", 0.25, 3.0)])
    graph.tensors()["noise"].values = np.asarray(noise, np.float32)
    return graph, gate


def _run(graph: gs.Graph) -> list[np.ndarray]:
    model = gs.export_onnx(graph)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": np.ones((1, 4), np.float32)})


def test_without_noise_the_gate_is_the_sign_of_the_logit_and_the_loss_follows_eq_7() -> None:
    graph, gate = _gated(1.0, noise=0.0)
    delta = np.array([[1, -1, 1, -1], [-1, -1, 1, 1]], np.float32)  # s = 2·δ
    graph.tensors()[gate.delta].values = delta
    y, loss = _run(graph)
    np.testing.assert_allclose(y, np.ones((1, 4)) @ (WEIGHT * (delta > 0)).T)
    density = (1 / (1 + np.exp(-2 * delta))).mean()
    np.testing.assert_allclose(loss, 3.0 * (density - 0.25) ** 2, rtol=1e-5)
    assert graph.tensors()[gate.delta].values is delta  # the logits are a constant the training runtime trains


def test_with_noise_gates_of_zero_logits_open_about_half_the_time() -> None:
    graph, _ = _gated(1e-6, noise=1.0)
    model = gs.export_onnx(graph)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    outputs = np.stack([session.run(["y"], {"x": np.eye(4, dtype=np.float32)[:1]})[0] for _ in range(400)])
    opened = (outputs[:, 0, 0] != 0).mean()  # gate of weight [0, 0]
    assert 0.4 < opened < 0.6
