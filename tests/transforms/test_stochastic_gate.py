"""StochasticGateWeight and ComplexityLoss: gates are [logit > 0] with the noise off and random with it on, the
noise a function of the weight's counter and the step alone; the loss is weight · (mean sigmoid(s) - density)²."""

import numpy as np
import onnx_graphsurgeon as gs
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.transforms.applier import apply_commands
from onnxcompress.transforms.commands import ComplexityLoss, StochasticGateWeight
from onnxcompress.transforms.stochastic_gate import uniform_noise

WEIGHT = np.arange(1, 9, dtype=np.float32).reshape(2, 4)
FIRST_COUNTER = 1000


def _gated(logit0: float, noise: float, weight: np.ndarray = WEIGHT) -> tuple[gs.Graph, StochasticGateWeight]:
    nodes = [helper.make_node("Gemm", ["x", "w"], ["y"], name="fc", transB=1)]
    rows, columns = weight.shape
    graph = gs.import_onnx(helper.make_model(helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, columns])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, rows])], [numpy_helper.from_array(weight, "w")]),
        opset_imports=[helper.make_opsetid("", 17)]))
    gate = StochasticGateWeight("fc", 1, "fc.rb_gate", logit0, lr_scale=2.0, noise="noise", step="step",
                                counter=FIRST_COUNTER)
    apply_commands(graph, [gate, ComplexityLoss("loss", (gate.logits,), "density", 0.25, 3.0)])
    graph.tensors()["noise"].values = np.asarray(noise, np.float32)
    return graph, gate


def _session(graph: gs.Graph, step: int, outputs: tuple[str, ...] = ()) -> ort.InferenceSession:
    graph.tensors()["step"].values = np.asarray(step, np.float32)
    graph.outputs.extend(graph.tensors()[name] for name in outputs if name not in {t.name for t in graph.outputs})
    return ort.InferenceSession(gs.export_onnx(graph).SerializeToString(), providers=["CPUExecutionProvider"])


def _run(graph: gs.Graph, step: int = 0) -> list[np.ndarray]:
    return _session(graph, step).run(None, {"x": np.ones((1, graph.inputs[0].shape[1]), np.float32)})


def test_without_noise_the_gate_is_the_sign_of_the_logit_and_the_loss_follows_eq_7() -> None:
    graph, gate = _gated(1.0, noise=0.0)
    delta = np.array([[1, -1, 1, -1], [-1, -1, 1, 1]], np.float32)  # s = 2·δ
    graph.tensors()[gate.delta].values = delta
    y, loss = _run(graph)
    np.testing.assert_allclose(y, np.ones((1, 4)) @ (WEIGHT * (delta > 0)).T)
    density = (1 / (1 + np.exp(-2 * delta))).mean()
    np.testing.assert_allclose(loss, 3.0 * (density - 0.25) ** 2, rtol=1e-5)
    assert graph.tensors()[gate.delta].values is delta  # the logits are a constant the training runtime trains


def test_the_noise_is_the_counter_hash_of_the_step_in_any_session() -> None:
    """What makes a resumed run draw the noise of an uninterrupted one: u depends on the step, not on how many
    times a session ran."""
    graph, gate = _gated(1e-6, noise=1.0, weight=np.ones((32, 64), np.float32))
    feeds = {"x": np.ones((1, 64), np.float32)}
    session = _session(graph, 7, (f"{gate.name}.u",))
    first, again = (session.run([f"{gate.name}.u"], feeds)[0] for _ in range(2))
    np.testing.assert_array_equal(first, uniform_noise(FIRST_COUNTER, (32, 64), 7))
    np.testing.assert_array_equal(again, first)
    fresh = _session(graph, 7).run([f"{gate.name}.u"], feeds)[0]
    np.testing.assert_array_equal(fresh, first)
    following = _session(graph, 8).run([f"{gate.name}.u"], feeds)[0]
    assert abs(np.corrcoef(first.ravel(), following.ravel())[0, 1]) < 0.1
    assert 0.0 < first.min() and first.max() < 1.0


def test_uniform_noise_is_uniform_and_uncorrelated_between_neighbours_and_steps() -> None:
    u, following = (uniform_noise(0, (256, 4, 4, 4), step).ravel() for step in (3, 4))
    counts, _ = np.histogram(u, 16, (0.0, 1.0))
    assert np.abs(counts / len(u) - 1 / 16).max() < 0.005
    for a, b in ((u[:-1], u[1:]), (u[:-64], u[64:]), (u, following)):  # next weight, next row, next step
        assert abs(np.corrcoef(a, b)[0, 1]) < 0.02


def test_with_noise_gates_of_zero_logits_open_half_the_time_independently_at_each_step() -> None:
    graph, gate = _gated(1e-6, noise=1.0, weight=np.ones((32, 64), np.float32))
    gated = f"{gate.name}.applied"
    opened = [_session(graph, step, (gated,)).run([gated], {"x": np.ones((1, 64), np.float32)})[0] != 0
              for step in (0, 1)]
    assert all(0.45 < o.mean() < 0.55 for o in opened)
    assert 0.45 < (opened[0] == opened[1]).mean() < 0.55
