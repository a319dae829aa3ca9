"""Filter importance (lecture 001, "Filter Pruning: Filter Importance Criteria"): per output channel of a compute
op, from its filter F (the weights of that channel).

    l1                ‖F‖₁
    l2                ‖F‖₂
    geometric_median  G(Fᵢ) = Σⱼ ‖Fᵢ − Fⱼ‖₂ over the op's other filters: a filter near the geometric median is
                      the one the others replace best, so it is pruned first
    bn_gamma          |γ| of the BatchNormalization that followed the filter in the user's model (preprocessing
                      folds it into the filter; one-shot pruning only); l2 for groups without one

A group's importance per channel is the sum over the compute ops whose filters it holds.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from onnxcompress.algorithms.pruning.channels import ChannelGroup
from onnxcompress.config import PruningCriterion
from onnxcompress.transforms.op_table import constant_weight, weight_channel_axis


def filter_importance(filters: np.ndarray, criterion: PruningCriterion) -> np.ndarray:
    """Importance of each row of `filters` [channels, weights] (float64)."""
    filters = filters.astype(np.float64)
    if criterion is PruningCriterion.L1:
        return np.abs(filters).sum(axis=1)
    if criterion is PruningCriterion.L2:
        return np.sqrt((filters ** 2).sum(axis=1))
    squared = (filters ** 2).sum(axis=1)
    distances = squared[:, None] + squared[None, :] - 2 * filters @ filters.T
    return np.sqrt(np.maximum(distances, 0)).sum(axis=1)


def batchnorm_gammas(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """|γ| of every BatchNormalization of `model` (before preprocessing folds them), by its output tensor: the
    name the folded compute op's output takes."""
    constants = {i.name: i for i in model.graph.initializer}
    return {n.output[0]: np.abs(numpy_helper.to_array(constants[n.input[1]])).astype(np.float64)
            for n in model.graph.node if n.op_type == "BatchNormalization" and n.input[1] in constants}


def group_importance(graph: gs.Graph, group: ChannelGroup, criterion: PruningCriterion,
                     weights: Mapping[str, np.ndarray] | None = None,
                     gammas: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
    """The summed importance of each channel over the group's compute ops, from their weights in `graph` or, by
    weight name, in `weights` (current values during fine-tuning); bn_gamma reads `gammas` (`batchnorm_gammas`)."""
    nodes = {n.name: n for n in graph.nodes}
    total = np.zeros(group.channels)
    if criterion is PruningCriterion.BN_GAMMA:
        found = [gammas[nodes[p].outputs[0].name] for p in group.producers if nodes[p].outputs[0].name in gammas]
        if found:
            return np.sum(found, axis=0)
        criterion = PruningCriterion.L2  # groups rank their own channels: another criterion does not mix scales
    for producer in group.producers:
        node = nodes[producer]
        constant = constant_weight(node)
        weight = weights[constant.name] if weights is not None else constant.values
        rows = np.moveaxis(weight, weight_channel_axis(node), 0).reshape(weight.shape[weight_channel_axis(node)], -1)
        total += filter_importance(rows, criterion)
    return total
