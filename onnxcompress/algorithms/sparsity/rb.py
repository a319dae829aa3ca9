"""Regularization-based (L0) sparsity, fine-tuned (NNCF paper §4.3, eq. 6–7).

    build: a stochastic gate per weight (StochasticGateWeight: z = Round(sigmoid(s + logit(u))), straight-through)
    and one complexity loss (ComplexityLoss: (mean sigmoid(s) - (1 - level))²) over every gated weight  →
    training: the loss pulls the kept fraction to 1 - level; after every epoch (until freeze_epoch) the scheduler
    sets the level of the schedule (adaptive: raised once the deterministic gates reach it)  →  evaluation with
    the noise off (z = [s > 0])  →  export: each weight times [s > 0], exact zeros kept by quantization.

The logits learn at their own rate through s = k·δ, as the quantizer ranges do (`quantizer_lr_scale`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxcompress.algorithms.quantization.ptq import resolve_ignored_scope
from onnxcompress.algorithms.quantization.qat import quantizer_lr_scale
from onnxcompress.algorithms.sparsity.masks import SparsityTarget, sparsity, sparsity_targets
from onnxcompress.algorithms.sparsity.schedule import AdaptiveLevel, planned_level
from onnxcompress.compression.api import (
    BuildContext,
    CompressionController,
    CompressionScheduler,
    ParameterReader,
    Parameters,
    Stage,
)
from onnxcompress.config import RBSparsityConfig, SparsitySchedule
from onnxcompress.runtime.training import IDENTITY_GRADIENT, GradientNode
from onnxcompress.transforms.commands import Command, ComplexityLoss, SetConstantInput, StochasticGateWeight

Batches = Iterable[Mapping[str, np.ndarray]]
NOISE = "rb_sparsity.noise"
DENSITY = "rb_sparsity.target_density"
LOSS = "rb_sparsity.loss"


def _gate(target: SparsityTarget, config: RBSparsityConfig, lr_scale: float, index: int) -> StochasticGateWeight:
    return StochasticGateWeight(target.node, target.port, f"{target.node}.rb_gate", config.logit_init, lr_scale,
                                NOISE, seed=float(index + 1))


def deterministic_masks(gates: list[StochasticGateWeight], parameters: Parameters) -> dict[str, np.ndarray]:
    """The gates at evaluation: 1 where the logit s = k·δ is positive."""
    return {g.name: (np.float32(g.lr_scale) * parameters[g.delta] > 0).astype(np.float32) for g in gates}


class RBSparsityScheduler(CompressionScheduler):
    """Sets the target density of the loss after every epoch; state: finished epochs, level, adaptive state."""

    def __init__(self, gates: list[StochasticGateWeight], config: RBSparsityConfig) -> None:
        self.gates, self.config = gates, config
        self.epoch = 0
        self.level = planned_level(config.schedule, 0)
        self.adaptive = AdaptiveLevel(self.level)

    @property
    def complete(self) -> bool:
        return self.level >= self.config.schedule.target_level

    def epoch_step(self, read: ParameterReader) -> dict[str, np.ndarray]:
        self.epoch += 1
        schedule = self.config.schedule
        if schedule.freeze_epoch is not None and self.epoch > schedule.freeze_epoch:
            return {}
        if schedule.schedule is SparsitySchedule.ADAPTIVE:
            measured = sparsity(deterministic_masks(self.gates, read([g.delta for g in self.gates])))
            self.level = self.adaptive.update(schedule, measured)
        else:
            self.level = planned_level(schedule, self.epoch)
        return {DENSITY: np.asarray(1.0 - self.level, np.float32)}

    def state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "level": self.level, "adaptive_level": self.adaptive.level,
                "epochs_close": self.adaptive.epochs_close}

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.epoch, self.level = state["epoch"], state["level"]
        self.adaptive = AdaptiveLevel(state["adaptive_level"], state["epochs_close"])


class RBSparsityController(CompressionController):
    """Stochastic gates and the complexity loss (see the module docstring)."""

    name = "rb_sparsity"
    stage = Stage.SPARSITY

    def __init__(self, targets: list[SparsityTarget], config: RBSparsityConfig, lr_scale: float,
                 shapes: Mapping[str, tuple[int, ...]]) -> None:
        super().__init__()
        self.targets, self.config, self._shapes = targets, config, dict(shapes)
        self.gates = [_gate(t, config, lr_scale, i) for i, t in enumerate(targets)]
        self.scheduler = RBSparsityScheduler(self.gates, config)

    @classmethod
    def build(cls, model: onnx.ModelProto, batches: Callable[[], Batches], config: RBSparsityConfig,
              context: BuildContext) -> tuple[RBSparsityController, onnx.ModelProto]:
        """Gates for the weights of `model` (preprocessed), which is returned unchanged: every gate starts open."""
        graph = gs.import_onnx(model)
        targets = sparsity_targets(graph, resolve_ignored_scope(graph, config.ignored_scope))
        lr_scale = quantizer_lr_scale(config.logit_lr, context.learning_rate, context.optimizer)
        tensors = graph.tensors()
        return cls(targets, config, lr_scale, {t.node: tuple(tensors[t.weight].values.shape) for t in targets}), model

    @property
    def training_commands(self) -> list[Command]:
        loss = ComplexityLoss(LOSS, tuple(g.logits for g in self.gates), DENSITY,
                              1.0 - self.scheduler.level, self.config.loss_weight)
        return [*self.gates, loss]

    @property
    def trainable_parameters(self) -> dict[str, np.ndarray]:
        return {g.delta: np.full(self._shapes[g.node], g.logit0 / g.lr_scale, np.float32) for g in self.gates}

    @property
    def frozen_parameters(self) -> dict[str, np.ndarray]:
        return {NOISE: np.ones((), np.float32), DENSITY: np.asarray(1.0 - self.scheduler.level, np.float32)}

    @property
    def evaluation_parameters(self) -> dict[str, np.ndarray]:
        return {NOISE: np.zeros((), np.float32)}

    @property
    def training_parameters(self) -> dict[str, np.ndarray]:
        return {NOISE: np.ones((), np.float32)}

    @property
    def gradients(self) -> dict[str, tuple[GradientNode, ...]]:
        return {"Round": IDENTITY_GRADIENT}  # the straight-through threshold of the gates

    @property
    def loss_output(self) -> str:
        return LOSS

    def statistics(self, parameters: Parameters) -> dict[str, float]:
        """The scheduled level, the sparsity of the deterministic gates overall and per layer, the mean keep
        probability."""
        masks = deterministic_masks(self.gates, parameters)
        probability = np.concatenate([1 / (1 + np.exp(-g.lr_scale * parameters[g.delta].reshape(-1)))
                                      for g in self.gates])
        stats = {"level": float(self.scheduler.level), "sparsity": sparsity(masks),
                 "mean_keep_probability": float(probability.mean())}
        stats.update({f"layer/{g.node}": sparsity({g.name: masks[g.name]}) for g in self.gates})
        return stats

    def export_commands(self, graph: gs.Graph, parameters: Parameters) -> list[Command]:
        """Each weight of `graph` times its deterministic gate."""
        nodes = {node.name: node for node in graph.nodes}
        masks = deterministic_masks(self.gates, parameters)
        return [SetConstantInput(g.node, g.port, nodes[g.node].inputs[g.port].values * masks[g.name])
                for g in self.gates]
