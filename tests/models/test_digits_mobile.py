"""The bundled digits_mobile sample: a real trained MobileNetV3-style model on the digits_cnn data."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import openvino as ov
import pytest
from onnx import numpy_helper

from onnxcompress import models
from onnxcompress.models import digits_mobile


@pytest.fixture(scope="module")
def mobile() -> models.Sample:
    return models.sample("digits_mobile")


@pytest.fixture(scope="module")
def session(mobile: models.Sample) -> ort.InferenceSession:
    return ort.InferenceSession(str(mobile.model_path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def graph(mobile: models.Sample) -> onnx.GraphProto:
    return onnx.load(str(mobile.model_path)).graph


@pytest.fixture(scope="module")
def meta(mobile: models.Sample) -> dict:
    return json.loads(mobile.model_path.with_suffix(".json").read_text())


def producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in graph.node for out in node.output}


def test_zoo_api_shares_the_digits_data(mobile: models.Sample) -> None:
    assert "digits_mobile" in models.available()
    assert mobile.model_path.is_file() and mobile.model_path.stat().st_size < 1_000_000
    cnn = models.sample("digits_cnn")
    assert (mobile.calibration_path, mobile.test_path, mobile.train_path) == (
        cnn.calibration_path, cnn.test_path, cnn.train_path)
    assert models.sample_for_model(mobile.model_path) == mobile


def test_model_is_valid_onnx(mobile: models.Sample, session: ort.InferenceSession) -> None:
    model = onnx.load(str(mobile.model_path))
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == 8
    assert {(o.domain, o.version) for o in model.opset_import} == {("", 17)}
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert inp.name == "input" and isinstance(inp.shape[0], str) and inp.shape[1:] == [1, 32, 32]
    assert out.name == "logits" and isinstance(out.shape[0], str) and out.shape[1:] == [10]


def test_depthwise_convolutions(graph: onnx.GraphProto) -> None:
    weights = {init.name: init for init in graph.initializer}
    depthwise = []
    for conv in (n for n in graph.node if n.op_type == "Conv"):
        group = next((a.i for a in conv.attribute if a.name == "group"), 1)
        shape = tuple(weights[conv.input[1]].dims)
        if group > 1:
            assert shape[0] == group and shape[1] == 1, (conv.name, shape, group)  # group == channels
            strides = next(a.ints for a in conv.attribute if a.name == "strides")
            depthwise.append((shape[2:], tuple(strides)))
    assert len(depthwise) == len(digits_mobile.BLOCKS)
    assert all(kernel == (3, 3) for kernel, _ in depthwise)
    assert {strides for _, strides in depthwise} == {(1, 1), (2, 2)}  # a downsampling block too


def test_squeeze_excitation(graph: onnx.GraphProto) -> None:
    """Every Mul gates its trunk with GlobalAveragePool -> Conv -> Relu -> Conv -> HardSigmoid(1/6, 0.5)."""
    made_by = producers(graph)
    muls = [n for n in graph.node if n.op_type == "Mul"]
    assert len(muls) == len(digits_mobile.BLOCKS)
    for mul in muls:
        trunk, tensor = mul.input
        chain = []
        for _ in range(5):
            chain.append(made_by[tensor])
            tensor = chain[-1].input[0]
        assert [n.op_type for n in chain] == ["HardSigmoid", "Conv", "Relu", "Conv", "GlobalAveragePool"]
        assert tensor == trunk  # the pooled tensor is the one that is gated
        assert {a.name: a.f for a in chain[0].attribute} == pytest.approx({"alpha": 1 / 6, "beta": 0.5})
        assert len(chain[1].input) == len(chain[3].input) == 3  # the SE convolutions have a bias


def test_activations_residuals_and_unfolded_batchnorm(graph: onnx.GraphProto) -> None:
    ops = [n.op_type for n in graph.node]
    assert ops.count("HardSwish") >= 2 + len(digits_mobile.BLOCKS)  # stem, every depthwise, head
    assert ops[-3:] == ["GlobalAveragePool", "Flatten", "Gemm"] and graph.node[-1].output[0] == "logits"
    constants = {init.name for init in graph.initializer}
    produced = producers(graph)
    residual = [n for n in graph.node if n.op_type == "Add"
                and all(i in produced and i not in constants for i in n.input)]
    assert len(residual) == sum(map(digits_mobile.is_residual, digits_mobile.BLOCKS)) >= 1
    bns = [n for n in graph.node if n.op_type == "BatchNormalization"]
    assert len(bns) == 2 + 3 * len(digits_mobile.BLOCKS)
    weights = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for bn in bns:
        assert all(i in constants for i in bn.input[1:]) and len(bn.output) == 1  # inference-mode BN
        assert produced[bn.input[0]].op_type == "Conv"
        assert not np.allclose(weights[bn.input[3]], 0.0)  # trained running mean, not the initial one


def test_test_accuracy(mobile: models.Sample, session: ort.InferenceSession, meta: dict) -> None:
    inputs, labels = mobile.load_test()
    (logits,) = session.run(["logits"], inputs)
    acc = float((logits.argmax(axis=1) == labels).mean())
    assert acc >= 0.96, acc
    assert meta["test_accuracy"] == pytest.approx(acc, abs=1e-9)
    assert meta["split"]["test"] == len(labels)


def test_openvino_agrees_with_onnxruntime(mobile: models.Sample, session: ort.InferenceSession) -> None:
    x = mobile.load_test()[0]["input"][:64]
    compiled = ov.Core().compile_model(str(mobile.model_path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    got = compiled({"input": x})[compiled.output(0)]
    np.testing.assert_allclose(got, session.run(["logits"], {"input": x})[0], atol=1e-3)


def test_builder_gradients_match_finite_differences() -> None:
    """The NumPy backward pass the sample is trained with (depthwise, SE, HardSwish, HardSigmoid, BN)."""
    rng = np.random.default_rng(0)
    params, bn_state = digits_mobile.init_params(rng)
    # float64 and non-zero residual gammas, so that every branch carries gradient.
    params = {k: v.astype(np.float64) + 0.05 * rng.standard_normal(v.shape) for k, v in params.items()}
    x, labels = rng.random((3, 1, 32, 32)), np.array([0, 4, 9])

    def run(p: dict[str, np.ndarray]) -> tuple[float, np.ndarray, digits_mobile.Backward]:
        state = {k: {s: v.copy() for s, v in d.items()} for k, d in bn_state.items()}
        logits, backward = digits_mobile.forward(p, state, x, train=True)
        return (*digits_mobile.softmax_cross_entropy(logits, labels), backward)

    _, dlogits, backward = run(params)
    grads: dict[str, np.ndarray] = {}
    backward(dlogits, grads)
    assert set(grads) == set(params)
    eps = 1e-5
    for name in ("stem.conv.weight", "block1.dw.weight", "block2.se.fc1.weight", "block2.se.fc2.bias",
                 "block3.expand_bn.gamma", "block4.project.weight", "head.conv.weight", "fc.weight"):
        index = tuple(int(rng.integers(n)) for n in params[name].shape)
        shifted = []
        for sign in (1, -1):
            p = dict(params)
            p[name] = params[name].copy()
            p[name][index] += sign * eps
            shifted.append(run(p)[0])
        numeric = (shifted[0] - shifted[1]) / (2 * eps)
        assert grads[name][index] == pytest.approx(numeric, rel=1e-4, abs=1e-8), name
