"""A ranking of a plan's quantizer units by the quantization noise each adds where it sits, from one float pass.

For a metric too slow to measure every unit alone (the user's OCR pipeline), accuracy control ranks the units by
this proxy and measures the metric only on the ranking's prefixes. A unit's noise is the noise-to-signal power
ratio it adds at its own tensor, on a few samples of the float model:

    activation group: max over its tensors x of  Σ (Q(x) − x)² / Σ x²   (Q: its QuantizeLinear → DequantizeLinear)
    weight:           Σ_c E[x_c²] ‖ΔW_c‖² / Σ_c E[x_c²] ‖W_c‖²        (c: input channels; x the layer's input)

The weight's ratio is the layer's output noise when its input channels are uncorrelated. Downstream amplification
is not modelled: that is what measuring the prefixes settles.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort

from onnxcompress.algorithms.quantization.partial import QuantizerUnit, UnitKind, quantizer_units
from onnxcompress.algorithms.quantization.ptq import QuantizationPlan, export_graph
from onnxcompress.errors import EvaluationError
from onnxcompress.transforms.commands import DequantizeWeight, QuantizeDequantize
from onnxcompress.transforms.op_table import weight_input_axis

Feed = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class UnitNoise:
    unit: QuantizerUnit
    noise: float  # noise-to-signal power ratio at the unit's tensor


def noise_ranking(plan: QuantizationPlan, model: onnx.ModelProto, feeds: Iterable[Feed]) -> list[UnitNoise]:
    """Every unit of `plan` with its noise on `feeds` (a few samples), noisiest first; ties in plan order."""
    nodes = {n.name: n for n in plan.graph.nodes}
    weight_inputs = {c.node: nodes[c.node].inputs[0].name for c in plan.weights}
    tensors = sorted({c.tensor for c in plan.activations} | set(weight_inputs.values()))
    values = _float_values(export_graph(plan.graph, model), tensors, feeds)
    units = quantizer_units(plan)
    result = []
    for unit in units:
        if unit.kind is UnitKind.WEIGHT:
            command = plan.weights[unit.index]
            noise = _weight_noise(nodes[command.node], command, values[weight_inputs[command.node]])
        else:
            noise = max(_activation_noise(c, values[c.tensor]) for c in plan.activation_groups[unit.index])
        result.append(UnitNoise(unit, noise))
    return sorted(result, key=lambda u: -u.noise)


def _float_values(model: onnx.ModelProto, tensors: list[str], feeds: Iterable[Feed]) -> dict[str, list[np.ndarray]]:
    """The values of `tensors` on every feed, from the float model with them as outputs."""
    known = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.ValueInfoProto(name=t) for t in tensors if t not in known)
    try:
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as error:  # ORT raises several unrelated types for models it cannot run
        raise EvaluationError(f"ONNX Runtime cannot run the float model to rank the quantizers: {error}") from None
    values: dict[str, list[np.ndarray]] = {t: [] for t in tensors}
    for feed in feeds:
        for name, value in zip(tensors, session.run(tensors, dict(feed))):
            values[name].append(np.asarray(value, np.float32))
    if not all(values.values()):
        raise EvaluationError("no samples to rank the quantizers on")
    return values


def _activation_noise(command: QuantizeDequantize, values: list[np.ndarray]) -> float:
    zero = command.zero_point.astype(np.float64)
    info = np.iinfo(command.zero_point.dtype)
    scale = command.scale.astype(np.float64)
    noise = signal = 0.0
    for x in values:
        q = np.clip(np.round(x / scale) + zero, info.min, info.max)
        noise += float(np.square((q - zero) * scale - x).sum())
        signal += float(np.square(x, dtype=np.float64).sum())
    return noise / signal if signal > 0 else 0.0


def _weight_noise(node, command: DequantizeWeight, inputs: list[np.ndarray]) -> float:
    weight = node.inputs[command.port].values.astype(np.float64)
    shape = [1] * weight.ndim
    shape[command.axis] = -1
    error = command.quantized.astype(np.float64) * command.scale.reshape(shape) - weight
    axis = weight_input_axis(node) % weight.ndim
    other = tuple(i for i in range(weight.ndim) if i != axis)
    error_power, weight_power = np.square(error).sum(axis=other), np.square(weight).sum(axis=other)
    channel_axis = 1 if inputs[0].ndim > 2 and node.op in ("Conv", "ConvTranspose") else inputs[0].ndim - 1
    energy = sum(np.square(x, dtype=np.float64).sum(axis=tuple(i for i in range(x.ndim) if i != channel_axis))
                 for x in inputs)
    if energy.shape != error_power.shape:  # grouped convolutions: channels do not match one to one
        energy = np.ones_like(error_power)
    signal = float((energy * weight_power).sum())
    return float((energy * error_power).sum()) / signal if signal > 0 else 0.0
