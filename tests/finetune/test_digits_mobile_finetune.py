"""The bundled MobileNetV3-style model (depthwise convolutions, squeeze-excitation with HardSigmoid, HardSwish),
trained on real digits, fine-tuned through the real training runtime: QAT alone, and magnitude sparsity + QAT."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxcompress.api import finetune
from onnxcompress.config import FinetuneConfig
from onnxcompress.models import sample
from onnxcompress.runtime.training_env import TrainingRuntime

MOBILE = sample("digits_mobile")


def _top1(model: onnx.ModelProto | Path) -> float:
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    test = np.load(MOBILE.test_path)
    logits = ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(None, {"input": test["input"]})[0]
    return float((logits.argmax(1) == test["labels"]).mean())


def _config(*algorithms: dict, epochs: int = 1, learning_rate: float = 1e-4) -> FinetuneConfig:
    return FinetuneConfig.build({"compression": list(algorithms), "training": {
        "epochs": epochs, "batch_size": 32, "learning_rate": learning_rate, "warmup_steps": 10,
        "distillation": {"enabled": True, "temperature": 4.0}}})


QUANTIZATION = {"algorithm": "quantization", "subset_size": 300, "quantizer_lr": 1e-3}


def test_qat_int8_keeps_the_float_accuracy(runtime: TrainingRuntime, tmp_path: Path) -> None:
    result = finetune(MOBILE.model_path, config=_config(QUANTIZATION), checkpoint_dir=tmp_path / "ckpt",
                      progress=False)
    assert result.export_error_float_path < 1e-6
    ops = {node.op_type for node in result.model.graph.node}
    assert {"HardSwish", "HardSigmoid", "QuantizeLinear"} <= ops
    depthwise = [n for n in result.model.graph.node if n.op_type == "Conv"
                 and any(a.name == "group" and a.i > 1 for a in n.attribute)]
    assert depthwise and all(any(i.endswith("_dq") for i in n.input[1:2]) for n in depthwise)  # INT8 weights
    assert _top1(result.model) >= _top1(MOBILE.model_path) - 0.003


def test_magnitude_sparsity_and_qat(runtime: TrainingRuntime, tmp_path: Path) -> None:
    """30% of the weights zeroed by one global threshold over normed magnitudes after the first epoch, trained on for
    a second."""
    sparsity = {"algorithm": "magnitude_sparsity", "schedule": {"target_level": 0.3, "target_epoch": 1}}
    result = finetune(MOBILE.model_path, config=_config(sparsity, QUANTIZATION, epochs=2, learning_rate=3e-4),
                      checkpoint_dir=tmp_path / "ckpt", progress=False)
    statistics = result.history[-1].statistics
    assert statistics["magnitude_sparsity/sparsity"] == pytest.approx(0.3, abs=0.005)
    layers = [v for k, v in statistics.items() if k.startswith("magnitude_sparsity/layer/")]
    assert len(layers) >= 20 and all(v < 0.9 for v in layers)  # no layer is emptied
    int8 = [onnx.numpy_helper.to_array(i) for i in result.model.graph.initializer
            if i.data_type == onnx.TensorProto.INT8 and i.name.endswith("_q")]
    zeros = sum(int((w == 0).sum()) for w in int8) / sum(w.size for w in int8)
    assert 0.3 - 0.005 <= zeros <= 0.3 + 0.02
    assert _top1(result.model) >= _top1(MOBILE.model_path) - 0.015
