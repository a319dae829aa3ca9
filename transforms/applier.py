"""Execute a list of commands (transforms.commands) on an onnx-graphsurgeon graph.

The applier is the only code that edits graphs for algorithms: it resolves names once, applies each command in
order and reports unknown names as errors, so a stale plan never edits the wrong node silently.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.transforms.commands import (
    Command,
    ComplexityLoss,
    DequantizeBias,
    DequantizeWeight,
    FakeQuantize,
    FakeQuantizeBias,
    FakeQuantizeWeight,
    MaskWeight,
    QuantizeDequantize,
    ScaleActivation,
    SetConstantInput,
    StochasticGateWeight,
)
from onnxcompress.transforms.fake_quantize import fake_quantize_bias, fake_quantize_weight, insert_fake_quantize
from onnxcompress.transforms.graph import set_constant_input, set_input
from onnxcompress.transforms.stochastic_gate import insert_complexity_loss, insert_stochastic_gate
from onnxcompress.transforms.op_table import spec


class UnknownNameError(KeyError):
    """A command names a node or tensor that the graph does not have."""


def apply_commands(graph: gs.Graph, commands: Iterable[Command]) -> gs.Graph:
    """Apply `commands` in order, then clean up and sort the graph; returns the same graph object."""
    nodes = {n.name: n for n in graph.nodes}
    tensors = graph.tensors()
    for command in commands:
        if isinstance(command, QuantizeDequantize):
            _insert_qdq(graph, tensors, nodes, command)
        elif isinstance(command, DequantizeWeight):
            _dequantize_weight(graph, _node(nodes, command.node), command)
        elif isinstance(command, DequantizeBias):
            _dequantize_bias(graph, _node(nodes, command.node), command)
        elif isinstance(command, SetConstantInput):
            _set_constant_input(_node(nodes, command.node), command)
        elif isinstance(command, ScaleActivation):
            _scale_activation(graph, tensors, nodes, command)
        elif isinstance(command, FakeQuantize):
            if command.tensor not in tensors:
                raise UnknownNameError(f"no tensor named {command.tensor!r}")
            insert_fake_quantize(graph, tensors, [_node(nodes, name) for name in command.consumers], command)
        elif isinstance(command, FakeQuantizeWeight):
            fake_quantize_weight(graph, tensors, _node(nodes, command.node), command)
        elif isinstance(command, FakeQuantizeBias):
            if not {command.input_step, command.weight_step} <= tensors.keys():
                raise UnknownNameError(f"bias of {command.node!r}: no step tensor {command.input_step!r} or "
                                       f"{command.weight_step!r} (insert its quantizers first)")
            fake_quantize_bias(graph, tensors, _node(nodes, command.node), command)
        elif isinstance(command, MaskWeight):
            _mask_weight(graph, tensors, _node(nodes, command.node), command)
        elif isinstance(command, StochasticGateWeight):
            insert_stochastic_gate(graph, tensors, _node(nodes, command.node), command)
        elif isinstance(command, ComplexityLoss):
            if not set(command.logits) <= tensors.keys():
                raise UnknownNameError(f"complexity loss {command.name!r}: insert its gates first")
            insert_complexity_loss(graph, tensors, command)
        else:
            raise TypeError(f"not a command: {command!r}")
    return graph.cleanup().toposort()


def _node(nodes: dict[str, gs.Node], name: str) -> gs.Node:
    try:
        return nodes[name]
    except KeyError:
        raise UnknownNameError(f"no node named {name!r}") from None


def _source_and_readers(tensors: dict, nodes: dict[str, gs.Node], tensor: str,
                        consumers: tuple[str, ...]) -> tuple[gs.Tensor, list[gs.Node]]:
    if tensor not in tensors:
        raise UnknownNameError(f"no tensor named {tensor!r}")
    return tensors[tensor], [_node(nodes, name) for name in consumers]


def _insert_qdq(graph: gs.Graph, tensors: dict, nodes: dict[str, gs.Node], cmd: QuantizeDequantize) -> None:
    source, readers = _source_and_readers(tensors, nodes, cmd.tensor, cmd.consumers)
    scale = gs.Constant(f"{cmd.tensor}_scale", np.asarray(cmd.scale, np.float32))
    zero_point = gs.Constant(f"{cmd.tensor}_zp", np.asarray(cmd.zero_point))
    quantized = gs.Variable(f"{cmd.tensor}_q", dtype=zero_point.values.dtype, shape=source.shape)
    dequantized = gs.Variable(f"{cmd.tensor}_dq", dtype=np.float32, shape=source.shape)
    graph.nodes.append(gs.Node("QuantizeLinear", f"{cmd.tensor}_Q",
                               inputs=[source, scale, zero_point], outputs=[quantized]))
    graph.nodes.append(gs.Node("DequantizeLinear", f"{cmd.tensor}_DQ",
                               inputs=[quantized, scale, zero_point], outputs=[dequantized]))
    for reader in readers:
        _replace_input(reader, source, dequantized)
    if cmd.graph_output:
        # Keep the model's interface: the dequantized tensor takes over the output name.
        graph.outputs[graph.outputs.index(source)] = dequantized
        dequantized.name, source.name = source.name, f"{source.name}_float"
        tensors[source.name] = source
        tensors[dequantized.name] = dequantized


def _scale_activation(graph: gs.Graph, tensors: dict, nodes: dict[str, gs.Node], cmd: ScaleActivation) -> None:
    source, readers = _source_and_readers(tensors, nodes, cmd.tensor, cmd.consumers)
    factor = gs.Constant(f"{cmd.tensor}_smooth_factor", np.asarray(cmd.factor, np.float32))
    scaled = gs.Variable(f"{cmd.tensor}_smooth", dtype=source.dtype, shape=source.shape)
    graph.nodes.append(gs.Node("Mul", f"{cmd.tensor}_smooth_Mul", inputs=[source, factor], outputs=[scaled]))
    for reader in readers:
        _replace_input(reader, source, scaled)
    tensors[scaled.name] = scaled


def _replace_input(node: gs.Node, old: gs.Tensor, new: gs.Tensor) -> None:
    for index, tensor in enumerate(node.inputs):
        if tensor is old:
            node.inputs[index] = new


def _dequantize_weight(graph: gs.Graph, node: gs.Node, cmd: DequantizeWeight) -> None:
    stem = _constant_input_stem(node, cmd.port)
    quantized = gs.Constant(f"{stem}_q", np.ascontiguousarray(cmd.quantized))
    scale = gs.Constant(f"{stem}_scale", np.asarray(cmd.scale, np.float32))
    inputs = [quantized, scale]
    # The zero-point is 0, the default when it is left out; stored only where a runtime's fusion needs it.
    if spec(node).integer_kernel_needs_weight_zero_point:
        inputs.append(gs.Constant(f"{stem}_zp", np.zeros(cmd.scale.shape, cmd.quantized.dtype)))
    dequantized = gs.Variable(f"{stem}_dq", dtype=np.float32, shape=list(cmd.quantized.shape))
    graph.nodes.append(gs.Node("DequantizeLinear", f"{stem}_DQ", attrs={"axis": cmd.axis},
                               inputs=inputs, outputs=[dequantized]))
    try:
        set_input(node, cmd.port, dequantized)
    except IndexError as error:
        raise UnknownNameError(str(error)) from None


def _dequantize_bias(graph: gs.Graph, node: gs.Node, cmd: DequantizeBias) -> None:
    weight_port = spec(node).weight_port
    input_scale = _dequantized_scale(node.inputs[0] if node.inputs else None)
    weight_scale = _dequantized_scale(node.inputs[weight_port] if weight_port is not None and
                                      weight_port < len(node.inputs) else None)
    if input_scale is None or weight_scale is None:
        raise UnknownNameError(f"bias of {node.name!r}: its input and weight must be dequantized first")
    stem = _constant_input_stem(node, cmd.port)
    scale = gs.Variable(f"{stem}_scale", dtype=np.float32, shape=list(weight_scale.shape))
    graph.nodes.append(gs.Node("Mul", f"{stem}_scale_Mul", inputs=[input_scale, weight_scale], outputs=[scale]))
    quantized = gs.Constant(f"{stem}_q", np.ascontiguousarray(cmd.quantized, np.int32))
    dequantized = gs.Variable(f"{stem}_dq", dtype=np.float32, shape=list(cmd.quantized.shape))
    graph.nodes.append(gs.Node("DequantizeLinear", f"{stem}_DQ", attrs={"axis": 0},
                               inputs=[quantized, scale], outputs=[dequantized]))
    try:
        set_input(node, cmd.port, dequantized)
    except IndexError as error:
        raise UnknownNameError(str(error)) from None


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


def _set_constant_input(node: gs.Node, cmd: SetConstantInput) -> None:
    try:
        set_constant_input(node, cmd.port, cmd.values)
    except IndexError as error:
        raise UnknownNameError(str(error)) from None


def _mask_weight(graph: gs.Graph, tensors: dict, node: gs.Node, cmd: MaskWeight) -> None:
    if cmd.port >= len(node.inputs) or not isinstance(node.inputs[cmd.port], gs.Constant):
        raise UnknownNameError(f"input {cmd.port} of node {node.name!r} is not a constant weight")
    if cmd.mask in tensors:
        raise ValueError(f"mask {cmd.mask!r}: a tensor of that name exists already")
    weight = node.inputs[cmd.port]
    if tuple(cmd.values.shape) != tuple(weight.values.shape):
        raise ValueError(f"mask {cmd.mask!r} is shaped {list(cmd.values.shape)}, the weight of {node.name!r} "
                         f"{list(weight.values.shape)}")
    mask = gs.Constant(cmd.mask, np.asarray(cmd.values, weight.values.dtype))
    masked = gs.Variable(f"{cmd.mask}.applied", dtype=weight.values.dtype, shape=list(weight.values.shape))
    graph.nodes.append(gs.Node("Mul", f"{cmd.mask}.Mul", inputs=[weight, mask], outputs=[masked]))
    node.inputs[cmd.port] = masked
    tensors[mask.name], tensors[masked.name] = mask, masked
