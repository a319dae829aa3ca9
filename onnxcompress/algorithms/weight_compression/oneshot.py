"""Weight compression of a model (`onnxcompress compress-weights`).

    opset 21 when 4-bit or blockwise tables need it  →  nodes named  →  compressible tables (plan.py)  →  with data:
    E[x²] per input feature of every product's activation, in one ONNX Runtime pass  →  in the 4-bit modes,
    activation-aware scales folded upstream where the graph allows (awq.py)  →  each table's precision and levels
    (plan.py, scheme.py)  →  DequantizeWeight (and the folds' SetConstantInput) commands through the applier  →  the
    model with float activations and integer tables

The graph is not otherwise preprocessed: nothing but the tables and the constants that take the scales changes.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxcompress.algorithms.quantization.ptq import export_for_calibration, export_graph, resolve_ignored_scope
from onnxcompress.algorithms.weight_compression.awq import scale_activations, scaling_targets
from onnxcompress.algorithms.weight_compression.plan import (
    CompressibleLayer,
    LayerChoice,
    WeightCompressionPlan,
    compressible_layers,
    four_bit_candidates,
    plan_weight_compression,
)
from onnxcompress.config import WeightCompressionConfig, WeightMode
from onnxcompress.errors import WeightCompressionError
from onnxcompress.evaluation.sensitivity import Candidates
from onnxcompress.runtime.calibration import Statistic, StatisticRequest, collect_statistics
from onnxcompress.runtime.model_io import (
    external_array,
    has_external_data,
    save_model,
    stored_bytes,
    upgrade_opset,
)
from onnxcompress.transforms.applier import apply_commands
from onnxcompress.transforms.graph import map_external_constants, peek_values
from onnxcompress.transforms.passes.name_nodes import name_nodes

Batches = Iterable[Mapping[str, np.ndarray]]

#: DequantizeLinear takes 4-bit levels and block_size from opset 21.
BLOCKWISE_OPSET = 21


@dataclass(frozen=True)
class WeightCompressionResult:
    model: onnx.ModelProto
    layers: tuple[LayerChoice, ...]
    #: Bytes of the float tables before, and of their levels, scales and zero-points after.
    float_bytes: int
    compressed_bytes: int
    #: The model file whose external data the tensors left as they were still refer to (None: all in memory).
    external_source: Path | None = None
    #: The activations whose features activation-aware scaling divided (folded upstream; awq.py).
    scaled_activations: tuple[str, ...] = ()

    def save(self, path: str | os.PathLike) -> Path:
        """Write the model atomically, streaming the tensors still in the source's external data."""
        return save_model(self.model, path, external_source=self.external_source)

    def count(self, mode: WeightMode) -> int:
        return sum(1 for layer in self.layers if layer.mode is mode)

    @property
    def per_channel_fallbacks(self) -> tuple[str, ...]:
        """4-bit layers whose reduction axis the group size did not divide."""
        return tuple(layer.node for layer in self.layers if layer.mode.four_bit and layer.group_size is None)


def needs_blockwise_opset(config: WeightCompressionConfig) -> bool:
    return config.mode.four_bit or config.effective_group_size is not None


def compress_model(model: onnx.ModelProto, config: WeightCompressionConfig, batches: Batches | None = None, *,
                   total: int | None = None, progress: bool = True, source: Path | None = None
                   ) -> WeightCompressionResult:
    """Compress the tables of `model` (a private copy the caller does not use again) as `config` says; with
    `batches`, weigh each table's error by its input features' E[x²]. `source` is the model file whose external
    data `model` still refers to (`load_model(lazy_external_data=True)`): tables are read from it one at a time."""
    graph, model, plan, float_bytes = _plan(model, config, batches, total, progress, source, fallbacks=False)
    choices, scaled = plan.layers, plan.scaled_activations
    apply_commands(graph, plan.all_commands)
    del plan  # the graph holds the levels now, as tensors: the commands' arrays go
    return _result(export_graph(graph, model, shapes=False), choices, float_bytes, source, scaled)


@dataclass(frozen=True)
class PlannedCompression:
    """A weight compression plan with an INT8 fallback for each 4-bit table, and the float model it applies to:
    what accuracy control builds its candidates from."""

    #: Upgraded to the blockwise opset where needed, nodes named; its tables may still refer to `source`.
    float_model: onnx.ModelProto
    plan: WeightCompressionPlan
    float_bytes: int
    source: Path | None

    def apply(self, relaxed: Collection[str] = ()) -> WeightCompressionResult:
        """The compressed model, with the 4-bit tables of the `relaxed` nodes in INT8 instead."""
        commands, choices = self.plan.relaxed(relaxed)
        graph = gs.import_onnx(self.float_model)
        if self.source is not None:
            map_external_constants(graph, functools.partial(external_array, model_path=self.source))
        apply_commands(graph, commands)
        return _result(export_graph(graph, self.float_model, shapes=False), choices, self.float_bytes, self.source,
                       self.plan.scaled_activations)

    def candidates(self) -> Candidates[str]:
        """The 4-bit tables, each moved to INT8 on its own, by node."""
        return Candidates(self.plan.four_bit, lambda nodes: self.apply(nodes).model, str, noun="4-bit tables",
                          relaxed="in INT8", external_source=self.source)


def plan_compression(model: onnx.ModelProto, config: WeightCompressionConfig, batches: Batches | None = None, *,
                     total: int | None = None, progress: bool = True, source: Path | None = None
                     ) -> PlannedCompression:
    """`compress_model`'s plan with INT8 fallbacks, not yet applied (arguments as there)."""
    graph, model, plan, float_bytes = _plan(model, config, batches, total, progress, source, fallbacks=True)
    return PlannedCompression(export_graph(graph, model, shapes=False), plan, float_bytes, source)


def _plan(model: onnx.ModelProto, config: WeightCompressionConfig, batches: Batches | None, total: int | None,
          progress: bool, source: Path | None, *, fallbacks: bool
          ) -> tuple[gs.Graph, onnx.ModelProto, WeightCompressionPlan, int]:
    """The model's graph (nodes named), the model it came from (upgraded to the blockwise opset where needed), the
    plan, and the bytes of the float tables it compresses."""
    if needs_blockwise_opset(config):
        model = upgrade_opset(model, BLOCKWISE_OPSET)
    graph = gs.import_onnx(model)
    if source is not None:
        map_external_constants(graph, functools.partial(external_array, model_path=source))
    name_nodes(graph)
    ignored = resolve_ignored_scope(graph, config.ignored_scope, original=model)
    layers = compressible_layers(graph, ignored)
    if not layers:
        raise WeightCompressionError("the model has no constant 2-D table in a MatMul, Gemm or Gather to compress")
    importance = {}
    if batches is not None:
        importance = _input_energy(graph, model, layers, batches, total, progress)
    nodes = {node.name: node for node in graph.nodes}

    def table(layer: CompressibleLayer) -> np.ndarray:
        return peek_values(nodes[layer.node].inputs[layer.layout.port])

    float_bytes = sum(_tensor_bytes_of(nodes[layer.node].inputs[layer.layout.port])
                      for layer in {layer.weight: layer for layer in layers}.values())
    if importance and config.mode.four_bit and config.activation_scaling:
        targets = scaling_targets(graph, four_bit_candidates(layers, config), ignored)
        scaling = scale_activations(graph, layers, targets, table, importance, config.mode,
                                    config.effective_group_size)
        plan = plan_weight_compression(layers, scaling.reader(table), config, scaling.importance,
                                       fallbacks=fallbacks)
        plan = dataclasses.replace(plan, folds=tuple(scaling.commands), scaled_activations=tuple(scaling.scaled))
    else:
        plan = plan_weight_compression(layers, table, config, importance, fallbacks=fallbacks)
    return graph, model, plan, float_bytes


def _result(compressed: onnx.ModelProto, choices: tuple[LayerChoice, ...], float_bytes: int, source: Path | None,
            scaled: tuple[str, ...]) -> WeightCompressionResult:
    return WeightCompressionResult(compressed, choices, float_bytes, _stored_bytes(compressed),
                                   source if has_external_data(compressed) else None, scaled)


def _input_energy(graph: gs.Graph, model: onnx.ModelProto, layers: list[CompressibleLayer], batches: Batches,
                  total: int | None, progress: bool) -> dict[str, np.ndarray]:
    """E[x²] per feature of each layer's activation input, by activation name. The tables reach ONNX Runtime as
    the graph's arrays themselves (memory maps for those in external data), not copied into a proto."""
    float_model, weights = export_for_calibration(graph, model)
    requests = [StatisticRequest(layer.activation, Statistic.CHANNEL_MEAN_SQUARE, axis=-1, channels=layer.reduction)
                for layer in layers if layer.activation is not None]
    statistics = collect_statistics(float_model, requests, batches, weights=weights, total=total, progress=progress,
                                    description="activation statistics")
    return {name: stats.channel_mean_square.astype(np.float32) for name, stats in statistics.items()}


def _tensor_bytes_of(constant: gs.Constant) -> int:
    return int(np.prod(constant.shape, dtype=np.int64)) * np.dtype(constant.dtype).itemsize


def _stored_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the initializers DequantizeLinear nodes read."""
    readers = {node.input[i] for node in model.graph.node if node.op_type == "DequantizeLinear"
               for i in range(len(node.input))}
    return sum(stored_bytes(t) for t in model.graph.initializer if t.name in readers)
