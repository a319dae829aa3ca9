"""Execute a list of commands (transforms.commands) on an onnx-graphsurgeon graph.

The applier is the only code that edits graphs for algorithms. It applies commands phase by phase (`Phase`: new
constant values, then rewired inputs, gates on weights, quantizers, the bias quantizers that read them, losses),
in list order within a phase, so no list needs an order its author must remember. It resolves each command's
insertion point first (`_check_point`) and reports unknown names or readers as errors, so a stale plan never edits
the wrong node silently. Tensors and nodes it derives from a tensor's name get a numbered stem when the name is
taken (two quantizers on one tensor for different readers).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import count

import numpy as np
import onnx_graphsurgeon as gs
from onnx import numpy_helper
from onnx_graphsurgeon.ir.tensor import LazyValues

from onnxcompress.transforms.commands import (
    Command,
    ComplexityLoss,
    DequantizeBias,
    DequantizeWeight,
    FakeQuantize,
    FakeQuantizeBias,
    FakeQuantizeWeight,
    MaskWeight,
    NewOutput,
    NodeAttribute,
    NodeInput,
    QuantizeDequantize,
    ScaleActivation,
    SetAttribute,
    SetConstantInput,
    SliceChannels,
    StochasticGateWeight,
    TensorReaders,
)
from onnxcompress.transforms.fake_quantize import fake_quantize_bias, fake_quantize_weight, insert_fake_quantize
from onnxcompress.transforms.graph import set_constant_input, set_input
from onnxcompress.transforms.op_table import spec
from onnxcompress.transforms.stochastic_gate import insert_complexity_loss, insert_stochastic_gate


class UnknownNameError(KeyError):
    """A command names a node or tensor that the graph does not have, or a reader that does not read it."""


class Phase(enum.IntEnum):
    """When a command applies. Each phase reads what the earlier ones made."""

    #: New values of constant inputs and attributes (corrected biases, sparse weights, pruned channels): later
    #: phases read them.
    SET_CONSTANTS = 0
    #: Ops put in front of readers of an activation (SmoothQuant's scaling).
    REWIRE_INPUTS = 1
    #: Masks and gates on weights: a weight quantizer quantizes the gated weight.
    GATE_WEIGHTS = 2
    #: Quantizers of activations and weights.
    QUANTIZE = 3
    #: Bias quantizers, whose step is the product of the input's and the weight's steps.
    QUANTIZE_BIASES = 4
    #: Losses over tensors that gates made.
    LOSSES = 5


@dataclass
class _Context:
    """The graph being edited, its nodes and tensors by name, and the names in use."""

    graph: gs.Graph
    nodes: dict[str, gs.Node]
    tensors: dict[str, gs.Tensor]
    used: set[str] = field(default_factory=set)
    #: Weights already dequantized, by (constant, axis): a weight several nodes share is stored once for each
    #: distinct way they quantize it.
    dequantized: dict[tuple[int, int], list[tuple[DequantizeWeight, gs.Variable]]] = field(default_factory=dict)

    def stem(self, base: str, suffixes: tuple[str, ...]) -> str:
        """`base`, or `base.1`, `base.2`...: the first stem that makes every `stem + suffix` a new name."""
        for stem in (base if i == 0 else f"{base}.{i}" for i in count()):
            names = {stem + suffix for suffix in suffixes}
            if not names & self.used:
                self.used |= names
                return stem
        raise AssertionError("unreachable")

    def node(self, name: str) -> gs.Node:
        try:
            return self.nodes[name]
        except KeyError:
            raise UnknownNameError(f"no node named {name!r}") from None


def apply_commands(graph: gs.Graph, commands: Iterable[Command]) -> gs.Graph:
    """Apply `commands` phase by phase (list order within a phase), then clean up and sort the graph; returns the
    same graph object."""
    tensors = graph.tensors()
    ctx = _Context(graph, {n.name: n for n in graph.nodes}, tensors, {*tensors, *(n.name for n in graph.nodes)})
    for command in sorted(commands, key=_phase):
        _check_point(ctx, command.point)
        _HANDLERS[type(command)][1](ctx, command)
    return graph.cleanup().toposort()


def _phase(command: Command) -> Phase:
    try:
        return _HANDLERS[type(command)][0]
    except KeyError:
        raise TypeError(f"not a command: {command!r}") from None


def _check_point(ctx: _Context, point: NodeInput | TensorReaders | NodeAttribute | NewOutput) -> None:
    if isinstance(point, NodeAttribute):
        ctx.node(point.node)
    elif isinstance(point, NodeInput):
        node = ctx.node(point.node)
        if not 0 <= point.port <= len(node.inputs):
            raise UnknownNameError(f"node {point.node!r} has no input {point.port} (it has {len(node.inputs)})")
    elif isinstance(point, TensorReaders):
        if point.tensor not in ctx.tensors:
            raise UnknownNameError(f"no tensor named {point.tensor!r}")
        source = ctx.tensors[point.tensor]
        for name in point.consumers:
            if not any(t is source for t in ctx.node(name).inputs):
                raise UnknownNameError(f"node {name!r} does not read tensor {point.tensor!r}")
        if point.graph_output and source not in ctx.graph.outputs:
            raise UnknownNameError(f"tensor {point.tensor!r} is not a graph output")
    elif point.name in ctx.used:
        raise ValueError(f"output {point.name!r}: a tensor or node of that name exists already")


def _insert_qdq(ctx: _Context, cmd: QuantizeDequantize) -> None:
    source = ctx.tensors[cmd.tensor]
    stem = ctx.stem(cmd.tensor, ("_scale", "_zp", "_q", "_dq", "_Q", "_DQ"))
    scale = gs.Constant(f"{stem}_scale", np.asarray(cmd.scale, np.float32))
    zero_point = gs.Constant(f"{stem}_zp", np.asarray(cmd.zero_point))
    quantized = gs.Variable(f"{stem}_q", dtype=zero_point.values.dtype, shape=source.shape)
    dequantized = gs.Variable(f"{stem}_dq", dtype=np.float32, shape=source.shape)
    ctx.graph.nodes.append(gs.Node("QuantizeLinear", f"{stem}_Q", inputs=[source, scale, zero_point],
                                   outputs=[quantized]))
    ctx.graph.nodes.append(gs.Node("DequantizeLinear", f"{stem}_DQ", inputs=[quantized, scale, zero_point],
                                   outputs=[dequantized]))
    for name in cmd.consumers:
        _replace_input(ctx.nodes[name], source, dequantized)
    if cmd.graph_output:
        # Keep the model's interface: the dequantized tensor takes over the output name.
        ctx.graph.outputs[ctx.graph.outputs.index(source)] = dequantized
        dequantized.name, source.name = source.name, ctx.stem(f"{source.name}_float", ("",))
        ctx.tensors[source.name] = source
        ctx.tensors[dequantized.name] = dequantized


def _scale_activation(ctx: _Context, cmd: ScaleActivation) -> None:
    source = ctx.tensors[cmd.tensor]
    stem = ctx.stem(f"{cmd.tensor}_smooth", ("", "_factor", "_Mul"))
    factor = gs.Constant(f"{stem}_factor", np.asarray(cmd.factor, np.float32))
    scaled = gs.Variable(stem, dtype=source.dtype, shape=source.shape)
    ctx.graph.nodes.append(gs.Node("Mul", f"{stem}_Mul", inputs=[source, factor], outputs=[scaled]))
    for name in cmd.consumers:
        _replace_input(ctx.nodes[name], source, scaled)
    ctx.tensors[scaled.name] = scaled


def _replace_input(node: gs.Node, old: gs.Tensor, new: gs.Tensor) -> None:
    for index, tensor in enumerate(node.inputs):
        if tensor is old:
            node.inputs[index] = new


def _dequantize_weight(ctx: _Context, cmd: DequantizeWeight) -> None:
    node = ctx.nodes[cmd.node]
    stem = _constant_input_stem(node, cmd.port)
    key = (id(node.inputs[cmd.port]), cmd.axis)
    for previous, dequantized in ctx.dequantized.get(key, []):
        if _same_levels(previous, cmd) and spec(ctx.nodes[previous.node]).integer_kernel_needs_weight_zero_point \
                == spec(node).integer_kernel_needs_weight_zero_point:
            set_input(node, cmd.port, dequantized)
            return
    stem = ctx.stem(stem, ("_q", "_scale", "_zp", "_dq", "_DQ"))
    inputs = [integer_constant(f"{stem}_q", cmd.quantized), gs.Constant(f"{stem}_scale",
                                                                         np.asarray(cmd.scale, np.float32))]
    if cmd.zero_point is not None:
        inputs.append(integer_constant(f"{stem}_zp", cmd.zero_point))
    elif spec(node).integer_kernel_needs_weight_zero_point and not cmd.block_size:
        # The zero-point is 0, the default when it is left out; stored only where a runtime's INT8 fusion needs it.
        inputs.append(integer_constant(f"{stem}_zp", np.zeros(cmd.scale.shape, cmd.quantized.dtype)))
    dequantized = gs.Variable(f"{stem}_dq", dtype=np.float32, shape=list(cmd.quantized.shape))
    attrs = {"axis": cmd.axis, **({"block_size": cmd.block_size} if cmd.block_size else {})}
    ctx.graph.nodes.append(gs.Node("DequantizeLinear", f"{stem}_DQ", attrs=attrs, inputs=inputs,
                                   outputs=[dequantized]))
    ctx.dequantized.setdefault(key, []).append((cmd, dequantized))
    set_input(node, cmd.port, dequantized)


def _same_levels(a: DequantizeWeight, b: DequantizeWeight) -> bool:
    return (a.quantized.dtype == b.quantized.dtype and np.array_equal(a.quantized, b.quantized)
            and np.array_equal(a.scale, b.scale) and a.block_size == b.block_size
            and (a.zero_point is None) == (b.zero_point is None)
            and (a.zero_point is None or np.array_equal(a.zero_point, b.zero_point)))


def integer_constant(name: str, values: np.ndarray) -> gs.Constant:
    """A constant of integer levels, held as its ONNX tensor: 4-bit ones packed two values per byte by ONNX's own
    helper (onnx-graphsurgeon's exporter does not pack them), and the export copies no large array again."""
    return gs.Constant(name, LazyValues(numpy_helper.from_array(np.ascontiguousarray(values), name)))


def _dequantize_bias(ctx: _Context, cmd: DequantizeBias) -> None:
    node = ctx.nodes[cmd.node]
    weight_port = spec(node).weight_port
    input_scale = _dequantized_scale(node.inputs[0] if node.inputs else None)
    weight_scale = _dequantized_scale(node.inputs[weight_port] if weight_port is not None and
                                      weight_port < len(node.inputs) else None)
    if input_scale is None or weight_scale is None:
        raise UnknownNameError(f"bias of {node.name!r}: its input and weight must be dequantized first")
    stem = ctx.stem(_constant_input_stem(node, cmd.port), ("_scale", "_scale_Mul", "_q", "_dq", "_DQ"))
    scale = gs.Variable(f"{stem}_scale", dtype=np.float32, shape=list(weight_scale.shape))
    ctx.graph.nodes.append(gs.Node("Mul", f"{stem}_scale_Mul", inputs=[input_scale, weight_scale], outputs=[scale]))
    quantized = gs.Constant(f"{stem}_q", np.ascontiguousarray(cmd.quantized, np.int32))
    dequantized = gs.Variable(f"{stem}_dq", dtype=np.float32, shape=list(cmd.quantized.shape))
    ctx.graph.nodes.append(gs.Node("DequantizeLinear", f"{stem}_DQ", attrs={"axis": 0},
                                   inputs=[quantized, scale], outputs=[dequantized]))
    set_input(node, cmd.port, dequantized)


def _dequantized_scale(tensor: gs.Tensor | None) -> gs.Constant | None:
    """The scale constant of the DequantizeLinear that produces `tensor`, if one does."""
    producer = tensor.inputs[0] if tensor is not None and tensor.inputs else None
    if producer is None or producer.op != "DequantizeLinear" or not isinstance(producer.inputs[1], gs.Constant):
        return None
    return producer.inputs[1]


def _constant_input_stem(node: gs.Node, port: int) -> str:
    """Name stem for tensors replacing input `port`: the constant's own name, or a new one for a missing input."""
    if port < len(node.inputs):
        if not isinstance(node.inputs[port], gs.Constant):
            raise UnknownNameError(f"input {port} of node {node.name!r} is not a constant")
        return node.inputs[port].name
    return f"{node.name}_in{port}"


def _set_constant_input(ctx: _Context, cmd: SetConstantInput) -> None:
    set_constant_input(ctx.nodes[cmd.node], cmd.port, cmd.values)


def _slice_channels(ctx: _Context, cmd: SliceChannels) -> None:
    node = ctx.nodes[cmd.node]
    source = node.inputs[cmd.port] if cmd.port < len(node.inputs) else None
    if isinstance(source, gs.Constant):
        set_constant_input(node, cmd.port, _sliced(source.values, cmd))
        return
    producer = source.inputs[0] if source is not None and source.inputs else None
    if producer is None or producer.op != "DequantizeLinear" or not isinstance(producer.inputs[0], gs.Constant):
        raise UnknownNameError(f"input {cmd.port} of node {node.name!r} is neither a constant nor dequantized from one")
    values = producer.inputs[0].values
    axis = cmd.axis % values.ndim
    set_constant_input(producer, 0, _sliced(values, cmd))
    if producer.attrs.get("axis", 1) % values.ndim == axis:
        for port in (1, 2):  # per-channel scale and zero-point along the sliced axis
            parameter = producer.inputs[port] if port < len(producer.inputs) else None
            if isinstance(parameter, gs.Constant) and parameter.values.ndim == 1:
                # In place: the bias's scale is computed from the same weight scale (DequantizeBias).
                parameter.values = np.take(parameter.values, cmd.kept)
    source.shape = None  # stale; the exported file leaves shapes out


def _sliced(values: np.ndarray, cmd: SliceChannels) -> np.ndarray:
    if cmd.groups == 1:
        return np.take(values, cmd.kept, axis=cmd.axis)
    size = values.shape[cmd.axis] * cmd.groups
    share = size // cmd.groups
    blocks = np.split(values, cmd.groups, axis=0)
    return np.concatenate([np.take(b, cmd.kept[(cmd.kept >= j * share) & (cmd.kept < (j + 1) * share)] - j * share,
                                   axis=cmd.axis) for j, b in enumerate(blocks)], axis=0)


def _set_attribute(ctx: _Context, cmd: SetAttribute) -> None:
    ctx.nodes[cmd.node].attrs[cmd.name] = cmd.value


def _mask_weight(ctx: _Context, cmd: MaskWeight) -> None:
    node = ctx.nodes[cmd.node]
    weight = node.inputs[cmd.port] if cmd.port < len(node.inputs) else None
    # A constant weight, or one an earlier mask multiplied (filter pruning, then sparsity).
    previous = weight.inputs[0] if isinstance(weight, gs.Variable) and weight.inputs else None
    if not isinstance(weight, gs.Constant) and not (previous is not None and previous.op == "Mul"
                                                    and weight.name.endswith(".applied")):
        raise UnknownNameError(f"input {cmd.port} of node {node.name!r} is not a constant weight")
    if {cmd.mask, f"{cmd.mask}.applied", f"{cmd.mask}.Mul"} & ctx.used:
        raise ValueError(f"mask {cmd.mask!r}: a tensor of that name exists already")
    shape = tuple(weight.values.shape) if isinstance(weight, gs.Constant) else tuple(weight.shape)
    dtype = weight.values.dtype if isinstance(weight, gs.Constant) else weight.dtype
    if tuple(cmd.values.shape) != shape:
        raise ValueError(f"mask {cmd.mask!r} is shaped {list(cmd.values.shape)}, the weight of {node.name!r} "
                         f"{list(shape)}")
    mask = gs.Constant(cmd.mask, np.asarray(cmd.values, dtype))
    masked = gs.Variable(f"{cmd.mask}.applied", dtype=dtype, shape=list(shape))
    ctx.graph.nodes.append(gs.Node("Mul", f"{cmd.mask}.Mul", inputs=[weight, mask], outputs=[masked]))
    node.inputs[cmd.port] = masked
    ctx.tensors[mask.name], ctx.tensors[masked.name] = mask, masked
    ctx.used |= {mask.name, masked.name, f"{cmd.mask}.Mul"}


def _fake_quantize(ctx: _Context, cmd: FakeQuantize) -> None:
    insert_fake_quantize(ctx.graph, ctx.tensors, [ctx.nodes[name] for name in cmd.consumers], cmd)


def _fake_quantize_bias(ctx: _Context, cmd: FakeQuantizeBias) -> None:
    if not {cmd.input_step, cmd.weight_step} <= ctx.tensors.keys():
        raise UnknownNameError(f"bias of {cmd.node!r}: no step tensor {cmd.input_step!r} or {cmd.weight_step!r} "
                               "(insert its quantizers first)")
    fake_quantize_bias(ctx.graph, ctx.tensors, ctx.nodes[cmd.node], cmd)


def _complexity_loss(ctx: _Context, cmd: ComplexityLoss) -> None:
    if not set(cmd.logits) <= ctx.tensors.keys():
        raise UnknownNameError(f"complexity loss {cmd.name!r}: insert its gates first")
    insert_complexity_loss(ctx.graph, ctx.tensors, cmd)


#: Each command's phase and the function that executes it.
_HANDLERS: dict[type, tuple[Phase, Callable[[_Context, Command], None]]] = {
    SetConstantInput: (Phase.SET_CONSTANTS, _set_constant_input),
    SetAttribute: (Phase.SET_CONSTANTS, _set_attribute),
    SliceChannels: (Phase.SET_CONSTANTS, _slice_channels),
    ScaleActivation: (Phase.REWIRE_INPUTS, _scale_activation),
    MaskWeight: (Phase.GATE_WEIGHTS, _mask_weight),
    StochasticGateWeight: (Phase.GATE_WEIGHTS,
                           lambda ctx, cmd: insert_stochastic_gate(ctx.graph, ctx.tensors, ctx.nodes[cmd.node], cmd)),
    QuantizeDequantize: (Phase.QUANTIZE, _insert_qdq),
    DequantizeWeight: (Phase.QUANTIZE, _dequantize_weight),
    FakeQuantize: (Phase.QUANTIZE, _fake_quantize),
    FakeQuantizeWeight: (Phase.QUANTIZE,
                         lambda ctx, cmd: fake_quantize_weight(ctx.graph, ctx.tensors, ctx.nodes[cmd.node], cmd)),
    DequantizeBias: (Phase.QUANTIZE_BIASES, _dequantize_bias),
    FakeQuantizeBias: (Phase.QUANTIZE_BIASES, _fake_quantize_bias),
    ComplexityLoss: (Phase.LOSSES, _complexity_loss),
}
