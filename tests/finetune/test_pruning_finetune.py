"""Filter pruning fine-tuned through the real onnxruntime-training worker, alone and stacked with QAT: masks zero
whole channels while training, the export removes them (also from the INT8 model), and the exported model
computes what the masked training graph computed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx
import pytest
from test_finetune import assert_same_initializers, cnn, cnn_data, straight_and_resumed  # noqa: F401 - cnn: fixture

from onnxcompress.api import finetune
from onnxcompress.config import FinetuneConfig, read_config_file
from onnxcompress.errors import ConfigError, PruningError
from onnxcompress.models import sample
from onnxcompress.runtime.training_env import TrainingRuntime

CONFIGS = Path(__file__).resolve().parents[2] / "models" / "configs"


def pruning(schedule: dict[str, Any], *, quantize: bool, **settings: Any) -> FinetuneConfig:
    stack = [{"algorithm": "filter_pruning", "target": 0.4, "target_kind": "filters", "min_width": 2, "channel_multiple": 1,
              "schedule": schedule}]
    if quantize:
        stack.insert(0, {"algorithm": "quantization", "subset_size": 32, "quantizer_lr": 1e-2})
    training = {"epochs": 2, "batch_size": 16, "learning_rate": 1e-3, "warmup_steps": 2, **settings}
    return FinetuneConfig.build({"compression": stack, "training": training})


def conv_widths(model: onnx.ModelProto) -> dict[str, int]:
    """Output channels of each Conv, read from its weight (through DequantizeLinear in an INT8 model)."""
    shapes = {i.name: tuple(i.dims) for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    widths = {}
    for node in model.graph.node:
        if node.op_type == "Conv":
            weight = node.input[1]
            if weight not in shapes:
                weight = producers[weight].input[0]
            widths[node.name] = shapes[weight][0]
    return widths


@pytest.mark.parametrize("quantize", [False, True], ids=["float", "int8"])
def test_pruned_channels_are_removed_at_export(runtime: TrainingRuntime, cnn: onnx.ModelProto, tmp_path: Path,
                                               quantize: bool) -> None:
    schedule = {"schedule": "exponential", "initial_level": 0.1, "pruning_steps": 1}
    result = finetune(cnn, cnn_data(cnn, 96, 1), cnn_data(cnn, 32, 2), pruning(schedule, quantize=quantize),
                      checkpoint_dir=tmp_path / "ckpt", progress=False)
    first, last = (record.statistics for record in result.history)
    assert first["filter_pruning/level"] == pytest.approx(0.4) and last["filter_pruning/mac_reduction"] > 0.3
    assert [record.complete for record in result.history] == [True, True]
    onnx.checker.check_model(result.model, full_check=True)
    before, after = conv_widths(cnn), conv_widths(result.model)
    assert after != before and all(after[name] <= width for name, width in before.items())
    # The exported model (channels removed) computes what the masked training graph computed.
    assert result.export_error_float_path < (1e-5 if not quantize else 1e-2)
    # Removing the channels, also from the quantized graph (exact integer kernels), changes nothing against zeroing
    # them.
    assert result.export_error_surgery < 1e-5
    if quantize:  # QAT levels stay within half the int16 pair budget, so the pairs surgery re-forms fit too
        from onnxcompress.portability import check_portability

        portability = check_portability(result.model)
        assert portability.checked and portability.safe_without_vnni, portability.describe()


def test_pruning_settings_that_cannot_work_are_refused(cnn: onnx.ModelProto, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="reaches its target at epoch 3, after the last epoch"):
        pruning({"pruning_steps": 3}, quantize=False, epochs=2)
    with pytest.raises(ConfigError, match="initial_level 0.5 is above the target 0.4"):
        pruning({"initial_level": 0.5}, quantize=False)
    config = FinetuneConfig.build({"compression": [{"algorithm": "filter_pruning", "target": 0.95,
                                                    "target_kind": "flops"}], "training": {"epochs": 1}})
    with pytest.raises(PruningError, match="a 95% MAC reduction cannot be reached"):
        finetune(cnn, cnn_data(cnn, 16, 1), cnn_data(cnn, 16, 2), config, checkpoint_dir=tmp_path / "ckpt",
                 progress=False)
    assert not (tmp_path / "ckpt").exists() or not any((tmp_path / "ckpt").iterdir())


def test_pruning_stacks_before_sparsity_and_quantization() -> None:
    from onnxcompress.compression.registry import order_stack

    config = FinetuneConfig.build({"compression": [{"algorithm": "quantization"},
                                                   {"algorithm": "magnitude_sparsity"},
                                                   {"algorithm": "filter_pruning"}]})
    assert [c.algorithm for c in order_stack(config.compression)] == ["filter_pruning", "magnitude_sparsity",
                                                                     "quantization"]


def test_pruning_sparsity_and_quantization_in_one_stack(runtime: TrainingRuntime, cnn: onnx.ModelProto,
                                                        tmp_path: Path) -> None:
    """Filter masks, then sparsity masks, then fake quantizers; the INT8 export has the channels removed and the
    sparsity zeros of what is left: the sparsity level counts only the weights the surgery keeps, so the exported
    file has that level, not less."""
    config = FinetuneConfig.build({"compression": [
        {"algorithm": "quantization", "subset_size": 32, "quantizer_lr": 1e-2},
        {"algorithm": "magnitude_sparsity", "threshold": "per_layer",
         "schedule": {"initial_level": 0.5, "target_level": 0.5, "target_epoch": 0}},
        {"algorithm": "filter_pruning", "target": 0.4, "target_kind": "filters", "min_width": 2, "channel_multiple": 1,
         "schedule": {"schedule": "baseline"}}],
        "training": {"epochs": 1, "batch_size": 16, "learning_rate": 1e-3, "warmup_steps": 2}})
    result = finetune(cnn, cnn_data(cnn, 64, 1), cnn_data(cnn, 32, 2), config, checkpoint_dir=tmp_path / "ckpt",
                      progress=False)
    assert conv_widths(result.model) != conv_widths(cnn)
    weights = [onnx.numpy_helper.to_array(i) for i in result.model.graph.initializer
               if i.data_type == onnx.TensorProto.INT8 and i.name.endswith("_q")]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.size for w in weights)
    assert result.history[-1].statistics["magnitude_sparsity/sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert 0.5 <= zeros < 0.53  # above 0.5 only by weights that round to zero in INT8
    assert result.export_error_float_path < 1e-2


def test_pruning_run_resumed_after_an_interruption_ends_identically(runtime: TrainingRuntime, cnn: onnx.ModelProto,
                                                                     tmp_path: Path) -> None:
    """The scheduler's kept channels are in the run state: a run killed after the level reached its target (so
    no later epoch recomputes them) and resumed removes the same channels and ends with the same weights."""
    train, val = cnn_data(cnn, 96, 1), cnn_data(cnn, 32, 2)
    settings = pruning({"schedule": "exponential", "initial_level": 0.1, "pruning_steps": 2}, quantize=True, epochs=3)
    straight, resumed = straight_and_resumed(runtime, cnn, train, val, settings, tmp_path, 2 * (96 // 16) + 3)
    assert [r.statistics for r in resumed.history] == [r.statistics for r in straight.history]
    assert conv_widths(resumed.model) == conv_widths(straight.model) != conv_widths(cnn)
    assert_same_initializers(straight.model, resumed.model)


def test_the_teacher_is_the_uncompressed_model_not_the_masked_one(cnn: onnx.ModelProto) -> None:
    """Distillation must pull the student towards what the user's model computes: the float model the algorithms
    return is masked at the initial level (and bias-corrected), so it cannot be the teacher."""
    import numpy as np
    import onnxruntime as ort

    from onnxcompress.compression.api import BuildContext
    from onnxcompress.compression.registry import create_compressed_model

    config = pruning({"schedule": "exponential", "initial_level": 0.3, "pruning_steps": 1}, quantize=True)
    feeds = cnn_data(cnn, 32, 1)[0]
    name = next(iter(feeds))

    def batches():
        return ({name: feeds[name][i:i + 1]} for i in range(32))

    compressed = create_compressed_model(cnn, config.compression, batches, BuildContext(1e-3, "adamw", 2, 32, False))

    def run(model: onnx.ModelProto) -> np.ndarray:
        return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]

    expected = run(cnn)
    np.testing.assert_allclose(run(compressed.reference_model), expected, atol=1e-4 * np.ptp(expected))
    assert np.abs(run(compressed.float_model) - expected).max() > 1e-2 * np.ptp(expected)


@pytest.mark.parametrize("name", ["digits_cnn", "digits_mobile"])
def test_sample_pruning_config_on_trained_weights_removes_channels_exactly(runtime: TrainingRuntime, tmp_path: Path,
                                                                          name: str) -> None:
    """The sample pruning + INT8 config, shortened to two epochs with the target reached after the first, on the
    bundled trained model: narrower INT8 layers, and removing the channels gives what zeroing them gives."""
    bundled = sample(name)
    values = read_config_file(CONFIGS / f"{name.replace('_cnn', '')}_pruning_int8.yaml")
    values["compression"][0]["schedule"]["pruning_steps"] = 1
    values["training"]["epochs"] = 2
    result = finetune(bundled.model_path, config=FinetuneConfig.build(values), checkpoint_dir=tmp_path / "ckpt",
                      progress=False)
    target = values["compression"][0]["target"]
    assert result.history[-1].statistics["filter_pruning/mac_reduction"] >= target - 0.01
    before, after = conv_widths(onnx.load(bundled.model_path)), conv_widths(result.model)
    assert sum(after.values()) < sum(before.values())
    assert result.export_error_surgery < 1e-5
    assert result.export_error_float_path < 1e-2
