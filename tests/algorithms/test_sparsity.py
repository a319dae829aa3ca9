"""Magnitude sparsity: masks at an exact level, schedules, one-shot `sparsify` with bias correction, bad settings;
the RB sparsity scheduler."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import TINY_CNN_INPUT, build_tiny_cnn
from onnx import TensorProto, helper

from onnxcompress.algorithms.sparsity.masks import SparsityTarget, alive_elements, compute_masks, sparsity
from onnxcompress.algorithms.sparsity.schedule import AdaptiveLevel, planned_level
from onnxcompress.api import sparsify
from onnxcompress.config import (
    FinetuneConfig,
    SparsityImportance,
    SparsityScheduleConfig,
    SparsifyConfig,
    SparsityThreshold,
)
from onnxcompress.errors import ConfigError, SparsityError
from onnxcompress.models import sample

ABS, NORMED = SparsityImportance.ABS, SparsityImportance.NORMED_ABS
PER_LAYER, GLOBAL = SparsityThreshold.PER_LAYER, SparsityThreshold.GLOBAL


def _targets(weights: dict[str, np.ndarray]) -> list[SparsityTarget]:
    return [SparsityTarget(f"node_{name}", 1, name, w.size) for name, w in weights.items()]


def test_per_layer_masks_zero_exactly_the_smallest_fraction_of_each_layer() -> None:
    rng = np.random.default_rng(0)
    weights = {"a": rng.standard_normal((8, 5)).astype(np.float32), "b": rng.standard_normal((3, 7)).astype(np.float32)}
    masks = compute_masks(_targets(weights), weights, 0.4, ABS, PER_LAYER)
    for name, weight in weights.items():
        mask = masks[f"node_{name}.weight_mask"]
        zeros = int(round(0.4 * weight.size))
        assert mask.dtype == np.float32 and mask.shape == weight.shape and int((mask == 0).sum()) == zeros
        assert np.abs(weight[mask == 0]).max() <= np.abs(weight[mask == 1]).min()


def test_a_global_threshold_prunes_the_layer_of_small_weights_more() -> None:
    small = np.full((4, 4), 0.01, np.float32) * np.arange(1, 17).reshape(4, 4)
    large = small * 100
    weights = {"small": small, "large": large}
    by_abs = compute_masks(_targets(weights), weights, 0.5, ABS, GLOBAL)
    assert sparsity(by_abs) == 0.5
    assert (by_abs["node_small.weight_mask"] == 0).all() and (by_abs["node_large.weight_mask"] == 1).all()
    # normed_abs divides each layer by its norm: the two layers are the same up to scale, so each loses half.
    by_norm = compute_masks(_targets(weights), weights, 0.5, NORMED, GLOBAL)
    assert [sparsity({k: v}) for k, v in by_norm.items()] == [0.5, 0.5]


@pytest.mark.parametrize("threshold", [PER_LAYER, GLOBAL])
def test_the_level_counts_only_the_weights_an_earlier_algorithm_leaves(threshold: SparsityThreshold) -> None:
    """Filter pruning removes whole rows at export: those are zeroed but not counted, so what survives has the
    level asked for; the zeros among the survivors are its smallest weights."""
    rng = np.random.default_rng(1)
    weights = {"a": rng.standard_normal((6, 10)).astype(np.float32), "b": rng.standard_normal((4, 5)).astype(np.float32)}
    rows = np.ones((6, 10), bool)
    rows[[0, 3]] = False
    targets = _targets(weights)
    alive = alive_elements(targets, {"a": rows})
    masks = compute_masks(targets, weights, 0.5, ABS, threshold, alive)
    a = masks["node_a.weight_mask"]
    assert (a[~rows] == 0).all()
    assert sparsity(masks, alive) == 0.5 and sparsity(masks) == (20 + 20 + 10) / 80
    if threshold is PER_LAYER:
        assert int((a[rows] == 0).sum()) == 20
        assert np.abs(weights["a"][rows & (a == 0)]).max() <= np.abs(weights["a"][a == 1]).min()


def test_schedules_rise_from_the_initial_to_the_target_level() -> None:
    polynomial = SparsityScheduleConfig(initial_level=0.1, target_level=0.5, target_epoch=4, power=3)
    assert [round(planned_level(polynomial, e), 4) for e in (0, 2, 4, 9)] == [0.1, 0.45, 0.5, 0.5]
    exponential = SparsityScheduleConfig(schedule="exponential", initial_level=0.0, target_level=0.75, target_epoch=2)
    assert [planned_level(exponential, e) for e in (0, 1, 2)] == pytest.approx([0.0, 0.5, 0.75])
    multistep = SparsityScheduleConfig(schedule="multistep", multistep_epochs=(1, 3), multistep_levels=(0.3, 0.6))
    assert [planned_level(multistep, e) for e in (0, 1, 2, 3)] == [0.0, 0.3, 0.3, 0.6]
    adaptive = SparsityScheduleConfig(schedule="adaptive", target_level=0.2, step=0.1, patience=2, eps=0.01)
    level = AdaptiveLevel(0.0)
    assert [level.update(adaptive, measured) for measured in (0.0, 0.0, 0.05, 0.1, 0.1, 0.2, 0.2)] == \
        pytest.approx([0.0, 0.1, 0.1, 0.1, 0.2, 0.2, 0.2])


@pytest.mark.parametrize(("values", "message"), [
    ({"compression": [{"algorithm": "magnitude_sparsity", "schedule": {"target_level": 1.0}}]},
     "'compression.0.schedule.target_level': Input should be less than 1"),
    ({"compression": [{"algorithm": "magnitude_sparsity", "schedule": {"initial_level": 0.5, "target_level": 0.3}}]},
     "target_level 0.3 is below initial_level 0.5"),
    ({"compression": [{"algorithm": "magnitude_sparsity", "schedule": {"target_epoch": 5}}], "training": {"epochs": 3}},
     "reaches its target at epoch 5, after the last epoch (3)"),
    ({"compression": [{"algorithm": "magnitude_sparsity", "schedule": {"target_epoch": 3, "freeze_epoch": 2}}]},
     "freeze_epoch 2 is before the schedule reaches its target"),
    ({"compression": [{"algorithm": "magnitude_sparsity", "schedule": {"schedule": "multistep"}}]},
     "multistep needs multistep_epochs and multistep_levels"),
    ({"compression": [{"algorithm": "rb_sparsityy"}]}, "unknown algorithm 'rb_sparsityy'"),
    ({"compression": [{"algorithm": "rb_sparsity", "schedule": {"target_epoch": 0, "freeze_epoch": 0}}]},
     "freeze_epoch 0 would freeze the gates before they train"),
    ({"compression": [{"algorithm": "magnitude_sparsity", "levle": 0.5}]}, "unknown key 'compression.0.levle'"),
])
def test_bad_sparsity_settings_are_config_errors(values: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        FinetuneConfig.build(values)


def test_a_stack_with_two_sparsity_algorithms_cannot_be_ordered() -> None:
    from onnxcompress.compression.registry import order_stack

    config = FinetuneConfig.build({"compression": [{"algorithm": "magnitude_sparsity"},
                                                   {"algorithm": "magnitude_sparsity"}]})
    with pytest.raises(ConfigError, match="'magnitude_sparsity' and 'magnitude_sparsity' both act at the sparsity"):
        order_stack(config.compression)
    ordered = order_stack(FinetuneConfig.build({"compression": [{"algorithm": "quantization"},
                                                                {"algorithm": "magnitude_sparsity"}]}).compression)
    assert [c.algorithm for c in ordered] == ["magnitude_sparsity", "quantization"]


def _top1(model: onnx.ModelProto, x: np.ndarray, labels: np.ndarray) -> float:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return float((session.run(None, {"input": x})[0].argmax(1) == labels).mean())


def test_one_shot_sparsify_of_the_bundled_model() -> None:
    digits = sample("digits_cnn")
    test = np.load(digits.test_path)
    x, labels = test["input"], test["labels"]
    float_top1 = _top1(onnx.load(digits.model_path), x, labels)
    plain = sparsify(digits.model_path, level=0.3, progress=False)
    corrected = sparsify(digits.model_path, digits.calibration_path, level=0.5, subset_size=100, progress=False)
    uncorrected = sparsify(digits.model_path, level=0.5, progress=False)
    assert plain.sparsity == pytest.approx(0.3, abs=1e-4) and not plain.corrected
    assert set(corrected.layers) == {"conv1", "conv2", "res_conv1", "res_conv2", "conv3", "fc"}
    assert all(layer == pytest.approx(0.5, abs=0.01) for layer in corrected.layers.values())
    weights = [onnx.numpy_helper.to_array(i) for i in corrected.model.graph.initializer
               if onnx.numpy_helper.to_array(i).ndim >= 2]
    assert sum(int((w == 0).sum()) for w in weights) / sum(w.size for w in weights) == pytest.approx(0.5, abs=1e-4)
    assert _top1(plain.model, x, labels) >= float_top1 - 0.02
    # Bias correction removes the mean shift the zeros add: measured on held-out data, it is the better model.
    assert len(corrected.corrected) == 6
    assert _top1(corrected.model, x, labels) > _top1(uncorrected.model, x, labels)


def test_ignored_layers_stay_dense_and_the_input_is_not_modified(tmp_path) -> None:
    model = build_tiny_cnn()
    before = model.SerializeToString()
    result = sparsify(model, level=0.5, ignored_scope={"names": ["fc"]}, threshold="per_layer", progress=False)
    assert model.SerializeToString() == before
    assert "fc" not in result.layers and set(result.layers) == {"conv1", "conv2"}
    fc_weight = next(n for n in result.model.graph.node if n.name == "fc").input[1]
    weight = next(onnx.numpy_helper.to_array(i) for i in result.model.graph.initializer if i.name == fc_weight)
    assert (weight != 0).all()
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    session = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert session.run(None, {TINY_CNN_INPUT: x})[0].shape == (2, 10)


def test_a_model_without_weights_to_mask_is_a_sparsity_error() -> None:
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="relu")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(SparsityError, match="no weight sparsity can mask"):
        sparsify(model, level=0.5, progress=False)
    with pytest.raises(SparsityError, match="no weight sparsity can mask"):
        sparsify(build_tiny_cnn(), level=0.5, ignored_scope={"types": ["Conv", "Gemm"]}, progress=False)
    with pytest.raises(ConfigError, match="'level': Input should be less than 1"):
        SparsifyConfig.build({"level": 1.0})


def test_the_controller_masks_at_the_level_the_schedule_sets_for_epoch_zero() -> None:
    """target_epoch 0 prunes before training: the initial masks, and the weights handed to the next algorithm, are
    at the target level; the scheduler's later steps keep it."""
    from onnxcompress.algorithms.sparsity.magnitude import MagnitudeSparsityController
    from onnxcompress.compression.api import BuildContext
    from onnxcompress.config import MagnitudeSparsityConfig

    config = MagnitudeSparsityConfig(algorithm="magnitude_sparsity", schedule={"target_level": 0.4, "target_epoch": 0})
    controller, masked = MagnitudeSparsityController.build(build_tiny_cnn(), lambda: iter(()), config,
                                                           BuildContext(1e-3, "adamw", steps_per_epoch=4))
    assert sparsity(controller.frozen_parameters) == pytest.approx(0.4, abs=1e-3)
    assert controller.scheduler.complete
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in masked.graph.initializer}
    for target in controller.targets:
        np.testing.assert_array_equal(weights[target.weight] == 0, controller.frozen_parameters[target.mask] == 0)
    changes = controller.scheduler.epoch_step(lambda names: {n: weights[n] for n in names})
    assert sparsity(changes) == pytest.approx(0.4, abs=1e-3)


def test_inspect_reports_the_zeros_of_float_and_quantized_weights(tmp_path) -> None:
    """Post-training quantization keeps every zero of a sparse model (round(0) = 0); inspect counts them in the INT8
    levels behind DequantizeLinear, per layer and overall, and the zlib size shows what they save."""
    from onnxcompress.api import quantize
    from onnxcompress.inspection import format_inspection, inspect_model

    digits = sample("digits_cnn")
    sparse = sparsify(digits.model_path, level=0.5, progress=False).model
    onnx.save(sparse, tmp_path / "sparse.onnx")
    onnx.save(quantize(sparse, digits.calibration_path, subset_size=16, progress=False), tmp_path / "int8.onnx")
    float_report = inspect_model(tmp_path / "sparse.onnx", runtimes=False)
    int8_report = inspect_model(tmp_path / "int8.onnx", runtimes=False)
    assert set(int8_report.layer_zeros) == set(float_report.layer_zeros) == {
        "conv1", "conv2", "res_conv1", "res_conv2", "conv3", "fc"}
    for name, (zeros, size) in float_report.layer_zeros.items():
        assert zeros == pytest.approx(size / 2, abs=1) and int8_report.layer_zeros[name][0] >= zeros
    assert "weight sparsity: 50.0% of 167456 weights in 6 layers" in format_inspection(float_report)
    dense = inspect_model(digits.model_path, runtimes=False)
    assert float_report.compressed_bytes < 0.7 * dense.compressed_bytes


def _rb_controller(schedule: dict, steps_per_epoch: int = 4):
    from onnxcompress.algorithms.sparsity.rb import RBSparsityController
    from onnxcompress.compression.api import BuildContext
    from onnxcompress.config import RBSparsityConfig

    config = RBSparsityConfig(algorithm="rb_sparsity", logit_lr=0.1, schedule=schedule)
    controller, _ = RBSparsityController.build(build_tiny_cnn(), lambda: iter(()), config,
                                               BuildContext(1e-3, "adamw", steps_per_epoch=steps_per_epoch))
    return controller


def test_the_rb_scheduler_numbers_the_noise_steps_and_freezes_the_gates_at_their_signs() -> None:
    from onnxcompress.algorithms.sparsity.rb import DENSITY, NOISE, PINNED_LOGIT, STEP

    controller = _rb_controller({"initial_level": 0.1, "target_level": 0.5, "target_epoch": 1, "freeze_epoch": 2})
    scheduler = controller.scheduler
    parameters = {**controller.trainable_parameters, **controller.frozen_parameters}
    assert parameters[STEP] == 0 and parameters[NOISE] == 1 and parameters[DENSITY] == pytest.approx(0.9)
    rng = np.random.default_rng(0)
    for gate in controller.gates:
        parameters[gate.delta] = rng.standard_normal(parameters[gate.delta].shape).astype(np.float32)
    signs = {g.delta: parameters[g.delta] > 0 for g in controller.gates}

    def read(names):
        return {name: parameters[name] for name in names}

    steps = []
    for _ in range(2):
        steps += [float(scheduler.step(read)[STEP]) for _ in range(4)]
        changes = scheduler.epoch_step(read)
        parameters.update(changes)
    assert steps == list(range(1, 9))
    assert changes[DENSITY] == pytest.approx(0.5) and changes[NOISE] == 0  # frozen after epoch 2
    for gate in controller.gates:
        np.testing.assert_allclose(gate.lr_scale * changes[gate.delta],
                                   np.where(signs[gate.delta], PINNED_LOGIT, -PINNED_LOGIT), rtol=1e-6)
    assert controller.training_parameters[NOISE] == 0 and controller.frozen_parameters[NOISE] == 0
    assert scheduler.epoch_step(read) == {}

    resumed = _rb_controller(dict(controller.config.schedule)).scheduler
    resumed.load_state(scheduler.state())
    assert float(resumed.step(read)[STEP]) == float(scheduler.step(read)[STEP]) == 9
    assert resumed.frozen


def test_the_rb_level_moves_every_step_with_update_per_step() -> None:
    from onnxcompress.algorithms.sparsity.rb import DENSITY

    scheduler = _rb_controller({"initial_level": 0.0, "target_level": 0.5, "target_epoch": 1, "power": 1,
                                "update_per_step": True}).scheduler
    densities = [float(scheduler.step(lambda names: {})[DENSITY]) for _ in range(4)]
    np.testing.assert_allclose(densities, [0.875, 0.75, 0.625, 0.5])
    assert scheduler.complete


def test_importance_initial_logits_order_the_gates_like_magnitude_sparsity() -> None:
    """The loss lowers every logit alike: with logits proportional to normed |w|, the gates close in the order
    magnitude sparsity (global normed_abs threshold) zeroes the weights."""
    from onnxcompress.algorithms.sparsity.rb import initial_logits
    from onnxcompress.config import RBSparsityConfig

    rng = np.random.default_rng(0)
    weights = {"a": rng.standard_normal((8, 5)).astype(np.float32),
               "b": 10 * rng.standard_normal((3, 7)).astype(np.float32)}
    targets = _targets(weights)
    config = RBSparsityConfig(algorithm="rb_sparsity", logit_init=4.0, logit_init_mode="importance",
                              schedule={"target_level": 0.4})
    logits = initial_logits(targets, weights, config)
    flat = np.concatenate([logits[t.node].ravel() for t in targets])
    masks = compute_masks(targets, weights, 0.4, NORMED, GLOBAL)
    zeroed = np.concatenate([masks[t.mask].ravel() for t in targets]) == 0
    assert flat[zeroed].max() <= 4.0 <= flat[~zeroed].min()
    assert flat.max() == 8.0 and flat.min() >= 0.0
    assert all(logits[t.node].shape == weights[t.weight].shape for t in targets)
    constant = initial_logits(targets, weights, RBSparsityConfig(algorithm="rb_sparsity", logit_init=4.0))
    assert set(constant.values()) == {4.0}
    mostly_zero = {name: np.where(np.arange(w.size).reshape(w.shape) % 2 == 0, 0, w) for name, w in weights.items()}
    assert set(initial_logits(targets, mostly_zero, config).values()) == {4.0}  # threshold 0: the constant start
