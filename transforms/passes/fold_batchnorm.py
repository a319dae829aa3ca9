"""Fold BatchNormalization into the op that feeds it, when the op table says it absorbs a channel affine
(Conv, ConvTranspose, Gemm).

    y = gamma * (conv(x, W) + b - mean) / sqrt(var + eps) + beta
      = conv(x, W * k) + (b - mean) * k + beta,      k = gamma / sqrt(var + eps) per output channel

Only folds when the compute op's output is read by the BatchNormalization alone and every parameter is constant,
so the fold leaves nothing unfused behind.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.transforms.graph import set_channel_bias, set_constant_input
from onnxcompress.transforms.op_table import (
    absorbs_channel_affine,
    channel_bias,
    constant_weight,
    spec,
    weight_channel_axis,
)


def fold_batchnorm(graph: gs.Graph) -> bool:
    """Fold every foldable BatchNormalization; return whether the graph changed."""
    changed = False
    for bn in [n for n in graph.nodes if n.op == "BatchNormalization"]:
        producer = _foldable_producer(bn)
        if producer is None:
            continue
        _fold(producer, bn)
        changed = True
    if changed:
        graph.cleanup()
    return changed


def _foldable_producer(bn: gs.Node) -> gs.Node | None:
    if len(bn.outputs) != 1 or not all(isinstance(t, gs.Constant) for t in bn.inputs[1:5]):
        return None
    if not bn.inputs[0].inputs or len(bn.inputs[0].outputs) != 1:
        return None
    producer = bn.inputs[0].inputs[0]
    return producer if absorbs_channel_affine(producer) else None


def _fold(producer: gs.Node, bn: gs.Node) -> None:
    gamma, beta, mean, var = (t.values.astype(np.float64) for t in bn.inputs[1:5])
    k = gamma / np.sqrt(var + bn.attrs.get("epsilon", 1e-5))
    weight = constant_weight(producer)
    shape = [1] * weight.values.ndim
    shape[weight_channel_axis(producer)] = -1
    # float32 product: one more rounding than a float64 one, without a float64 copy of every weight.
    folded_weight = (weight.values * k.astype(np.float32).reshape(shape)).astype(np.float32, copy=False)
    set_constant_input(producer, spec(producer).weight_port, folded_weight)
    set_channel_bias(producer, (channel_bias(producer) - mean) * k + beta)
    # The producer now writes the BatchNormalization's output tensor directly.
    bn_output = bn.outputs[0]
    bn.outputs.clear()
    producer.outputs[0] = bn_output
