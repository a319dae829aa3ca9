"""Per-unit sensitivity of a quantized model: the metric when each quantizer unit alone is left in float.

A unit's gain is its score with that unit in float minus the fully quantized score; the units with the largest
gains are the ones that cost the most accuracy, and the ones accuracy control returns to float first. Every
candidate is built from the same plan (`apply_partial`), so nothing is calibrated again.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnx
from tqdm.auto import tqdm

from onnxcompress.algorithms.quantization.partial import QuantizerUnit, apply_partial, quantizer_units
from onnxcompress.algorithms.quantization.ptq import QuantizationPlan
from onnxcompress.runtime.model_io import save_model

Metric = Callable[[str], float]


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


def quantizer_sensitivity(plan: QuantizationPlan, model: onnx.ModelProto, metric: Metric, *,
                          progress: bool = True) -> SensitivityReport:
    """Score the float model, the quantized model and the quantized model with each unit alone in float."""
    units = quantizer_units(plan)
    with tempfile.TemporaryDirectory(prefix="onnxcompress-sensitivity-") as tmp:
        folder = Path(tmp)
        float_score = score_model(apply_partial(plan, model, units), metric, folder, "float")
        quantized_score = score_model(apply_partial(plan, model), metric, folder, "quantized")
        results = []
        for index, unit in enumerate(tqdm(units, desc="sensitivity", unit="unit", disable=not progress)):
            score = score_model(apply_partial(plan, model, [unit]), metric, folder, f"unit{index}")
            results.append(UnitSensitivity(unit, score, score - quantized_score))
    ranked = sorted(results, key=lambda r: -r.gain)  # stable: equal gains keep plan order
    return SensitivityReport(float_score, quantized_score, tuple(ranked))
