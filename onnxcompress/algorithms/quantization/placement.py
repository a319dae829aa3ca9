"""Where quantizers go (NNCF paper §4.1), decided from the op table alone.

- Weights of every compute op (Conv, Gemm, MatMul with a constant weight) are quantized at the op.
- An activation is quantized where it enters a compute op, after the pattern that produced it (compute op,
  bias Add, ReLU/Clip), never inside it, and once per tensor however many ops read it.
- Quantizers move up through pass-through ops (MaxPool, Reshape...) and are repeated after them with the same
  parameters, so those ops run on INT8 data in both runtimes.
- Conv outputs are quantized even when their reader is float: ONNX Runtime only runs QLinearConv when the
  Conv's output goes through QuantizeLinear.
- Scales are unified where a runtime needs one scale: both inputs of a residual Add (when either is quantized)
  and all inputs and the output of a Concat whose output is quantized.
- In transformer models Add stays float, and LayerNorm/Softmax and friends keep reading float tensors.
- For files that must be exact on every x86 CPU (`portable`), weights of ops whose ONNX Runtime kernel adds
  products in int16 pairs on CPUs without VNNI get a pair budget (`scheme.INT16_PAIR_BUDGET`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.algorithms.quantization.scheme import INT16_PAIR_BUDGET
from onnxcompress.transforms.op_table import (
    SHAPE_KEEPING_OPS,
    SHAPE_READING_OPS,
    TRANSFORMER_FLOAT_OPS,
    Role,
    channel_bias,
    constant_weight,
    input_channels,
    input_layout_known,
    int16_pair_accumulation,
    int16_pair_order,
    spec,
    weight_channel_axis,
)

_FLOAT_TYPES = (np.float32, np.float16, np.float64)


@dataclass(frozen=True)
class WeightTarget:
    """A constant weight quantized per channel along `axis`. With `pair_budget`, no two same-sign levels that the
    op's integer kernel adds up in one int16 exceed it: neighbours in `pair_order` (the weight's other axes in the
    kernel's order), or any two levels of a channel when that order is None."""

    node: str
    port: int
    axis: int
    pair_budget: int | None = None
    pair_order: tuple[int, ...] | None = None


@dataclass(frozen=True)
class ActivationTarget:
    """One quantizer on `tensor`; `consumers` are the nodes that read the dequantized value, and with
    `graph_output` the model's output becomes the dequantized value too."""

    tensor: str
    consumers: tuple[str, ...]
    graph_output: bool = False


@dataclass(frozen=True)
class QuantizerGroup:
    """Quantizers that must share one scale and zero-point.

    `feeds_compute` is false for a group that no compute op reads: Conv outputs quantized only so that ONNX
    Runtime can fuse QLinearConv, on their way into a Concat or a float op.
    """

    targets: tuple[ActivationTarget, ...]
    feeds_compute: bool = True


@dataclass(frozen=True)
class BiasTarget:
    """A compute op whose bias can absorb the mean error of its quantized weight (bias correction)."""

    node: str
    bias_port: int
    input_tensor: str
    #: Channel axis of the input activation: 1 for Conv (NCHW), -1 for Gemm/MatMul.
    input_axis: int
    input_channels: int


@dataclass(frozen=True)
class QuantizerSetup:
    weights: tuple[WeightTarget, ...]
    groups: tuple[QuantizerGroup, ...]
    bias_targets: tuple[BiasTarget, ...]

    @property
    def activation_tensors(self) -> list[str]:
        return [t.tensor for g in self.groups for t in g.targets]


def plan_quantizers(graph: gs.Graph, ignored: frozenset[str], *, transformer: bool = False,
                    portable: bool = True) -> QuantizerSetup:
    """Decide every quantizer for `graph`; nodes named in `ignored` stay float and add no requirement.

    `portable` keeps every integer kernel exact on x86 CPUs without VNNI (see `WeightTarget.pair_budget`).
    """
    return _Planner(graph, ignored, transformer, portable).plan()


class _Planner:
    def __init__(self, graph: gs.Graph, ignored: frozenset[str], transformer: bool, portable: bool) -> None:
        self.graph, self.ignored, self.transformer, self.portable = graph, ignored, transformer, portable
        self.graph_outputs = {t.name for t in graph.outputs}
        self.parent: dict[str, str] = {}  # union-find over tensor names: unified-scale groups
        self.tensors: dict[str, gs.Tensor] = {}
        self.quantized_outputs: set[str] = set()

    def plan(self) -> QuantizerSetup:
        weights, bias_targets = [], []
        compute = [n for n in self.graph.nodes if spec(n).role is Role.COMPUTE and n.name not in self.ignored]
        for node in compute:
            weight = self._weight_target(node)
            if weight:
                weights.append(weight)
                bias = bias_target(node)
                if bias:
                    bias_targets.append(bias)
            for port in spec(node).activation_ports:
                if weight and port == weight.port or port >= len(node.inputs):
                    continue
                self._require(node.inputs[port])
            if spec(node).integer_kernel_needs_quantized_output and not self.transformer:
                end = self._pattern_end(node)
                if not (_dynamic_shape(end) and _shape_read(end)):  # see op_table.SHAPE_READING_OPS
                    self._require(end, as_output=True)
        self._unify_until_stable()
        return QuantizerSetup(tuple(weights), self._groups(), tuple(bias_targets))

    # -- requirements ---------------------------------------------------------------------------------------

    def _require(self, tensor: gs.Tensor, *, as_output: bool = False) -> None:
        """Quantize `tensor`; pull the quantizer up through pass-through producers, sharing its parameters.

        `as_output` also quantizes a graph output (a Conv whose result is the model's output).
        """
        if as_output and tensor.name in self.graph_outputs and not isinstance(tensor, gs.Constant):
            self.quantized_outputs.add(tensor.name)
        elif not self._quantizable_activation(tensor):
            return
        if tensor.name in self.parent:
            return
        self.parent[tensor.name] = tensor.name
        self.tensors[tensor.name] = tensor
        upstream = self._upstream(tensor)
        if upstream is not None and self._quantizable_activation(upstream):
            self._require(upstream)
            self._union(tensor.name, upstream.name)

    def _upstream(self, tensor: gs.Tensor) -> gs.Tensor | None:
        """The tensor a quantizer on `tensor` is pulled up to: the input of its pass-through producer, or of the
        first op of a chain of layout-only ops whose intermediate tensors nothing else reads."""
        producer = tensor.inputs[0] if tensor.inputs else None
        if producer is None or spec(producer).role is not Role.PASSTHROUGH or producer.name in self.ignored:
            return None
        upstream = producer.inputs[0]
        while spec(producer).layout_only and len(upstream.outputs) == 1 and upstream.name not in self.graph_outputs:
            parent = upstream.inputs[0] if upstream.inputs else None
            if parent is None or not spec(parent).layout_only or parent.name in self.ignored:
                break
            producer, upstream = parent, parent.inputs[0]
        return upstream

    def _quantizable_activation(self, tensor: gs.Tensor) -> bool:
        if isinstance(tensor, gs.Constant) or not tensor.name:
            return False
        if tensor.dtype is not None and np.dtype(tensor.dtype).type not in _FLOAT_TYPES:
            return False
        return bool(self._readers(tensor))

    def _readers(self, tensor: gs.Tensor) -> tuple[str, ...]:
        readers = []
        for consumer in tensor.outputs:
            if consumer.name in self.ignored:
                continue
            # Transformers keep LayerNorm/Softmax inputs and the residual stream float: an Add reading the
            # dequantized value would add quantization noise to the residual stream in every block.
            if self.transformer and (consumer.op in TRANSFORMER_FLOAT_OPS or spec(consumer).role is Role.ELTWISE_ADD):
                continue
            readers.append(consumer.name)
        return tuple(dict.fromkeys(readers))

    def _pattern_end(self, node: gs.Node) -> gs.Tensor:
        """The tensor after the fused pattern that starts at compute op `node` (bias Add, ReLU/Clip)."""
        tensor = node.outputs[0]
        while len(tensor.outputs) == 1 and tensor.name not in self.graph_outputs:
            reader = tensor.outputs[0]
            if reader.name in self.ignored:
                break
            if spec(reader).role is Role.FUSED_ACTIVATION or _is_bias_add(reader):
                tensor = reader.outputs[0]
                continue
            break
        return tensor

    # -- unified scales -------------------------------------------------------------------------------------

    def _unify_until_stable(self) -> None:
        changed = True
        while changed:
            changed = False
            for node in self.graph.nodes:
                if node.name in self.ignored:
                    continue
                # Residual Adds keep one scale per input (both runtimes add differently scaled INT8 inputs): a
                # shared scale coarsens the smaller branch (bench/dynamic.py, docs/benchmarks.md).
                if spec(node).role is Role.CONCAT:
                    changed |= self._unify_concat(node)

    def _unify_concat(self, node: gs.Node) -> bool:
        output = node.outputs[0]
        if not all(self._quantizable_activation(t) for t in node.inputs):
            return False
        if output.name in self.parent:
            return self._unify([*node.inputs, output])
        if not any(t.name in self.parent for t in node.inputs):
            return False
        # The output is read in float (densenet: by a BatchNormalization), so the inputs keep their own scales;
        # but all must be INT8: one float input makes OpenVINO concatenate, and run what follows, in bf16. An
        # input that is itself such a Concat's output is INT8 already (its own inputs are quantized).
        before = len(self.parent)
        for tensor in node.inputs:
            if not (tensor.inputs and spec(tensor.inputs[0]).role is Role.CONCAT):
                self._require(tensor)
        return len(self.parent) != before

    def _unify(self, tensors: list[gs.Tensor]) -> bool:
        before = len(self.parent), len({self._find(t) for t in self.parent})
        for tensor in tensors:
            self._require(tensor)
        for tensor in tensors[1:]:
            self._union(tensors[0].name, tensor.name)
        return (len(self.parent), len({self._find(t) for t in self.parent})) != before

    def _find(self, name: str) -> str:
        while self.parent[name] != name:
            self.parent[name] = self.parent[self.parent[name]]
            name = self.parent[name]
        return name

    def _union(self, a: str, b: str) -> None:
        self.parent[self._find(a)] = self._find(b)

    def _groups(self) -> tuple[QuantizerGroup, ...]:
        members: dict[str, list[ActivationTarget]] = {}
        for name, tensor in self.tensors.items():
            target = ActivationTarget(name, self._readers(tensor), name in self.quantized_outputs)
            members.setdefault(self._find(name), []).append(target)
        nodes = {n.name: n for n in self.graph.nodes}
        return tuple(QuantizerGroup(tuple(targets), any(spec(nodes[reader]).role is Role.COMPUTE
                                                        for target in targets for reader in target.consumers))
                     for targets in members.values())

    # -- weights and biases ---------------------------------------------------------------------------------

    def _weight_target(self, node: gs.Node) -> WeightTarget | None:
        weight = constant_weight(node)
        axis = weight_channel_axis(node)
        if weight is None or axis is None or weight.values.ndim < 2 or weight.values.dtype != np.float32:
            return None
        if not input_layout_known(node):
            return None
        target = WeightTarget(node.name, spec(node).weight_port, axis % weight.values.ndim)
        if not (self.portable and int16_pair_accumulation(node)):
            return target
        return replace(target, pair_budget=INT16_PAIR_BUDGET, pair_order=int16_pair_order(node, weight.values.ndim))

def bias_target(node: gs.Node) -> BiasTarget | None:
    """The bias of `node` that bias correction can adjust, if it has one (a missing Conv/Gemm bias can be added)."""
    entry = spec(node)
    source = node.inputs[0]
    if isinstance(source, gs.Constant) or not entry.correct_bias or not input_layout_known(node):
        return None
    if channel_bias(node) is None or entry.bias_scale_attr and node.attrs.get(entry.bias_scale_attr, 1.0) != 1.0:
        return None
    return BiasTarget(node.name, entry.bias_port, source.name, entry.channel_axis, input_channels(node))


def _dynamic_shape(tensor: gs.Tensor) -> bool:
    """Whether the spatial size (axes past the channel axis) is unknown; a dynamic batch alone does not count."""
    return tensor.shape is None or any(not isinstance(d, int) or d <= 0 for d in tensor.shape[2:])


def _shape_read(tensor: gs.Tensor, depth: int = 3) -> bool:
    """Whether a shape-reading op reads `tensor` or an elementwise result of it within `depth` ops (a SiLU's Mul)."""
    for reader in tensor.outputs:
        if reader.op in SHAPE_READING_OPS:
            return True
        if depth and reader.op in SHAPE_KEEPING_OPS and any(_shape_read(t, depth - 1) for t in reader.outputs):
            return True
    return False


def _is_bias_add(node: gs.Node) -> bool:
    return node.op == "Add" and len(node.inputs) == 2 and any(isinstance(t, gs.Constant) for t in node.inputs)
