"""Post-training INT8 quantization: plan quantizers, collect statistics, turn them into commands, apply.

    preprocess (shapes, constant folding, BN folding)  →  plan_quantizers  →  statistics requests
    →  one ONNX Runtime calibration pass  →  QDQ and weight commands (+ bias correction)  →  apply_commands

Weights are stored as INT8 initializers read through DequantizeLinear; activations get QuantizeLinear →
DequantizeLinear pairs. Both OpenVINO and ONNX Runtime turn this QDQ form into integer kernels.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxcompress.algorithms.quantization.bias_correction import bias_correction_commands, input_mean_requests
from onnxcompress.algorithms.quantization.placement import ActivationTarget, QuantizerSetup, plan_quantizers
from onnxcompress.algorithms.quantization.ranges import RangeMethod, estimate_range
from onnxcompress.algorithms.quantization.smooth_quant import (
    abs_max_requests,
    smoothing_commands,
    smoothing_targets,
)
from onnxcompress.algorithms.quantization.scheme import Mode, QuantParams, quantize_weight, unified_activation_params
from onnxcompress.config import BiasCorrection, IgnoredScope, ModelType, Preset, QuantizationConfig, Target
from onnxcompress.errors import ConfigError, UnsupportedModelError
from onnxcompress.runtime.calibration import (
    IN_MEMORY_WEIGHT_BYTES,
    StatisticRequest,
    TensorStatistics,
    collect_statistics,
    in_memory_initializer,
)
from onnxcompress.transforms.applier import apply_commands
from onnxcompress.transforms.commands import (
    Command,
    DequantizeBias,
    DequantizeWeight,
    QuantizeDequantize,
    SetConstantInput,
    bias_scale,
)
from onnxcompress.transforms.graph import MappedValues
from onnxcompress.transforms.op_table import Role, spec
from onnxcompress.transforms.passes import preprocess

Batches = Iterable[Mapping[str, np.ndarray]]
_INT32 = np.iinfo(np.int32)

#: DequantizeLinear reads 4-bit levels from opset 21.
INT4_OPSET = 21


@dataclass(frozen=True)
class QuantizationPlan:
    """Everything post-training quantization decided, before any graph edit: the preprocessed float `graph`,
    the quantizer setup, weight commands, activation commands per unified-scale group (index-aligned with
    `setup.groups`; a group may hold no command), and the corrected float biases. Quantization-aware training
    starts from the same plan."""

    graph: gs.Graph
    setup: QuantizerSetup
    weights: list[DequantizeWeight]
    activation_groups: list[list[QuantizeDequantize]]
    corrected_biases: list[SetConstantInput]
    #: Per-channel means of each bias-corrected layer's float input, by node (fast bias correction): a weight
    #: quantized again (mixed precision) gets its correction recomputed from them.
    input_means: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def activations(self) -> list[QuantizeDequantize]:
        return [command for group in self.activation_groups for command in group]


def plan_quantization(model: onnx.ModelProto, batches: Batches, config: QuantizationConfig, *,
                      total: int | None = None, progress: bool = True, second_pass: Batches | None = None,
                      batches_for_smoothing: Batches | None = None, preprocessed: bool = False) -> QuantizationPlan:
    """Preprocess (unless `model` is `preprocessed` already), place quantizers, calibrate on `batches` and correct
    biases; `second_pass` feeds the full bias correction and `batches_for_smoothing` the SmoothQuant statistics
    pass (each an independent pass over the data). `partial.apply_partial` turns the plan into the model."""
    graph = gs.import_onnx(model).toposort() if preprocessed else preprocess(model)
    ignored = resolve_ignored_scope(graph, config.ignored_scope, original=model)
    if config.effective_smooth_quant_alpha is not None:
        _smooth(graph, model, ignored, batches_for_smoothing, config.effective_smooth_quant_alpha, total, progress)
    setup = plan_quantizers(graph, ignored, transformer=config.model_type is ModelType.TRANSFORMER,
                            portable=config.target is Target.PORTABLE)

    _require_finite_weights(graph, setup)
    requests = _range_requests(setup, config) + input_mean_requests(setup, config)
    calibration_model, calibration_weights = export_for_calibration(graph, model)
    stats = collect_statistics(calibration_model, requests, batches, weights=calibration_weights, total=total,
                               progress=progress)
    del calibration_weights  # the float arrays are not needed past calibration

    weights = _weight_commands(graph, setup, config)
    roles = {n.name: spec(n).role for n in graph.nodes}
    activation_groups = _activation_commands(setup, stats, config, roles)
    corrected: list[SetConstantInput] = []
    if config.bias_correction is not BiasCorrection.NONE:
        float_model = export_graph(graph, model) if config.bias_correction is BiasCorrection.FULL else None
        activations = [command for group in activation_groups for command in group]
        corrected = bias_correction_commands(graph, float_model, setup, [*weights, *activations], stats, config,
                                             second_pass=second_pass, total=total, progress=progress)
    means = {t.node: stats[t.input_tensor].channel_mean for t in setup.bias_targets
             if config.bias_correction is BiasCorrection.FAST and t.input_tensor in stats}
    return QuantizationPlan(graph, setup, weights, activation_groups, corrected, means)


def _smooth(graph: gs.Graph, model: onnx.ModelProto, ignored: frozenset[str], batches: Batches | None,
            alpha: float, total: int | None, progress: bool) -> None:
    targets = smoothing_targets(graph, ignored)
    if not targets:
        return
    if batches is None:
        raise ValueError("SmoothQuant needs its own pass over the calibration data")
    smoothing_model, weights = export_for_calibration(graph, model)
    stats = collect_statistics(smoothing_model, abs_max_requests(targets), batches, weights=weights, total=total,
                               progress=progress, description="smoothquant")
    apply_commands(graph, smoothing_commands(graph, targets, stats, alpha))


def resolve_ignored_scope(graph: gs.Graph, scope: IgnoredScope, *,
                          original: onnx.ModelProto | None = None) -> frozenset[str]:
    """Node names of `graph` the scope selects.

    Entries are checked against the user's model (`original`, before preprocessing): an entry that matches
    nothing there is an error listing every such entry, while a node that preprocessing folded away (a
    BatchNormalization merged into its Conv) is accepted and simply has nothing left to keep in float.
    """
    if scope.empty:
        return frozenset()
    current = [(n.name, n.op) for n in graph.nodes]
    known = current + [(n.name, n.op_type) for n in original.graph.node] if original is not None else current
    unmatched = [f"name '{name}'" for name in scope.names if not any(name == n for n, _ in known)]
    unmatched += [f"type '{op}'" for op in scope.types if not any(op == t for _, t in known)]
    regexes = []
    for pattern in scope.patterns:
        try:
            regexes.append(re.compile(pattern))
        except re.error as error:
            raise ConfigError(f"ignored scope pattern '{pattern}' is not a valid regular expression: {error}") from None
        if not any(regexes[-1].fullmatch(n) for n, _ in known):
            unmatched.append(f"pattern '{pattern}'")
    if unmatched:
        known_types = ", ".join(sorted({t for _, t in known}))
        raise ConfigError(f"ignored scope entries match no node: {', '.join(unmatched)} "
                          f"(the model's op types: {known_types})")
    return frozenset(name for name, op in current
                     if name in scope.names or op in scope.types or any(r.fullmatch(name) for r in regexes))


def _mode(config: QuantizationConfig) -> Mode:
    return Mode.ASYMMETRIC if config.preset is Preset.MIXED else Mode.SYMMETRIC


def _range_requests(setup: QuantizerSetup, config: QuantizationConfig) -> list[StatisticRequest]:
    return [StatisticRequest(tensor, config.calibration.statistic) for tensor in setup.activation_tensors]


def _require_finite_weights(graph: gs.Graph, setup: QuantizerSetup) -> None:
    """A NaN or infinite weight would give its channel a meaningless scale, and NaN activations in calibration."""
    nodes = {n.name: n for n in graph.nodes}
    for target in setup.weights:
        weight = nodes[target.node].inputs[target.port]
        if not np.isfinite(weight.values).all():
            raise UnsupportedModelError(
                f"weight {weight.name!r} of {target.node!r} holds NaN or infinite values, so it cannot be quantized; "
                f"keep the layer in float (--ignore-names {target.node}) or repair the model")


def _weight_commands(graph: gs.Graph, setup: QuantizerSetup, config: QuantizationConfig) -> list[DequantizeWeight]:
    """Per-channel levels of every weight at its bit width; 4 bits or fewer stored as INT4 where the opset reads it
    (the callers move a model with such weights to `INT4_OPSET`)."""
    nodes = {n.name: n for n in graph.nodes}
    unknown = sorted(set(config.layer_weight_bits) - {target.node for target in setup.weights})
    if unknown:
        known = ", ".join(target.node for target in setup.weights[:8])
        raise ConfigError(f"layer_weight_bits names nodes with no quantized weight: {', '.join(unknown)} (quantized "
                          f"weights: {known}{', ...' if len(setup.weights) > 8 else ''})")
    commands = []
    for target in setup.weights:
        weight = nodes[target.node].inputs[target.port].values
        bits = config.weight_bits_of(target.node)
        quantized, params = quantize_weight(weight, target.axis, bits, pair_budget=target.pair_budget,
                                            pair_order=target.pair_order)
        if bits <= 4 and graph.opset >= INT4_OPSET:
            quantized = quantized.astype(ml_dtypes.int4)
        commands.append(DequantizeWeight(target.node, target.port, quantized, params.scale, target.axis))
    return commands


def _activation_commands(setup: QuantizerSetup, stats: dict[str, TensorStatistics], config: QuantizationConfig,
                         roles: dict[str, Role]) -> list[list[QuantizeDequantize]]:
    mode = _mode(config)
    groups = []
    for group in setup.groups:
        method = config.calibration
        if method is RangeMethod.MINMAX and not group.feeds_compute:
            # Quantizers that only enable fused kernels add error without a compute op reading them; averaged
            # per-sample extremes clip rare outliers (densenet121: 15.1 -> 16.1 dB).
            method = RangeMethod.MEAN_MINMAX
        ranges = [estimate_range(stats[t.tensor], method, mode=mode, percentile=config.percentile)
                  for t in group.targets]
        params = unified_activation_params(ranges, mode)
        groups.append([QuantizeDequantize(t.tensor, p.scale, _stored_zero_point(p, t, roles), t.consumers,
                                          t.graph_output)
                       for t, p in zip(group.targets, params) if t.consumers or t.graph_output])
    return groups


def _stored_zero_point(params: QuantParams, target: ActivationTarget, roles: dict[str, Role]) -> np.ndarray:
    """How signed levels are stored: int8 for a tensor that is only added or concatenated, uint8 shifted by 128
    for every other reader.

    ONNX Runtime fuses MatMul into an integer kernel only on uint8 activations (int8 left the transformer block's
    MatMuls in float), and a Conv whose output feeds a float activation (SiLU) into QLinearConv only when that
    output is uint8 like its input (bench/detector.py). OpenVINO keeps a
    Concat INT8 only without a zero-point shift, so tensors only added or concatenated stay int8.
    """
    only_joined = all(roles.get(reader) in (Role.ELTWISE_ADD, Role.CONCAT) for reader in target.consumers)
    if params.zero_point.dtype == np.int8 and not only_joined:
        return np.array(128, np.uint8)
    return params.zero_point


def bias_commands(graph: gs.Graph, commands: list[Command],
                   corrected: list[SetConstantInput]) -> list[Command]:
    """Biases of compute ops with quantized input and weight become INT32 with scale s_input · s_weight.

    ONNX Runtime only fuses Conv/Gemm into QLinearConv/QGemm when the bias is dequantized this way.
    """
    nodes = {n.name: n for n in graph.nodes}
    new_values = {c.node: c.values for c in corrected}
    input_scales = {c.tensor: c.scale for c in commands if isinstance(c, QuantizeDequantize)}
    result: list[Command] = []
    for weight in (c for c in commands if isinstance(c, DequantizeWeight)):
        node = nodes[weight.node]
        bias_port = spec(node).bias_port
        source = node.inputs[0].name
        has_bias = bias_port is not None and len(node.inputs) > bias_port
        if weight.node not in new_values and not has_bias:
            continue
        bias = new_values.get(weight.node)
        if bias is None:
            bias = node.inputs[bias_port].values
        if source not in input_scales:
            result.append(SetConstantInput(weight.node, bias_port, np.asarray(bias, np.float32)))
            continue
        scale = bias_scale(input_scales[source], weight.scale)
        bias = np.broadcast_to(np.asarray(bias, np.float64).reshape(-1), scale.shape)
        quantized = np.clip(np.round(bias / scale), _INT32.min, _INT32.max).astype(np.int32)
        result.append(DequantizeBias(weight.node, bias_port, quantized))
    return result


def export_for_calibration(graph: gs.Graph, original: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """Export without the data of large constants, and return that data as arrays for `collect_statistics`.

    The weights reach ONNX Runtime without being copied into a proto first (0.12 s for ResNet-50's 100 MB).
    gs exports a constant whose values are `LazyValues` as the proto they wrap, so for the export each large
    constant's values are swapped for a data-less proto, then put back. Constants mapped from external data
    (`map_external_constants`) of any size go as their mapped arrays: their protos only point at the user's files.
    """
    weights: dict[str, np.ndarray] = {}
    kept_values: list[tuple[gs.Constant, object]] = []
    for tensor in graph.tensors().values():
        values = getattr(tensor, "_values", None)  # noqa: SLF001 - a Constant's values, not loaded if lazy
        if not isinstance(tensor, gs.Constant) or (values.nbytes < IN_MEMORY_WEIGHT_BYTES
                                                   and not isinstance(values, MappedValues)):
            continue
        lazy = isinstance(values, gs.ir.tensor.LazyValues)
        weights[tensor.name] = values.load() if lazy else values
        kept_values.append((tensor, values))
        tensor._values = gs.ir.tensor.LazyValues(in_memory_initializer(tensor.name, weights[tensor.name]))  # noqa: SLF001
    try:
        return export_graph(graph, original), weights
    finally:
        for tensor, values in kept_values:
            tensor._values = values  # noqa: SLF001


def export_graph(graph: gs.Graph, original: onnx.ModelProto, *, shapes: bool = True) -> onnx.ModelProto:
    """Export keeping the original's opsets, IR version and metadata (the fine-tuning runtime needs IR <= 10).

    `shapes=False` leaves out the intermediate tensors' shapes (value_info), for deployable files: runtimes infer
    them, and in a small INT8 model they are 1% of the file.
    """
    model = gs.export_onnx(graph, do_type_check=False)
    if not shapes:
        del model.graph.value_info[:]
    del model.opset_import[:]
    model.opset_import.extend(original.opset_import)
    model.ir_version = original.ir_version
    model.producer_name = "onnxcompress"
    del model.metadata_props[:]
    model.metadata_props.extend(original.metadata_props)
    return model
