"""Which tables weight compression compresses, to which precision, and the commands that store them.

    compressible_layers (op table: `compress_weight` layouts)  →  4-bit candidates (all but the embeddings and the
    last matrix product, unless all_layers)  →  each candidate in 4 bits, ranked by its relative error (weighted
    by E[x²] of its input features when data was given)  →  the least sensitive in 4 bits up to `ratio` of the
    candidates' weights, the rest INT8 per channel  →  DequantizeWeight commands in each table's own layout
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.algorithms.weight_compression.scheme import Compressed, compress_table
from onnxcompress.config import WeightCompressionConfig, WeightMode
from onnxcompress.transforms.commands import DequantizeWeight, SetConstantInput
from onnxcompress.transforms.op_table import WeightLayout, compressed_weight_layout, input_layout_known

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompressibleLayer:
    """A node whose constant 2-D table weight compression can store in fewer bits."""

    node: str
    op: str
    weight: str
    layout: WeightLayout
    shape: tuple[int, int]
    #: The activation whose last axis the table's reduction axis meets (its statistics weigh the error); None for
    #: embeddings and transposed inputs.
    activation: str | None

    @property
    def parameters(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def reduction(self) -> int:
        """K: the values along the block axis."""
        return self.shape[self.layout.block_axis]

    @property
    def embedding(self) -> bool:
        return not self.layout.activation_features

    def oriented(self, table: np.ndarray) -> np.ndarray:
        """The table as [channels, K]."""
        return table if self.layout.channel_axis == 0 else table.T


@dataclass(frozen=True)
class LayerChoice:
    """What one table became."""

    node: str
    op: str
    weight: str
    mode: WeightMode
    #: Values per scale along K; None: one scale per channel.
    group_size: int | None
    parameters: int
    relative_error: float


@dataclass(frozen=True)
class WeightCompressionPlan:
    commands: tuple[DequantizeWeight, ...]
    layers: tuple[LayerChoice, ...]
    #: For each 4-bit table's node (when asked for): its command and choice in INT8 per channel instead.
    fallbacks: Mapping[str, tuple[DequantizeWeight, LayerChoice]] = field(default_factory=dict)
    #: New values of the constants that take activation-aware scaling's 1/s (awq.py), applied with the commands.
    folds: tuple[SetConstantInput, ...] = ()
    #: The activations that scaling divided.
    scaled_activations: tuple[str, ...] = ()

    @property
    def all_commands(self) -> tuple[DequantizeWeight | SetConstantInput, ...]:
        return self.folds + self.commands

    @property
    def four_bit(self) -> tuple[str, ...]:
        """The nodes whose tables are in 4 bits, in graph order."""
        return tuple(layer.node for layer in self.layers if layer.mode.four_bit)

    def relaxed(self, nodes: Collection[str]
                ) -> tuple[tuple[DequantizeWeight | SetConstantInput, ...], tuple[LayerChoice, ...]]:
        """All commands and the choices with the 4-bit tables of `nodes` in INT8 (their fallbacks)."""
        unknown = set(nodes) - set(self.fallbacks)
        if unknown:
            raise ValueError(f"no INT8 fallback planned for {', '.join(sorted(unknown))}")
        pairs = [self.fallbacks[c.node] if c.node in nodes else (c, choice)
                 for c, choice in zip(self.commands, self.layers)]
        return self.folds + tuple(c for c, _ in pairs), tuple(choice for _, choice in pairs)


def compressible_layers(graph: gs.Graph, ignored: frozenset[str] = frozenset()) -> list[CompressibleLayer]:
    """The nodes, in graph order, whose float 2-D constant table the op table gives a compression layout."""
    layers = []
    for node in graph.nodes:
        layout = compressed_weight_layout(node)
        if layout is None or node.name in ignored:
            continue
        table = node.inputs[layout.port]
        if np.dtype(table.dtype) != np.float32:
            if np.issubdtype(np.dtype(table.dtype), np.floating):
                _log.info("%s: its table is %s; only float32 tables are compressed", node.name, np.dtype(table.dtype))
            continue
        first = node.inputs[0] if node.inputs else None
        reads_features = layout.activation_features and isinstance(first, gs.Variable) and input_layout_known(node)
        layers.append(CompressibleLayer(node.name, node.op, table.name, layout, tuple(int(d) for d in table.shape),
                                        first.name if reads_features else None))
    return layers


def plan_weight_compression(layers: Sequence[CompressibleLayer], table: Callable[[CompressibleLayer], np.ndarray],
                            config: WeightCompressionConfig,
                            importance: Mapping[str, np.ndarray] | None = None, *,
                            fallbacks: bool = False) -> WeightCompressionPlan:
    """Choose each layer's precision and make its command; `table(layer)` reads a layer's float values (once per
    decision, so a large model's tables need not all be in memory) and `importance` holds E[x²] per input
    feature by activation name. With `fallbacks`, each 4-bit table's INT8 command is planned too (what accuracy
    control moves a table to)."""
    importance = importance or {}
    compressed: dict[CompressibleLayer, tuple[Compressed, WeightMode, int | None]] = {}
    candidates = four_bit_candidates(layers, config)
    for layer in candidates:
        compressed[layer] = _compress(layer, table(layer), config.mode, config.effective_group_size, importance)
    kept_in_four = _least_sensitive(candidates, {c: compressed[c][0].relative_error for c in candidates},
                                    config.ratio)
    backup = config.mode if not config.mode.four_bit else WeightMode.INT8
    backup_group = None if config.mode.four_bit else config.effective_group_size
    for layer in layers:
        if layer not in kept_in_four:
            compressed[layer] = _compress(layer, table(layer), backup, backup_group, importance)
    commands, choices = [], []
    for layer in layers:
        command, choice = _planned(layer, *compressed.pop(layer))  # one layout of the levels in memory at a time
        commands.append(command)
        choices.append(choice)
    backups = {layer.node: _planned(layer, *_compress(layer, table(layer), backup, backup_group, importance))
               for layer in layers if fallbacks and layer in kept_in_four}
    return WeightCompressionPlan(tuple(commands), tuple(choices), backups)


def _planned(layer: CompressibleLayer, result: Compressed, mode: WeightMode, group: int | None
             ) -> tuple[DequantizeWeight, LayerChoice]:
    return _command(layer, result), LayerChoice(layer.node, layer.op, layer.weight, mode, group, layer.parameters,
                                                result.relative_error)


def four_bit_candidates(layers: Sequence[CompressibleLayer], config: WeightCompressionConfig
                         ) -> list[CompressibleLayer]:
    """The layers the 4-bit modes may store in 4 bits: all, or all but the embeddings and the last product."""
    if not config.mode.four_bit:
        return []
    if config.all_layers:
        return list(layers)
    products = [layer for layer in layers if not layer.embedding]
    last = products[-1] if products else None
    return [layer for layer in products if layer is not last]


def _least_sensitive(candidates: Sequence[CompressibleLayer], errors: Mapping[CompressibleLayer, float],
                     ratio: float) -> set[CompressibleLayer]:
    """The candidates with the smallest 4-bit error whose weights add up to `ratio` of all of theirs, as nearly as
    whole layers allow: a layer is taken when it brings the 4-bit share closer to the ratio."""
    budget = ratio * sum(layer.parameters for layer in candidates)
    chosen, used = set(), 0
    for layer in sorted(candidates, key=lambda c: errors[c]):
        if used + layer.parameters / 2 > budget * (1 + 1e-9):
            continue
        chosen.add(layer)
        used += layer.parameters
    return chosen


def _compress(layer: CompressibleLayer, values: np.ndarray, mode: WeightMode, group_size: int | None,
              importance: Mapping[str, np.ndarray]) -> tuple[Compressed, WeightMode, int | None]:
    k = layer.reduction
    if group_size is not None and k % group_size:
        _log.info("%s: its reduction axis (%d values) is not a multiple of the group size %d, so it takes one "
                  "scale per channel", layer.node, k, group_size)
        group_size = None
    weights = importance.get(layer.activation) if layer.activation is not None else None
    if weights is not None and weights.shape != (k,):
        weights = None
    block = k if group_size is None else group_size
    return compress_table(layer.oriented(values), mode, block, weights), mode, group_size


def _command(layer: CompressibleLayer, result: Compressed) -> DequantizeWeight:
    """The DequantizeLinear that stores `result` in the layer's own layout: per-channel scales on the channel axis,
    or blockwise ones along the block axis (scale shaped like the table with that axis divided by the block)."""
    transposed = layer.layout.channel_axis != 0
    levels = np.ascontiguousarray(result.levels.T if transposed else result.levels)
    if result.block == layer.reduction:
        zero = None if result.zero_point is None else result.zero_point[:, 0]
        return DequantizeWeight(layer.node, layer.layout.port, levels, result.scale[:, 0], layer.layout.channel_axis,
                                zero_point=zero)
    scale = np.ascontiguousarray(result.scale.T if transposed else result.scale)
    zero = None if result.zero_point is None else np.ascontiguousarray(
        result.zero_point.T if transposed else result.zero_point)
    return DequantizeWeight(layer.node, layer.layout.port, levels, scale, layer.layout.block_axis, zero_point=zero,
                            block_size=result.block)
