"""The one place compression algorithms are registered, and `create_compressed_model`, which stacks them.

A new algorithm is one module with a controller (`api.CompressionController`) and one entry in `ALGORITHMS`:
its stage and its build function `(model, batches factory, config, api.BuildContext)` → `(controller, float
model)`; the factory gives a fresh pass over the calibration feeds on every call.

    preprocess once → order the stack by stage → build each algorithm on the float model the previous one returned
    (a sparsity builder returns the weights masked at their initial level, so quantization calibrates on what it
    will quantize) → the last float model + every controller's training commands, in stack order → training graph

Export composes the same way: trained weights set on the float model, then each controller's export commands,
each computed from the graph the previous ones left, then each controller's finish commands (filter pruning
removes the channels it zeroed, from the quantized graph).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxcompress.algorithms.pruning.finetuned import FilterPruningController
from onnxcompress.algorithms.quantization.ptq import export_graph
from onnxcompress.algorithms.quantization.qat import QuantizationController
from onnxcompress.algorithms.sparsity.magnitude import MagnitudeSparsityController
from onnxcompress.algorithms.sparsity.rb import RBSparsityController
from onnxcompress.compression.api import BuildContext, CompressionController, Parameters, Stage
from onnxcompress.config import AlgorithmConfig
from onnxcompress.errors import ConfigError
from onnxcompress.runtime.training import GradientNode
from onnxcompress.transforms.applier import apply_commands
from onnxcompress.transforms.passes import preprocess

BatchesFactory = Callable[[], Iterable[Mapping[str, np.ndarray]]]
BuildFunction = Callable[..., tuple[CompressionController, onnx.ModelProto]]

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Algorithm:
    stage: Stage
    build: BuildFunction


ALGORITHMS: dict[str, Algorithm] = {
    "filter_pruning": Algorithm(Stage.PRUNING, FilterPruningController.build),
    "magnitude_sparsity": Algorithm(Stage.SPARSITY, MagnitudeSparsityController.build),
    "rb_sparsity": Algorithm(Stage.SPARSITY, RBSparsityController.build),
    "quantization": Algorithm(Stage.QUANTIZATION, QuantizationController.build),
}


@dataclass
class CompressedModel:
    """The user's model as preprocessed (the teacher of distillation: what compression must not lose), the float
    graph the algorithms planned on (masked at their initial levels, biases corrected), the trainable graph with
    their operations, and the controllers that know how to schedule, measure and export them."""

    reference_model: onnx.ModelProto
    float_model: onnx.ModelProto
    training_model: onnx.ModelProto
    controllers: list[CompressionController]

    @property
    def trainable_parameters(self) -> dict[str, np.ndarray]:
        return {name: value for c in self.controllers for name, value in c.trainable_parameters.items()}

    @property
    def frozen_parameters(self) -> dict[str, np.ndarray]:
        return {name: value for c in self.controllers for name, value in c.frozen_parameters.items()}

    @property
    def compression_parameters(self) -> dict[str, np.ndarray]:
        """Every parameter the algorithms added, trainable and frozen."""
        return {**self.trainable_parameters, **self.frozen_parameters}

    @property
    def gradients(self) -> dict[str, tuple[GradientNode, ...]]:
        definitions: dict[str, tuple[GradientNode, ...]] = {}
        for controller in self.controllers:
            for op_type, nodes in controller.gradients.items():
                if definitions.setdefault(op_type, nodes) != nodes:
                    raise ConfigError(f"the stacked algorithms define different gradients for {op_type}")
        return definitions

    @property
    def evaluation_parameters(self) -> dict[str, np.ndarray]:
        return {name: value for c in self.controllers for name, value in c.evaluation_parameters.items()}

    @property
    def training_parameters(self) -> dict[str, np.ndarray]:
        return {name: value for c in self.controllers for name, value in c.training_parameters.items()}

    @property
    def loss_outputs(self) -> list[str]:
        return [c.loss_output for c in self.controllers if c.loss_output is not None]

    def statistics(self, parameters: Parameters) -> dict[str, float]:
        return {f"{c.name}/{key}": value for c in self.controllers for key, value in c.statistics(parameters).items()}

    def export(self, parameters: Parameters, finish: bool = True) -> onnx.ModelProto:
        """The deployable model: trained float weights set by name, then each algorithm's export commands, computed
        from the graph the previous algorithms exported; then (`finish`) their finish commands (filter pruning's
        surgery). Unfinished, the model computes the same with pruned channels zeroed instead of removed."""
        graph = gs.import_onnx(self.float_model)
        for tensor in graph.tensors().values():
            if isinstance(tensor, gs.Constant) and tensor.name in parameters:
                tensor.values = np.asarray(parameters[tensor.name])
        for controller in self.controllers:
            apply_commands(graph, controller.export_commands(graph, parameters))
        for controller in self.controllers if finish else ():
            apply_commands(graph, controller.finish_commands(graph))
        return export_graph(graph, self.float_model, shapes=False)


def order_stack(configs: Iterable[AlgorithmConfig]) -> list[AlgorithmConfig]:
    """The configs in stage order (stable); ConfigError when two act at one stage."""
    configs = list(configs)
    by_stage: dict[Stage, AlgorithmConfig] = {}
    for config in configs:
        stage = ALGORITHMS[config.algorithm].stage
        if stage in by_stage:
            raise ConfigError(f"the compression stack cannot be ordered: '{by_stage[stage].algorithm}' and "
                              f"'{config.algorithm}' both act at the {stage.name.lower()} stage of the same weights")
        by_stage[stage] = config
    ordered = [by_stage[stage] for stage in sorted(by_stage)]
    if ordered != configs:
        _log.info("compression stack applied in the order %s (weights are masked before they are quantized)",
                  " → ".join(c.algorithm for c in ordered))
    return ordered


def create_compressed_model(model: onnx.ModelProto, configs: Iterable[AlgorithmConfig], batches: BatchesFactory,
                            context: BuildContext) -> CompressedModel:
    """Build every configured algorithm on `model`; `batches()` gives a fresh pass over calibration feeds."""
    ordered = order_stack(configs)
    reference = export_graph(preprocess(model), model)
    float_model = reference
    controllers: list[CompressionController] = []
    for config in ordered:
        controller, float_model = ALGORITHMS[config.algorithm].build(float_model, batches, config, context)
        controllers.append(controller)
        context = replace(context, surviving_weights=_Surviving(tuple(controllers)))
    graph = gs.import_onnx(float_model)
    for controller in controllers:
        apply_commands(graph, controller.training_commands)
    return CompressedModel(reference, float_model, export_graph(graph, float_model), controllers)


@dataclass(frozen=True)
class _Surviving:
    """`SurvivingWeights` of a stack's first algorithms: an element survives when it survives each of them."""

    controllers: tuple[CompressionController, ...]

    def __call__(self) -> dict[str, np.ndarray]:
        masks: dict[str, np.ndarray] = {}
        for controller in self.controllers:
            for name, mask in controller.surviving_weights().items():
                masks[name] = mask & masks[name] if name in masks else mask
        return masks
