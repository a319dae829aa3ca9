"""The compression API of the NNCF paper (§3), for ONNX graphs trained with onnxruntime-training.

An algorithm (*compression method*) is a builder: from the float model and some data it plans its changes
and returns a *controller*. The controller owns:

* `training_commands`: what turns the float graph into the trainable graph (fake quantizers, masks...). The
  algorithms of a stack apply theirs in stack order to one graph, so each sees what the previous ones inserted
  (a weight quantizer quantizes the masked weight);
* the parameters those commands add: `trainable_parameters` (trained with the model's weights) and
  `frozen_parameters` (kept out of the optimizer; only the scheduler changes them, e.g. sparsity masks);
* `gradients`: definitions for ops of its training graph that the training runtime cannot differentiate by
  itself (Round's straight-through estimator);
* the *compression loss* (`loss_output`, a scalar tensor of the trainable graph, or None), added to the task loss;
* the *compression scheduler*: `step(read)` after every training step and `epoch_step(read)` after every epoch,
  where `read(names)` returns current values of any parameters (model weights included); both return the
  parameter values to set before the next step;
* `statistics(parameters)` for logging, and `export_commands(graph, parameters)`: the commands that turn the
  graph as the previous algorithms of the stack exported it, with the trained weights, into this algorithm's
  deployable form. Constants are read from `graph`, not from `parameters`, so exports compose. Then
  `finish_commands(graph)` of each, on the fully exported graph (filter pruning removes the masked channels);
* `surviving_weights()`: which elements of the model's weights survive its export (filter pruning removes whole
  filters and the next layers' inputs). Algorithms of later stages get them from `BuildContext.surviving_weights`
  and count their level over what survives, so the exported file has the level asked for.

Algorithms register in `registry.py`; the fine-tuning loop only ever talks to this interface.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.runtime.training import GradientNode
from onnxcompress.transforms.commands import Command

Parameters = Mapping[str, np.ndarray]
#: Current values of the named parameters of the training session.
ParameterReader = Callable[[Iterable[str]], dict[str, np.ndarray]]
#: 0/1 masks (boolean, shaped like the weight) by weight name; a weight not named survives whole.
SurvivingWeights = Callable[[], dict[str, np.ndarray]]


def _all_survive() -> dict[str, np.ndarray]:
    return {}


class Stage(enum.IntEnum):
    """Where an algorithm acts on a weight's way to the compute op; a stack applies them in this order, and holds at
    most one algorithm per stage (two masks or two quantizers of one weight cannot be ordered)."""

    #: Masks that zero whole channels (filter pruning).
    PRUNING = 0
    #: Masks that zero float weights (sparsity).
    SPARSITY = 1
    #: Quantizers of the (masked) float weights and activations.
    QUANTIZATION = 2


@dataclass(frozen=True)
class BuildContext:
    """What a builder knows about the run besides its own config."""

    #: Peak learning rate and optimizer of the model's weights (for algorithms that scale their parameters' rate).
    learning_rate: float
    optimizer: str
    #: Training steps per epoch (for schedules that move every step).
    steps_per_epoch: int
    #: Number of calibration samples `batches()` yields, when known (progress bars).
    calibration_samples: int | None = None
    progress: bool = True
    #: The weights the algorithms built before this one leave, current at each call (their schedules move).
    surviving_weights: SurvivingWeights = _all_survive


class CompressionScheduler:
    """Changes compression parameters over training; the default changes nothing.

    `step` and `epoch_step` get a reader of current parameter values and return the values to set (empty when
    nothing changes). The state must survive a checkpoint so that a resumed run continues identically.
    """

    @property
    def complete(self) -> bool:
        """Whether the compression has reached its target (only such epochs can be the best checkpoint)."""
        return True

    def step(self, read: ParameterReader) -> dict[str, np.ndarray]:
        return {}

    def epoch_step(self, read: ParameterReader) -> dict[str, np.ndarray]:
        return {}

    def state(self) -> dict[str, Any]:
        return {}

    def load_state(self, state: Mapping[str, Any]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} has no state, got {sorted(state)}")


class CompressionController(ABC):
    """What a built algorithm offers the training loop (see the module docstring)."""

    #: Registry name of the algorithm, used in statistics and error messages.
    name: str
    stage: Stage

    def __init__(self) -> None:
        self.scheduler = CompressionScheduler()

    @property
    @abstractmethod
    def training_commands(self) -> list[Command]:
        """Commands that add the algorithm's operations to the training graph."""

    @property
    @abstractmethod
    def trainable_parameters(self) -> dict[str, np.ndarray]:
        """Parameters the training commands add that the optimizer trains, with their initial values."""

    @property
    def frozen_parameters(self) -> dict[str, np.ndarray]:
        """Parameters the training commands add that only the scheduler changes, with their initial values."""
        return {}

    @property
    def gradients(self) -> dict[str, tuple[GradientNode, ...]]:
        """Gradient definitions by op type, for ops the algorithm adds that the training runtime cannot
        differentiate."""
        return {}

    @property
    def evaluation_parameters(self) -> dict[str, np.ndarray]:
        """Values of frozen parameters to set while the model is evaluated (deterministic gates), and
        `training_parameters` to restore afterwards."""
        return {}

    @property
    def training_parameters(self) -> dict[str, np.ndarray]:
        return {}

    @property
    def loss_output(self) -> str | None:
        """Name of the scalar compression-loss tensor in the training graph, if the algorithm has one."""
        return None

    @abstractmethod
    def statistics(self, parameters: Parameters) -> dict[str, float]:
        """Numbers worth logging for the current values of the algorithm's parameters."""

    @abstractmethod
    def export_commands(self, graph: gs.Graph, parameters: Parameters) -> list[Command]:
        """Commands that turn `graph` (trained weights, previous algorithms exported) into the deployable form."""

    def surviving_weights(self) -> dict[str, np.ndarray]:
        """The elements of weights its current state keeps in the export (see `SurvivingWeights`); all by default."""
        return {}

    def finish_commands(self, graph: gs.Graph) -> list[Command]:
        """Commands applied once every algorithm has exported (filter pruning removes its channels from the
        quantized graph); none by default."""
        return []
