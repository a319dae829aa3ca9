"""SmoothQuant scale migration (Xiao et al.) for MatMuls with constant weights.

Transformer activations have a few outlier channels that waste the INT8 range. For each input channel j of the
MatMuls reading one activation, s_j = max|X_j|^α / max|W_j|^(1-α) moves range from activations to weights:
X' = X / s and W' = diag(s) · W. When the activation is a LayerNorm output read only by those MatMuls, 1/s is
folded into the LayerNorm's scale and bias (no op is added); otherwise (a post-LN block's LayerNorm also feeds
the residual Add; a GELU output) a Mul by 1/s is inserted for the MatMuls alone, and the other readers keep
the original tensor. The float model's output is unchanged; the INT8 model's error drops because X' has no
outlier channels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.runtime.calibration import Statistic, StatisticRequest, TensorStatistics
from onnxcompress.transforms.commands import ScaleActivation, SetConstantInput
from onnxcompress.transforms.op_table import constant_weight

_MIN_SCALE = 1e-5


@dataclass(frozen=True)
class SmoothTarget:
    """An activation `tensor` and the MatMuls reading it; `layer_norm` names its producer when 1/s can be folded
    there (a LayerNorm with constant affine parameters read by those MatMuls only)."""

    tensor: str
    matmuls: tuple[str, ...]
    channels: int
    layer_norm: str | None = None


def smoothing_targets(graph: gs.Graph, ignored: frozenset[str]) -> list[SmoothTarget]:
    """Activations read by MatMuls with constant 2-D weights (none ignored)."""
    targets = []
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Constant) or not tensor.inputs:
            continue
        readers = [r for r in tensor.outputs if r.op == "MatMul" and r.inputs[0] is tensor and r.name not in ignored]
        weights = [constant_weight(r) for r in readers]
        if not readers or any(w is None or w.values.ndim != 2 for w in weights):
            continue
        if len({w.values.shape[0] for w in weights}) != 1:
            continue
        targets.append(SmoothTarget(tensor.name, tuple(r.name for r in readers), weights[0].values.shape[0],
                                    _foldable_layer_norm(tensor, readers)))
    return targets


def _foldable_layer_norm(tensor: gs.Variable, readers: list[gs.Node]) -> str | None:
    producer = tensor.inputs[0]
    if producer.op != "LayerNormalization" or len(producer.inputs) < 3 or len(tensor.outputs) != len(readers):
        return None
    if not all(isinstance(t, gs.Constant) for t in producer.inputs[1:3]) or producer.attrs.get("axis", -1) != -1:
        return None
    return producer.name


def abs_max_requests(targets: list[SmoothTarget]) -> list[StatisticRequest]:
    return [StatisticRequest(t.tensor, Statistic.CHANNEL_ABS_MAX, axis=-1, channels=t.channels) for t in targets]


def smoothing_commands(graph: gs.Graph, targets: list[SmoothTarget], stats: dict[str, TensorStatistics],
                       alpha: float) -> list[SetConstantInput | ScaleActivation]:
    nodes = {n.name: n for n in graph.nodes}
    commands: list[SetConstantInput | ScaleActivation] = []
    for target in targets:
        weights = [constant_weight(nodes[name]).values for name in target.matmuls]
        weight_max = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
        act_max = stats[target.tensor].channel_abs_max
        scale = np.power(np.maximum(act_max, _MIN_SCALE), alpha) / np.power(np.maximum(weight_max, _MIN_SCALE),
                                                                             1 - alpha)
        scale = np.maximum(scale, _MIN_SCALE).astype(np.float32)
        if target.layer_norm is not None:
            layer_norm = nodes[target.layer_norm]
            commands += [SetConstantInput(target.layer_norm, 1, layer_norm.inputs[1].values / scale),
                         SetConstantInput(target.layer_norm, 2, layer_norm.inputs[2].values / scale)]
        else:
            commands.append(ScaleActivation(target.tensor, (1 / scale).astype(np.float32), target.matmuls))
        commands += [SetConstantInput(name, 1, w * scale[:, None]) for name, w in zip(target.matmuls, weights)]
    return commands
