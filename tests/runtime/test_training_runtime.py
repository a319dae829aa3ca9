"""End-to-end tests of the private onnxruntime-training runtime: install, worker protocol, training, checkpoints.

They run the real runtime (installed by `make test`, or by the session fixture on first use). They are skipped
only where it cannot be installed at all (no x86-64 Linux CPython 3.10/3.11).
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.errors import TrainingError, TrainingRuntimeMissing
from onnxcompress.runtime import training
from onnxcompress.runtime.training import TrainingRuntimeSession
from onnxcompress.runtime.training_env import DIR_ENV, TrainingRuntime, ensure_training_runtime

PARAMETERS = ["w1", "b1", "w2", "b2"]
HIDDEN = 16


def build_mlp(*, round_hidden: bool = False, ir_version: int = 8) -> onnx.ModelProto:
    """x[N,4] → MatMul+Add → Relu (→ Round) → Gemm → logits[N,2]; opset 17."""
    rng = np.random.default_rng(0)
    initializers = [
        numpy_helper.from_array((rng.standard_normal((4, HIDDEN)) * 0.3).astype(np.float32), "w1"),
        numpy_helper.from_array(np.zeros(HIDDEN, np.float32), "b1"),
        numpy_helper.from_array((rng.standard_normal((HIDDEN, 2)) * 0.3).astype(np.float32), "w2"),
        numpy_helper.from_array(np.array([0.25, -0.25], np.float32), "b2"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"], name="fc1"),
        helper.make_node("Add", ["h0", "b1"], ["h1"], name="fc1_bias"),
        helper.make_node("Relu", ["h1"], ["h2"], name="relu"),
    ]
    if round_hidden:
        nodes.append(helper.make_node("Round", ["h2"], ["h3"], name="round_hidden"))
    nodes.append(helper.make_node("Gemm", [nodes[-1].output[0], "w2", "b2"], ["logits"], name="fc2"))
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = ir_version
    return model


def toy_data(samples: int = 128, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Linearly separable: the class is whether x0 - x1 > 0."""
    x = np.random.default_rng(seed).standard_normal((samples, 4)).astype(np.float32)
    return x, (x[:, 0] - x[:, 1] > 0).astype(np.int64)


@pytest.fixture(scope="session")
def mlp_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("models") / "mlp.onnx"
    onnx.save(build_mlp(), path)
    return path


@pytest.fixture()
def session(runtime: TrainingRuntime) -> Iterator[TrainingRuntimeSession]:
    with TrainingRuntimeSession(runtime, timeout=120) as opened:
        yield opened


def generate_and_open(session: TrainingRuntimeSession, model: Path, folder: Path) -> training.OpenedArtifacts:
    artifacts = session.generate_artifacts(model, folder, trainable=PARAMETERS, loss="cross_entropy",
                                           optimizer="adamw")
    return session.open(artifacts.directory, learning_rate=0.05)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(axis=1) == labels).mean())


def test_training_lowers_loss_and_raises_accuracy(session: TrainingRuntimeSession, mlp_path: Path,
                                                  tmp_path: Path) -> None:
    assert session.versions["onnxruntime"] == "1.19.2"
    opened = generate_and_open(session, mlp_path, tmp_path / "artifacts")
    artifacts = opened.artifacts
    assert artifacts.label_inputs == ("labels",) and artifacts.outputs == ("logits",)
    assert {name for name, info in opened.parameters.items() if info.trainable} == set(PARAMETERS)
    for path in artifacts.directory.glob("*.onnx"):
        assert onnx.load(path).ir_version <= 10, path.name
    x, y = toy_data()
    before = session.eval_step({"x": x}, y)

    first = session.train_step({"x": x}, y, return_outputs=True)
    assert first.loss == pytest.approx(before.loss, rel=1e-5)  # the loss before the update
    assert first.outputs["logits"].shape == (len(x), 2)
    for _ in range(49):
        session.train_step({"x": x}, y)

    after = session.eval_step({"x": x}, y)
    assert after.loss < 0.3 * before.loss
    assert accuracy(after.outputs["logits"], y) >= 0.95 > accuracy(before.outputs["logits"], y) + 0.1


def test_set_parameters_changes_the_model_and_round_trips(session: TrainingRuntimeSession, mlp_path: Path,
                                                          tmp_path: Path) -> None:
    generate_and_open(session, mlp_path, tmp_path / "artifacts")
    x, y = toy_data(16)
    original = session.get_parameters()
    assert set(original) == set(PARAMETERS)

    session.set_parameters({"w2": np.zeros((HIDDEN, 2), np.float32)})
    assert not session.get_parameters(["w2"])["w2"].any()
    # With w2 = 0 the logits are the bias b2 for every sample.
    logits = session.eval_step({"x": x}, y).outputs["logits"]
    np.testing.assert_array_equal(logits, np.broadcast_to(original["b2"], logits.shape))

    session.set_parameters({"w2": original["w2"]})
    np.testing.assert_array_equal(session.get_parameters(["w2"])["w2"], original["w2"])
    with pytest.raises(TrainingError, match=r"parameter 'w2' is float32\[16, 2\]"):
        session.set_parameters({"w2": np.zeros((2, 2), np.float32)})


def test_checkpoint_reopens_with_the_same_outputs_and_exports(runtime: TrainingRuntime, mlp_path: Path,
                                                              tmp_path: Path) -> None:
    x, y = toy_data(32)
    with TrainingRuntimeSession(runtime) as first:
        opened = generate_and_open(first, mlp_path, tmp_path / "artifacts")
        for _ in range(5):
            first.train_step({"x": x}, y)
        trained = first.eval_step({"x": x}, y)
        checkpoint = first.save_checkpoint(tmp_path / "trained.ckpt")
        exported = first.export_inference(tmp_path / "trained.onnx")

    with TrainingRuntimeSession(runtime) as second:
        second.open(opened.artifacts.directory, checkpoint=checkpoint)
        reopened = second.eval_step({"x": x}, y)
    assert reopened.loss == trained.loss
    np.testing.assert_array_equal(reopened.outputs["logits"], trained.outputs["logits"])
    # The exported model runs on the main environment's onnxruntime with the trained weights.
    inference = ort.InferenceSession(exported, providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(inference.run(["logits"], {"x": x})[0], trained.outputs["logits"], atol=1e-6)


def test_op_without_gradient_is_named_and_identity_gradient_fixes_it(session: TrainingRuntimeSession,
                                                                     tmp_path: Path) -> None:
    model = tmp_path / "rounded.onnx"
    onnx.save(build_mlp(round_hidden=True), model)
    with pytest.raises(TrainingError, match=r"cannot differentiate op Round \(node 'round_hidden'\)"):
        session.generate_artifacts(model, tmp_path / "failed", trainable=PARAMETERS)
    assert not (tmp_path / "failed").exists()

    session.register_gradient("Round", training.IDENTITY_GRADIENT)
    artifacts = session.generate_artifacts(model, tmp_path / "artifacts", trainable=PARAMETERS)
    session.open(artifacts.directory)
    x, y = toy_data(8)
    assert np.isfinite(session.train_step({"x": x}, y).loss)


def test_command_errors_are_reported_and_the_session_survives(session: TrainingRuntimeSession, mlp_path: Path,
                                                              tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="no artifacts are open"):
        session.get_parameters()
    ir11 = tmp_path / "ir11.onnx"
    onnx.save(build_mlp(ir_version=11), ir11)
    with pytest.raises(TrainingError, match="IR version 11"):
        session.generate_artifacts(ir11, tmp_path / "ir11", trainable=PARAMETERS)
    generate_and_open(session, mlp_path, tmp_path / "artifacts")
    x, y = toy_data(8)
    with pytest.raises(TrainingError, match=r"takes inputs \['x', 'labels'\]"):
        session.train_step({"image": x}, y)
    assert np.isfinite(session.train_step({"x": x}, y).loss)


def test_a_dead_worker_raises_instead_of_hanging(session: TrainingRuntimeSession) -> None:
    os.kill(session._process.pid, signal.SIGKILL)
    with pytest.raises(TrainingError, match="training worker"):
        session.set_lr(0.1)
    with pytest.raises(TrainingError, match="not running"):
        session.set_lr(0.1)


def test_worker_exits_when_its_stdin_closes(runtime: TrainingRuntime) -> None:
    session = TrainingRuntimeSession(runtime)
    session._process.stdin.close()
    assert session._process.wait(timeout=30) == 0
    session.close()


def test_a_worker_that_never_answers_times_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A stand-in runtime whose numpy import blocks: the worker never becomes ready.
    (tmp_path / "numpy").mkdir()
    (tmp_path / "numpy" / "__init__.py").write_text("import time\ntime.sleep(60)\n")
    monkeypatch.setattr(training, "STARTUP_TIMEOUT", 1.0)
    with pytest.raises(TrainingError, match="did not answer within 1 s"):
        TrainingRuntimeSession(TrainingRuntime(Path(sys.executable), tmp_path))


def test_a_broken_runtime_reports_why(tmp_path: Path) -> None:
    (tmp_path / "numpy").mkdir()
    (tmp_path / "numpy" / "__init__.py").write_text("raise ImportError('numpy is broken here')\n")
    with pytest.raises(TrainingError, match="could not start: numpy is broken here"):
        TrainingRuntimeSession(TrainingRuntime(Path(sys.executable), tmp_path))


def test_missing_runtime_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv(DIR_ENV, os.fspath(empty))
    with pytest.raises(TrainingRuntimeMissing, match=r"python -m onnxcompress\.runtime\.training_env --install"):
        ensure_training_runtime(install=False)
    with pytest.raises(TrainingRuntimeMissing):
        TrainingRuntimeSession()
    assert not any(empty.iterdir())
