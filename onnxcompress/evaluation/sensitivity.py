"""Per-unit sensitivity of a quantized model: the metric when each quantizer unit alone is left in float.

A unit's gain is its score with that unit in float minus the fully quantized score; the units with the largest
gains are the ones that cost the most accuracy, and the ones accuracy control returns to float first. Every
candidate is built from the same plan (`apply_partial`), so nothing is calibrated again.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import onnx
from tqdm.auto import tqdm

from onnxcompress.algorithms.quantization.partial import QuantizerUnit, apply_partial, quantizer_units
from onnxcompress.algorithms.quantization.ptq import QuantizationPlan
from onnxcompress.evaluation.parallel import Evaluator, SerialEvaluator
from onnxcompress.runtime.model_io import save_model

Metric = Callable[[str], float]
T = TypeVar("T")


@dataclass(frozen=True)
class UnitSensitivity:
    unit: QuantizerUnit
    score: float  # the metric with this unit alone in float
    gain: float  # score minus the fully quantized model's score


@dataclass(frozen=True)
class SensitivityReport:
    float_score: float
    quantized_score: float
    units: tuple[UnitSensitivity, ...]  # largest gain first; ties in plan order

    def format(self, worst: int = 10) -> str:
        lines = [f"metric: float {self.float_score:.6g}, quantized {self.quantized_score:.6g}",
                 "gain when left in float | kind | unit"]
        lines += [f"{u.gain:+.6g} | {u.unit.kind.value} | {u.unit.label}" for u in self.units[:worst]]
        return "\n".join(lines)


def score_model(model: onnx.ModelProto, metric: Metric, folder: Path, name: str) -> float:
    """Write `model` into `folder` (the metric reads a file), score it, delete it."""
    path = save_model(model, folder / f"{name}.onnx")
    try:
        return metric(str(path))
    finally:
        for written in folder.glob(f"{name}.onnx*"):
            written.unlink()


def score_candidates(build: Callable[[T], onnx.ModelProto], candidates: Sequence[T], metric: Metric, folder: Path,
                     evaluator: Evaluator | None = None, *, bar: tqdm | None = None) -> list[float]:
    """Score `build(c)` for every candidate, in order: `evaluator.batch` files on disk and scored at a time
    (default: serially, in this process)."""
    evaluator = evaluator or SerialEvaluator()
    scores: list[float] = []
    for start in range(0, len(candidates), evaluator.batch):
        paths = [save_model(build(c), folder / f"candidate{start + i}.onnx")
                 for i, c in enumerate(candidates[start:start + evaluator.batch])]
        try:
            scores += evaluator.scores(metric, paths)
        finally:
            for path in paths:
                for written in folder.glob(f"{path.name}*"):
                    written.unlink()
        if bar is not None:
            bar.update(len(paths))
    return scores


def quantizer_sensitivity(plan: QuantizationPlan, model: onnx.ModelProto, metric: Metric, *,
                          evaluator: Evaluator | None = None, progress: bool = True) -> SensitivityReport:
    """Score the float model, the quantized model and the quantized model with each unit alone in float."""
    units = quantizer_units(plan)
    with tempfile.TemporaryDirectory(prefix="onnxcompress-sensitivity-") as tmp, \
            tqdm(total=len(units) + 2, desc="sensitivity", unit="model", disable=not progress) as bar:
        sets = [units, [], *([unit] for unit in units)]
        scores = score_candidates(lambda units: apply_partial(plan, model, units), sets, metric, Path(tmp),
                                  evaluator, bar=bar)
        float_score, quantized_score = scores[0], scores[1]
        results = [UnitSensitivity(unit, score, score - quantized_score) for unit, score in zip(units, scores[2:])]
    ranked = sorted(results, key=lambda r: -r.gain)  # stable: equal gains keep plan order
    return SensitivityReport(float_score, quantized_score, tuple(ranked))
