"""Quantization-aware training (NNCF paper §4.1): the post-training plan, made trainable, exported as the same QDQ.

    plan_quantization (preprocess with BN folding, placement, calibration, bias correction)
    →  training commands: each QDQ pair becomes a FakeQuantize with a trainable range, each INT8 weight a
       FakeQuantizeWeight on the float weight, each INT32 bias a FakeQuantizeBias on the float bias
    →  (training)  →  export commands: the same QuantizeDequantize / DequantizeWeight commands post-training
       quantization emits, with steps and zero-points computed from the trained ranges exactly as the fake
       quantizers compute them, so the exported model reproduces the fake-quantized one.

Quantizers of one unified-scale group (Concat inputs, residual Add inputs) share their trainable range.
BatchNorm is folded into the convolutions before training (preprocessing), so the trained graph is the one
that is deployed and no running statistics drift.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxcompress.algorithms.quantization.ptq import INT4_OPSET, QuantizationPlan, export_graph, plan_quantization
from onnxcompress.algorithms.quantization.scheme import activation_levels, weight_levels
from onnxcompress.compression.api import BuildContext, CompressionController, Parameters, Stage
from onnxcompress.config import Preset, QuantizationAwareTrainingConfig
from onnxcompress.runtime.model_io import upgrade_opset
from onnxcompress.runtime.training import IDENTITY_GRADIENT, GradientNode
from onnxcompress.transforms.applier import apply_commands
from onnxcompress.transforms.commands import (
    Command,
    DequantizeBias,
    DequantizeWeight,
    FakeQuantize,
    FakeQuantizeBias,
    FakeQuantizeWeight,
    QuantizeDequantize,
    TrainableQuantizer,
    bias_scale,
)
from onnxcompress.transforms.fake_quantize import channel_shape, parameter_values, trained_step_and_zero_point
from onnxcompress.transforms.op_table import spec

Batches = Iterable[Mapping[str, np.ndarray]]
_INT32 = np.iinfo(np.int32)


@dataclass(frozen=True)
class _Activation:
    command: FakeQuantize
    #: Exported zero-point of symmetric and unsigned quantizers: 0, as int8 for signed levels, else uint8.
    fixed_zero_point: np.ndarray


class QuantizationController(CompressionController):
    """Fake quantizers with trainable ranges on a float graph (see the module docstring)."""

    name = "quantization"
    stage = Stage.QUANTIZATION

    def __init__(self, plan: QuantizationPlan, config: QuantizationAwareTrainingConfig, lr_scale: float) -> None:
        super().__init__()
        self._activations = _activation_quantizers(plan, config, lr_scale)
        nodes = {node.name: node for node in plan.graph.nodes}
        budgets = {target.node: target.pair_budget for target in plan.setup.weights}
        self._weights = [_weight_quantizer(nodes, command, config.weight_bits_of(command.node), lr_scale,
                                           budgets[command.node]) for command in plan.weights]
        self._biases = _bias_quantizers(nodes, self._activations, self._weights)

    @classmethod
    def build(cls, model: onnx.ModelProto, batches: Callable[[], Batches], config: QuantizationAwareTrainingConfig,
              context: BuildContext) -> tuple[QuantizationController, onnx.ModelProto]:
        """Calibrate `model` (preprocessed) and plan its quantizers; returns the controller and the float graph to
        train (biases corrected, smoothed) on which its commands apply. `batches()` gives a fresh pass over the
        calibration feeds (SmoothQuant takes one of its own)."""
        settings = config.post_training()
        if settings.four_bit_storage:  # 4-bit levels are exported as INT4 (the training runtime reads opset 21)
            model = upgrade_opset(model, INT4_OPSET)
        smoothing = batches() if settings.effective_smooth_quant_alpha is not None else None
        plan = plan_quantization(model, batches(), settings, total=context.calibration_samples,
                                 progress=context.progress, batches_for_smoothing=smoothing, preprocessed=True)
        apply_commands(plan.graph, plan.corrected_biases)
        lr_scale = quantizer_lr_scale(config.quantizer_lr, context.learning_rate, context.optimizer)
        return cls(plan, config, lr_scale), export_graph(plan.graph, model)

    @property
    def training_commands(self) -> list[Command]:
        return [*(a.command for a in self._activations), *self._weights, *self._biases]

    @property
    def trainable_parameters(self) -> dict[str, np.ndarray]:
        values: dict[str, np.ndarray] = {}
        for quantizer in self._quantizers():
            values.update(parameter_values(quantizer))
        return values

    @property
    def gradients(self) -> dict[str, tuple[GradientNode, ...]]:
        return {"Round": IDENTITY_GRADIENT}  # the straight-through estimator of the fake quantizers

    def statistics(self, parameters: Parameters) -> dict[str, float]:
        """Mean relative change of the activation and weight ranges since calibration."""
        stats = {"activation_quantizers": float(len({a.command.quantizer.name for a in self._activations})),
                 "weight_quantizers": float(len(self._weights))}
        for kind, quantizers in (("activation", [a.command.quantizer for a in self._activations]),
                                 ("weight", [w.quantizer for w in self._weights])):
            ratios = [trained_step_and_zero_point(q, parameters)[0] / q.step0 for q in quantizers]
            if ratios:
                stats[f"{kind}_range_change"] = float(np.mean([np.abs(r - 1).mean() for r in ratios]))
        return stats

    def export_commands(self, graph: gs.Graph, parameters: Parameters) -> list[Command]:
        """QDQ activations, INT8 weights and INT32 biases from the trained ranges and the weights of `graph`."""
        nodes = {node.name: node for node in graph.nodes}
        steps: dict[str, np.ndarray] = {}
        commands: list[Command] = []
        for activation in self._activations:
            command = activation.command
            step, zero_point = trained_step_and_zero_point(command.quantizer, parameters)
            steps[command.quantizer.step_name] = step
            zero_point = np.asarray(zero_point).astype(np.uint8)
            if not command.quantizer.asymmetric or command.unsigned:
                zero_point = activation.fixed_zero_point
            commands.append(QuantizeDequantize(command.tensor, step, zero_point, command.consumers,
                                               command.graph_output))
        for command in self._weights:
            step, _ = trained_step_and_zero_point(command.quantizer, parameters)
            steps[command.quantizer.step_name] = step
            values = nodes[command.node].inputs[command.port].values
            levels = np.round(values / step.reshape(channel_shape(values.ndim, command.axis)))
            four_bit = graph.opset >= INT4_OPSET and command.quantizer.q_min >= -8 and command.quantizer.q_max <= 7
            quantized = np.clip(levels, command.quantizer.q_min, command.quantizer.q_max).astype(
                ml_dtypes.int4 if four_bit else np.int8)
            commands.append(DequantizeWeight(command.node, command.port, quantized, step, command.axis))
        for command in self._biases:
            step = bias_scale(steps[command.input_step], steps[command.weight_step])
            values = nodes[command.node].inputs[command.port].values
            quantized = np.clip(np.round(values / step), _INT32.min, _INT32.max)
            commands.append(DequantizeBias(command.node, command.port, quantized.astype(np.int32)))
        return commands

    def _quantizers(self) -> list[TrainableQuantizer]:
        unique = {a.command.quantizer.name: a.command.quantizer for a in self._activations}
        return [*unique.values(), *(w.quantizer for w in self._weights)]


def quantizer_lr_scale(quantizer_lr: float, learning_rate: float, optimizer: str) -> float:
    """k such that the relative range u = 1 + k·δ learns at `quantizer_lr` while δ learns at `learning_rate`.

    Adam-family steps move δ by about the learning rate whatever the gradient's size, so u moves by k·lr;
    SGD on δ is SGD on u with rate k²·lr.
    """
    ratio = quantizer_lr / learning_rate
    return float(ratio if optimizer == "adamw" else np.sqrt(ratio))


def _activation_quantizers(plan: QuantizationPlan, config: QuantizationAwareTrainingConfig,
                           lr_scale: float) -> list[_Activation]:
    """One trainable quantizer per unified group, read by every member's FakeQuantize.

    Symmetric members keep their own signed or unsigned levels on the shared step; asymmetric members share the
    group's range, except non-negative ones, which keep zero-point 0 on its step (as post-training does).
    """
    asymmetric = config.preset is Preset.MIXED
    unsigned_levels = activation_levels(signed=False)
    activations = []
    for group in plan.activation_groups:
        if not group:
            continue
        name = f"{group[0].tensor}.quantizer"
        shared = max(group, key=lambda command: int(command.zero_point))  # asymmetric: the group's zero-point
        for command in group:
            if asymmetric:
                quantizer = TrainableQuantizer(name, np.asarray(shared.scale, np.float32), unsigned_levels.q_min,
                                               unsigned_levels.q_max, lr_scale, asymmetric=True,
                                               zero_point0=float(int(shared.zero_point)))
                unsigned = int(command.zero_point) == 0 and int(shared.zero_point) != 0
            else:
                # Signed levels are int8, or uint8 shifted by 128 where ONNX Runtime needs uint8 (see ptq).
                levels = activation_levels(signed=command.zero_point.dtype == np.int8 or int(command.zero_point) != 0)
                quantizer = TrainableQuantizer(name, np.asarray(command.scale, np.float32), levels.q_min,
                                               levels.q_max, lr_scale)
                unsigned = False
            fake = FakeQuantize(command.tensor, quantizer, command.consumers, command.graph_output, unsigned)
            activations.append(_Activation(fake, np.zeros((), np.uint8) if asymmetric else command.zero_point))
    return activations


def _weight_quantizer(nodes: dict[str, gs.Node], command: DequantizeWeight, bits: int, lr_scale: float,
                      pair_budget: int | None) -> FakeQuantizeWeight:
    """A trainable per-channel weight quantizer. Under a pair budget the levels are ±budget/2, so that any two
    trained levels stay within it (post-training fits each channel's step to the pairs the kernel forms, a
    property of weights that change while training); the initial step covers the channel's largest weight on
    those levels."""
    levels = weight_levels(bits)
    node = nodes[command.node]
    step0 = np.asarray(command.scale, np.float32)
    q_min, q_max = levels.q_min, levels.q_max
    if pair_budget is not None and 2 * q_max > pair_budget:
        q_min, q_max = -(pair_budget // 2), pair_budget // 2
        weight = node.inputs[command.port].values
        abs_max = np.abs(np.moveaxis(weight, command.axis, 0).reshape(weight.shape[command.axis], -1)).max(axis=1)
        step0 = np.maximum(step0, (abs_max / np.float32(q_max)).astype(np.float32))
    quantizer = TrainableQuantizer(f"{node.inputs[command.port].name}.quantizer", step0, q_min, q_max, lr_scale)
    return FakeQuantizeWeight(command.node, command.port, quantizer, command.axis)


def _bias_quantizers(nodes: dict[str, gs.Node], activations: list[_Activation],
                     weights: list[FakeQuantizeWeight]) -> list[FakeQuantizeBias]:
    """Biases of compute ops whose input and weight are both quantized: they are exported as INT32."""
    input_steps = {(consumer, a.command.tensor): a.command.quantizer.step_name
                   for a in activations for consumer in a.command.consumers}
    biases = []
    for weight in weights:
        node = nodes[weight.node]
        port = spec(node).bias_port
        has_bias = port is not None and len(node.inputs) > port and isinstance(node.inputs[port], gs.Constant)
        input_step = input_steps.get((node.name, node.inputs[0].name))
        if has_bias and input_step is not None:
            command = FakeQuantizeBias(node.name, port, input_step, weight.quantizer.step_name)
            biases.append(command)
    return biases
