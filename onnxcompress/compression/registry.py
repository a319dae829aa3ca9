"""The one place compression algorithms are registered, and `create_compressed_model`, which stacks them.

A new algorithm is one module with a controller (`api.CompressionController`) and one entry in `ALGORITHMS`:
a build function `(model, batches factory, config, *, learning_rate, optimizer, total, progress)` →
`(controller, float graph its commands apply to)`; the factory gives a fresh pass over the calibration feeds on
every call. Algorithms build in config order, each on the float graph the previous one returned.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxcompress.algorithms.quantization.ptq import export_graph
from onnxcompress.algorithms.quantization.qat import QuantizationController
from onnxcompress.compression.api import CompressionController, Parameters
from onnxcompress.config import QuantizationAwareTrainingConfig
from onnxcompress.transforms.applier import apply_commands

BatchesFactory = Callable[[], Iterable[Mapping[str, np.ndarray]]]
BuildFunction = Callable[..., tuple[CompressionController, onnx.ModelProto]]

ALGORITHMS: dict[str, BuildFunction] = {
    "quantization": QuantizationController.build,
}

AlgorithmConfig = QuantizationAwareTrainingConfig


@dataclass
class CompressedModel:
    """The float graph the algorithms planned on, the trainable graph with their operations, and the
    controllers that know how to schedule, measure and export them."""

    float_model: onnx.ModelProto
    training_model: onnx.ModelProto
    controllers: list[CompressionController]

    @property
    def compression_parameters(self) -> dict[str, np.ndarray]:
        values: dict[str, np.ndarray] = {}
        for controller in self.controllers:
            values.update(controller.initial_parameters)
        return values

    @property
    def loss_outputs(self) -> list[str]:
        return [c.loss_output for c in self.controllers if c.loss_output is not None]

    def statistics(self, parameters: Parameters) -> dict[str, float]:
        return {f"{c.name}/{key}": value for c in self.controllers for key, value in c.statistics(parameters).items()}

    def export(self, parameters: Parameters) -> onnx.ModelProto:
        """The deployable model: trained float weights set by name, then each algorithm's export commands."""
        graph = gs.import_onnx(self.float_model)
        for tensor in graph.tensors().values():
            if isinstance(tensor, gs.Constant) and tensor.name in parameters:
                tensor.values = np.asarray(parameters[tensor.name])
        for controller in self.controllers:
            apply_commands(graph, controller.export_commands(parameters))
        return export_graph(graph, self.float_model, shapes=False)


def create_compressed_model(model: onnx.ModelProto, configs: Iterable[AlgorithmConfig], batches: BatchesFactory, *,
                            learning_rate: float, optimizer: str, total: int | None = None,
                            progress: bool = True) -> CompressedModel:
    """Build every configured algorithm on `model`; `batches()` gives a fresh pass over calibration feeds."""
    controllers = []
    float_model = model
    for config in configs:
        controller, float_model = ALGORITHMS[config.algorithm](
            float_model, batches, config, learning_rate=learning_rate, optimizer=optimizer, total=total,
            progress=progress)
        controllers.append(controller)
    graph = gs.import_onnx(float_model)
    for controller in controllers:
        apply_commands(graph, controller.training_commands)
    return CompressedModel(float_model, export_graph(graph, float_model), controllers)
