"""The compression API of the NNCF paper (§3), for ONNX graphs trained with onnxruntime-training.

An algorithm (*compression method*) is a builder: from the float model and some data it plans its changes
and returns a *controller*. The controller owns:

* the commands that turn the float graph into the trainable graph (fake quantizers, masks...), with the
  initial values of the parameters they add (trained together with the model's weights);
* the *compression loss* (`loss_output`, a scalar tensor of the trainable graph, or None);
* the *compression scheduler* (`scheduler.step()` per iteration, `scheduler.epoch_step()` per epoch), which
  may change parameter values between steps;
* `statistics(parameters)` for logging and `export_commands(parameters)`, which turn trained parameter values
  into the deployable form of the algorithm (QDQ with INT8 weights for quantization).

Algorithms register in `registry.py`; the fine-tuning loop only ever talks to this interface.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

import numpy as np

from onnxcompress.transforms.commands import Command

Parameters = Mapping[str, np.ndarray]


class CompressionScheduler:
    """Changes compression parameters over training; the default changes nothing.

    `step()` returns parameter values to set in the training runtime before the next iteration (empty when
    nothing changes); its state must survive a checkpoint so that a resumed run continues identically.
    """

    def step(self) -> dict[str, np.ndarray]:
        return {}

    def epoch_step(self) -> dict[str, np.ndarray]:
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

    def __init__(self) -> None:
        self.scheduler = CompressionScheduler()

    @property
    @abstractmethod
    def training_commands(self) -> list[Command]:
        """Commands that add the algorithm's operations to the (preprocessed) float graph for training."""

    @property
    @abstractmethod
    def initial_parameters(self) -> dict[str, np.ndarray]:
        """Trainable parameters the training commands add, with their initial values."""

    @property
    def loss_output(self) -> str | None:
        """Name of the scalar compression-loss tensor in the training graph, if the algorithm has one."""
        return None

    @abstractmethod
    def statistics(self, parameters: Parameters) -> dict[str, float]:
        """Numbers worth logging for the current parameter values."""

    @abstractmethod
    def export_commands(self, parameters: Parameters) -> list[Command]:
        """Commands that turn the float graph with trained weights into the deployable compressed model."""
