"""Bias correction: remove the per-channel mean shift that quantization adds to a layer's output.

- full (the lecture's procedure, all layers in one pass): run the quantized model on the calibration data with a
  float copy of each layer beside it reading the same input, and subtract the difference of their per-channel
  output means, E[ŷ] - E[y], from the bias. Costs one more inference pass over the (second-pass) samples.
- fast: E[ŷ] - E[y] ≈ (Ŵ - W) · E[x], from the float input means gathered in the calibration pass itself (exact
  for Gemm; for Conv it ignores zero padding at the borders). Costs no extra pass.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxcompress.algorithms.quantization.placement import BiasTarget, QuantizerSetup
from onnxcompress.config import BiasCorrection, QuantizationConfig
from onnxcompress.runtime.calibration import Statistic, StatisticRequest, TensorStatistics, collect_statistics
from onnxcompress.transforms.applier import apply_commands
from onnxcompress.transforms.commands import Command, DequantizeWeight, SetConstantInput
from onnxcompress.transforms.op_table import channel_bias, constant_weight, filters, groups, output_channels, spec


def input_mean_requests(setup: QuantizerSetup, config: QuantizationConfig) -> list[StatisticRequest]:
    """Statistics the calibration pass must also collect (the full variant makes its own pass)."""
    if config.bias_correction is BiasCorrection.FAST:
        return [StatisticRequest(t.input_tensor, Statistic.CHANNEL_MEAN, t.input_axis, t.input_channels)
                for t in setup.bias_targets]
    return []


def bias_correction_commands(graph: gs.Graph, float_model: onnx.ModelProto | None, setup: QuantizerSetup,
                             commands: list[Command], stats: dict[str, TensorStatistics],
                             config: QuantizationConfig, *, second_pass: Iterable[Mapping[str, np.ndarray]] | None,
                             total: int | None, progress: bool) -> list[SetConstantInput]:
    """Corrected biases; `float_model` (the preprocessed float graph) is needed by the full variant only."""
    nodes = {n.name: n for n in graph.nodes}
    weights = {c.node: c for c in commands if isinstance(c, DequantizeWeight)}
    if config.bias_correction is BiasCorrection.FAST:
        shifts = {t.node: weight_error_shift(nodes[t.node], weights[t.node], stats[t.input_tensor].channel_mean)
                  for t in setup.bias_targets if t.input_tensor in stats}
    else:
        subset = min(total, config.bias_correction_subset_size) if total is not None else None
        shifts = measured_bias_shifts(float_model, nodes, setup.bias_targets, commands, second_pass, subset,
                                      progress)
    return [SetConstantInput(t.node, t.bias_port, (channel_bias(nodes[t.node]) - shifts[t.node]).astype(np.float32))
            for t in setup.bias_targets if t.node in shifts]


def _output_mean_request(node: gs.Node) -> StatisticRequest:
    return StatisticRequest(node.outputs[0].name, Statistic.CHANNEL_MEAN, spec(node).channel_axis,
                            output_channels(node))


def weight_error_shift(node: gs.Node, command: DequantizeWeight, input_mean: np.ndarray) -> np.ndarray:
    weight = constant_weight(node).values
    shape = [1] * weight.ndim
    shape[command.axis] = -1
    # float32 like the runtimes; each output channel's error sum is over at most a few thousand terms.
    error = command.quantized.astype(np.float32) * command.scale.reshape(shape) - weight
    # Each output channel sums its filter's error over space, weighted by its group's input means.
    error = filters(node, error).sum(axis=2)  # [O, I/g]
    out_channels, count = error.shape[0], groups(node)
    if count == 1:
        return error @ input_mean
    means = input_mean.reshape(count, -1)[np.arange(out_channels) // (out_channels // count)]  # [O, I/g]
    return (error * means).sum(axis=1)


def measured_bias_shifts(float_model: onnx.ModelProto | None, nodes: dict[str, gs.Node],
                         targets: Sequence[BiasTarget], commands: list[Command],
                         batches: Iterable[Mapping[str, np.ndarray]] | None, total: int | None,
                         progress: bool) -> dict[str, np.ndarray]:
    """E[ŷ] - E[y] per output channel of each target layer, where `commands` change `float_model` (quantizers,
    sparse weights) and y is a float copy of the layer reading the same input as ŷ (see `_add_float_reference`)."""
    if batches is None or float_model is None:
        raise ValueError("full bias correction needs the float model and a second pass over the data")
    quantized_graph = apply_commands(gs.import_onnx(float_model), commands)
    requests = []
    for target in targets:
        measured = _output_mean_request(nodes[target.node])
        reference = _add_float_reference(quantized_graph, nodes[target.node], target)
        requests.append((measured, StatisticRequest(reference, measured.statistic, measured.axis, measured.channels)))
    quantized_model = gs.export_onnx(quantized_graph, do_type_check=False)
    quantized_model.ClearField("opset_import")
    quantized_model.opset_import.extend(float_model.opset_import)
    quantized_model.ir_version = float_model.ir_version
    means = collect_statistics(quantized_model, [r for pair in requests for r in pair], batches, total=total,
                               progress=progress, description="bias correction")
    return {t.node: means[measured.tensor].channel_mean - means[reference.tensor].channel_mean
            for t, (measured, reference) in zip(targets, requests)}


def _add_float_reference(quantized_graph: gs.Graph, float_node: gs.Node, target: BiasTarget) -> str:
    """Add a float copy of the layer reading the same (unquantized) input as the quantized layer; return its
    output name.

    Comparing against this copy, not against the float model's own output, measures only the error the layer's
    quantizers add. The float model's output also differs by the upstream layers' error, which those layers
    correct themselves: counting it again over-corrects, the more the deeper the network (densenet121:
    15.5 dB uncorrected, 8.5 dB that way).
    """
    source = quantized_graph.tensors()[target.input_tensor]
    constants = [gs.Constant(f"{float_node.name}/float_reference/{i}", np.asarray(t.values))
                 for i, t in enumerate(float_node.inputs[1:], start=1)]
    output = gs.Variable(f"{float_node.name}/float_reference", dtype=np.float32)
    quantized_graph.nodes.append(gs.Node(float_node.op, f"{float_node.name}/float_reference",
                                         dict(float_node.attrs), [source, *constants], [output]))
    return output.name
