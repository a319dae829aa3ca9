"""Magnitude sparsity, fine-tuned (NNCF paper §4.3): frozen 0/1 masks multiply the float weights; the scheduler
raises the level and recomputes the masks from the current weights' importance; the other weights keep training.

    build: masks at the initial level (the returned float model holds the masked weights, so that algorithms
    stacked after it calibrate on them)  →  training commands MaskWeight (weight · mask)  →  after every epoch (or
    step, with update_per_step) until freeze_epoch: level from the schedule, masks from the current weights  →
    export: each weight times its trained mask (exact zeros, kept exact by quantization).

Stacked after filter pruning, the level counts only the weights its surgery keeps (`BuildContext.surviving_weights`):
the pruned filters' and inputs' weights are zeroed on top, so the exported file has the level. Masks frozen before
pruning's last change keep their zeros; the level of what survives then drifts (the statistics show it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxcompress.algorithms.quantization.ptq import export_graph, resolve_ignored_scope
from onnxcompress.algorithms.sparsity.masks import (
    SparsityTarget,
    alive_elements,
    compute_masks,
    sparsity,
    sparsity_targets,
)
from onnxcompress.algorithms.sparsity.schedule import AdaptiveLevel, planned_level
from onnxcompress.compression.api import (
    BuildContext,
    CompressionController,
    CompressionScheduler,
    ParameterReader,
    Parameters,
    Stage,
    SurvivingWeights,
)
from onnxcompress.config import MagnitudeSparsityConfig, SparsitySchedule
from onnxcompress.transforms.applier import apply_commands
from onnxcompress.transforms.commands import Command, MaskWeight, SetConstantInput

Batches = Iterable[Mapping[str, np.ndarray]]


class MagnitudeSparsityScheduler(CompressionScheduler):
    """Level and masks over training; state: finished epochs, steps into the current epoch, the adaptive level."""

    def __init__(self, targets: list[SparsityTarget], config: MagnitudeSparsityConfig, steps_per_epoch: int,
                 surviving: SurvivingWeights) -> None:
        self.targets, self.config, self.steps_per_epoch = targets, config, max(steps_per_epoch, 1)
        self.surviving = surviving
        self.epoch, self.step_in_epoch = 0, 0
        self.adaptive = AdaptiveLevel(config.schedule.initial_level)
        self.level = config.schedule.initial_level

    @property
    def complete(self) -> bool:
        return self.level >= self.config.schedule.target_level

    def masks(self, read: ParameterReader, level: float) -> dict[str, np.ndarray]:
        self.level = level
        weights = read([t.weight for t in self.targets])
        return compute_masks(self.targets, weights, level, self.config.importance, self.config.threshold,
                             self.alive())

    def alive(self) -> dict[str, np.ndarray]:
        """The elements the level counts: those the stack's earlier algorithms leave (filter pruning's kept
        channels), by mask name."""
        return alive_elements(self.targets, self.surviving())

    def step(self, read: ParameterReader) -> dict[str, np.ndarray]:
        self.step_in_epoch += 1
        schedule = self.config.schedule
        if not schedule.update_per_step or self._frozen():
            return {}
        level = planned_level(schedule, self.epoch + self.step_in_epoch / self.steps_per_epoch)
        return self.masks(read, level) if level != self.level else {}

    def epoch_step(self, read: ParameterReader) -> dict[str, np.ndarray]:
        self.epoch, self.step_in_epoch = self.epoch + 1, 0
        if self._frozen():
            return {}
        schedule = self.config.schedule
        if schedule.schedule is SparsitySchedule.ADAPTIVE:
            masks = read([t.mask for t in self.targets])
            return self.masks(read, self.adaptive.update(schedule, sparsity(masks, self.alive())))
        return self.masks(read, planned_level(schedule, self.epoch))

    def _frozen(self) -> bool:
        freeze = self.config.schedule.freeze_epoch
        return freeze is not None and self.epoch > freeze

    def state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "level": self.level,
                "adaptive_level": self.adaptive.level, "epochs_close": self.adaptive.epochs_close}

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.epoch, self.step_in_epoch, self.level = state["epoch"], state["step_in_epoch"], state["level"]
        self.adaptive = AdaptiveLevel(state["adaptive_level"], state["epochs_close"])


class MagnitudeSparsityController(CompressionController):
    """Masks on the weights of `targets` (see the module docstring)."""

    name = "magnitude_sparsity"
    stage = Stage.SPARSITY

    def __init__(self, targets: list[SparsityTarget], config: MagnitudeSparsityConfig,
                 weights: Mapping[str, np.ndarray], context: BuildContext) -> None:
        super().__init__()
        self.targets = targets
        self.scheduler = MagnitudeSparsityScheduler(targets, config, context.steps_per_epoch,
                                                    context.surviving_weights)
        self._initial_masks = self.scheduler.masks(lambda names: {n: weights[n] for n in names},
                                                   planned_level(config.schedule, 0))

    @classmethod
    def build(cls, model: onnx.ModelProto, batches: Callable[[], Batches], config: MagnitudeSparsityConfig,
              context: BuildContext) -> tuple[MagnitudeSparsityController, onnx.ModelProto]:
        """Masks at the initial level for `model` (preprocessed); returns the controller and `model` with its
        weights masked. Magnitude sparsity needs no data."""
        graph = gs.import_onnx(model)
        targets = sparsity_targets(graph, resolve_ignored_scope(graph, config.ignored_scope))
        tensors = graph.tensors()
        weights = {t.weight: tensors[t.weight].values for t in targets}
        controller = cls(targets, config, weights, context)
        apply_commands(graph, controller.export_commands(graph, controller.frozen_parameters))
        return controller, export_graph(graph, model)

    @property
    def training_commands(self) -> list[Command]:
        return [MaskWeight(t.node, t.port, t.mask, self._initial_masks[t.mask]) for t in self.targets]

    @property
    def trainable_parameters(self) -> dict[str, np.ndarray]:
        return {}

    @property
    def frozen_parameters(self) -> dict[str, np.ndarray]:
        return dict(self._initial_masks)

    def statistics(self, parameters: Parameters) -> dict[str, float]:
        """The scheduled level, the sparsity of all masked weights, and each layer's (of the elements that survive
        the stack's earlier algorithms)."""
        masks, alive = {t.mask: parameters[t.mask] for t in self.targets}, self.scheduler.alive()
        stats = {"level": float(self.scheduler.level), "sparsity": sparsity(masks, alive)}
        stats.update({f"layer/{t.node}": sparsity({t.mask: masks[t.mask]}, alive) for t in self.targets})
        return stats

    def export_commands(self, graph: gs.Graph, parameters: Parameters) -> list[Command]:
        """Each weight of `graph` times its mask."""
        nodes = {node.name: node for node in graph.nodes}
        return [SetConstantInput(t.node, t.port, nodes[t.node].inputs[t.port].values * parameters[t.mask])
                for t in self.targets]
