"""Quantization-aware fine-tuning end to end, through the real onnxruntime-training worker.

Models: the ResNet-style tiny CNN of conftest (Conv+BN+ReLU, residual Add, Gemm) and the transformer block of the
model zoo (MatMul, LayerNorm, Softmax, GELU). Labels come from the float model itself, so the float accuracy is
100% by construction and any loss of accuracy is quantization's.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import TINY_CNN_INPUT, build_tiny_cnn

import onnx_graphsurgeon as gs

from onnxcompress.api import finetune
from onnxcompress.training.loss import cross_entropy
from onnxcompress.training.trainer import Trainer
from onnxcompress.config import FinetuneConfig
from onnxcompress.models.transformer_block import build_transformer_block
from onnxcompress.portability import check_portability
from onnxcompress.runtime.ort_kernels import ort_kernel_summary
from onnxcompress.runtime.training import TrainingRuntimeSession
from onnxcompress.runtime.training_env import TrainingRuntime


def float_outputs(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString()).run(None, feeds)[0]


def cnn_data(model: onnx.ModelProto, samples: int, seed: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    x = np.random.default_rng(seed).standard_normal((samples, 3, 16, 16)).astype(np.float32)
    return {TINY_CNN_INPUT: x}, float_outputs(model, {TINY_CNN_INPUT: x}).argmax(axis=1).astype(np.int64)


def config(preset: str = "performance", **training: Any) -> FinetuneConfig:
    settings = {"epochs": 2, "batch_size": 16, "learning_rate": 1e-3, "warmup_steps": 2, **training}
    return FinetuneConfig.build({"compression": [{"algorithm": "quantization", "subset_size": 32, "preset": preset,
                                                  "quantizer_lr": 1e-2}], "training": settings})


@pytest.fixture(scope="module")
def cnn() -> onnx.ModelProto:
    return build_tiny_cnn(seed=3)


@pytest.mark.parametrize("preset", ["performance", "mixed"])  # trainable scale / trainable low and range
def test_qat_of_a_resnet_style_cnn_exports_integer_qdq(runtime: TrainingRuntime, cnn: onnx.ModelProto,
                                                        tmp_path: Path, preset: str) -> None:
    result = finetune(cnn, cnn_data(cnn, 128, 1), cnn_data(cnn, 64, 2), config(preset),
                      checkpoint_dir=tmp_path / "ckpt", progress=False)
    assert [record.epoch for record in result.history] == [1, 2]
    assert result.best_metric >= result.initial_metric - 0.05 and result.best_metric >= 0.85
    statistics = result.history[-1].statistics
    assert statistics["quantization/activation_range_change"] > 0  # the ranges trained
    assert statistics["quantization/weight_range_change"] > 0
    # The export is the fake-quantized model, exactly, when ONNX Runtime computes the QDQ graph in float.
    assert result.export_error_float_path < 1e-6
    assert result.export_error_integer_kernels < 0.02

    model = result.model
    onnx.checker.check_model(model, full_check=True)
    ops = [node.op_type for node in model.graph.node]
    assert "BatchNormalization" not in ops  # folded before training
    int8_weights = [i.name for i in model.graph.initializer
                    if i.data_type == onnx.TensorProto.INT8 and i.name.endswith("_q")]
    assert len(int8_weights) == 3  # conv1, conv2, fc
    # Exact on x86 CPUs without VNNI: trained weight levels of int16-pair kernels stay within ±64.
    assert check_portability(model).safe_without_vnni
    levels = [onnx.numpy_helper.to_array(i) for i in model.graph.initializer if i.name in int8_weights]
    assert max(int(np.abs(v.astype(np.int32)).max()) for v in levels) == 64
    path = tmp_path / "qat.onnx"
    onnx.save(model, path)
    assert ort_kernel_summary(path).all_integer


def test_custom_loss_and_metric_hooks(runtime: TrainingRuntime, cnn: onnx.ModelProto, tmp_path: Path) -> None:
    """A custom loss of twice the cross-entropy doubles the validation loss; the metric hook sees the logits."""
    train, val = cnn_data(cnn, 32, 1), cnn_data(cnn, 32, 2)
    settings = config(epochs=1, learning_rate=1e-12)
    seen: list[tuple[int, ...]] = []

    def doubled(graph: gs.Graph, logits: gs.Tensor, labels: gs.Variable) -> gs.Tensor:
        output = gs.Variable("doubled_loss", dtype=np.float32)
        two = gs.Constant("two", np.array(2.0, np.float32))
        graph.nodes.append(gs.Node("Mul", "double", inputs=[cross_entropy(graph, logits, labels), two],
                                   outputs=[output]))
        return output

    def agreement(logits: np.ndarray, labels: np.ndarray) -> float:
        seen.append(logits.shape)
        return float((logits.argmax(axis=1) == labels).mean())

    plain = finetune(cnn, train, val, settings, checkpoint_dir=tmp_path / "plain", progress=False)
    custom = finetune(cnn, train, val, settings, checkpoint_dir=tmp_path / "custom", progress=False, loss=doubled,
                      metric=agreement)
    assert custom.history[0].val_loss == pytest.approx(2 * plain.history[0].val_loss, rel=1e-4)
    assert custom.history[0].metric == plain.history[0].metric
    assert seen and all(shape == (32, 10) for shape in seen)


def test_qat_of_a_transformer_block_with_mse(runtime: TrainingRuntime, tmp_path: Path) -> None:
    model = build_transformer_block(dim=32, heads=2, hidden=64)
    rng = np.random.default_rng(0)

    def data(samples: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        tokens = rng.standard_normal((samples, 6, 32)).astype(np.float32)
        return {"tokens": tokens}, float_outputs(model, {"tokens": tokens})

    settings = FinetuneConfig.build({
        "compression": [{"algorithm": "quantization", "model_type": "transformer", "subset_size": 16}],
        "training": {"epochs": 1, "batch_size": 8, "learning_rate": 1e-4, "loss": "mse", "metric": "loss"}})
    result = finetune(model, data(48), data(16), settings, checkpoint_dir=tmp_path / "ckpt", progress=False)
    assert result.best_metric <= result.initial_metric * 1.05
    assert result.export_error_float_path < 1e-6
    quantized_matmuls = [n for n in result.model.graph.node if n.op_type == "MatMul"
                         and any(i.endswith("_dq") for i in n.input)]
    assert len(quantized_matmuls) >= 6  # Q, K, V, output and the two MLP projections (plus attention products)
    layer_norms = [n for n in result.model.graph.node if n.op_type == "LayerNormalization"]
    assert layer_norms and not any(i.endswith("_dq") for n in layer_norms for i in n.input[:1])


class InterruptAfter:
    """A session that raises (like a kill) after `steps` training steps; everything else is the real one."""

    def __init__(self, session: TrainingRuntimeSession, steps: int) -> None:
        self._session, self._left = session, steps

    def train_step(self, *args: Any, **kwargs: Any) -> Any:
        if self._left == 0:
            raise KeyboardInterrupt
        self._left -= 1
        return self._session.train_step(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)


def straight_and_resumed(runtime: TrainingRuntime, model: onnx.ModelProto, train: Any, val: Any, settings: Any,
                         folder: Path, steps: int) -> tuple[Any, Any]:
    """An uninterrupted run, and one killed after `steps` training steps then resumed."""
    straight = finetune(model, train, val, settings, checkpoint_dir=folder / "straight", progress=False)
    with TrainingRuntimeSession(runtime) as session:
        interrupted = Trainer(model, train, val, settings, folder / "resumed", progress=False,
                              session=InterruptAfter(session, steps))  # type: ignore[arg-type]
        with pytest.raises(KeyboardInterrupt):
            interrupted.run()
    resumed = finetune(model, train, val, settings, checkpoint_dir=folder / "resumed", resume=True, progress=False)
    return straight, resumed


def assert_same_initializers(a: onnx.ModelProto, b: onnx.ModelProto) -> None:
    for x, y in zip(a.graph.initializer, b.graph.initializer, strict=True):
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(x), onnx.numpy_helper.to_array(y), err_msg=x.name)


@pytest.fixture()
def session(runtime: TrainingRuntime) -> Iterator[TrainingRuntimeSession]:
    with TrainingRuntimeSession(runtime) as opened:
        yield opened


def test_resume_after_an_interruption_ends_like_an_uninterrupted_run(
        runtime: TrainingRuntime, cnn: onnx.ModelProto, tmp_path: Path, session: TrainingRuntimeSession) -> None:
    train, val = cnn_data(cnn, 96, 1), cnn_data(cnn, 32, 2)
    settings = config(epochs=3)
    straight = finetune(cnn, train, val, settings, checkpoint_dir=tmp_path / "straight", progress=False)
    steps_per_epoch = 96 // 16
    interrupted = Trainer(cnn, train, val, settings, tmp_path / "resumed", progress=False,
                          session=InterruptAfter(session, steps_per_epoch + 2))  # type: ignore[arg-type]
    with pytest.raises(KeyboardInterrupt):
        interrupted.run()
    resumed = finetune(cnn, train, val, settings, checkpoint_dir=tmp_path / "resumed", resume=True, progress=False)

    assert [r.metric for r in resumed.history] == [r.metric for r in straight.history]
    assert [r.train_loss for r in resumed.history] == pytest.approx([r.train_loss for r in straight.history],
                                                                    rel=1e-6)
    for a, b in zip(straight.model.graph.initializer, resumed.model.graph.initializer, strict=True):
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b), err_msg=a.name)


def _mobile_block(seed: int = 0) -> onnx.ModelProto:
    """x[N,3,16,16] → Conv → HardSwish → depthwise Conv → squeeze-excitation (GlobalAveragePool → Conv → PRelu →
    Conv → HardSigmoid → Mul with the trunk) → HardSwish → GlobalAveragePool → Flatten → Gemm: the ops of
    MobileNetV3-style models that onnxruntime-training cannot differentiate as they are."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)

    def weight(name: str, *shape: int, scale: float = 0.3) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    nodes = [helper.make_node("Conv", ["x", "c1.w", "c1.b"], ["c1"], name="c1", pads=[1, 1, 1, 1]),
             helper.make_node("HardSwish", ["c1"], ["h1"], name="hswish1"),
             helper.make_node("Conv", ["h1", "dw.w", "dw.b"], ["dw"], name="dw", group=8, pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["dw"], ["se_in"], name="se_pool"),
             helper.make_node("Conv", ["se_in", "se1.w", "se1.b"], ["se1"], name="se1"),
             helper.make_node("PRelu", ["se1", "se.slope"], ["se_act"], name="se_prelu"),
             helper.make_node("Conv", ["se_act", "se2.w", "se2.b"], ["se2"], name="se2"),
             helper.make_node("HardSigmoid", ["se2"], ["gate"], name="se_gate", alpha=1 / 6, beta=0.5),
             helper.make_node("Mul", ["dw", "gate"], ["scaled"], name="se_scale"),
             helper.make_node("HardSwish", ["scaled"], ["h2"], name="hswish2"),
             helper.make_node("GlobalAveragePool", ["h2"], ["pooled"], name="gap"),
             helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"),
             helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["logits"], name="fc", transB=1)]
    initializers = [weight("c1.w", 8, 3, 3, 3), weight("c1.b", 8, scale=0.1), weight("dw.w", 8, 1, 3, 3),
                    weight("dw.b", 8, scale=0.1), weight("se1.w", 4, 8, 1, 1), weight("se1.b", 4, scale=0.1),
                    numpy_helper.from_array(np.full((4, 1, 1), 0.25, np.float32), "se.slope"),
                    weight("se2.w", 8, 4, 1, 1), weight("se2.b", 8, scale=0.1), weight("fc.w", 10, 8),
                    weight("fc.b", 10, scale=0.1)]
    graph = helper.make_graph(nodes, "mobile_block",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_qat_of_a_squeeze_excitation_hardswish_block(runtime: TrainingRuntime, tmp_path: Path) -> None:
    """HardSwish, HardSigmoid and PRelu train in their differentiable forms; the export keeps the original ops and
    equals the fake-quantized model."""
    model = _mobile_block()
    result = finetune(model, cnn_data(model, 128, 1), cnn_data(model, 64, 2), config(epochs=1),
                      checkpoint_dir=tmp_path / "ckpt", progress=False)
    assert result.best_metric >= 0.8
    assert result.export_error_float_path < 1e-6
    ops = {node.op_type for node in result.model.graph.node}
    assert {"HardSwish", "HardSigmoid", "PRelu"} <= ops and "Clip" not in ops
    trained = {i.name: onnx.numpy_helper.to_array(i) for i in result.model.graph.initializer}
    assert not np.array_equal(trained["se.slope"], np.full((4, 1, 1), 0.25, np.float32))  # the slope trained


def _min_normalised_block() -> onnx.ModelProto:
    """x[N,4,6] → MatMul → minus its per-sample ReduceMin, reshaped to [N,1,1] through a shape computed in int32
    (as tf2onnx writes it: Shape → Cast → Slice → Concat → Cast) → Flatten → Gemm → logits[N,3]; opset 15."""
    rng = np.random.default_rng(4)
    h = onnx.helper
    constants = {"w": rng.standard_normal((6, 6)).astype(np.float32), "fc": rng.standard_normal((24, 3)).astype(
        np.float32), "fc_b": np.zeros(3, np.float32), "start": np.array([0], np.int64),
        "one": np.array([1], np.int64), "ones": np.array([1, 1], np.int32)}
    nodes = [h.make_node("MatMul", ["x", "w"], ["m"], name="mm"),
             h.make_node("ReduceMin", ["m"], ["low"], axes=[1, 2], keepdims=0, name="low"),
             h.make_node("Shape", ["m"], ["shape"]), h.make_node("Cast", ["shape"], ["shape32"], to=6),
             h.make_node("Slice", ["shape32", "start", "one", "start"], ["batch"]),
             h.make_node("Concat", ["batch", "ones"], ["target32"], axis=0),
             h.make_node("Cast", ["target32"], ["target"], to=7),
             h.make_node("Reshape", ["low", "target"], ["low3"]),
             h.make_node("Sub", ["m", "low3"], ["shifted"]),
             h.make_node("Flatten", ["shifted"], ["flat"]),
             h.make_node("Gemm", ["flat", "fc", "fc_b"], ["logits"], name="fc")]
    graph = h.make_graph(nodes, "min_normalised", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4, 6])],
                         [h.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["N", 3])],
                         [onnx.numpy_helper.from_array(v, k) for k, v in constants.items()])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 15)])
    model.ir_version = 8
    return model


def test_qat_through_a_reshape_to_a_computed_shape(runtime: TrainingRuntime, tmp_path: Path) -> None:
    """The training graph keeps shapes inferred with data propagation: the runtime's Sub gradient of the [N,1,1]
    operand is reduced to that shape (ReduceMin trains in its differentiable form)."""
    model = _min_normalised_block()

    def data(samples: int, seed: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        x = np.random.default_rng(seed).standard_normal((samples, 4, 6)).astype(np.float32)
        return {"x": x}, float_outputs(model, {"x": x}).argmax(axis=1).astype(np.int64)

    result = finetune(model, data(64, 1), data(32, 2), config(epochs=1), checkpoint_dir=tmp_path / "ckpt",
                      progress=False)
    assert result.export_error_float_path < 1e-5
    assert "ReduceMin" in {node.op_type for node in result.model.graph.node}


def test_qat_with_per_layer_bits_trains_and_exports_the_4_bit_layer_as_int4(runtime: TrainingRuntime,
                                                                           cnn: onnx.ModelProto,
                                                                           tmp_path: Path) -> None:
    """The fine-tuning config's layer_weight_bits: conv2 trains on 4-bit levels and is exported as INT4 (opset
    21), the export equal to the fake-quantized model; the other weights stay INT8."""
    settings = FinetuneConfig.build({
        "compression": [{"algorithm": "quantization", "subset_size": 32, "quantizer_lr": 1e-2,
                         "layer_weight_bits": {"conv2": 4}}],
        "training": {"epochs": 1, "batch_size": 16, "learning_rate": 1e-3, "warmup_steps": 2}})
    result = finetune(cnn, cnn_data(cnn, 96, 1), cnn_data(cnn, 32, 2), settings, checkpoint_dir=tmp_path / "ckpt",
                      progress=False)
    assert result.export_error_float_path < 1e-6
    model = result.model
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 21
    weights = {i.name: i.data_type for i in model.graph.initializer if i.name.endswith("_q")
               and i.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.INT8)}
    assert sorted(weights.values()) == sorted([onnx.TensorProto.INT4, onnx.TensorProto.INT8, onnx.TensorProto.INT8])
    four = next(name for name, kind in weights.items() if kind == onnx.TensorProto.INT4)
    assert "conv2" in four
