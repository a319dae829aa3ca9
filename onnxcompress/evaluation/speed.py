"""What the units an accuracy search relaxed cost in speed, each measured against the final model in the same run.

Models: the fully compressed plan, the final one (every relaxed unit), and the final one with each relaxed unit
compressed again. A unit's cost is the final model's median latency minus that of the model without it relaxed,
the two measured in one interleaved run: what keeping it in float (or INT8) costs given the others. Only same-run
differences are reported (each pair is its own run, so that a large model is loaded twice at most, not once per
unit); on a shared machine a cost within a few percent of the latency is noise, and the report says how long each
model takes so the reader can judge.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onnxcompress.evaluation.sensitivity import Candidates, U
from onnxcompress.runtime.benchmark import LATENCY, ORT_BACKEND, benchmark
from onnxcompress.runtime.model_io import save_model

#: Relaxed units whose cost is measured one by one; beyond this, only the total is (each costs two more models).
MEASURED_UNITS = 8
#: OpenVINO's CPU plugin with its default precision (bf16 where the CPU has it), and ONNX Runtime.
RUNTIMES = {"openvino": "ov-default", "onnxruntime": ORT_BACKEND}


@dataclass(frozen=True)
class UnitSpeedCost:
    label: str
    #: By runtime: the final model's latency minus that with this unit compressed again (NaN: not measured).
    ms: Mapping[str, float]


@dataclass(frozen=True)
class SpeedCost:
    #: Median latency by runtime, batch 1.
    compressed_ms: Mapping[str, float]
    final_ms: Mapping[str, float]
    units: tuple[UnitSpeedCost, ...]

    def format(self) -> str:
        lines = ["speed (median latency, batch 1): " + "; ".join(
            f"{runtime} {self.compressed_ms[runtime]:.3f} ms compressed, {self.final_ms[runtime]:.3f} ms final "
            f"({self.final_ms[runtime] / self.compressed_ms[runtime] - 1:+.1%})" for runtime in self.final_ms)]
        for unit in self.units:
            costs = ", ".join(f"{runtime} " + ("not measured" if math.isnan(ms) else f"{ms:+.3f} ms")
                              for runtime, ms in unit.ms.items())
            lines.append(f"  {unit.label}: {costs}")
        if any(math.isnan(ms) for unit in self.units for ms in unit.ms.values()):
            lines.append(f"  (each unit is measured when at most {MEASURED_UNITS} were relaxed)")
        return "\n".join(lines)


def speed_cost(candidates: Candidates[U], relaxed: Sequence[U], inputs: Mapping[str, np.ndarray] | None, *,
               rounds: int = 5, round_seconds: float = 0.25, progress: bool = True) -> SpeedCost:
    """Measure the final model against the compressed one and (up to `MEASURED_UNITS` relaxed units) against each
    leave-one-out model, on `inputs` (one sample; None: random data for a model whose only dynamic axis is the
    batch). Each comparison is its own interleaved run of two models, so that only two are loaded at a time."""
    each = list(relaxed) if len(relaxed) <= MEASURED_UNITS else []
    final_set = frozenset(relaxed)
    with tempfile.TemporaryDirectory(prefix="onnxcompress-speed-") as tmp:
        def save(units: frozenset, name: str) -> Path:
            return save_model(candidates.build([u for u in relaxed if u in units]), Path(tmp) / f"{name}.onnx",
                              external_source=candidates.external_source)

        final = save(final_set, "final")

        def against(units: frozenset) -> tuple[dict[str, float], dict[str, float]]:
            """Median latencies of the final model and of the one with `units` relaxed, in one run."""
            other = save(units, "other")
            report = benchmark({"final": final, "other": other}, rounds=rounds, round_seconds=round_seconds,
                               openvino_precisions=("default",), include_throughput=False, inputs=inputs,
                               progress=progress)
            other.unlink()

            def latency(name: str) -> dict[str, float]:
                return {runtime: report.find(name, backend, LATENCY).median_ms
                        for runtime, backend in RUNTIMES.items()}

            return latency("final"), latency("other")

        final_ms, compressed_ms = against(frozenset())
        costs = []
        for unit in relaxed:
            if unit not in each:
                costs.append(UnitSpeedCost(candidates.label(unit), {r: math.nan for r in RUNTIMES}))
            elif len(relaxed) == 1:  # the model without it is the compressed one, measured already
                costs.append(UnitSpeedCost(candidates.label(unit), {r: final_ms[r] - compressed_ms[r]
                                                                     for r in RUNTIMES}))
            else:
                with_it, without = against(final_set - {unit})
                costs.append(UnitSpeedCost(candidates.label(unit), {r: with_it[r] - without[r] for r in RUNTIMES}))
    return SpeedCost(compressed_ms, final_ms, tuple(costs))
