"""Filter importance (lecture 001, "Filter Pruning: Filter Importance Criteria"): per output channel of a compute
op, from its filter F (the weights of that channel).

    l1                ‖F‖₁
    l2                ‖F‖₂
    geometric_median  G(Fᵢ) = Σⱼ ‖Fᵢ − Fⱼ‖₂ over the op's other filters: a filter near the geometric median is
                      the one the others replace best, so it is pruned first

A group's importance per channel is the sum over the compute ops whose filters it holds.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.algorithms.pruning.channels import ChannelAnalysis, ChannelGroup
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


def group_importance(graph: gs.Graph, analysis: ChannelAnalysis, group: ChannelGroup, criterion: PruningCriterion,
                     weights: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
    """The summed importance of each channel over the group's compute ops, from their weights in `graph` or, by
    weight name, in `weights` (current values during fine-tuning)."""
    nodes = {n.name: n for n in graph.nodes}
    total = np.zeros(group.channels)
    for producer in group.producers:
        node = nodes[producer]
        constant = constant_weight(node)
        weight = weights[constant.name] if weights is not None else constant.values
        rows = np.moveaxis(weight, weight_channel_axis(node), 0).reshape(weight.shape[weight_channel_axis(node)], -1)
        total += filter_importance(rows, criterion)
    return total
