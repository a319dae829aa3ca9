"""Sensitivity ranks the unit that costs the most accuracy first: a weight quantized far too coarsely, planted in
an otherwise normal plan, must top the ranking."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
from conftest import TINY_CNN_INPUT, build_tiny_cnn

from onnxcompress.algorithms.quantization.partial import UnitKind, quantizer_units
from onnxcompress.algorithms.quantization.ptq import plan_quantization
from onnxcompress.config import QuantizationConfig
from onnxcompress.evaluation.metrics import EvalSet, resolve_metric
from onnxcompress.evaluation.sensitivity import quantizer_sensitivity


def test_the_unit_planted_to_hurt_most_ranks_first(tmp_path) -> None:
    model = build_tiny_cnn()
    fp32 = tmp_path / "fp32.onnx"
    onnx.save(model, fp32)
    shape = [d.dim_value or 1 for d in model.graph.input[0].type.tensor_type.shape.dim][1:]
    x = np.random.default_rng(0).standard_normal((16, *shape)).astype(np.float32)
    plan = plan_quantization(model, [{TINY_CNN_INPUT: x[:8]}, {TINY_CNN_INPUT: x[8:]}], QuantizationConfig(),
                             progress=False)
    # The last weight keeps its range but only every 32nd level: far worse than any other unit.
    victim = len(plan.weights) - 1
    command = plan.weights[victim]
    coarse = (np.round(command.quantized.astype(np.float32) / 32) * 32).clip(-127, 127).astype(np.int8)
    weights = list(plan.weights)
    weights[victim] = dataclasses.replace(command, quantized=coarse)
    plan = dataclasses.replace(plan, weights=weights)

    metric = resolve_metric("sqnr", EvalSet.from_arrays({TINY_CNN_INPUT: x}, [TINY_CNN_INPUT]), fp32)
    report = quantizer_sensitivity(plan, model, metric, progress=False)
    assert len(report.units) == len(quantizer_units(plan))
    top = report.units[0]
    assert (top.unit.kind, top.unit.index) == (UnitKind.WEIGHT, victim)
    assert top.gain > 0 and top.score <= report.float_score
    assert [u.gain for u in report.units] == sorted((u.gain for u in report.units), reverse=True)
    assert report.float_score > report.quantized_score
    assert command.node in report.format()
