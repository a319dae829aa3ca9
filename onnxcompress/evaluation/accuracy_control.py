"""Accuracy-aware compression: relax the fewest units of a plan (quantizers back to float, 4-bit tables to INT8)
that bring the metric drop within a budget.

Start from the fully compressed plan. While `float score - score > max_drop`, leave in float the unit whose
measured gain is largest, measured on the model as it now is (the gains of units interact: two quantizers on one
path share the error), and re-measure the remaining units' gains on that model only when the last step gained
less than half of what its ranking promised. Every candidate comes from the same plan, so nothing is calibrated
again. When every allowed unit is float and the drop still exceeds the budget, AccuracyControlError says what that
model and the float model scored. With a given ranking (`order`), only its prefixes are measured, for metrics too
slow to measure every unit alone (see `control_accuracy`).
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Generic

import onnx
from tqdm.auto import tqdm

from onnxcompress.errors import ConfigError, EvaluationError
from onnxcompress.evaluation.cache import ScoreCache
from onnxcompress.evaluation.parallel import Evaluator, SerialEvaluator
from onnxcompress.evaluation.sensitivity import Candidates, Metric, U, candidate_scores
from onnxcompress.evaluation.speed import SpeedCost


class AccuracyControlError(EvaluationError):
    """No allowed set of relaxed units meets the budget."""


@dataclass(frozen=True)
class ControlStep(Generic[U]):
    unit: U
    score: float  # the metric after this unit (and the earlier ones) were relaxed


@dataclass(frozen=True)
class ControlResult(Generic[U]):
    model: onnx.ModelProto
    float_score: float
    quantized_score: float  # the fully compressed plan's
    final_score: float
    steps: tuple[ControlStep[U], ...]  # in the order the units were relaxed
    evaluations: int  # candidates measured
    reused: int = 0  # candidates whose score an earlier run had measured (the score cache)
    #: Each relaxed unit's name in reports (`Candidates.label`), in `steps` order.
    labels: tuple[str, ...] = ()
    #: What the relaxed units cost in speed (`speed.speed_cost`), when it was measured.
    speed: SpeedCost | None = None

    @property
    def float_units(self) -> tuple[U, ...]:
        """The units relaxed: returned to float (quantization) or to INT8 (weight compression)."""
        return tuple(step.unit for step in self.steps)


def control_accuracy(candidates: Candidates[U], metric: Metric, max_drop: float, *,
                     allowed: Iterable[U] | None = None, order: Sequence[U] | None = None,
                     weights: Mapping[U, float] | None = None, evaluator: Evaluator | None = None,
                     store: ScoreCache | None = None, progress: bool = True) -> ControlResult[U]:
    """The model of the candidates' plan with the fewest units relaxed (greedy by measured gain) such that
    `float score - score <= max_drop`; only `allowed` units (default: all) may be relaxed. The float score is
    that of every unit relaxed.

    With `order` (the units most harmful first, e.g. `noise.noise_ranking`), the metric is measured only on
    prefixes of it: the shortest prefix that meets the budget (doubling, then bisecting: O(log k) evaluations for
    k units; beyond `REFINED_PREFIX` units, to within a quarter of the prefix), then each of its units dropped
    again where the budget still holds without it (when k is at most `REFINED_PREFIX`). With `weights` (each
    unit's share of the harm, e.g. its noise), the search starts at the prefix predicted to recover the needed part
    of the drop, (drop − max_drop) / drop of the total weight. For metrics too slow to measure every unit alone.
    Scores `store` holds (`onnxcompress sensitivity` fills it) are not measured again."""
    if not max_drop >= 0:
        raise ConfigError(f"max_drop must be 0 or more, got {max_drop}")
    every = list(candidates.units)
    units = every if allowed is None else [u for u in every if u in set(allowed)]
    with tempfile.TemporaryDirectory(prefix="onnxcompress-accuracy-") as tmp, \
            _Search(candidates, metric, Path(tmp), evaluator, store, progress) as search:
        float_score, quantized_score = search.baseline()
        score = quantized_score
        if order is not None:
            ranked = [u for u in order if u in set(units)]
            start = 1
            if weights is not None and float_score - quantized_score > max_drop:
                start = _predicted_prefix([weights[u] for u in ranked],
                                          1 - max_drop / (float_score - quantized_score))
            chosen = _shortest_prefix(search, ranked, float_score, max_drop, start)
            score = search.score(chosen)
            steps = tuple(ControlStep(u, search.cache.get(frozenset(chosen[:i + 1]), math.nan))
                          for i, u in enumerate(chosen))
            return ControlResult(candidates.build(chosen), float_score, quantized_score, score, steps,
                                 search.evaluations, search.reused, tuple(map(candidates.label, chosen)))
        chosen: list[U] = []
        steps: list[ControlStep[U]] = []
        gains: dict[U, float] = {}
        while float_score - score > max_drop:
            remaining = [u for u in units if u not in chosen]
            if not remaining:
                raise _unmet(candidates, len(units), score, float_score, max_drop)
            if not gains:
                measured = search.scores([[*chosen, u] for u in remaining])
                gains = {u: value - score for u, value in zip(remaining, measured)}
            best = max(remaining, key=lambda u: gains[u])
            chosen.append(best)
            new_score = search.score(chosen)
            promised = gains.pop(best)
            if new_score - score < promised / 2:
                gains = {}  # the ranking no longer describes this model: measure again
            score = new_score
            steps.append(ControlStep(best, score))
        final = candidates.build(chosen)
    return ControlResult(final, float_score, quantized_score, score, tuple(steps), search.evaluations,
                         search.reused, tuple(map(candidates.label, chosen)))


def _unmet(candidates: Candidates[U], count: int, score: float, float_score: float, max_drop: float
           ) -> AccuracyControlError:
    return AccuracyControlError(
        f"with all {count} allowed {candidates.noun} {candidates.relaxed} the metric is {score:.6g}, a drop of "
        f"{float_score - score:.6g} from the float model's {float_score:.6g}, over the budget {max_drop:g}")


#: Prefixes up to this many units are refined (each unit dropped again if the budget holds without it).
REFINED_PREFIX = 8


def _predicted_prefix(weights: list[float], share: float) -> int:
    """The shortest prefix whose weights add up to `share` of them all (at least 1)."""
    total = sum(weights)
    if total <= 0:
        return 1
    covered = 0.0
    for count, weight in enumerate(weights, 1):
        covered += weight
        if covered >= share * total:
            return count
    return len(weights)


def _shortest_prefix(search: _Search, ranked: list[U], float_score: float, max_drop: float,
                     start: int = 1) -> list[U]:
    def meets(units: list[U]) -> bool:
        return float_score - search.score(units) <= max_drop

    if meets([]):
        return []
    # The shortest meeting prefix lies in (low, high]: grow `high` by doubling from `start` until it meets.
    low, high = 0, max(1, min(start, len(ranked)))
    while high < len(ranked) and not meets(ranked[:high]):
        low, high = high, min(2 * high, len(ranked))
    if not meets(ranked[:high]):
        raise _unmet(search.candidates, len(ranked), search.score(ranked), float_score, max_drop)
    # Bisect to the unit for short prefixes; a long one only to within a quarter of its length (each step costs a
    # whole evaluation of a metric that may take minutes, and a few units more in float cost little).
    while high - low > max(1, high // 4 if high > REFINED_PREFIX else 1):
        middle = (low + high) // 2
        low, high = (low, middle) if meets(ranked[:middle]) else (middle, high)
    chosen = ranked[:high]
    changed = len(chosen) <= REFINED_PREFIX
    while changed:  # until no unit can go: units interact, so one that could not may after another went
        changed = False
        for unit in reversed(chosen):
            trial = [u for u in chosen if u != unit]
            if meets(trial):  # sets measured before (the failing prefix) come from the cache
                chosen, changed = trial, True
    return chosen


class _Search:
    """Scores candidate sets of float units, each set once."""

    def __init__(self, candidates: Candidates, metric: Metric, folder: Path, evaluator: Evaluator | None,
                 store: ScoreCache | None, progress: bool) -> None:
        self.candidates, self.metric, self.folder = candidates, metric, folder
        self.evaluator, self.store = evaluator, store or ScoreCache(None)
        self.cache: dict[frozenset, float] = {}
        self.measured = self.reused = 0
        self.bar = tqdm(desc="accuracy control", unit="eval", disable=not progress)

    def __enter__(self) -> _Search:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.bar.close()

    @property
    def evaluations(self) -> int:
        """Candidates measured by this search (not those the store knew)."""
        return self.measured

    def baseline(self) -> tuple[float, float]:
        """The float model's score and the fully compressed model's."""
        reference = self.candidates.reference
        if reference is None:
            return tuple(self.scores([list(self.candidates.units), []]))
        key = frozenset({f"float model {reference.name}"})
        known = self.store.get(key)
        if known is None:
            known = (self.evaluator or SerialEvaluator()).scores(self.metric, [reference])[0]
            self.store.put(key, known)
            self.measured += 1
            self.bar.update()
        else:
            self.reused += 1
        return known, self.score([])

    def score(self, relaxed: list) -> float:
        return self.scores([relaxed])[0]

    def scores(self, sets: list[list]) -> list[float]:
        """The metric with each set of units relaxed; sets not measured before are scored together."""
        new = list(dict.fromkeys(frozenset(units) for units in sets if frozenset(units) not in self.cache))
        known = sum(1 for units in new if self.store.get(self.candidates.key(units)) is not None)
        self.measured, self.reused = self.measured + len(new) - known, self.reused + known
        measured = candidate_scores(self.candidates, new, self.metric, self.folder, self.evaluator, self.store,
                                    bar=self.bar)
        self.cache.update(zip(new, measured))
        return [self.cache[frozenset(units)] for units in sets]
