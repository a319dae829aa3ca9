"""Accuracy-aware quantization: return the fewest units to float that bring the metric drop within a budget.

Start from the fully quantized plan. While `float score - score > max_drop`, leave in float the unit whose
measured gain is largest, measured on the model as it now is (the gains of units interact: two quantizers on one
path share the error), and re-measure the remaining units' gains on that model only when the last step gained
less than half of what its ranking promised. Every candidate comes from the same plan, so nothing is calibrated
again. When every allowed unit is float and the drop still exceeds the budget, AccuracyControlError says what that
model and the float model scored.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import onnx
from tqdm.auto import tqdm

from onnxcompress.algorithms.quantization.partial import QuantizerUnit, apply_partial, quantizer_units
from onnxcompress.algorithms.quantization.ptq import QuantizationPlan
from onnxcompress.errors import ConfigError, EvaluationError
from onnxcompress.evaluation.sensitivity import Metric, score_model


class AccuracyControlError(EvaluationError):
    """No allowed set of float units meets the budget."""


@dataclass(frozen=True)
class ControlStep:
    unit: QuantizerUnit
    score: float  # the metric after this unit (and the earlier ones) went to float


@dataclass(frozen=True)
class ControlResult:
    model: onnx.ModelProto
    float_score: float
    quantized_score: float
    final_score: float
    steps: tuple[ControlStep, ...]  # in the order the units went to float
    evaluations: int

    @property
    def float_units(self) -> tuple[QuantizerUnit, ...]:
        return tuple(step.unit for step in self.steps)


def control_accuracy(plan: QuantizationPlan, model: onnx.ModelProto, metric: Metric, max_drop: float, *,
                     allowed: Iterable[QuantizerUnit] | None = None, progress: bool = True) -> ControlResult:
    """The quantized model of `plan` with the fewest units in float (greedy by measured gain) such that
    `float score - score <= max_drop`; only `allowed` units (default: all) may go to float."""
    if not max_drop >= 0:
        raise ConfigError(f"max_drop must be 0 or more, got {max_drop}")
    every = quantizer_units(plan)
    units = every if allowed is None else [u for u in every if u in set(allowed)]
    with tempfile.TemporaryDirectory(prefix="onnxcompress-accuracy-") as tmp, \
            _Search(plan, model, metric, Path(tmp), progress) as search:
        float_score = search.score(every)
        quantized_score = score = search.score([])
        chosen: list[QuantizerUnit] = []
        steps: list[ControlStep] = []
        gains: dict[QuantizerUnit, float] = {}
        while float_score - score > max_drop:
            remaining = [u for u in units if u not in chosen]
            if not remaining:
                raise AccuracyControlError(
                    f"with all {len(units)} allowed quantizer units in float the metric is {score:.6g}, a drop of "
                    f"{float_score - score:.6g} from the float model's {float_score:.6g}, over the budget "
                    f"{max_drop:g}")
            if not gains:
                gains = {u: search.score([*chosen, u]) - score for u in remaining}
            best = max(remaining, key=lambda u: gains[u])
            chosen.append(best)
            new_score = search.score(chosen)
            promised = gains.pop(best)
            if new_score - score < promised / 2:
                gains = {}  # the ranking no longer describes this model: measure again
            score = new_score
            steps.append(ControlStep(best, score))
        final = apply_partial(plan, model, chosen)
    return ControlResult(final, float_score, quantized_score, score, tuple(steps), search.evaluations)


class _Search:
    """Scores candidate sets of float units, each set once."""

    def __init__(self, plan: QuantizationPlan, model: onnx.ModelProto, metric: Metric, folder: Path,
                 progress: bool) -> None:
        self.plan, self.model, self.metric, self.folder = plan, model, metric, folder
        self.cache: dict[frozenset[QuantizerUnit], float] = {}
        self.bar = tqdm(desc="accuracy control", unit="eval", disable=not progress)

    def __enter__(self) -> _Search:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.bar.close()

    @property
    def evaluations(self) -> int:
        return len(self.cache)

    def score(self, float_units: list[QuantizerUnit]) -> float:
        key = frozenset(float_units)
        if key not in self.cache:
            candidate = apply_partial(self.plan, self.model, float_units)
            self.cache[key] = score_model(candidate, self.metric, self.folder, f"candidate{len(self.cache)}")
            self.bar.update()
        return self.cache[key]
