"""Per-layer weight bits from {8, 4} under a model-size budget (`quantize --max-size RATIO`), post-training.

    INT8 plan  →  each weight's 4-bit version (per-channel levels −7..7, stored as INT4 on disk, opset 21; a fast
    bias correction recomputed for its error)  →  its sensitivity: the metric drop when that weight alone goes to
    4 bits  →  greedy: the weights with the smallest drop per byte saved take 4 bits until the initializers fit
    `max_size` × the FP32 model's  →  the plan with those weights in 4 bits (nothing is calibrated again)

Activations stay INT8. What the runtimes run (docs/benchmarks.md): ONNX Runtime has no integer kernel with 4-bit
weights and runs such a Conv or Gemm in float; OpenVINO runs a 4-bit Gemm/MatMul as a compressed-weight
FullyConnected and a 4-bit Conv in float (bf16 where the CPU has it).
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
from tqdm.auto import tqdm

from onnxcompress.algorithms.quantization.bias_correction import weight_error_shift
from onnxcompress.algorithms.quantization.partial import apply_partial, quantizer_units
from onnxcompress.algorithms.quantization.ptq import QuantizationPlan, export_graph
from onnxcompress.algorithms.quantization.scheme import quantize_weight
from onnxcompress.errors import ConfigError
from onnxcompress.evaluation.hessian import hawq_sensitivity
from onnxcompress.evaluation.parallel import Evaluator
from onnxcompress.evaluation.cache import ScoreCache
from onnxcompress.evaluation.sensitivity import Candidates, Metric, candidate_scores, score_candidates, score_model
from onnxcompress.runtime.model_io import stored_bytes
from onnxcompress.transforms.commands import DequantizeWeight, SetConstantInput
from onnxcompress.transforms.op_table import channel_bias, spec

@dataclass(frozen=True)
class WeightBits:
    """One weight's outcome: its bits, the metric drop it alone (with the nodes sharing its constant) costs in 4
    bits, the bytes 4 bits save."""

    node: str
    bits: int
    drop: float
    saved_bytes: int


@dataclass(frozen=True)
class MixedPrecisionResult:
    model: onnx.ModelProto
    plan: QuantizationPlan
    weights: tuple[WeightBits, ...]
    #: The metric of the float, all-INT8 and chosen models.
    float_score: float
    int8_score: float
    score: float
    #: Initializer bytes of the chosen model and of the FP32 model.
    size_bytes: int
    float_bytes: int
    evaluations: int
    #: Bit complexity (Σ MACs × weight bits × activation bits) against the all-INT8 model's, under that budget.
    bit_complexity: float | None = None

    @property
    def size_ratio(self) -> float:
        return self.size_bytes / self.float_bytes

    @property
    def four_bit(self) -> tuple[str, ...]:
        return tuple(w.node for w in self.weights if w.bits == 4)


def four_bit_weight(plan: QuantizationPlan, command: DequantizeWeight) -> DequantizeWeight:
    """`command`'s weight quantized again to 4-bit levels per channel, stored as INT4."""
    nodes = {n.name: n for n in plan.graph.nodes}
    weight = nodes[command.node].inputs[command.port].values
    quantized, params = quantize_weight(weight, command.axis, 4)
    return dataclasses.replace(command, quantized=quantized.astype(ml_dtypes.int4), scale=params.scale)


def with_four_bit_weights(plan: QuantizationPlan, indices: Iterable[int],
                          four_bit: dict[int, DequantizeWeight] | None = None) -> QuantizationPlan:
    """`plan` with weights `indices` (into plan.weights) in 4 bits, their fast bias corrections recomputed for the
    4-bit error (a full correction, measured for the INT8 weight, is kept as it is)."""
    chosen = set(indices)
    four_bit = four_bit or {}
    weights = [four_bit.get(i) or four_bit_weight(plan, c) if i in chosen else c for i, c in enumerate(plan.weights)]
    nodes = {n.name: n for n in plan.graph.nodes}
    changed = {weights[i].node: weights[i] for i in chosen}
    corrected = []
    for command in plan.corrected_biases:
        weight = changed.get(command.node)
        mean = plan.input_means.get(command.node)
        if weight is not None and mean is not None:
            node = nodes[command.node]
            values = (channel_bias(node) - weight_error_shift(node, weight, mean)).astype(np.float32)
            command = SetConstantInput(command.node, command.port, values)
        corrected.append(command)
    return dataclasses.replace(plan, weights=weights, corrected_biases=corrected)


def initializer_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the model's initializers as stored (4-bit values packed two per byte)."""
    return sum(stored_bytes(tensor) for tensor in model.graph.initializer)


def choose_weight_bits(plan: QuantizationPlan, model: onnx.ModelProto, metric: Metric, max_size: float | None, *,
                       float_bytes: int, max_bit_complexity: float | None = None,
                       macs: Mapping[str, int] | None = None, ranking: Metric | None = None,
                       predicted: Mapping[str, float] | None = None, evaluator: Evaluator | None = None,
                       progress: bool = True) -> MixedPrecisionResult:
    """The plan with the weights whose 4 bits cost the least metric per unit of budget they save in 4 bits, until
    the model's initializers are at most `max_size` × `float_bytes`, or its bit complexity (Σ MACs × weight bits ×
    activation bits, `macs` by node) at most `max_bit_complexity` × the all-INT8 model's; ConfigError (with the
    smallest reachable ratio) when even every weight in 4 bits is over. `ranking` (default `metric`) measures each
    weight's drop: a continuous metric ranks where a coarse one (top-1 on few samples) ties. `predicted` (by node:
    e.g. the HAWQ loss increase of its 4 bits over its 8, `four_bit_hawq_costs`) replaces the measured drops."""
    ranking = ranking or metric
    four_bit = {i: four_bit_weight(plan, c) for i, c in enumerate(plan.weights)}
    # Nodes that share one constant weight share its bits (one stored copy): each sharing set is one choice.
    nodes = {n.name: n for n in plan.graph.nodes}
    sharing: dict[str, list[int]] = {}
    for i, c in enumerate(plan.weights):
        sharing.setdefault(nodes[c.node].inputs[c.port].name, []).append(i)
    groups = [tuple(indices) for indices in sharing.values()]
    bytes_saved = {g: _stored_bytes(plan.weights[g[0]]) - _stored_bytes(four_bit[g[0]]) for g in groups}
    int8_model = apply_partial(plan, model)
    if max_bit_complexity is None:
        start, saved = initializer_bytes(int8_model), bytes_saved
        budget = max_size * float_bytes
        smallest = initializer_bytes(apply_partial(with_four_bit_weights(plan, four_bit, four_bit), model))
        if smallest > budget:
            raise ConfigError(f"--max-size {max_size:g} cannot be met: with every weight in 4 bits the model keeps "
                              f"{smallest / float_bytes:.3f} of the FP32 model's size (the smallest reachable)")
    else:
        # Bit operations per sample, activations 8 bits: a weight's 4 bits save MACs × 4 × 8 of its MACs × 8 × 8.
        start = sum(64 * macs[c.node] for c in plan.weights)
        saved = {g: sum(32 * macs[plan.weights[i].node] for i in g) for g in groups}
        budget = max_bit_complexity * start
        if max_bit_complexity < 0.5:
            raise ConfigError(f"--max-bit-complexity {max_bit_complexity:g} cannot be met: with every weight in 4 "
                              "bits the bit complexity is 0.5 of the all-INT8 model's (the smallest reachable)")
    with tempfile.TemporaryDirectory(prefix="onnxcompress-bits-") as tmp:
        folder = Path(tmp)
        float_score = score_model(apply_partial(plan, model, quantizer_units(plan)), metric, folder, "float")
        int8_score = score_model(int8_model, metric, folder, "int8")
        candidates = [g for g in groups if saved[g] > 0] if start > budget else []
        if predicted is not None:
            drops = {g: sum(predicted[plan.weights[i].node] for i in g) for g in candidates}
        else:
            reference = int8_score if ranking is metric else score_model(int8_model, ranking, folder, "int8-rank")
            with tqdm(total=len(candidates), desc="4-bit sensitivity", unit="weight", disable=not progress) as bar:
                scores = score_candidates(lambda g: apply_partial(with_four_bit_weights(plan, g, four_bit), model),
                                          candidates, ranking, folder, evaluator, bar=bar)
            drops = {g: reference - score for g, score in zip(candidates, scores)}
        chosen, used = [], start
        for g in sorted(candidates, key=lambda g: (max(drops[g], 0.0) / saved[g], -saved[g])):
            if used <= budget:
                break
            chosen += g
            used -= saved[g]
        final_plan = with_four_bit_weights(plan, chosen, four_bit)
        final = apply_partial(final_plan, model)
        score = score_model(final, metric, folder, "mixed") if chosen else int8_score
    group_of = {i: g for g in groups for i in g}
    weights = tuple(WeightBits(c.node, 4 if i in chosen else 8, drops.get(group_of[i], 0.0),
                               bytes_saved[group_of[i]]) for i, c in enumerate(plan.weights))
    evaluations = (0 if predicted is not None else len(drops) + (ranking is not metric)) + 2 + bool(chosen)
    complexity = None if max_bit_complexity is None else used / start
    return MixedPrecisionResult(final, final_plan, weights, float_score, int8_score, score,
                                initializer_bytes(final), float_bytes, evaluations, complexity)


def weight_macs(plan: QuantizationPlan, model: onnx.ModelProto, sample: Mapping[str, np.ndarray]) -> dict[str, int]:
    """Multiply-accumulates of each quantized weight's node for one sample at `sample`'s input shapes: the weight's
    values × the output positions each filter applies at (the output's elements per channel, batch aside)."""
    fixed = export_graph(plan.graph, model, shapes=False)
    for value in fixed.graph.input:
        if value.name in sample:
            dims = value.type.tensor_type.shape.dim
            for dim, size in zip(dims, np.shape(sample[value.name])):
                dim.Clear()
                dim.dim_value = int(size)
    del fixed.graph.value_info[:]
    inferred = onnx.shape_inference.infer_shapes(fixed, data_prop=True)
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
              for v in [*inferred.graph.value_info, *inferred.graph.output]}
    nodes = {n.name: n for n in plan.graph.nodes}
    macs = {}
    for command in plan.weights:
        node = nodes[command.node]
        shape = shapes.get(node.outputs[0].name)
        if not shape or None in shape:
            raise ConfigError(f"the bit complexity needs the output shape of {command.node!r}, which shape "
                              f"inference left unknown at the sample's input shapes")
        axis = spec(node).channel_axis % len(shape)
        positions = int(np.prod(shape[1:])) // shape[axis] if len(shape) > 1 else 1
        macs[command.node] = int(np.prod(nodes[command.node].inputs[command.port].shape)) * max(positions, 1)
    return macs


def four_bit_drops(plan: QuantizationPlan, model: onnx.ModelProto, metric: Metric, int8_score: float, *,
                   evaluator: Evaluator | None = None, store: ScoreCache | None = None, progress: bool = True
                   ) -> dict[int, float]:
    """By weight index: the metric drop from the INT8 model's `int8_score` when that weight alone goes to 4 bits
    (`model` at opset 21). Scores `store` holds are not measured again."""
    four_bit = {i: four_bit_weight(plan, c) for i, c in enumerate(plan.weights)}
    candidates = Candidates(tuple(four_bit), lambda chosen: apply_partial(with_four_bit_weights(plan, chosen,
                                                                                                 four_bit), model),
                            lambda i: f"4-bit:{plan.weights[i].node}", noun="weights", relaxed="in 4 bits")
    with tempfile.TemporaryDirectory(prefix="onnxcompress-bits-") as tmp, \
            tqdm(total=len(four_bit), desc="4-bit sensitivity", unit="weight", disable=not progress) as bar:
        scores = candidate_scores(candidates, [[i] for i in four_bit], metric, Path(tmp), evaluator, store, bar=bar)
    return {i: int8_score - score for i, score in zip(four_bit, scores)}


def four_bit_hawq_costs(plan: QuantizationPlan, average_traces: Mapping[str, float]) -> dict[str, float]:
    """By node: the HAWQ-v2 loss increase of its weight in 4 bits minus that in 8 bits, Tr(H)/n · (‖Q₄(W) − W‖² −
    ‖Q₈(W) − W‖²), from each weight's average Hessian trace (`evaluation/hessian.py`, by initializer name)."""
    nodes = {n.name: n for n in plan.graph.nodes}
    costs = {}
    for command in plan.weights:
        weight = nodes[command.node].inputs[command.port]
        four = four_bit_weight(plan, command)
        costs[command.node] = (hawq_sensitivity(average_traces[weight.name], weight.values, _dequantized(four))
                               - hawq_sensitivity(average_traces[weight.name], weight.values, _dequantized(command)))
    return costs


def hessian_weights(plan: QuantizationPlan) -> list[str]:
    """The initializers of the plan's quantized weights (each once), whose Hessian traces the HAWQ costs need."""
    nodes = {n.name: n for n in plan.graph.nodes}
    return list(dict.fromkeys(nodes[c.node].inputs[c.port].name for c in plan.weights))


def _dequantized(command: DequantizeWeight) -> np.ndarray:
    levels = command.quantized.astype(np.float32)
    shape = [1] * levels.ndim
    shape[command.axis] = -1
    return levels * np.asarray(command.scale, np.float32).reshape(shape)


def _stored_bytes(command: DequantizeWeight) -> int:
    bits = 4 if command.quantized.dtype in (ml_dtypes.int4, ml_dtypes.uint4) else 8 * command.quantized.itemsize
    return (command.quantized.size * bits + 7) // 8
