"""Regularization-based (L0) sparsity, fine-tuned (NNCF paper §4.3, eq. 6–7).

    build: a stochastic gate per weight (StochasticGateWeight: z = Round(sigmoid(s + logit(u))), straight-through;
    logits s start at logit_init, or proportional to the weights' importance) and one complexity loss
    (ComplexityLoss: (mean sigmoid(s) - (1 - level))²) over every gated weight  →
    training: the loss pulls the kept fraction to 1 - level; the scheduler sets the level of the schedule after
    every epoch, or every step (`update_per_step`; adaptive: raised once the deterministic gates reach it), and
    the step number that seeds the gates' noise after every step  →  freeze (after `freeze_epoch`): the noise
    goes off and the logits are pinned at ±PINNED_LOGIT, so the gates stay [s > 0] while the weights fine-tune
    under them  →  evaluation with the noise off (z = [s > 0])  →  export: each weight times [s > 0], exact zeros
    kept by quantization.

The complexity loss counts every gated weight, also those filter pruning earlier in the stack removes at export;
their gates close first (no task gradient holds them open), so what survives ends sparser than the level.

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
from onnxcompress.algorithms.sparsity.masks import SparsityTarget, importance, sparsity, sparsity_targets
from onnxcompress.algorithms.sparsity.schedule import AdaptiveLevel, planned_level
from onnxcompress.compression.api import (
    BuildContext,
    CompressionController,
    CompressionScheduler,
    ParameterReader,
    Parameters,
    Stage,
)
from onnxcompress.config import RBSparsityConfig, SparsityImportance, SparsitySchedule
from onnxcompress.runtime.training import IDENTITY_GRADIENT, GradientNode
from onnxcompress.transforms.commands import Command, ComplexityLoss, SetConstantInput, StochasticGateWeight
from onnxcompress.transforms.stochastic_gate import counters_used

Batches = Iterable[Mapping[str, np.ndarray]]
NOISE = "rb_sparsity.noise"
STEP = "rb_sparsity.step"
DENSITY = "rb_sparsity.target_density"
LOSS = "rb_sparsity.loss"
#: Frozen logits: sigmoid within 1e-13 of 0 or 1 (next to no gradient reaches them), and far from the sign change
#: that Adam's remaining momentum could reach.
PINNED_LOGIT = 30.0
#: The step input is a float32 scalar, exact below 2^24; the noise sequence repeats after that many steps.
STEP_PERIOD = 1 << 24


def initial_logits(targets: list[SparsityTarget], weights: Mapping[str, np.ndarray],
                   config: RBSparsityConfig) -> dict[str, float | np.ndarray]:
    """By target node: logit_init (constant), or logit_init · importance / threshold (importance: normed |w|, the
    threshold the importance below which the target level's fraction of all gated weights lies), at most
    2·logit_init; constant if that threshold is 0 (the weights are that sparse already). The complexity loss lowers
    all logits alike, so these close the least important gates first."""
    constant = {t.node: config.logit_init for t in targets}
    if config.logit_init_mode == "constant":
        return constant
    scores = {t.node: importance(weights[t.weight], SparsityImportance.NORMED_ABS) for t in targets}
    threshold = np.quantile(np.concatenate(list(scores.values())), config.schedule.target_level)
    if threshold <= 0:
        return constant
    return {t.node: np.minimum(scores[t.node] * (config.logit_init / threshold), 2 * config.logit_init)
            .reshape(weights[t.weight].shape) for t in targets}


def _gates(targets: list[SparsityTarget], logits: Mapping[str, float | np.ndarray],
           shapes: Mapping[str, tuple[int, ...]], lr_scale: float) -> list[StochasticGateWeight]:
    """One gate per target; consecutive counter ranges give every weight its own noise."""
    starts = np.cumsum([0] + [counters_used(shapes[t.node]) for t in targets[:-1]])
    return [StochasticGateWeight(t.node, t.port, f"{t.node}.rb_gate", logits[t.node], lr_scale, NOISE, STEP,
                                 int(start)) for t, start in zip(targets, starts)]


def deterministic_masks(gates: list[StochasticGateWeight], parameters: Parameters) -> dict[str, np.ndarray]:
    """The gates at evaluation: 1 where the logit s = k·δ is positive."""
    return {g.name: (np.float32(g.lr_scale) * parameters[g.delta] > 0).astype(np.float32) for g in gates}


def _density(level: float) -> np.ndarray:
    return np.asarray(1.0 - level, np.float32)


def _noise(on: bool) -> np.ndarray:
    return np.asarray(1.0 if on else 0.0, np.float32)


class RBSparsityScheduler(CompressionScheduler):
    """Sets the step of the noise after every step, the target density of the loss after every epoch (or step),
    and freezes the gates; state: finished epochs, steps (overall and into the epoch), level, adaptive state."""

    def __init__(self, gates: list[StochasticGateWeight], config: RBSparsityConfig, steps_per_epoch: int) -> None:
        self.gates, self.config, self.steps_per_epoch = gates, config, max(steps_per_epoch, 1)
        self.epoch, self.steps, self.step_in_epoch = 0, 0, 0
        self.level = planned_level(config.schedule, 0)
        self.adaptive = AdaptiveLevel(self.level)

    @property
    def complete(self) -> bool:
        return self.level >= self.config.schedule.target_level

    @property
    def frozen(self) -> bool:
        freeze = self.config.schedule.freeze_epoch
        return freeze is not None and self.epoch >= freeze

    @property
    def step_value(self) -> np.ndarray:
        return np.asarray(self.steps % STEP_PERIOD, np.float32)

    def step(self, read: ParameterReader) -> dict[str, np.ndarray]:
        self.steps, self.step_in_epoch = self.steps + 1, self.step_in_epoch + 1
        changes = {STEP: self.step_value}
        schedule = self.config.schedule
        if schedule.update_per_step and not self.frozen and schedule.schedule is not SparsitySchedule.ADAPTIVE:
            self.level = planned_level(schedule, self.epoch + self.step_in_epoch / self.steps_per_epoch)
            changes[DENSITY] = _density(self.level)
        return changes

    def epoch_step(self, read: ParameterReader) -> dict[str, np.ndarray]:
        was_frozen = self.frozen
        self.epoch, self.step_in_epoch = self.epoch + 1, 0
        if was_frozen:
            return {}
        schedule = self.config.schedule
        if schedule.schedule is SparsitySchedule.ADAPTIVE:
            measured = sparsity(deterministic_masks(self.gates, read([g.delta for g in self.gates])))
            self.level = self.adaptive.update(schedule, measured)
        else:
            self.level = planned_level(schedule, self.epoch)
        changes = {DENSITY: _density(self.level)}
        if self.frozen:
            changes.update({**self._pinned_logits(read), NOISE: _noise(False)})
        return changes

    def _pinned_logits(self, read: ParameterReader) -> dict[str, np.ndarray]:
        """The logits at ±PINNED_LOGIT with their current signs: the deterministic gates, fixed."""
        deltas = read([g.delta for g in self.gates])
        return {g.delta: np.where(g.lr_scale * deltas[g.delta] > 0, PINNED_LOGIT, -PINNED_LOGIT).astype(np.float32)
                / np.float32(g.lr_scale) for g in self.gates}

    def state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "steps": self.steps, "step_in_epoch": self.step_in_epoch, "level": self.level,
                "adaptive_level": self.adaptive.level, "epochs_close": self.adaptive.epochs_close}

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.epoch, self.steps, self.step_in_epoch = state["epoch"], state["steps"], state["step_in_epoch"]
        self.level = state["level"]
        self.adaptive = AdaptiveLevel(state["adaptive_level"], state["epochs_close"])


class RBSparsityController(CompressionController):
    """Stochastic gates and the complexity loss (see the module docstring)."""

    name = "rb_sparsity"
    stage = Stage.SPARSITY

    def __init__(self, targets: list[SparsityTarget], config: RBSparsityConfig, lr_scale: float,
                 weights: Mapping[str, np.ndarray], steps_per_epoch: int) -> None:
        super().__init__()
        self.targets, self.config = targets, config
        self._shapes = {t.node: tuple(weights[t.weight].shape) for t in targets}
        self.gates = _gates(targets, initial_logits(targets, weights, config), self._shapes, lr_scale)
        self.scheduler = RBSparsityScheduler(self.gates, config, steps_per_epoch)

    @classmethod
    def build(cls, model: onnx.ModelProto, batches: Callable[[], Batches], config: RBSparsityConfig,
              context: BuildContext) -> tuple[RBSparsityController, onnx.ModelProto]:
        """Gates for the weights of `model` (preprocessed), which is returned unchanged: every gate starts open."""
        graph = gs.import_onnx(model)
        targets = sparsity_targets(graph, resolve_ignored_scope(graph, config.ignored_scope))
        lr_scale = quantizer_lr_scale(config.logit_lr, context.learning_rate, context.optimizer)
        tensors = graph.tensors()
        weights = {t.weight: tensors[t.weight].values for t in targets}
        return cls(targets, config, lr_scale, weights, context.steps_per_epoch), model

    @property
    def training_commands(self) -> list[Command]:
        loss = ComplexityLoss(LOSS, tuple(g.logits for g in self.gates), DENSITY,
                              1.0 - self.scheduler.level, self.config.loss_weight)
        return [*self.gates, loss]

    @property
    def trainable_parameters(self) -> dict[str, np.ndarray]:
        return {g.delta: np.broadcast_to(np.float32(g.logit0) / np.float32(g.lr_scale), self._shapes[g.node])
                .astype(np.float32) for g in self.gates}

    @property
    def frozen_parameters(self) -> dict[str, np.ndarray]:
        return {NOISE: _noise(not self.scheduler.frozen), STEP: self.scheduler.step_value,
                DENSITY: _density(self.scheduler.level)}

    @property
    def evaluation_parameters(self) -> dict[str, np.ndarray]:
        return {NOISE: _noise(False)}

    @property
    def training_parameters(self) -> dict[str, np.ndarray]:
        return {NOISE: _noise(not self.scheduler.frozen)}

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
