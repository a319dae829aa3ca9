"""The commands algorithms emit and `apply_commands` executes: small, frozen, and independent of each other.

An algorithm decides *what* to change (which tensor gets which quantizer, which constant takes which values);
the applier in `transforms.applier` is the one place that knows *how* to edit the graph, in which order commands
apply (`applier.Phase`) and how new nodes and tensors are named (uniquely). Every command is addressed to a typed
insertion point, its `point`: an input of a node (`NodeInput`: a weight, a bias), an activation tensor as some of
its readers see it (`TensorReaders`), an attribute (`NodeAttribute`), or a new graph output (`NewOutput`). Points name nodes and tensors, so a
plan can be made on one copy of a graph and applied to another.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class NodeInput:
    """Input `port` of node `node` (a constant weight or bias, or the next missing optional input)."""

    node: str
    port: int


@dataclass(frozen=True)
class TensorReaders:
    """Activation `tensor` as the nodes `consumers` read it, and as the graph output of that name if
    `graph_output`; other readers are not affected."""

    tensor: str
    consumers: tuple[str, ...]
    graph_output: bool = False


@dataclass(frozen=True)
class NodeAttribute:
    """Attribute `name` of node `node`."""

    node: str
    name: str


@dataclass(frozen=True)
class NewOutput:
    """A graph output the command adds, named `name`."""

    name: str


class AtNodeInput:
    """A command on input `port` of node `node`."""

    node: str
    port: int

    @property
    def point(self) -> NodeInput:
        return NodeInput(self.node, self.port)


class AtTensorReaders:
    """A command on activation `tensor` for its readers `consumers` (and the graph output, with `graph_output`)."""

    tensor: str
    consumers: tuple[str, ...]
    graph_output: bool = False

    @property
    def point(self) -> TensorReaders:
        return TensorReaders(self.tensor, self.consumers, self.graph_output)


@dataclass(frozen=True, eq=False)
class QuantizeDequantize(AtTensorReaders):
    """Insert QuantizeLinear → DequantizeLinear after `tensor`; `consumers` (node names) read the result.

    The element type of the integer tensor follows `zero_point.dtype` (int8 or uint8). Readers not listed in
    `consumers` (ignored nodes) keep reading the float tensor. With `graph_output`, the graph output named
    `tensor` becomes the dequantized value (same name; the float producer's tensor is renamed).
    """

    tensor: str
    scale: np.ndarray
    zero_point: np.ndarray
    consumers: tuple[str, ...]
    graph_output: bool = False


@dataclass(frozen=True, eq=False)
class DequantizeWeight(AtNodeInput):
    """Replace constant input `port` of `node` by an integer initializer read through DequantizeLinear.

    Stores only the integer tensor with a per-channel `scale` along `axis` (INT8: post-training quantization), or
    with `block_size`, one scale per block of that many values along `axis` (the opset-21 blockwise form; `scale`
    is shaped like `quantized` with that axis divided by the block size). `quantized` may be 4-bit
    (`ml_dtypes.int4`/`uint4`), stored packed, two values per byte. `zero_point` (the dtype and shape of `scale`'s
    levels) is left out when None: a zero-point of 0.
    """

    node: str
    port: int
    quantized: np.ndarray
    scale: np.ndarray
    axis: int
    zero_point: np.ndarray | None = None
    block_size: int = 0


@dataclass(frozen=True, eq=False)
class DequantizeBias(AtNodeInput):
    """Replace bias input `port` of `node` by INT32 levels read through DequantizeLinear.

    Their scale is the node's input scale times its weight scale (`bias_scale`), as integer kernels require. It is
    computed in the graph, a Mul of the two scale initializers that both runtimes fold when they load the model,
    instead of being stored: on a depthwise convolution it would cost 4 bytes per channel, as much again as the
    weight scales (shufflenet: 57 KB, 3.7% of the INT8 file). Apply after the node's input and weight quantizers.
    """

    node: str
    port: int
    quantized: np.ndarray


def bias_scale(input_scale: np.ndarray, weight_scale: np.ndarray) -> np.ndarray:
    """The scale of INT32 bias levels, computed as the runtime computes `DequantizeBias`'s Mul (float32)."""
    return np.asarray(input_scale, np.float32) * np.asarray(weight_scale, np.float32)


@dataclass(frozen=True, eq=False)
class SetConstantInput(AtNodeInput):
    """Set constant input `port` of `node` to `values`, adding the input if the node has fewer (a missing bias)."""

    node: str
    port: int
    values: np.ndarray


@dataclass(frozen=True, eq=False)
class SliceChannels(AtNodeInput):
    """Keep only positions `kept` along `axis` of the constant behind input `port` of `node` (filter pruning): the
    constant itself or, when a DequantizeLinear produces the input, its integer values and, if they are per
    channel along the same axis, its scale and zero-point. With `groups` > 1 the rows (axis 0) form that many
    equal blocks, block j keeping the positions of `kept` in its j-th share of the axis (a grouped convolution's
    input channels), renumbered within the block."""

    node: str
    port: int
    axis: int
    kept: np.ndarray
    groups: int = 1


@dataclass(frozen=True, eq=False)
class SetAttribute:
    """Set attribute `name` of `node` to `value` (a pruned depthwise convolution's group count)."""

    node: str
    name: str
    value: int | float | list[int]

    @property
    def point(self) -> NodeAttribute:
        return NodeAttribute(self.node, self.name)


@dataclass(frozen=True, eq=False)
class ScaleActivation(AtTensorReaders):
    """Insert `tensor` · `factor` (a Mul by a constant broadcast along the last axis) for `consumers` only; other
    readers keep reading `tensor`."""

    tensor: str
    factor: np.ndarray
    consumers: tuple[str, ...]


@dataclass(frozen=True, eq=False)
class TrainableQuantizer:
    """A fake quantizer with trainable range (NNCF paper §4.1), computed in float so that it can be trained.

    Symmetric (`asymmetric=False`): step s = step0 · max(1 + k·δ, ε) with the trainable δ `{name}.scale_delta`
    (shaped like `step0`, initially 0); r = s · clamp(round(x / s), q_min, q_max). s · q_max is the paper's
    `scale`. Asymmetric: range R = range0 · max(1 + k·δ_R, ε), low L = low0 + range0 · k·δ_L (trainable
    `{name}.range_delta`, `{name}.low_delta`), s = R / q_max, zero-point z = clamp(round(-L / s), 0, q_max)
    (float zero maps exactly to z, as after the paper's alignment), r = s · (clamp(round(x / s) + z, 0, q_max) - z).

    k = `lr_scale` gives the quantizer its own learning rate: an Adam-family step of size lr moves δ by about lr,
    so the range moves by about k · lr of its initial size. Round needs a straight-through gradient.
    The step s (the exported QuantizeLinear scale) is the tensor `step_name`.
    """

    name: str
    step0: np.ndarray
    q_min: int
    q_max: int
    lr_scale: float
    asymmetric: bool = False
    #: Asymmetric only: the initial zero-point (step0 · zero_point0 = -low0).
    zero_point0: float = 0.0

    @property
    def step_name(self) -> str:
        return f"{self.name}.step"

    @property
    def parameter_names(self) -> tuple[str, ...]:
        if self.asymmetric:
            return (f"{self.name}.low_delta", f"{self.name}.range_delta")
        return (f"{self.name}.scale_delta",)


@dataclass(frozen=True, eq=False)
class FakeQuantize(AtTensorReaders):
    """Insert `quantizer` after activation `tensor`; `consumers` and `graph_output` as for QuantizeDequantize.

    With `unsigned`, an asymmetric quantizer's step is used with zero-point 0 and levels [0, q_max]: a
    non-negative member (a ReLU output) of a group that shares one asymmetric range.
    """

    tensor: str
    quantizer: TrainableQuantizer
    consumers: tuple[str, ...]
    graph_output: bool = False
    unsigned: bool = False


@dataclass(frozen=True, eq=False)
class FakeQuantizeWeight(AtNodeInput):
    """Fake-quantize constant input `port` of `node` (kept float and trainable) per channel along `axis`."""

    node: str
    port: int
    quantizer: TrainableQuantizer
    axis: int


@dataclass(frozen=True, eq=False)
class FakeQuantizeBias(AtNodeInput):
    """Round constant input `port` of `node` to the INT32 grid of step `input_step` · `weight_step` (two step
    tensors of fake quantizers), as the exported INT32 bias will be."""

    node: str
    port: int
    input_step: str
    weight_step: str


@dataclass(frozen=True, eq=False)
class MaskWeight(AtNodeInput):
    """Multiply constant input `port` of `node` by the constant `mask` (same shape, 0 or 1) in the graph: the weight
    stays a trainable float constant, the mask a frozen parameter the algorithm's scheduler rewrites.

    The masked weight is what later commands on the same input see (a fake quantizer quantizes the masked
    weight; a second mask multiplies it: filter pruning's, then sparsity's). Its tensor is named `{mask}.applied`,
    unique because a mask name is.
    """

    node: str
    port: int
    mask: str
    values: np.ndarray


@dataclass(frozen=True, eq=False)
class StochasticGateWeight(AtNodeInput):
    """Multiply constant input `port` of `node` by a stochastic binary gate per weight (RB sparsity, NNCF paper
    eq. 6): logits s = k·δ (trainable `{name}.logit_delta`, shaped like the weight, initially `logit0`/k, where
    `logit0` is one value or an array of the weight's shape, so that s learns k times faster than the weights),
    z = Round(sigmoid(s + n·logit(u))), n the scalar constant `noise` (1 while training; 0 gives the deterministic
    gate [s > 0] for evaluation). u is uniform in (0, 1), a hash of the gate's counters (`counter` onwards,
    `stochastic_gate.counters_used` of them) and the scalar constant `step` (the training step), so that the same
    step draws the same noise in any session. Round needs a straight-through gradient. The logits are the tensor
    `{name}.logits`.
    """

    node: str
    port: int
    name: str
    logit0: float | np.ndarray
    lr_scale: float
    noise: str
    step: str
    counter: int

    @property
    def logits(self) -> str:
        return f"{self.name}.logits"

    @property
    def delta(self) -> str:
        return f"{self.name}.logit_delta"


@dataclass(frozen=True, eq=False)
class ComplexityLoss:
    """Add the scalar `name` = weight · (Σ sigmoid(logits) / N - density)² over all the gates' logits (NNCF paper
    eq. 7); `density` is a scalar constant (the scheduler's target fraction of kept weights, initially
    `density0`). The loss becomes a graph output until the training loss takes it in."""

    name: str
    logits: tuple[str, ...]
    density: str
    density0: float
    weight: float

    @property
    def point(self) -> NewOutput:
        return NewOutput(self.name)


Command = (QuantizeDequantize | DequantizeWeight | DequantizeBias | SetConstantInput | SliceChannels | SetAttribute
           | ScaleActivation
           | FakeQuantize
           | FakeQuantizeWeight | FakeQuantizeBias | MaskWeight | StochasticGateWeight | ComplexityLoss)
