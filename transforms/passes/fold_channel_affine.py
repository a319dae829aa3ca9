"""Fold a per-channel constant Mul or Add into the BatchNormalization or compute op before it (those the op table
says absorb a channel affine: Conv, ConvTranspose, Gemm).

    conv(x, W, b) * c  =  conv(x, W·c, b·c)          conv(x, W, b) + c  =  conv(x, W, b + c)
    bn(x; γ, β) * c    =  bn(x; γ·c, β·c)            bn(x; γ, β) + c    =  bn(x; γ, β + c)

Caffe-converted models write BatchNorm's affine part as separate Mul/Add "scale layers"; folded, they cost no
extra pass over the activation and no float constants in the quantized file. Only constants that broadcast per
output channel (or are scalars) fold, and only when the producer's output has no other reader.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.transforms.graph import set_channel_bias, set_constant_input
from onnxcompress.transforms.op_table import (
    absorbs_channel_affine,
    channel_bias,
    constant_weight,
    output_channels,
    spec,
    weight_channel_axis,
)

_FOLDABLE = frozenset({"Mul", "Add"})


def fold_channel_affine(graph: gs.Graph) -> bool:
    """Fold every foldable Mul/Add into its producer; return whether the graph changed."""
    changed = False
    for node in [n for n in graph.nodes if n.op in _FOLDABLE]:
        folded = _try_fold(node)
        changed |= folded
    if changed:
        graph.cleanup()
    return changed


def _try_fold(node: gs.Node) -> bool:
    data = [t for t in node.inputs if not isinstance(t, gs.Constant)]
    constants = [t for t in node.inputs if isinstance(t, gs.Constant)]
    if len(data) != 1 or len(constants) != 1 or not data[0].inputs or len(data[0].outputs) != 1:
        return False
    producer = data[0].inputs[0]
    channels = _output_channels(producer)
    if channels is None:
        return False
    factor = _per_channel(constants[0].values, channels, producer)
    if factor is None:
        return False
    if producer.op == "BatchNormalization":
        _fold_into_batchnorm(producer, node.op, factor)
    else:
        _fold_into_compute(producer, node.op, factor)
    result = node.outputs[0]
    node.outputs.clear()
    producer.outputs[0] = result
    return True


def _output_channels(producer: gs.Node) -> int | None:
    if producer.op == "BatchNormalization":
        return len(producer.inputs[1].values) if all(isinstance(t, gs.Constant) for t in producer.inputs[1:5]) \
            else None
    return output_channels(producer) if absorbs_channel_affine(producer) else None


def _per_channel(values: np.ndarray, channels: int, producer: gs.Node) -> np.ndarray | None:
    """The constant as a [channels] vector, if it broadcasts along the producer's channel axis only."""
    values = np.asarray(values, np.float64)
    if values.size == 1:
        return np.full(channels, values.reshape(()))
    # [N, C] or [N, C, H, W]: a BatchNormalization's or convolution's channels are axis 1 of 4.
    channel_axis_from_end = 1 if spec(producer).channel_axis == -1 else 3
    squeezed_shape = [d for d in values.shape if d != 1]
    if squeezed_shape != [channels] or values.ndim > channel_axis_from_end + 1:
        return None
    axis_from_end = values.ndim - next(i for i, d in enumerate(values.shape) if d == channels)
    return values.reshape(-1) if axis_from_end == channel_axis_from_end else None


def _fold_into_batchnorm(bn: gs.Node, op: str, factor: np.ndarray) -> None:
    gamma, beta = (bn.inputs[i].values.astype(np.float64) for i in (1, 2))
    if op == "Mul":
        gamma, beta = gamma * factor, beta * factor
    else:
        beta = beta + factor
    set_constant_input(bn, 1, gamma.astype(np.float32))
    set_constant_input(bn, 2, beta.astype(np.float32))


def _fold_into_compute(node: gs.Node, op: str, factor: np.ndarray) -> None:
    bias = channel_bias(node)
    if op == "Mul":
        weight = constant_weight(node)
        shape = [1] * weight.values.ndim
        shape[weight_channel_axis(node)] = -1
        scaled = (weight.values.astype(np.float64) * factor.reshape(shape)).astype(np.float32)
        set_constant_input(node, spec(node).weight_port, scaled)
        bias = bias * factor
    else:
        bias = bias + factor
    set_channel_bias(node, bias)
