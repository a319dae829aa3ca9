"""Magnitude and RB sparsity stacked with quantization-aware training, through the real onnxruntime-training worker.

The ResNet-style tiny CNN and the transformer block: masks (or gates) multiply the float weights, fake quantizers
quantize the masked weights, and the exported INT8 weights hold exactly the zeros the statistics report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from test_finetune import (  # noqa: F401 - cnn is a fixture
    assert_same_initializers,
    cnn,
    cnn_data,
    float_outputs,
    straight_and_resumed,
)

from onnxcompress.api import finetune
from onnxcompress.config import FinetuneConfig
from onnxcompress.models.transformer_block import build_transformer_block
from onnxcompress.runtime.training_env import TrainingRuntime


def stacked(schedule: dict[str, Any], *, quantization: dict[str, Any] | None = None, **training: Any) -> FinetuneConfig:
    sparsity = {"algorithm": "magnitude_sparsity", "schedule": schedule}
    quantize = {"algorithm": "quantization", "subset_size": 32, "quantizer_lr": 1e-2, **(quantization or {})}
    settings = {"epochs": 2, "batch_size": 16, "learning_rate": 1e-3, "warmup_steps": 2, **training}
    # Written in the "wrong" order on purpose: the stack is applied sparsity first.
    return FinetuneConfig.build({"compression": [quantize, sparsity], "training": settings})


def int8_weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer
            if i.data_type == onnx.TensorProto.INT8 and i.name.endswith("_q")}


def test_magnitude_sparsity_with_qat_keeps_zeros_exact(runtime: TrainingRuntime, cnn: onnx.ModelProto,
                                                       tmp_path: Path) -> None:
    schedule = {"initial_level": 0.2, "target_level": 0.5, "target_epoch": 1}
    result = finetune(cnn, cnn_data(cnn, 128, 1), cnn_data(cnn, 64, 2), stacked(schedule),
                      checkpoint_dir=tmp_path / "ckpt", progress=False)
    first, last = (record.statistics for record in result.history)
    assert first["magnitude_sparsity/level"] == pytest.approx(0.5)  # after epoch 1 = target_epoch
    assert last["magnitude_sparsity/sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert [record.complete for record in result.history] == [True, True]
    assert result.export_error_float_path < 1e-6  # the export is the masked, fake-quantized model
    weights = int8_weights(result.model)
    assert len(weights) == 3
    zeros = sum(int((w == 0).sum()) for w in weights.values()) / sum(w.size for w in weights.values())
    # Every masked weight is an exact INT8 zero; quantization may round a few tiny kept weights to zero too.
    assert 0.5 - 1e-3 <= zeros <= 0.5 + 0.01
    for name, layer in ((k.removeprefix("magnitude_sparsity/layer/"), v) for k, v in last.items()
                        if k.startswith("magnitude_sparsity/layer/")):
        assert 0.0 < layer < 1.0, name  # global threshold: layers differ, none is emptied
    assert result.best_metric >= 0.8


def test_before_the_target_level_no_epoch_is_the_best(runtime: TrainingRuntime, cnn: onnx.ModelProto,
                                                      tmp_path: Path) -> None:
    """A checkpoint taken at a lower level than the target is never exported while a complete one exists."""
    schedule = {"schedule": "multistep", "multistep_epochs": [0, 2], "multistep_levels": [0.0, 0.6]}
    result = finetune(cnn, cnn_data(cnn, 64, 1), cnn_data(cnn, 32, 2), stacked(schedule, epochs=3),
                      checkpoint_dir=tmp_path / "ckpt", progress=False)
    assert [record.complete for record in result.history] == [False, True, True]
    assert result.best_epoch in (2, 3)
    weights = int8_weights(result.model)
    zeros = sum(int((w == 0).sum()) for w in weights.values()) / sum(w.size for w in weights.values())
    assert zeros >= 0.6 - 1e-3


def test_stacked_run_resumed_after_an_interruption_ends_identically(runtime: TrainingRuntime, cnn: onnx.ModelProto,
                                                                     tmp_path: Path) -> None:
    train, val = cnn_data(cnn, 96, 1), cnn_data(cnn, 32, 2)
    schedule = {"initial_level": 0.1, "target_level": 0.5, "target_epoch": 3, "update_per_step": True}
    settings = stacked(schedule, epochs=3)
    straight, resumed = straight_and_resumed(runtime, cnn, train, val, settings, tmp_path, 96 // 16 + 3)
    assert [r.statistics for r in resumed.history] == [r.statistics for r in straight.history]
    assert_same_initializers(straight.model, resumed.model)


def test_rb_and_qat_run_resumed_after_an_interruption_ends_identically(runtime: TrainingRuntime,
                                                                      cnn: onnx.ModelProto, tmp_path: Path) -> None:
    """The gates' noise is a function of the step: the resumed run repeats the interrupted epoch's draws, and the
    freeze after epoch 2 happens in both runs alike."""
    train, val = cnn_data(cnn, 96, 1), cnn_data(cnn, 32, 2)
    rb = {"algorithm": "rb_sparsity", "logit_lr": 0.5, "logit_init": 2.0,
          "schedule": {"initial_level": 0.1, "target_level": 0.5, "target_epoch": 2, "update_per_step": True,
                       "freeze_epoch": 2}}
    quantize = {"algorithm": "quantization", "subset_size": 32, "quantizer_lr": 1e-2}
    settings = FinetuneConfig.build({"compression": [rb, quantize], "training": {
        "epochs": 3, "batch_size": 16, "learning_rate": 1e-3, "warmup_steps": 2}})
    straight, resumed = straight_and_resumed(runtime, cnn, train, val, settings, tmp_path, 96 // 16 + 3)
    assert [r.statistics for r in resumed.history] == [r.statistics for r in straight.history]
    assert [r.train_loss for r in resumed.history] == [r.train_loss for r in straight.history]
    assert straight.history[-1].statistics["rb_sparsity/sparsity"] > 0.3
    assert_same_initializers(straight.model, resumed.model)


def test_transformer_block_with_sparsity_and_quantization(runtime: TrainingRuntime, tmp_path: Path) -> None:
    model = build_transformer_block(dim=32, heads=2, hidden=64)
    rng = np.random.default_rng(0)

    def data(samples: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        tokens = rng.standard_normal((samples, 6, 32)).astype(np.float32)
        return {"tokens": tokens}, float_outputs(model, {"tokens": tokens})

    settings = stacked({"target_level": 0.3, "target_epoch": 0}, quantization={"model_type": "transformer"},
                       epochs=1, batch_size=8, learning_rate=1e-4, loss="mse", metric="loss")
    result = finetune(model, data(48), data(16), settings, checkpoint_dir=tmp_path / "ckpt", progress=False)
    assert result.export_error_float_path < 1e-6
    assert result.history[0].statistics["magnitude_sparsity/sparsity"] == pytest.approx(0.3, abs=1e-3)
    weights = int8_weights(result.model)
    assert len(weights) >= 6
    zeros = sum(int((w == 0).sum()) for w in weights.values()) / sum(w.size for w in weights.values())
    assert zeros >= 0.3 - 1e-3


def test_rb_sparsity_with_qat_trains_gates_and_exports_the_deterministic_ones(
        runtime: TrainingRuntime, cnn: onnx.ModelProto, tmp_path: Path) -> None:
    """The complexity loss lowers the keep probabilities while training; evaluation and export use [logit > 0]
    (noise off), so the export equals the evaluated model and its INT8 zeros are the reported sparsity."""
    rb = {"algorithm": "rb_sparsity", "logit_lr": 0.5, "logit_init": 2.0,
          "schedule": {"target_level": 0.5, "target_epoch": 0}}
    quantize = {"algorithm": "quantization", "subset_size": 32, "quantizer_lr": 1e-2}
    settings = FinetuneConfig.build({"compression": [rb, quantize], "training": {
        "epochs": 2, "batch_size": 16, "learning_rate": 1e-3, "warmup_steps": 2}})
    result = finetune(cnn, cnn_data(cnn, 128, 1), cnn_data(cnn, 64, 2), settings, checkpoint_dir=tmp_path / "ckpt",
                      progress=False)
    last = result.history[result.best_epoch - 1].statistics
    assert last["rb_sparsity/mean_keep_probability"] < 1 / (1 + np.exp(-2.0)) - 0.05  # the loss moved the logits
    assert last["rb_sparsity/level"] == 0.5
    assert result.export_error_float_path < 1e-6
    weights = int8_weights(result.model)
    zeros = sum(int((w == 0).sum()) for w in weights.values()) / sum(w.size for w in weights.values())
    assert last["rb_sparsity/sparsity"] - 1e-3 <= zeros <= last["rb_sparsity/sparsity"] + 0.02
    assert {n.op_type for n in result.model.graph.node}.isdisjoint({"RandomUniform", "Sigmoid", "Round"})
