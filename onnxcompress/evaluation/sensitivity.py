"""Per-unit sensitivity of a quantized model: the metric when each quantizer unit alone is left in float.

A unit's gain is its score with that unit in float minus the fully quantized score; the units with the largest
gains are the ones that cost the most accuracy, and the ones accuracy control returns to float first. Every
candidate is built from the same plan (`apply_partial`), so nothing is calibrated again.
"""

from __future__ import annotations

import io
import math
import tempfile
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

import onnx
from tqdm.auto import tqdm

from onnxcompress.algorithms.quantization.partial import QuantizerUnit, apply_partial, quantizer_units
from onnxcompress.algorithms.quantization.ptq import QuantizationPlan
from onnxcompress.evaluation.cache import ScoreCache
from onnxcompress.evaluation.parallel import Evaluator, SerialEvaluator
from onnxcompress.runtime.model_io import save_model
from onnxcompress.runtime.outputs import write_bytes_atomic

Metric = Callable[[str], float]
T = TypeVar("T")
U = TypeVar("U", bound=Hashable)


@dataclass(frozen=True)
class Candidates(Generic[U]):
    """What a search over one compression plan chooses from: the units it may relax (return to float, or to a
    wider precision), and the model with a set of them relaxed, built from the same plan each time."""

    units: tuple[U, ...]  # in plan order
    build: Callable[[Sequence[U]], onnx.ModelProto]
    #: A unit's name in the score cache (unique within the plan).
    name: Callable[[U], str]
    #: A unit's name in reports.
    label: Callable[[U], str] = str
    #: What the units are, for messages: "quantizer units", "4-bit tables".
    noun: str = "units"
    #: What relaxing a unit does, for messages: "in float", "in INT8".
    relaxed: str = "in float"
    #: The model file whose external data the built models still refer to (None: they are all in memory).
    external_source: Path | None = None
    #: The float model's file, whose score budgets are measured from; None: the model with every unit relaxed.
    reference: Path | None = None

    def key(self, units: Iterable[U]) -> frozenset[str]:
        """A set of units as the score cache names it."""
        return frozenset(self.name(unit) for unit in units)


def quantizer_candidates(plan: QuantizationPlan, model: onnx.ModelProto) -> Candidates[QuantizerUnit]:
    """The units of a quantization plan, each returned to float on its own."""
    return Candidates(tuple(quantizer_units(plan)), lambda units: apply_partial(plan, model, list(units)),
                      lambda unit: f"{unit.kind.value}:{unit.label}", lambda unit: unit.label, noun="quantizer units")


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
    #: Each unit's quantization noise (`noise.noise_ranking`), when it was measured.
    noise: dict[QuantizerUnit, float] = field(default_factory=dict)
    #: Weight units: the metric drop when that weight alone goes to 4 bits (the rest INT8), when measured.
    four_bit_drop: dict[QuantizerUnit, float] = field(default_factory=dict)
    #: Weight units: (average Hessian trace Tr(H)/n, HAWQ-v2 loss increase of 4 bits over 8), when estimated.
    hessian: dict[QuantizerUnit, tuple[float, float]] = field(default_factory=dict)

    def format(self, worst: int = 10) -> str:
        lines = [f"metric: float {self.float_score:.6g}, quantized {self.quantized_score:.6g}",
                 "gain when left in float | noise | kind | unit"]
        for u in self.units[:worst]:
            line = f"{u.gain:+.6g} | {self.noise.get(u.unit, math.nan):.3g} | {u.unit.kind.value} | {u.unit.label}"
            if u.unit in self.four_bit_drop:
                line += f" | 4-bit drop {self.four_bit_drop[u.unit]:+.6g}"
            if u.unit in self.hessian:
                line += f" | HAWQ 4-bit cost {self.hessian[u.unit][1]:.3g}"
            lines.append(line)
        return "\n".join(lines)

    def markdown(self) -> str:
        """The ranked table of every unit, with the weights' 4-bit and Hessian columns when they were measured."""
        extra = [*(["drop with it alone in 4 bits"] if self.four_bit_drop else []),
                 *(["Hessian trace / n", "HAWQ loss increase, 4 over 8 bits"] if self.hessian else [])]
        header = ["rank", "unit", "kind", "metric with it alone in float", "gain", "noise it adds", *extra]
        lines = [f"Metric: float {self.float_score:.6g}, quantized {self.quantized_score:.6g} "
                 f"(drop {self.float_score - self.quantized_score:.6g}).", "",
                 "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for rank, u in enumerate(self.units, 1):
            cells = [str(rank), u.unit.label, u.unit.kind.value, f"{u.score:.6g}", f"{u.gain:+.6g}",
                     f"{self.noise.get(u.unit, math.nan):.3g}"]
            if self.four_bit_drop:
                cells.append(_number(self.four_bit_drop.get(u.unit), "+.6g"))
            if self.hessian:
                trace, cost = self.hessian.get(u.unit, (None, None))
                cells += [_number(trace, ".3g"), _number(cost, ".3g")]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def plot(self, path: Path, worst: int = 20) -> Path:
        """A bar chart of the largest gains (the units that cost the most), beside each one's noise."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        shown = list(self.units[:worst])[::-1]
        figure = Figure(figsize=(11, 0.32 * len(shown) + 1.6), layout="constrained")
        FigureCanvasAgg(figure)
        gains, noise = figure.subplots(1, 2, sharey=True)
        labels = [u.unit.label if len(u.unit.label) <= 40 else u.unit.label[:37] + "..." for u in shown]
        gains.barh(labels, [u.gain for u in shown], color=["tab:red" if u.gain > 0 else "tab:gray" for u in shown])
        gains.set_xlabel("metric gain with the unit alone in float")
        noise.barh(labels, [max(self.noise.get(u.unit, 0.0), 1e-12) for u in shown], color="tab:blue")
        noise.set_xscale("log")
        noise.set_xlabel("quantization noise it adds (noise / signal power)")
        figure.suptitle(f"Quantizer sensitivity: float {self.float_score:.4g}, quantized {self.quantized_score:.4g}")
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=110)
        return write_bytes_atomic(path, buffer.getvalue())


def _number(value: float | None, spec: str) -> str:
    """A table cell: `value` formatted, or "-" where the column does not apply (activation units)."""
    return "-" if value is None else format(value, spec)


def score_model(model: onnx.ModelProto, metric: Metric, folder: Path, name: str) -> float:
    """Write `model` into `folder` (the metric reads a file), score it, delete it."""
    path = save_model(model, folder / f"{name}.onnx")
    try:
        return metric(str(path))
    finally:
        for written in folder.glob(f"{name}.onnx*"):
            written.unlink()


def score_candidates(build: Callable[[T], onnx.ModelProto], candidates: Sequence[T], metric: Metric, folder: Path,
                     evaluator: Evaluator | None = None, *, bar: tqdm | None = None,
                     external_source: Path | None = None) -> list[float]:
    """Score `build(c)` for every candidate, in order: `evaluator.batch` files on disk and scored at a time
    (default: serially, in this process). `external_source` is the file whose external data the built models
    still refer to."""
    evaluator = evaluator or SerialEvaluator()
    scores: list[float] = []
    for start in range(0, len(candidates), evaluator.batch):
        paths = [save_model(build(c), folder / f"candidate{start + i}.onnx", external_source=external_source)
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


def candidate_scores(candidates: Candidates[U], sets: Sequence[Iterable[U]], metric: Metric, folder: Path,
                     evaluator: Evaluator | None = None, store: ScoreCache | None = None, *,
                     bar: tqdm | None = None) -> list[float]:
    """The metric with each set of units relaxed; sets `store` knows are not measured again, the others are
    measured together and added to it."""
    store = store or ScoreCache(None)
    keyed = [(frozenset(units), candidates.key(units)) for units in sets]
    missing = list(dict.fromkeys(units for units, key in keyed if store.get(key) is None))
    measured = score_candidates(lambda units: candidates.build(list(units)), missing, metric, folder, evaluator,
                                bar=bar, external_source=candidates.external_source)
    for units, score in zip(missing, measured):
        store.put(candidates.key(units), score)
    if missing:
        store.save()
    return [store.get(key) for _, key in keyed]


def quantizer_sensitivity(plan: QuantizationPlan, model: onnx.ModelProto, metric: Metric, *,
                          evaluator: Evaluator | None = None, store: ScoreCache | None = None,
                          progress: bool = True) -> SensitivityReport:
    """Score the float model, the quantized model and the quantized model with each unit alone in float (the
    scores `store` holds already are not measured again)."""
    candidates = quantizer_candidates(plan, model)
    units = candidates.units
    with tempfile.TemporaryDirectory(prefix="onnxcompress-sensitivity-") as tmp, \
            tqdm(total=len(units) + 2, desc="sensitivity", unit="model", disable=not progress) as bar:
        sets = [units, [], *([unit] for unit in units)]
        scores = candidate_scores(candidates, sets, metric, Path(tmp), evaluator, store, bar=bar)
        float_score, quantized_score = scores[0], scores[1]
        results = [UnitSensitivity(unit, score, score - quantized_score) for unit, score in zip(units, scores[2:])]
    ranked = sorted(results, key=lambda r: -r.gain)  # stable: equal gains keep plan order
    return SensitivityReport(float_score, quantized_score, tuple(ranked))
