"""Accuracy control returns exactly the unit that breaks the budget to float, stops as soon as the budget holds,
and says so clearly when the allowed units cannot meet it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import TINY_CNN_INPUT, build_tiny_cnn

from onnxcompress.algorithms.quantization.partial import apply_partial, quantizer_units
from onnxcompress.algorithms.quantization.ptq import QuantizationPlan, plan_quantization
from onnxcompress.config import QuantizationConfig
from onnxcompress.errors import ConfigError
from onnxcompress.evaluation.sensitivity import quantizer_candidates
from onnxcompress.evaluation.accuracy_control import AccuracyControlError, control_accuracy
from onnxcompress.evaluation.metrics import EvalSet, resolve_metric
from onnxcompress.evaluation.sensitivity import score_model


@pytest.fixture()
def planted(tmp_path: Path):
    """A plan whose last weight keeps only every 32nd level, the cosine metric against the float model, and the
    scores with nothing and with only that weight in float."""
    model = build_tiny_cnn()
    fp32 = tmp_path / "fp32.onnx"
    onnx.save(model, fp32)
    shape = [d.dim_value or 1 for d in model.graph.input[0].type.tensor_type.shape.dim][1:]
    x = np.random.default_rng(0).standard_normal((16, *shape)).astype(np.float32)
    plan = plan_quantization(model, [{TINY_CNN_INPUT: x}], QuantizationConfig(), progress=False)
    command = plan.weights[-1]
    coarse = (np.round(command.quantized.astype(np.float32) / 32) * 32).clip(-127, 127).astype(np.int8)
    plan = dataclasses.replace(plan, weights=[*plan.weights[:-1], dataclasses.replace(command, quantized=coarse)])
    metric = resolve_metric("cosine", EvalSet.from_arrays({TINY_CNN_INPUT: x}, [TINY_CNN_INPUT]), fp32)
    victim = next(u for u in quantizer_units(plan) if u.label == command.node)
    scores = [score_model(apply_partial(plan, model, units), metric, tmp_path, "s") for units in ([], [victim])]
    return plan, model, metric, victim, scores


def test_the_planted_unit_alone_goes_to_float(planted: tuple[QuantizationPlan, onnx.ModelProto, object, object,
                                                             list[float]]) -> None:
    plan, model, metric, victim, (quantized, victim_float) = planted
    budget = (1 - victim_float) * 1.5
    assert 1 - quantized > budget  # the quantized model breaks it
    result = control_accuracy(quantizer_candidates(plan, model), metric, budget, progress=False)
    assert result.float_units == (victim,)
    assert result.quantized_score == pytest.approx(quantized) and result.final_score == pytest.approx(victim_float)
    assert result.float_score == pytest.approx(1.0, abs=1e-6)
    assert result.model.graph == apply_partial(plan, model, [victim]).graph
    nothing = control_accuracy(quantizer_candidates(plan, model), metric, 1 - quantized + 1e-9, progress=False)
    assert nothing.float_units == () and nothing.evaluations == 2  # float and quantized only


def test_a_budget_the_allowed_units_cannot_meet_is_refused(planted) -> None:
    plan, model, metric, victim, (quantized, victim_float) = planted
    others = [u for u in quantizer_units(plan) if u != victim]
    with pytest.raises(AccuracyControlError, match=rf"with all {len(others)} allowed quantizer units in float .* "
                                                   "over the budget"):
        control_accuracy(quantizer_candidates(plan, model), metric, (1 - victim_float) * 1.5, allowed=others, progress=False)
    with pytest.raises(ConfigError, match="max_drop must be 0 or more, got -0.1"):
        control_accuracy(quantizer_candidates(plan, model), metric, -0.1, progress=False)


def test_the_api_meets_a_top1_budget_on_the_bundled_model(tmp_path: Path) -> None:
    """Real trained weights and real held-out digits: the budget holds, measured again on the returned model."""
    import onnxruntime as ort

    from onnxcompress.api import quantize_with_accuracy_control
    from onnxcompress.models import sample

    digits = sample("digits_cnn")
    test = np.load(digits.test_path)
    eval_data = {"input": test["input"][:200], "labels": test["labels"][:200]}
    result = quantize_with_accuracy_control(digits.model_path, metric="top1", max_drop=0.0, eval_data=eval_data,
                                            progress=False)
    assert result.float_score - result.final_score <= 0.0
    logits = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"input": eval_data["input"]})[0]
    assert float((logits.argmax(1) == eval_data["labels"]).mean()) == pytest.approx(result.final_score)
    assert "QuantizeLinear" in {n.op_type for n in result.model.graph.node}
    # What the float units cost is measured when there are any, one latency difference per unit and runtime.
    assert (result.speed is None) == (not result.float_units)
    if result.speed is not None:
        assert [u.label for u in result.speed.units] == list(result.labels)
        assert all(set(u.ms) == {"openvino", "onnxruntime"} for u in result.speed.units)


def test_a_bad_metric_is_refused_before_the_calibration_pass(tmp_path: Path) -> None:
    from onnxcompress.api import quantize_with_accuracy_control

    model = tmp_path / "fp32.onnx"
    onnx.save(build_tiny_cnn(), model)
    read = []

    def calibration():
        read.append(True)
        yield {TINY_CNN_INPUT: np.zeros((1, *[d.dim_value or 1 for d in build_tiny_cnn().graph.input[0].type
                                               .tensor_type.shape.dim][1:]), np.float32)}

    with pytest.raises(ConfigError, match="metric file not found"):
        quantize_with_accuracy_control(model, calibration(), metric=str(tmp_path / "absent.py:f"), max_drop=0.01,
                                       progress=False)
    assert not read


def test_the_noise_ranking_puts_the_planted_unit_first(planted, tmp_path: Path) -> None:
    from onnxcompress.evaluation.noise import noise_ranking

    plan, model, metric, victim, _ = planted
    shape = [d.dim_value or 1 for d in model.graph.input[0].type.tensor_type.shape.dim][1:]
    feeds = [{TINY_CNN_INPUT: np.random.default_rng(1).standard_normal((4, *shape)).astype(np.float32)}]
    ranking = noise_ranking(plan, model, feeds)
    assert ranking[0].unit == victim
    assert ranking[0].noise > 10 * ranking[1].noise
    assert {r.unit for r in ranking} == set(quantizer_units(plan))


@pytest.mark.parametrize("position", [0, 4])
def test_a_ranking_is_searched_by_its_prefixes_and_refined(planted, position: int) -> None:
    plan, model, metric, victim, (quantized, victim_float) = planted
    others = [u for u in quantizer_units(plan) if u != victim]
    order = [*others[:position], victim, *others[position:]]
    result = control_accuracy(quantizer_candidates(plan, model), metric, (1 - victim_float) * 1.5, order=order, progress=False)
    assert result.float_units == (victim,)
    # float and quantized, then prefixes of 1, 2, 4, 8 units (doubling), bisection, and the refinement's trials
    assert result.evaluations <= (3 if position == 0 else 2 + 4 + 2 + position)


def test_the_search_starts_at_the_prefix_that_holds_the_needed_share_of_the_noise() -> None:
    from onnxcompress.evaluation.accuracy_control import _predicted_prefix

    assert [_predicted_prefix([5, 3, 1, 1], share) for share in (0.05, 0.5, 0.7, 0.95, 1.0)] == [1, 1, 2, 4, 4]
    assert _predicted_prefix([0, 0], 0.5) == 1
