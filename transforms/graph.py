"""Small graph-editing helpers shared by passes and the applier."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.transforms.op_table import spec


def set_constant_input(node: gs.Node, port: int, values: np.ndarray) -> None:
    """Give `node` constant input `port` with `values`, appending it when it is the next missing input.

    A constant read only by `node` is updated in place and keeps its name, so folding passes do not grow names
    (and the file) with every rewrite; a shared constant is left alone and `node` gets its own copy.
    """
    if port < len(node.inputs):
        current = node.inputs[port]
        if isinstance(current, gs.Constant) and current.outputs == [node]:
            current.values = np.asarray(values)
            return
    set_input(node, port, gs.Constant(f"{node.name}_in{port}", np.asarray(values)))


def set_input(node: gs.Node, port: int, tensor: gs.Tensor) -> None:
    """Replace input `port` of `node`, or append it when it is the next missing (optional) input."""
    if port < len(node.inputs):
        node.inputs[port] = tensor
    elif port == len(node.inputs):
        node.inputs.append(tensor)
    else:
        raise IndexError(f"node {node.name!r} has no input {port - 1} to add input {port} after")


def set_channel_bias(node: gs.Node, values: np.ndarray) -> None:
    """Make `values` (per output channel) the bias `node` adds, writing its bias input and resetting the attribute
    that scales it (Gemm's beta), so that `op_table.channel_bias(node)` reads `values` back."""
    entry = spec(node)
    set_constant_input(node, entry.bias_port, np.asarray(values, np.float32))
    if entry.bias_scale_attr and entry.bias_scale_attr in node.attrs:
        node.attrs[entry.bias_scale_attr] = 1.0
