"""One-shot filter pruning, without training (`onnxcompress prune`).

    preprocess  →  channel analysis (groups)  →  importance per group (criteria.py)  →  kept channels for the
    target (select.py)  →  with data: the next layers' biases absorb the mean of the inputs they lose  →  surgery
    (channels removed, surgery.py)  →  the file, without the stale inferred shapes

The bias adjustment measures, on the calibration data, each reading layer's mean output change when the pruned
input channels are zeroed (quantization's measured bias correction, the same pass for every layer), and
subtracts it from that layer's bias, so the pruned model keeps the float model's output means.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxcompress.algorithms.pruning.channels import (
    ChannelAnalysis,
    ChannelGroup,
    SliceEdit,
    analyse_channels,
    zero_pruned,
)
from onnxcompress.algorithms.pruning.criteria import batchnorm_gammas, group_importance
from onnxcompress.algorithms.pruning.macs import LayerCost, layer_costs
from onnxcompress.algorithms.pruning.select import Widths, select_channels
from onnxcompress.algorithms.pruning.surgery import surgery_commands
from onnxcompress.algorithms.quantization.bias_correction import measured_bias_shifts
from onnxcompress.algorithms.quantization.placement import bias_target
from onnxcompress.algorithms.quantization.ptq import export_graph, resolve_ignored_scope
from onnxcompress.config import PruneConfig, PruningCriterion
from onnxcompress.errors import PruningError
from onnxcompress.transforms.applier import apply_commands
from onnxcompress.transforms.commands import SetConstantInput
from onnxcompress.transforms.op_table import channel_bias, weight_input_axis
from onnxcompress.transforms.passes import preprocess

Batches = Iterable[Mapping[str, np.ndarray]]
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerChange:
    """One compute op before and after pruning: output and input channels, MACs and weights for one sample."""

    node: str
    op: str
    channels_before: tuple[int, int]
    channels_after: tuple[int, int]
    macs_before: int
    macs_after: int
    weights_before: int
    weights_after: int


@dataclass(frozen=True)
class GroupChange:
    """A channel group: its compute ops, its channels before and after (equal when not pruned), and why not."""

    producers: tuple[str, ...]
    channels_before: int
    channels_after: int
    reason: str | None


@dataclass(frozen=True)
class PruneResult:
    model: onnx.ModelProto
    layers: tuple[LayerChange, ...]
    groups: tuple[GroupChange, ...]
    #: The searched strength of the ranking: under uniform ranking, the fraction of filters each group lost (for
    #: a MAC target, groups given width back lost less).
    strength: float
    #: Layers whose bias absorbed the mean of their pruned inputs (empty without data).
    adjusted: tuple[str, ...]

    @property
    def macs_before(self) -> int:
        return sum(layer.macs_before for layer in self.layers)

    @property
    def macs_after(self) -> int:
        return sum(layer.macs_after for layer in self.layers)

    @property
    def weights_before(self) -> int:
        return sum(layer.weights_before for layer in self.layers)

    @property
    def largest_cut(self) -> float:
        """The largest fraction of filters one group lost."""
        return max((1 - g.channels_after / g.channels_before for g in self.groups), default=0.0)

    @property
    def weights_after(self) -> int:
        return sum(layer.weights_after for layer in self.layers)


def prune_model(model: onnx.ModelProto, config: PruneConfig, batches: Batches | None = None, *,
                total: int | None = None, progress: bool = True) -> PruneResult:
    """Remove `config.target` of the filters (or MACs) of `model`; with `batches`, adjust the next biases."""
    gammas = batchnorm_gammas(model)
    graph = preprocess(model)
    analysis = analyse_channels(graph)
    ignored = resolve_ignored_scope(graph, config.ignored_scope, original=model)
    prunable = [i for i, g in enumerate(analysis.groups) if g.prunable and not set(g.producers) & ignored]
    if not prunable:
        raise PruningError(_nothing_prunable(analysis, ignored))
    costs = layer_costs(graph, analysis)
    if config.criterion is PruningCriterion.BN_GAMMA:
        _check_gammas(graph, analysis, prunable, gammas)
    importance = {i: group_importance(graph, analysis.groups[i], config.criterion, gammas=gammas)
                  for i in prunable}
    keep, strength = select_channels(analysis, importance, costs, config.target, config.target_kind, config.ranking,
                                     Widths(config.min_width, config.channel_multiple))
    adjusted: list[SetConstantInput] = []
    if batches is not None:
        adjusted = _adjusted_biases(graph, model, analysis, keep, batches, total, progress)
        apply_commands(graph, adjusted)
    apply_commands(graph, surgery_commands(graph, analysis, keep))
    # The inferred shapes of the pruned tensors are stale: the file leaves them out, runtimes infer them.
    return PruneResult(export_graph(graph, model, shapes=False), _layer_changes(costs, keep), _group_changes(analysis, keep, ignored), strength,
                       tuple(c.node for c in adjusted))


def _check_gammas(graph: gs.Graph, analysis: ChannelAnalysis, prunable: list[int],
                  gammas: Mapping[str, np.ndarray]) -> None:
    nodes = {n.name: n for n in graph.nodes}
    without = [analysis.groups[i].producers[0] for i in prunable
               if not any(nodes[p].outputs[0].name in gammas for p in analysis.groups[i].producers)]
    if len(without) == len(prunable):
        raise PruningError("criterion bn_gamma: no BatchNormalization follows any prunable filters "
                           "(use l1, l2 or geometric_median)")
    if without:
        _log.info("criterion bn_gamma: %d of %d groups have no BatchNormalization after their filters and are "
                  "ranked by l2 (%s%s)", len(without), len(prunable), ", ".join(without[:4]),
                  " ..." if len(without) > 4 else "")


def _nothing_prunable(analysis: ChannelAnalysis, ignored: frozenset[str]) -> str:
    if not analysis.groups:
        return "the model has no Conv, ConvTranspose, Gemm or MatMul with a constant weight: nothing to prune"
    reasons = sorted({g.reason or "in the ignored scope" for g in analysis.groups})
    return "no channel group can be pruned: " + "; ".join(reasons[:5]) + (" ..." if len(reasons) > 5 else "")


def _adjusted_biases(graph: gs.Graph, model: onnx.ModelProto, analysis: ChannelAnalysis,
                     keep: dict[int, np.ndarray], batches: Batches, total: int | None,
                     progress: bool) -> list[SetConstantInput]:
    """New biases of the layers that read pruned channels, absorbing the mean those inputs contributed."""
    nodes = {n.name: n for n in graph.nodes}
    zeroed: dict[str, SetConstantInput] = {}
    for edit in analysis.edits:
        node = nodes[edit.node]
        if not isinstance(edit, SliceEdit) or edit.port != 1 or edit.axis != weight_input_axis(node) \
                or not edit.layout.spaces & keep.keys() or bias_target(node) is None:
            continue
        weight = np.array(node.inputs[1].values)
        zero_pruned(weight, edit.axis, edit.layout, keep)
        zeroed[node.name] = SetConstantInput(node.name, 1, weight)
    targets = [bias_target(nodes[name]) for name in zeroed]
    if not targets:
        return []
    shifts = measured_bias_shifts(export_graph(graph, model), nodes, targets, list(zeroed.values()), batches, total,
                                  progress)
    return [SetConstantInput(t.node, t.bias_port, (channel_bias(nodes[t.node]) - shifts[t.node]).astype(np.float32))
            for t in targets]


def _layer_changes(costs: list[LayerCost], keep: dict[int, np.ndarray]) -> tuple[LayerChange, ...]:
    return tuple(LayerChange(c.node, c.op, c.channels(), c.channels(keep), c.macs(), c.macs(keep), c.weights(),
                             c.weights(keep)) for c in costs)


def _group_changes(analysis: ChannelAnalysis, keep: dict[int, np.ndarray],
                   ignored: frozenset[str]) -> tuple[GroupChange, ...]:
    def change(group: ChannelGroup) -> GroupChange:
        after = len(keep[group.spaces[0]]) if group.spaces[0] in keep else group.channels
        reason = group.reason or ("in the ignored scope" if set(group.producers) & ignored else None)
        return GroupChange(group.producers, group.channels, after, reason)
    return tuple(change(g) for g in analysis.groups)
