"""SmoothQuant scale migration (Xiao et al.) for MatMuls fed by a LayerNormalization.

Transformer activations have a few outlier channels that waste the INT8 range. For each input channel j of the
MatMuls reading a LayerNorm output, s_j = max|X_j|^α / max|W_j|^(1-α) moves range from activations to weights:
X' = X / s (folded into the LayerNorm's scale and bias, so no op is added) and W' = diag(s) · W. The float
model's output is unchanged; the INT8 model's error drops because X' has no outlier channels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.runtime.calibration import Statistic, StatisticRequest, TensorStatistics
from onnxcompress.transforms.commands import SetConstantInput
from onnxcompress.transforms.op_table import constant_weight

_MIN_SCALE = 1e-5


@dataclass(frozen=True)
class SmoothTarget:
    tensor: str
    layer_norm: str
    matmuls: tuple[str, ...]
    channels: int


def smoothing_targets(graph: gs.Graph, ignored: frozenset[str]) -> list[SmoothTarget]:
    """LayerNorm outputs read only by MatMuls with constant 2-D weights, none of them ignored."""
    targets = []
    for node in graph.nodes:
        if node.op != "LayerNormalization" or node.name in ignored or len(node.inputs) < 3:
            continue
        if not all(isinstance(t, gs.Constant) for t in node.inputs[1:3]) or node.attrs.get("axis", -1) != -1:
            continue
        readers = node.outputs[0].outputs
        weights = [constant_weight(r) if r.op == "MatMul" else None for r in readers]
        if not readers or any(w is None or w.values.ndim != 2 for w in weights) or \
                any(r.name in ignored for r in readers):
            continue
        targets.append(SmoothTarget(node.outputs[0].name, node.name, tuple(r.name for r in readers),
                                    weights[0].values.shape[0]))
    return targets


def abs_max_requests(targets: list[SmoothTarget]) -> list[StatisticRequest]:
    return [StatisticRequest(t.tensor, Statistic.CHANNEL_ABS_MAX, axis=-1, channels=t.channels) for t in targets]


def smoothing_commands(graph: gs.Graph, targets: list[SmoothTarget], stats: dict[str, TensorStatistics],
                       alpha: float) -> list[SetConstantInput]:
    nodes = {n.name: n for n in graph.nodes}
    commands = []
    for target in targets:
        weights = [constant_weight(nodes[name]).values for name in target.matmuls]
        weight_max = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
        act_max = stats[target.tensor].channel_abs_max
        scale = np.power(np.maximum(act_max, _MIN_SCALE), alpha) / np.power(np.maximum(weight_max, _MIN_SCALE),
                                                                             1 - alpha)
        scale = np.maximum(scale, _MIN_SCALE).astype(np.float32)
        layer_norm = nodes[target.layer_norm]
        commands += [SetConstantInput(target.layer_norm, 1, layer_norm.inputs[1].values / scale),
                     SetConstantInput(target.layer_norm, 2, layer_norm.inputs[2].values / scale)]
        commands += [SetConstantInput(name, 1, w * scale[:, None]) for name, w in zip(target.matmuls, weights)]
    return commands
