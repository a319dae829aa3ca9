"""The commands algorithms emit and `apply_commands` executes: small, frozen, and independent of each other.

An algorithm decides *what* to change (which tensor gets which quantizer, which constant takes which values);
the applier in `transforms.applier` is the one place that knows *how* to edit the graph. Nodes and tensors are
addressed by name, so a plan can be made on one copy of a graph and applied to another.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)
class QuantizeDequantize:
    """Insert QuantizeLinear → DequantizeLinear after `tensor`; `consumers` (node names) read the result.

    The element type of the integer tensor follows `zero_point.dtype` (int8 or uint8). Readers not listed in
    `consumers` (ignored nodes) keep reading the float tensor. With `graph_output`, the graph output named
    `tensor` becomes the dequantized value (same name; the float producer's tensor is renamed).
    """

    tensor: str
    scale: np.ndarray
    zero_point: np.ndarray
    consumers: tuple[str, ...]
    graph_output: bool = False


@dataclass(frozen=True, eq=False)
class DequantizeWeight:
    """Replace constant input `port` of `node` by an integer initializer read through DequantizeLinear.

    Stores only the integer tensor (INT8 on disk) with a per-channel `scale` along `axis`.
    """

    node: str
    port: int
    quantized: np.ndarray
    scale: np.ndarray
    axis: int


@dataclass(frozen=True, eq=False)
class SetConstantInput:
    """Set constant input `port` of `node` to `values`, adding the input if the node has fewer (a missing bias)."""

    node: str
    port: int
    values: np.ndarray


Command = QuantizeDequantize | DequantizeWeight | SetConstantInput
