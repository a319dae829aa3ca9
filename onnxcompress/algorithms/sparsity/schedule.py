"""The sparsity level over training: polynomial, exponential, multistep and adaptive schedules (NNCF paper §4.3).

`planned_level(config, t)` is the level at (possibly fractional) epoch t for the schedules fixed in advance;
`AdaptiveLevel` raises the level as the measured sparsity catches up with it.
"""

from __future__ import annotations

from dataclasses import dataclass

from onnxcompress.config import SparsitySchedule, SparsityScheduleConfig


def planned_level(config: SparsityScheduleConfig, epoch: float) -> float:
    """The level from epoch `epoch` on (0 = before training); adaptive schedules start at `initial_level`."""
    initial, target = config.initial_level, config.target_level
    if config.schedule is SparsitySchedule.MULTISTEP:
        reached = [level for start, level in zip(config.multistep_epochs, config.multistep_levels) if epoch >= start]
        return reached[-1] if reached else initial
    if config.schedule is SparsitySchedule.ADAPTIVE:
        return initial
    if config.target_epoch == 0 or epoch >= config.target_epoch:
        return target
    progress = max(epoch, 0.0) / config.target_epoch
    if config.schedule is SparsitySchedule.POLYNOMIAL:
        return target - (target - initial) * (1.0 - progress) ** config.power
    # exponential: the density 1 - level shrinks by the same factor every epoch.
    ratio = (1.0 - target) / (1.0 - initial)
    return 1.0 - (1.0 - initial) * ratio ** progress


@dataclass
class AdaptiveLevel:
    """The adaptive schedule's state: the current level and how many epochs the measured sparsity has been close
    to it."""

    level: float
    epochs_close: int = 0

    def update(self, config: SparsityScheduleConfig, measured: float) -> float:
        """After an epoch whose masks reached sparsity `measured`: the level of the next epoch."""
        if abs(measured - self.level) <= config.eps:
            self.epochs_close += 1
            if self.epochs_close >= config.patience:
                self.level = min(self.level + config.step, config.target_level)
                self.epochs_close = 0
        else:
            self.epochs_close = 0
        return self.level
