"""Small graph-editing helpers shared by passes and the applier."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from onnxcompress.transforms.op_table import spec


def set_constant_input(node: gs.Node, port: int, values: np.ndarray) -> None:
    """Give `node` constant input `port` with `values`, appending it when it is the next missing input.

    A constant read only by `node` is updated in place and keeps its name, so folding passes do not grow names
    (and the file) with every rewrite; a shared constant is left alone and `node` gets its own copy. A constant
    that was read from external data holds its new values in memory.
    """
    if port < len(node.inputs):
        current = node.inputs[port]
        if isinstance(current, gs.Constant) and current.outputs == [node]:
            current.values = np.asarray(values)
            current.data_location = None
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


class MappedValues(LazyValues):
    """The values of a constant whose tensor is in external data, read through `read` (a checked memory map)
    whenever they are loaded. The exporter writes the tensor itself, still a reference to its file."""

    def __init__(self, tensor: onnx.TensorProto, read: Callable[[onnx.TensorProto], np.ndarray]) -> None:
        super().__init__(tensor)
        self._read = read

    def load(self) -> np.ndarray:
        return self._read(self.tensor)


def map_external_constants(graph: gs.Graph, read: Callable[[onnx.TensorProto], np.ndarray]) -> bool:
    """Make every constant of `graph` whose tensor refers to external data load through `read` (onnx-graphsurgeon
    would otherwise read the file relative to the working directory); returns whether any did."""
    changed = False
    for tensor in graph.tensors().values():
        values = getattr(tensor, "_values", None)
        if type(values) is LazyValues and values.tensor.data_location == onnx.TensorProto.EXTERNAL:
            tensor._values = MappedValues(values.tensor, read)
            changed = True
    return changed


def peek_values(constant: gs.Constant) -> np.ndarray:
    """The constant's values without keeping them in the graph: a lazily loaded (or mapped) table is read again
    on each call instead of staying in memory for as long as the graph holds the constant."""
    values = constant._values
    return values.load() if isinstance(values, LazyValues) else values
