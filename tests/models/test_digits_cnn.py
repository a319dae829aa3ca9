"""The bundled digits_cnn sample: a real trained model with its held-out data."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxcompress import models


@pytest.fixture(scope="module")
def digits():
    return models.sample("digits_cnn")


@pytest.fixture(scope="module")
def session(digits):
    return ort.InferenceSession(str(digits.model_path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def graph(digits):
    return onnx.load(str(digits.model_path)).graph


def test_zoo_api(digits):
    assert "digits_cnn" in models.available()
    assert models.sample() == digits
    for path in (digits.model_path, digits.calibration_path, digits.test_path):
        assert path.is_file(), path
    with pytest.raises(ValueError, match="digits_cnn"):
        models.sample("no_such_model")


def test_model_is_valid_onnx(digits):
    model = onnx.load(str(digits.model_path))
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == 8
    assert {(o.domain, o.version) for o in model.opset_import} == {("", 17)}


def test_io_names_and_shapes(session):
    (inp,) = session.get_inputs()
    (out,) = session.get_outputs()
    assert inp.name == "input" and inp.type == "tensor(float)"
    assert isinstance(inp.shape[0], str) and inp.shape[1:] == [1, 32, 32]
    assert out.name == "logits"
    assert isinstance(out.shape[0], str) and out.shape[1:] == [10]


@pytest.mark.parametrize("batch", [1, 7])
def test_dynamic_batch(digits, session, batch):
    inputs, _ = digits.load_test()
    x = inputs["input"][:batch]
    (logits,) = session.run(["logits"], {"input": x})
    assert logits.shape == (batch, 10) and logits.dtype == np.float32
    # Rows do not depend on the batch they are run in (eval-mode BN).
    (single,) = session.run(["logits"], {"input": x[-1:]})
    np.testing.assert_allclose(logits[-1:], single, rtol=1e-4, atol=1e-4)


def test_test_accuracy(digits, session):
    inputs, labels = digits.load_test()
    assert inputs["input"].dtype == np.float32 and inputs["input"].shape[1:] == (1, 32, 32)
    assert labels.dtype == np.int64 and labels.shape == (len(inputs["input"]),)
    assert set(np.unique(labels)) == set(range(10))
    (logits,) = session.run(["logits"], inputs)
    acc = float((logits.argmax(axis=1) == labels).mean())
    assert acc >= 0.975, acc
    meta = json.loads(digits.model_path.with_suffix(".json").read_text())
    assert meta["test_accuracy"] == pytest.approx(acc, abs=1e-9)


def test_calibration_set(digits):
    calib = digits.load_calibration()
    assert list(calib) == ["input"]
    assert calib["input"].shape == (300, 1, 32, 32) and calib["input"].dtype == np.float32
    assert 0.0 <= calib["input"].min() and calib["input"].max() <= 1.0


def test_calibration_and_test_are_disjoint(digits):
    calib = digits.load_calibration()["input"].reshape(300, -1)
    test = digits.load_test()[0]["input"]
    test = test.reshape(len(test), -1)
    calib_rows = {row.tobytes() for row in calib}
    test_rows = {row.tobytes() for row in test}
    assert len(calib_rows) == len(calib) and len(test_rows) == len(test)  # no duplicates inside
    assert not calib_rows & test_rows
    # Not even near-duplicates: every test image is clearly apart from every calibration image.
    d2 = (test**2).sum(1)[:, None] + (calib**2).sum(1)[None, :] - 2.0 * test @ calib.T
    assert d2.min() > 1e-3


def test_graph_has_batchnorm_and_residual_add(graph):
    ops = [n.op_type for n in graph.node]
    assert ops.count("BatchNormalization") >= 5
    assert "Conv" in ops and "Gemm" in ops
    constants = {init.name for init in graph.initializer}
    adds = [n for n in graph.node if n.op_type == "Add"]
    # A residual Add: both operands are activations produced by other nodes, not weights.
    produced = {out for n in graph.node for out in n.output}
    residual = [n for n in adds if all(i in produced and i not in constants for i in n.input)]
    assert residual, "no Add joining two activations"
    for bn in (n for n in graph.node if n.op_type == "BatchNormalization"):
        assert all(i in constants for i in bn.input[1:])  # scale, bias, running mean / var
        assert len(bn.output) == 1  # inference-mode BN
