"""Filter pruning, fine-tuned: frozen masks zero whole channels in the training graph, the schedule raises the
level, and the export removes the pruned channels.

    build: channel analysis of the (preprocessed) float model  →  masks at the initial level on every constant
    that makes a channel (filters, biases, BatchNorm parameters, per-channel constants: the analysis's
    non-reading edits; MaskWeight), the returned float model holding the masked values so that quantization
    calibrates on them  →  after every epoch until the schedule reaches the target: the level of the schedule,
    the kept channels from the current masked weights' importance, new masks  →  export: every masked constant
    times its mask (exact zeros, which quantization keeps), then, after every algorithm's export, the channels
    removed (surgery, also through quantized weights).

The level is a fraction of the target's kind: of each group's filters, or of the model's MACs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxcompress.algorithms.pruning.channels import ChannelAnalysis, SliceEdit, analyse_channels, zero_pruned
from onnxcompress.algorithms.pruning.criteria import group_importance
from onnxcompress.algorithms.pruning.macs import LayerCost, layer_costs
from onnxcompress.algorithms.pruning.select import Keep, Widths, select_channels, total_macs
from onnxcompress.algorithms.pruning.surgery import surgery_commands
from onnxcompress.algorithms.quantization.ptq import export_graph, resolve_ignored_scope
from onnxcompress.compression.api import (
    BuildContext,
    CompressionController,
    CompressionScheduler,
    ParameterReader,
    Parameters,
    Stage,
)
from onnxcompress.config import FilterPruningConfig, PruningSchedule, PruningScheduleConfig
from onnxcompress.errors import PruningError
from onnxcompress.transforms.applier import apply_commands
from onnxcompress.transforms.commands import Command, MaskWeight, SetConstantInput
from onnxcompress.transforms.op_table import constant_weight, spec

Batches = Iterable[Mapping[str, np.ndarray]]


def planned_level(schedule: PruningScheduleConfig, target: float, epoch: int) -> float:
    """The level from epoch `epoch` on (0 = before training)."""
    if epoch < schedule.num_init_steps:
        return schedule.initial_level
    if schedule.schedule is PruningSchedule.BASELINE or epoch >= schedule.last_change_epoch:
        return target
    progress = (epoch - schedule.num_init_steps) / schedule.pruning_steps
    initial = schedule.initial_level
    if schedule.schedule is PruningSchedule.EXPONENTIAL:
        return 1.0 - (1.0 - initial) * ((1.0 - target) / (1.0 - initial)) ** progress
    return initial + (target - initial) * (1.0 - np.exp(-3.0 * progress)) / (1.0 - np.exp(-3.0))


class _Plan:
    """What the controller and its scheduler share: the analysis, the groups that may lose channels, the layer
    costs and the masked constants."""

    def __init__(self, graph: gs.Graph, config: FilterPruningConfig, ignored: frozenset[str]) -> None:
        self.graph, self.config = graph, config
        self.analysis: ChannelAnalysis = analyse_channels(graph)
        self.prunable = [i for i, g in enumerate(self.analysis.groups)
                         if g.prunable and not set(g.producers) & ignored]
        if not self.prunable:
            raise PruningError("no channel group can be pruned: "
                               + "; ".join(sorted({g.reason or "in the ignored scope" for g in self.analysis.groups})))
        self.costs: list[LayerCost] = layer_costs(graph, self.analysis)
        nodes = {n.name: n for n in graph.nodes}
        # Weights (two or more axes) whose slices go with pruned channels, with the edits that slice them.
        self.sliced: dict[str, tuple[tuple[int, ...], list[SliceEdit]]] = {}
        for edit in self.analysis.edits:
            constant = nodes[edit.node].inputs[edit.port] if isinstance(edit, SliceEdit) else None
            if isinstance(constant, gs.Constant) and constant.values.ndim >= 2 and edit.groups == 1:
                self.sliced.setdefault(constant.name, (constant.values.shape, []))[1].append(edit)
        # Constants that make channels, by (node, port), with their shapes and mask names.
        self.masked: dict[tuple[str, int], tuple[str, tuple[int, ...]]] = {}
        for edit in self.analysis.edits:
            if isinstance(edit, SliceEdit) and not edit.reads:
                constant = nodes[edit.node].inputs[edit.port]
                self.masked[(edit.node, edit.port)] = (f"{edit.node}.in{edit.port}.filter_mask", constant.values.shape)
        # The filters importance reads, by weight name, with their masks.
        self.filter_masks = {constant_weight(nodes[p]).name: self.masked[(p, spec(nodes[p]).weight_port)][0]
                             for i in self.prunable for p in self.analysis.groups[i].producers}

    def keep(self, level: float, weights: Mapping[str, np.ndarray] | None) -> Keep:
        if level <= 0:
            return {}
        importance = {i: group_importance(self.graph, self.analysis.groups[i], self.config.criterion,
                                          weights) for i in self.prunable}
        return select_channels(self.analysis, importance, self.costs, level, self.config.target_kind,
                               self.config.ranking, Widths(self.config.min_width, self.config.channel_multiple))[0]

    def masks(self, keep: Keep) -> dict[str, np.ndarray]:
        masks = {name: np.ones(shape, np.float32) for name, shape in self.masked.values()}
        for edit in self.analysis.edits:
            if isinstance(edit, SliceEdit) and not edit.reads and edit.layout.spaces & keep.keys():
                zero_pruned(masks[self.masked[(edit.node, edit.port)][0]], edit.axis, edit.layout, keep)
        return masks


    def surviving(self, keep: Keep) -> dict[str, np.ndarray]:
        """Which elements of each sliced weight the surgery keeps (a grouped convolution's input slices count as
        kept)."""
        masks = {}
        for name, (shape, edits) in self.sliced.items():
            if any(edit.layout.spaces & keep.keys() for edit in edits):
                masks[name] = np.ones(shape, bool)
                for edit in edits:
                    zero_pruned(masks[name], edit.axis, edit.layout, keep)
        return masks


class FilterPruningScheduler(CompressionScheduler):
    """Level and kept channels over the epochs; state: finished epochs, the level, the kept channels."""

    def __init__(self, plan: _Plan, config: FilterPruningConfig, keep: Keep) -> None:
        self.plan, self.config = plan, config
        self.epoch = 0
        self.level = planned_level(config.schedule, config.target, 0)
        self.kept = keep

    @property
    def complete(self) -> bool:
        return self.level >= self.config.target

    def epoch_step(self, read: ParameterReader) -> dict[str, np.ndarray]:
        self.epoch += 1
        level = planned_level(self.config.schedule, self.config.target, self.epoch)
        if level == self.level:
            return {}
        self.level = level
        # Importance of the masked weights: a pruned filter stays pruned as the level rises.
        values = read([*self.plan.filter_masks, *self.plan.filter_masks.values()])
        current = {weight: values[weight] * values[mask] for weight, mask in self.plan.filter_masks.items()}
        self.kept = self.plan.keep(level, current)
        return self.plan.masks(self.kept)

    def state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "level": self.level,
                "kept": {str(space): channels.tolist() for space, channels in self.kept.items()}}

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.epoch, self.level = state["epoch"], state["level"]
        self.kept = {int(space): np.asarray(channels, np.int64) for space, channels in state["kept"].items()}


class FilterPruningController(CompressionController):
    """Masks that zero whole channels (see the module docstring)."""

    name = "filter_pruning"
    stage = Stage.PRUNING

    def __init__(self, plan: _Plan, config: FilterPruningConfig) -> None:
        super().__init__()
        self.plan = plan
        keep = plan.keep(planned_level(config.schedule, config.target, 0), None)
        self.scheduler = FilterPruningScheduler(plan, config, keep)
        self._initial_masks = plan.masks(keep)

    @classmethod
    def build(cls, model: onnx.ModelProto, batches: Callable[[], Batches], config: FilterPruningConfig,
              context: BuildContext) -> tuple[FilterPruningController, onnx.ModelProto]:
        """Masks at the initial level for `model` (preprocessed); returns the controller and `model` with them
        applied. The final target is checked now: a MAC target out of reach fails before training."""
        graph = gs.import_onnx(model)
        plan = _Plan(graph, config, resolve_ignored_scope(graph, config.ignored_scope))
        plan.keep(config.target, None)
        controller = cls(plan, config)
        masked = gs.import_onnx(model)
        apply_commands(masked, controller.export_commands(masked, controller.frozen_parameters))
        return controller, export_graph(masked, model)

    @property
    def training_commands(self) -> list[Command]:
        return [MaskWeight(node, port, name, self._initial_masks[name])
                for (node, port), (name, _) in self.plan.masked.items()]

    @property
    def trainable_parameters(self) -> dict[str, np.ndarray]:
        return {}

    @property
    def frozen_parameters(self) -> dict[str, np.ndarray]:
        return dict(self._initial_masks)

    def statistics(self, parameters: Parameters) -> dict[str, float]:
        """The scheduled level, the MACs left, and each pruned group's kept fraction (by its first compute op)."""
        kept = self.scheduler.kept
        stats = {"level": float(self.scheduler.level),
                 "mac_reduction": 1 - total_macs(self.plan.costs, kept) / total_macs(self.plan.costs)}
        for index in self.plan.prunable:
            group = self.plan.analysis.groups[index]
            count = len(kept[group.spaces[0]]) if group.spaces[0] in kept else group.channels
            stats[f"kept/{group.producers[0]}"] = count / group.channels
        return stats

    def export_commands(self, graph: gs.Graph, parameters: Parameters) -> list[Command]:
        """Every masked constant of `graph` times its mask."""
        nodes = {node.name: node for node in graph.nodes}
        return [SetConstantInput(node, port, nodes[node].inputs[port].values * parameters[name])
                for (node, port), (name, _) in self.plan.masked.items()]

    def surviving_weights(self) -> dict[str, np.ndarray]:
        """The filters and next layers' input slices of the channels kept now."""
        return self.plan.surviving(self.scheduler.kept)

    def finish_commands(self, graph: gs.Graph) -> list[Command]:
        """The pruned channels removed from the exported `graph` (float or quantized)."""
        return surgery_commands(graph, self.plan.analysis, self.scheduler.kept)
