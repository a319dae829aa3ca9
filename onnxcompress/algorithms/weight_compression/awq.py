"""Activation-aware scaling of weight-only compression (AWQ, Lin et al. 2024), folded into the graph's constants.

4-bit rounding costs most on the input features whose activations are large. Scaling feature k of a table by sₖ
and the activation by 1/sₖ leaves the float product unchanged,

    x · W  =  (x / s) · (diag(s) W),

and gives the rows that matter finer steps. With hₖ = E[xₖ²] (the statistics weight compression collects),

    sₖ = (√hₖ)^α / √(max s · min s),   α from ALPHA_GRID,

the α that minimises the error the round-to-nearest tables of all readers of x add, Σₖ (hₖ / sₖ²) ‖sₖ Wₖ − Q(diag(s)
W)ₖ‖² over a sample of their output channels (α = 0 is s = 1: the unscaled tables win unless a scale rounds
better). The clipping search and scale estimation of `scheme.py`
then run on the scaled tables, with importance h / s².

1/s must not cost an op at run time: it is folded into constants upstream of x by the op table's `output_scaling`
rules (a LayerNormalization's scale and bias; a MatMul's or Gemm's output channels and bias; the constant of an Add,
Sub or Mul, and through their other operands). That needs x and every tensor on the way to be read only by the ops
being rescaled, and each constant to have no other reader; elsewhere the tables stay as they are (a post-LN
transformer's LayerNorm output also feeds the residual Add). Activations are taken from the last to the first, so a
table that reads one and makes another is compared with its output channels already divided.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.algorithms.weight_compression.plan import CompressibleLayer
from onnxcompress.algorithms.weight_compression.scheme import rounding_error
from onnxcompress.config import WeightMode
from onnxcompress.transforms.commands import SetConstantInput
from onnxcompress.transforms.graph import peek_values
from onnxcompress.transforms.op_table import OutputScaling, constant_weight, spec, weight_channel_axis

#: Migration strengths tried (0: no scaling).
ALPHA_GRID = np.linspace(0.0, 1.0, 11)

#: Output channels of each table (evenly spaced) that the search for α rounds: its error ratios, not the levels,
#: are what it needs.
SEARCH_CHANNELS = 512

#: Features whose RMS is below this fraction of the largest count as that small: a feature the calibration data
#: hardly activates keeps s within 100× of the others, so its rows are not rounded away.
_MIN_RELATIVE_RMS = 1e-2

TableReader = Callable[[CompressibleLayer], np.ndarray]


@dataclass(frozen=True)
class Fold:
    """A constant input `port` of `node` that takes 1/s along its `axis`."""

    node: str
    port: int
    axis: int


@dataclass(frozen=True)
class ScalingTarget:
    """An activation read only by compressible tables, whose per-feature scale folds into `folds`."""

    activation: str
    readers: tuple[CompressibleLayer, ...]
    folds: tuple[Fold, ...]

    @property
    def features(self) -> int:
        return self.readers[0].reduction


@dataclass
class ActivationScaling:
    """The chosen scales: factors on the tables' input features (`rows`) and divisors on their output channels
    (`columns`), applied as the tables are read; the other constants' new values as commands."""

    rows: dict[str, np.ndarray] = field(default_factory=dict)
    columns: dict[str, np.ndarray] = field(default_factory=dict)
    commands: list[SetConstantInput] = field(default_factory=list)
    #: E[x²] of each activation as the scaled model sees it.
    importance: dict[str, np.ndarray] = field(default_factory=dict)
    #: The activations scaled, in the order chosen.
    scaled: list[str] = field(default_factory=list)

    def oriented(self, layer: CompressibleLayer, values: np.ndarray, step: int = 1) -> np.ndarray:
        """The layer's table as [channels, K] with the scales chosen so far; every `step`-th channel only."""
        table = layer.oriented(values)[::step]
        rows, columns = self.rows.get(layer.weight), self.columns.get(layer.weight)
        if rows is not None:
            table = table * rows[None, :]
        if columns is not None:
            table = table / columns[::step, None]
        return np.ascontiguousarray(table)

    def reader(self, read: TableReader) -> TableReader:
        """`read` with the scales applied, in each table's own layout."""
        def scaled(layer: CompressibleLayer) -> np.ndarray:
            if layer.weight not in self.rows and layer.weight not in self.columns:
                return read(layer)
            table = self.oriented(layer, read(layer))
            return table if layer.layout.channel_axis == 0 else table.T
        return scaled


def scaling_targets(graph: gs.Graph, layers: Sequence[CompressibleLayer], ignored: frozenset[str] = frozenset()
                    ) -> list[ScalingTarget]:
    """The activations read only by `layers` (the 4-bit candidates) whose scale can fold upstream into nodes not
    `ignored` (the user's ignored scope keeps its constants as they are), the last made first."""
    nodes = {node.name: node for node in graph.nodes}
    position = {node.name: index for index, node in enumerate(graph.nodes)}
    outputs = {tensor.name for tensor in graph.outputs}
    tensors = graph.tensors()
    by_activation: dict[str, list[CompressibleLayer]] = defaultdict(list)
    for layer in layers:
        if layer.activation is not None and not layer.embedding:
            by_activation[layer.activation].append(layer)
    targets = []
    for activation, readers in by_activation.items():
        if len({layer.reduction for layer in readers}) != 1 or \
                any(len(nodes[layer.node].inputs[layer.layout.port].outputs) != 1 for layer in readers):
            continue
        folds = _folds(tensors[activation], [nodes[layer.node] for layer in readers], readers[0].reduction, outputs)
        if folds and not {fold.node for fold in folds} & ignored:
            targets.append(ScalingTarget(activation, tuple(readers), tuple(folds)))
    return sorted(targets, key=lambda t: -position[tensors[t.activation].inputs[0].name])


def scale_activations(graph: gs.Graph, layers: Sequence[CompressibleLayer], targets: Sequence[ScalingTarget],
                      read: TableReader, importance: Mapping[str, np.ndarray], mode: WeightMode,
                      group_size: int | None) -> ActivationScaling:
    """Choose each target's scale (`read(layer)` gives a table's float values) and say where it goes; `layers` are
    all compressible tables (a fold into one of them divides it as it is read)."""
    nodes = {node.name: node for node in graph.nodes}
    tables = {(layer.node, layer.layout.port): layer for layer in layers}
    scaling = ActivationScaling(importance=dict(importance))
    for target in targets:
        energy = importance.get(target.activation)
        if energy is None or energy.shape != (target.features,):
            continue
        samples = [scaling.oriented(layer, read(layer), -(-layer.shape[layer.layout.channel_axis] // SEARCH_CHANNELS))
                   for layer in target.readers]
        scale = _best_scale(samples, energy, mode, group_size)
        if scale is None:
            continue
        for layer in target.readers:
            scaling.rows[layer.weight] = scale
        scaling.importance[target.activation] = (energy / scale ** 2).astype(np.float32)
        for fold in target.folds:
            layer = tables.get((fold.node, fold.port))
            if layer is not None:
                scaling.columns[layer.weight] = scale
            else:
                scaling.commands.append(SetConstantInput(fold.node, fold.port,
                                                         _divided(nodes[fold.node].inputs[fold.port], fold.axis,
                                                                  scale)))
        scaling.scaled.append(target.activation)
    return scaling


def _best_scale(tables: Sequence[np.ndarray], energy: np.ndarray, mode: WeightMode, group_size: int | None
                ) -> np.ndarray | None:
    """The scale with the least rounding error over `tables` (oriented), None when no scaling is best."""
    rms = np.sqrt(np.maximum(energy.astype(np.float64), 0.0))
    if not rms.max() > 0:
        return None
    rms = np.maximum(rms, rms.max() * _MIN_RELATIVE_RMS)
    k = rms.size
    block = group_size if group_size is not None and k % group_size == 0 else k

    def error(scale: np.ndarray) -> float:
        weights = (energy / scale ** 2).astype(np.float32)
        return sum(rounding_error(table * scale[None, :].astype(np.float32), mode, block, weights)
                   for table in tables)

    best, least = None, error(np.ones(k))
    for alpha in ALPHA_GRID[1:]:
        scale = rms ** alpha
        scale /= np.sqrt(scale.max() * scale.min())
        candidate = error(scale)
        if candidate < least:
            best, least = scale, candidate
    return None if best is None else best.astype(np.float32)


def _divided(constant: gs.Constant, axis: int, scale: np.ndarray) -> np.ndarray:
    """The constant's values divided by `scale` along `axis`; a constant of size 1 there is broadcast first."""
    values = np.asarray(peek_values(constant), np.float32)
    if values.ndim == 0:
        values = values.reshape(1)
    axis %= values.ndim
    shape = [1] * values.ndim
    shape[axis] = scale.size
    if values.shape[axis] == 1:
        values = np.broadcast_to(values, tuple(scale.size if i == axis else d for i, d in enumerate(values.shape)))
    return (values / scale.reshape(shape)).astype(np.float32)


def _folds(tensor: gs.Tensor, readers: list[gs.Node], features: int, outputs: set[str]) -> list[Fold] | None:
    """Where 1/s on `tensor`'s last axis folds, when `readers` are all that read it; None when it cannot."""
    if not isinstance(tensor, gs.Variable) or tensor.name in outputs or len(tensor.inputs) != 1 or \
            len(tensor.outputs) != len(readers) or {id(n) for n in tensor.outputs} != {id(n) for n in readers}:
        return None
    maker = tensor.inputs[0]
    rule = spec(maker).output_scaling
    if rule is OutputScaling.PARAMETERS:
        if maker.attrs.get("axis", -1) != -1:
            return None
        return _all_or_none([_constant_fold(maker, port, features) for port in spec(maker).trained_ports
                             if port < len(maker.inputs) and maker.inputs[port].name])
    if rule is OutputScaling.WEIGHT_CHANNELS:
        return _weight_channel_folds(maker, features)
    operands = [(port, t) for port, t in enumerate(maker.inputs)]
    if rule is OutputScaling.SUM:
        return _all_or_none([_operand_folds(maker, port, t, features, outputs) for port, t in operands])
    if rule is OutputScaling.PRODUCT:
        # A constant operand first: it costs nothing to rescale, while an activation's maker may be shared.
        for port, t in sorted(operands, key=lambda pair: not isinstance(pair[1], gs.Constant)):
            folds = _operand_folds(maker, port, t, features, outputs)
            if folds:
                return folds
    return None


def _operand_folds(maker: gs.Node, port: int, operand: gs.Tensor, features: int, outputs: set[str]
                   ) -> list[Fold] | None:
    if isinstance(operand, gs.Constant):
        return _constant_fold(maker, port, features)
    return _folds(operand, [maker], features, outputs)


def _weight_channel_folds(maker: gs.Node, features: int) -> list[Fold] | None:
    weight = constant_weight(maker)
    if weight is None or len(weight.shape) != 2 or len(weight.outputs) != 1 or \
            np.dtype(weight.dtype) != np.float32:
        return None
    axis = weight_channel_axis(maker) % 2
    if weight.shape[axis] != features:
        return None
    folds = [[Fold(maker.name, spec(maker).weight_port, axis)]]
    bias = spec(maker).bias_port
    if bias is not None and bias < len(maker.inputs) and maker.inputs[bias].name:
        folds.append(_constant_fold(maker, bias, features))
    return _all_or_none(folds)


def _constant_fold(node: gs.Node, port: int, features: int) -> list[Fold] | None:
    """Input `port` of `node`, when it is a float constant read only by `node` that is one value, or one per
    feature along its last axis."""
    constant = node.inputs[port]
    if not isinstance(constant, gs.Constant) or len(constant.outputs) != 1 or \
            np.dtype(constant.dtype) != np.float32:
        return None
    shape = tuple(constant.shape)
    if any(d != 1 for d in shape[:-1]) or (shape and shape[-1] not in (1, features)):
        return None
    return [Fold(node.name, port, -1)]


def _all_or_none(parts: list[list[Fold] | None]) -> list[Fold] | None:
    """The parts' folds together, None when there are none or any part could not fold."""
    if not parts or any(part is None for part in parts):
        return None
    return [fold for part in parts for fold in part]
