"""A quantization plan applied with some of its quantizers left out: what accuracy control and sensitivity
analysis return to float, without calibrating again.

The units are the plan's own: each quantized weight (by node), and each unified-scale activation group (its
quantizers share one scale, so they stay or go together). A weight left float loses its bias correction, which
compensated its quantization error; biases are quantized to INT32 only where input and weight both stay
quantized, as in the full plan.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

import onnx
import onnx_graphsurgeon as gs

from onnxcompress.algorithms.quantization.ptq import QuantizationPlan, bias_commands, export_graph
from onnxcompress.transforms.applier import apply_commands
from onnxcompress.transforms.commands import Command

_log = logging.getLogger(__name__)


class UnitKind(str, Enum):
    WEIGHT = "weight"
    ACTIVATIONS = "activations"


@dataclass(frozen=True)
class QuantizerUnit:
    """One weight quantizer (`index` into plan.weights) or one activation group (index into
    plan.activation_groups); `label` names it for reports: the node, or the group's tensors."""

    kind: UnitKind
    index: int
    label: str


def quantizer_units(plan: QuantizationPlan) -> list[QuantizerUnit]:
    """Every unit the plan quantizes: weights in plan order, then activation groups that hold a quantizer."""
    units = [QuantizerUnit(UnitKind.WEIGHT, i, command.node) for i, command in enumerate(plan.weights)]
    units += [QuantizerUnit(UnitKind.ACTIVATIONS, i, ", ".join(c.tensor for c in group))
              for i, group in enumerate(plan.activation_groups) if group]
    return units


def apply_partial(plan: QuantizationPlan, model: onnx.ModelProto, float_units: Iterable[QuantizerUnit] = (), *,
                  in_place: bool = False) -> onnx.ModelProto:
    """The quantized model of `plan` with `float_units` left in float. `plan.graph` is edited only `in_place` (a
    plan applied once, whole: no copy of a large model's weights)."""
    left_out = {(unit.kind, unit.index) for unit in float_units}
    weights = [c for i, c in enumerate(plan.weights) if (UnitKind.WEIGHT, i) not in left_out]
    activations = [c for i, group in enumerate(plan.activation_groups)
                   if (UnitKind.ACTIVATIONS, i) not in left_out for c in group]
    graph = plan.graph if in_place else gs.import_onnx(gs.export_onnx(plan.graph, do_type_check=False))
    commands: list[Command] = [*weights, *activations]
    if not commands and not left_out:
        _log.info("nothing to quantize: no layer outside the ignored scope is one this algorithm quantizes; the "
                  "output computes in float")
    apply_commands(graph, commands + bias_commands(graph, commands, plan.corrected_biases))
    return export_graph(graph, model, shapes=False)
