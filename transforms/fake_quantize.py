"""Build the float subgraphs of trainable fake quantizers (commands FakeQuantize, FakeQuantizeWeight,
FakeQuantizeBias; arithmetic in `TrainableQuantizer`'s docstring).

Only ops with gradients in onnxruntime-training are used (Mul, Add, Max, Div, Clip, Sub, Reshape), plus Round,
whose straight-through gradient the trainer registers. The step tensor of each quantizer carries its
`step_name`, so a bias quantizer can read the steps of the quantizers before it.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.transforms.commands import FakeQuantize, FakeQuantizeBias, FakeQuantizeWeight, TrainableQuantizer

# Lower bound of the factor 1 + k·δ: a range never collapses to zero or flips sign.
MIN_RANGE_FACTOR = np.float32(1e-3)


def channel_shape(ndim: int, axis: int) -> tuple[int, ...]:
    """Shape that broadcasts a per-channel vector along `axis` of an `ndim`-dimensional tensor."""
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return tuple(shape)


def parameter_values(quantizer: TrainableQuantizer) -> dict[str, np.ndarray]:
    """Initial values of the quantizer's trainable parameters (all zero: the calibrated range)."""
    return {name: np.zeros_like(quantizer.step0, dtype=np.float32) for name in quantizer.parameter_names}


def trained_step_and_zero_point(quantizer: TrainableQuantizer,
                                values: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Step and zero-point for trained parameter `values`, computed in float32 in the graph's order of operations,
    so that QuantizeLinear with them reproduces the fake quantizer bit for bit."""
    k, one = np.float32(quantizer.lr_scale), np.float32(1)
    step0 = quantizer.step0.astype(np.float32)
    if not quantizer.asymmetric:
        delta = values[quantizer.parameter_names[0]].astype(np.float32)
        step = step0 * np.maximum(one + k * delta, MIN_RANGE_FACTOR)
        return step.astype(np.float32), np.zeros(step.shape, np.float32)
    low_delta, range_delta = (values[name].astype(np.float32) for name in quantizer.parameter_names)
    range0 = step0 * np.float32(quantizer.q_max)
    low0 = -step0 * np.float32(quantizer.zero_point0)
    value_range = range0 * np.maximum(one + k * range_delta, MIN_RANGE_FACTOR)
    low = low0 + range0 * (k * low_delta)
    step = (value_range / np.float32(quantizer.q_max)).astype(np.float32)
    zero_point = np.clip(np.round(-low / step), 0, quantizer.q_max).astype(np.float32)
    return step, zero_point


class _Builder:
    """Appends nodes to `graph`, naming every tensor after the quantizer."""

    def __init__(self, graph: gs.Graph, prefix: str) -> None:
        self.graph, self.prefix = graph, prefix
        self.count = 0
        self.constants: dict[str, gs.Constant] = {}

    def const(self, suffix: str, value: np.ndarray | float) -> gs.Constant:
        """One float32 constant per suffix (tensor names must be unique)."""
        if suffix not in self.constants:
            self.constants[suffix] = gs.Constant(f"{self.prefix}.{suffix}", np.asarray(value, np.float32))
        return self.constants[suffix]

    def op(self, op: str, *inputs: gs.Tensor, name: str | None = None) -> gs.Variable:
        self.count += 1
        output = gs.Variable(name or f"{self.prefix}.{op.lower()}{self.count}", dtype=np.float32)
        self.graph.nodes.append(gs.Node(op, f"{self.prefix}.{op}{self.count}", inputs=list(inputs),
                                        outputs=[output]))
        return output


def _range_factor(b: _Builder, delta: gs.Tensor, lr_scale: float) -> gs.Variable:
    """max(1 + k·δ, ε)."""
    scaled = b.op("Mul", b.const("lr_scale", lr_scale), delta)
    return b.op("Max", b.op("Add", b.const("one", 1.0), scaled), b.const("min_factor", MIN_RANGE_FACTOR))


def build_quantizer(graph: gs.Graph, x: gs.Tensor, quantizer: TrainableQuantizer, tensors: dict[str, gs.Tensor],
                    parameter_shape: tuple[int, ...] | None = None, *, unsigned: bool = False) -> gs.Variable:
    """Append the fake quantizer reading `x`; returns the fake-quantized tensor.

    `parameter_shape` reshapes the step for broadcasting against `x` (per-channel weights); the trainable
    parameters and the `step_name` tensor keep `step0`'s shape. Quantizers with the same name share the step
    (and parameters) built by the first of them, which is recorded in `tensors`. `unsigned`: see FakeQuantize.
    """
    b = _Builder(graph, f"{quantizer.name}.{x.name}")
    q_max = b.const("q_max", quantizer.q_max)
    step, low = _build_step(graph, quantizer, tensors)
    broadcast_step = step
    if parameter_shape is not None:
        shape = gs.Constant(f"{quantizer.name}.broadcast_shape", np.asarray(parameter_shape, np.int64))
        broadcast_step = b.op("Reshape", step, shape)
    scaled = b.op("Div", x, broadcast_step)
    if low is not None and not unsigned:
        zero = b.const("zero", 0.0)
        zero_point = b.op("Clip", b.op("Round", b.op("Div", b.op("Neg", low), step)), zero, q_max)
        levels = b.op("Clip", b.op("Add", b.op("Round", scaled), zero_point), zero, q_max)
        return b.op("Mul", b.op("Sub", levels, zero_point), broadcast_step)
    q_min = 0 if unsigned else quantizer.q_min
    levels = b.op("Round", b.op("Clip", scaled, b.const("q_min", q_min), q_max))
    return b.op("Mul", levels, broadcast_step)


def _build_step(graph: gs.Graph, quantizer: TrainableQuantizer,
                tensors: dict[str, gs.Tensor]) -> tuple[gs.Tensor, gs.Tensor | None]:
    """The step tensor (and for asymmetric quantizers the low end of the range), built once per name."""
    low_name = f"{quantizer.name}.low"
    if quantizer.step_name in tensors:
        return tensors[quantizer.step_name], tensors.get(low_name)
    b = _Builder(graph, quantizer.name)
    params = [gs.Constant(name, value) for name, value in parameter_values(quantizer).items()]
    if quantizer.asymmetric:
        low_delta, range_delta = params
        range0 = b.const("range0", quantizer.step0 * np.float32(quantizer.q_max))
        low0 = b.const("low0", -quantizer.step0 * np.float32(quantizer.zero_point0))
        value_range = b.op("Mul", range0, _range_factor(b, range_delta, quantizer.lr_scale))
        lr_scaled = b.op("Mul", b.const("lr_scale", quantizer.lr_scale), low_delta)
        tensors[low_name] = b.op("Add", low0, b.op("Mul", range0, lr_scaled), name=low_name)
        step = b.op("Div", value_range, b.const("q_max", quantizer.q_max), name=quantizer.step_name)
    else:
        step0 = b.const("step0", quantizer.step0)
        step = b.op("Mul", step0, _range_factor(b, params[0], quantizer.lr_scale), name=quantizer.step_name)
    tensors[quantizer.step_name] = step
    return step, tensors.get(low_name)


def insert_fake_quantize(graph: gs.Graph, tensors: dict[str, gs.Tensor], readers: list[gs.Node],
                         cmd: FakeQuantize) -> None:
    source = tensors[cmd.tensor]
    output = build_quantizer(graph, source, cmd.quantizer, tensors, unsigned=cmd.unsigned)
    for reader in readers:
        for index, tensor in enumerate(reader.inputs):
            if tensor is source:
                reader.inputs[index] = output
    if cmd.graph_output:
        graph.outputs[graph.outputs.index(source)] = output
        output.name, source.name = source.name, f"{source.name}_float"
        tensors[source.name], tensors[output.name] = source, output


def fake_quantize_weight(graph: gs.Graph, tensors: dict[str, gs.Tensor], node: gs.Node,
                         cmd: FakeQuantizeWeight) -> None:
    weight = node.inputs[cmd.port]
    # A constant, or a constant already transformed for training (a masked weight), whose shape is known.
    ndim = weight.values.ndim if isinstance(weight, gs.Constant) else len(weight.shape or ())
    if not ndim:
        raise ValueError(f"input {cmd.port} of node {node.name!r} is not a weight of known shape")
    shape = channel_shape(ndim, cmd.axis)
    node.inputs[cmd.port] = build_quantizer(graph, weight, cmd.quantizer, tensors, shape)


def fake_quantize_bias(graph: gs.Graph, tensors: dict[str, gs.Tensor], node: gs.Node,
                       cmd: FakeQuantizeBias) -> None:
    bias = node.inputs[cmd.port]
    # A constant, or one already transformed for training (a masked bias).
    if not isinstance(bias, gs.Constant) and not bias.inputs:
        raise ValueError(f"input {cmd.port} of node {node.name!r} is not a bias")
    b = _Builder(graph, f"{bias.name}.int32")
    bias_step = b.op("Mul", tensors[cmd.input_step], tensors[cmd.weight_step])
    node.inputs[cmd.port] = b.op("Mul", b.op("Round", b.op("Div", bias, bias_step)), bias_step)

