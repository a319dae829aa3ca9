"""What onnxcompress knows about ONNX ops, in one declarative table.

Every placement and transformation decision that depends on an op type reads this table instead of branching on
op names: which input is the weight and which the bias, along which axis the weight's output channels lie, which
inputs carry activations, and how the op behaves in an INT8 graph (see `Role`). An op missing from the table is
treated as `Role.FLOAT`: it keeps running in float and quantizers are never placed inside it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs


class Role(enum.Enum):
    """How an op takes part in an INT8 graph."""

    #: Heavy op with an integer kernel in OpenVINO and ONNX Runtime (Conv, Gemm, MatMul): weights and activation
    #: inputs are quantized.
    COMPUTE = "compute"
    #: Elementwise op that runtimes fuse into the preceding compute op (bias Add, ReLU, Clip...): quantizers go
    #: after it, never between it and the compute op.
    FUSED_ACTIVATION = "fused_activation"
    #: Op whose outputs stay within its input's range (MaxPool, Reshape, Transpose select or move values;
    #: AveragePool averages them): it runs on INT8 data, so the quantizer on its input is repeated on its output
    #: with the same parameters.
    PASSTHROUGH = "passthrough"
    #: Elementwise Add of two activations (residual connection): both inputs are quantized, each on its own scale.
    ELTWISE_ADD = "eltwise_add"
    #: Concat: all inputs and the output share one scale, so the op is a plain copy of INT8 data. When the output
    #: is read in float, the inputs keep their own scales but are all quantized, so the copy is still INT8.
    CONCAT = "concat"
    #: Everything else runs in float.
    FLOAT = "float"


class PairOrder(enum.Enum):
    """The order in which ONNX Runtime's x86 integer kernel adds up one output channel's products; VPMADDUBSW adds
    each two neighbours in it (positions 2i and 2i + 1) in int16."""

    #: QLinearConv reorders each group's filter from OIHW to HWIO before packing it: taps outer, input channels
    #: inner, so pairs are input channels (2i, 2i + 1) of one tap, and cross taps when the channel count is odd.
    TAPS_THEN_INPUT_CHANNELS = "taps_then_input_channels"
    #: QGemm, QLinearMatMul and MatMulIntegerToFloat pack the weight along its input features.
    INPUT_FEATURES = "input_features"


class ChannelRule(enum.Enum):
    """How an op passes the channels of its activation inputs to its outputs (filter pruning's dependency
    analysis, `algorithms/pruning/channels.py`). An op without a rule stops the analysis: channels it reads are
    not pruned."""

    #: Reads channels through its weight's input-channel axis and makes new ones (Conv, Gemm, MatMul with a
    #: constant weight). A depthwise convolution passes channels instead, its filters pruned with them.
    PRODUCE = "produce"
    #: Output channel c depends on input channel c only (activations, pooling).
    ELEMENTWISE = "elementwise"
    #: BatchNormalization: elementwise, with per-channel parameters (inputs 1-4).
    NORMALIZE = "normalize"
    #: Elementwise over broadcast inputs (Add, Mul...): activations share channels (merged into one group),
    #: constants that vary per channel lose the pruned ones.
    BROADCAST = "broadcast"
    #: Concatenation: along the channel axis each input's channels follow the previous inputs'.
    CONCAT = "concat"
    #: Split along the channel axis: each output takes a run of channels.
    SPLIT = "split"
    #: Moves axes: the channel axis moves with its dimension.
    TRANSPOSE = "transpose"
    #: Reshape, Flatten, Squeeze, Unsqueeze: followed through the shapes (channels × spatial become features).
    RESHAPE = "reshape"


class OutputScaling(enum.Enum):
    """How an op's output divides by a factor per channel of its last axis through its constants alone (where
    weight compression's activation-aware scaling folds 1/s, `algorithms/weight_compression/awq.py`)."""

    #: Its constant parameters at `OpSpec.trained_ports` (LayerNormalization's scale and bias over the last axis).
    PARAMETERS = "parameters"
    #: Its constant weight's output channels and its bias (MatMul, Gemm).
    WEIGHT_CHANNELS = "weight_channels"
    #: Each operand divided: a constant directly, an activation by the op that makes it (Add, Sub).
    SUM = "sum"
    #: One operand divided (Mul).
    PRODUCT = "product"


@dataclass(frozen=True)
class WeightLayout:
    """Where weight-only compression (`onnxcompress compress-weights`) finds an op's constant 2-D table and how it
    quantizes it: one scale per slice of `channel_axis`, in blocks along `block_axis`."""

    port: int
    #: Axis with one scale (per block) per slice: output channels; an embedding's rows.
    channel_axis: int
    #: Axis the blocks run along: the reduction axis K of a matrix product, as blockwise kernels need (ONNX
    #: Runtime's MatMulNBits, OpenVINO's compressed FullyConnected); an embedding's features.
    block_axis: int
    #: Attribute that, when set, swaps the two axes (Gemm's transB).
    transpose_attr: str | None = None
    #: Attributes (with their default) that must have the given value for the layout to hold (Gather's axis 0).
    required_attrs: tuple[tuple[str, int, int], ...] = ()
    #: Whether an activation input (port 0) holds features along its last axis that meet the table's block axis,
    #: so activation statistics can weigh the weight's rows (matrix products, not a Gather's indices).
    activation_features: bool = True


@dataclass(frozen=True)
class OpSpec:
    """The facts about one op type."""

    role: Role
    #: Input index of a constant weight, if the op has one.
    weight_port: int | None = None
    #: Input index of the bias, if the op has one.
    bias_port: int | None = None
    #: Axis of the weight tensor that enumerates output channels (per-channel quantization, bias correction).
    weight_channel_axis: int | None = None
    #: Attribute that, when set, transposes the weight (Gemm's transB); the channel axis is then the other one.
    weight_transpose_attr: str | None = None
    #: Attribute that, when set, transposes the activation input (Gemm's transA): layouts we do not handle.
    input_transpose_attr: str | None = None
    #: Attribute that scales the bias before it is added (Gemm's beta).
    bias_scale_attr: str | None = None
    #: Axis of the activation input and of the output that enumerates channels ([N, C, ...] or [..., C]).
    channel_axis: int | None = None
    #: Input indices that carry activations to be quantized when the op runs in INT8.
    activation_ports: tuple[int, ...] = (0,)
    #: ONNX Runtime only emits a fused integer kernel (QLinearConv) when the op's output is quantized too; Gemm and
    #: MatMul have kernels with float output (QGemm, MatMulIntegerToFloat).
    integer_kernel_needs_quantized_output: bool = False
    #: ONNX Runtime fuses Gemm into QGemm only when the weight's DequantizeLinear has an explicit zero-point;
    #: QLinearConv fusion takes the default. Elsewhere the all-zero tensor is left out of the file (MatMul and
    #: ConvTranspose keep it: not measured without).
    integer_kernel_needs_weight_zero_point: bool = False
    #: A pass-through op that only rearranges values (no arithmetic). Chains of them get quantizers at their ends
    #: only: OpenVINO fuses a Reshape → Transpose → Reshape channel shuffle into ShuffleChannels only when no
    #: quantizer sits inside it, and ONNX Runtime moves Q/DQ through such ops by itself.
    layout_only: bool = False
    #: ONNX Runtime's x86 kernel for this op, on CPUs without VNNI, multiplies u8 activations by s8 weights with
    #: VPMADDUBSW, which adds each two neighbouring products in int16 and saturates (255 · 127 · 2 > 32767); the
    #: value says which weights are neighbours. Depthwise convolutions run a widening kernel instead
    #: (`int16_pair_accumulation` resolves it). Measured with bench/isa_probe.py under an emulated AVX2 CPU.
    int16_pairs: PairOrder | None = None
    #: Inputs besides the weight and bias that hold parameters fine-tuning trains (a constant there is trainable).
    trained_ports: tuple[int, ...] = ()
    #: Sparsity masks the constant weight (`weight_port`) of this op.
    sparsify_weight: bool = False
    #: Preprocessing folds a per-output-channel affine that follows the op (BatchNormalization, a constant
    #: Mul/Add) into its weight and bias.
    fold_channel_affine: bool = False
    #: Bias correction adjusts the op's bias (ConvTranspose: not implemented, its filters are split by group).
    correct_bias: bool = False
    #: How the op passes channels (filter pruning); None: it stops the analysis.
    channels: ChannelRule | None = None
    #: Axis of the weight that enumerates input channels (2-D Gemm weights: the other one than the channel axis).
    weight_input_axis: int | None = None
    #: Weight-only compression's layout of the op's constant table; None: compress-weights leaves the op alone.
    compress_weight: WeightLayout | None = None
    #: How a per-channel factor on the op's output folds into its constants; None: it does not.
    output_scaling: OutputScaling | None = None


_PASSTHROUGH = OpSpec(Role.PASSTHROUGH, channels=ChannelRule.ELEMENTWISE)
_LAYOUT = OpSpec(Role.PASSTHROUGH, layout_only=True, channels=ChannelRule.RESHAPE)
_FUSED = OpSpec(Role.FUSED_ACTIVATION, channels=ChannelRule.ELEMENTWISE)
#: Float elementwise activations: output channel c is a function of input channel c.
_FLOAT_ELEMENTWISE = OpSpec(Role.FLOAT, activation_ports=(), channels=ChannelRule.ELEMENTWISE)

OP_TABLE: dict[str, OpSpec] = {
    "Conv": OpSpec(Role.COMPUTE, weight_port=1, bias_port=2, weight_channel_axis=0, channel_axis=1,
                   integer_kernel_needs_quantized_output=True, int16_pairs=PairOrder.TAPS_THEN_INPUT_CHANNELS,
                   sparsify_weight=True, fold_channel_affine=True, correct_bias=True,
                   channels=ChannelRule.PRODUCE, weight_input_axis=1),
    # ONNX Runtime runs ConvTranspose in float (no QDQ fusion), so it needs no int16 headroom.
    "ConvTranspose": OpSpec(Role.COMPUTE, weight_port=1, bias_port=2, weight_channel_axis=1, channel_axis=1,
                            integer_kernel_needs_quantized_output=True, integer_kernel_needs_weight_zero_point=True,
                            sparsify_weight=True, fold_channel_affine=True, channels=ChannelRule.PRODUCE,
                            weight_input_axis=0),
    # Weight [in, out], or [out, in] with transB.
    "Gemm": OpSpec(Role.COMPUTE, weight_port=1, bias_port=2, weight_channel_axis=1, weight_transpose_attr="transB",
                   input_transpose_attr="transA", bias_scale_attr="beta", channel_axis=-1,
                   integer_kernel_needs_weight_zero_point=True, int16_pairs=PairOrder.INPUT_FEATURES,
                   sparsify_weight=True, fold_channel_affine=True, correct_bias=True, channels=ChannelRule.PRODUCE,
                   weight_input_axis=0, compress_weight=WeightLayout(1, channel_axis=1, block_axis=0,
                                                                     transpose_attr="transB"),
                   output_scaling=OutputScaling.WEIGHT_CHANNELS),
    # MatMul with a constant weight [.., in, out]; with two activations (attention) both inputs are quantized.
    # Two activations are both uint8 in our files: ONNX Runtime's u8u8 kernel widens to int16 first (exact).
    "MatMul": OpSpec(Role.COMPUTE, weight_port=1, weight_channel_axis=-1, channel_axis=-1, activation_ports=(0, 1),
                     integer_kernel_needs_weight_zero_point=True, int16_pairs=PairOrder.INPUT_FEATURES,
                     sparsify_weight=True, channels=ChannelRule.PRODUCE, weight_input_axis=-2,
                     compress_weight=WeightLayout(1, channel_axis=1, block_axis=0),
                     output_scaling=OutputScaling.WEIGHT_CHANNELS),
    # Only activations both runtimes fuse in front of a QuantizeLinear: ONNX Runtime drops Relu/Clip before a
    # quantizer whose range starts at zero; other activations (Sigmoid, HardSwish...) would leave Conv in float.
    "Relu": _FUSED,
    "Clip": _FUSED,
    "MaxPool": _PASSTHROUGH,
    "AveragePool": _PASSTHROUGH,
    "GlobalAveragePool": _PASSTHROUGH,
    "Reshape": _LAYOUT,
    "Flatten": _LAYOUT,
    "Transpose": OpSpec(Role.PASSTHROUGH, layout_only=True, channels=ChannelRule.TRANSPOSE),
    "Squeeze": _LAYOUT,
    "Unsqueeze": _LAYOUT,
    "Identity": OpSpec(Role.PASSTHROUGH, layout_only=True, channels=ChannelRule.ELEMENTWISE),
    "Add": OpSpec(Role.ELTWISE_ADD, activation_ports=(0, 1), channels=ChannelRule.BROADCAST,
                  output_scaling=OutputScaling.SUM),
    "Concat": OpSpec(Role.CONCAT, activation_ports=(), channels=ChannelRule.CONCAT),
    # Float ops with learned parameters: LayerNorm's scale and bias, PRelu's slope.
    "LayerNormalization": OpSpec(Role.FLOAT, activation_ports=(), trained_ports=(1, 2),
                                 output_scaling=OutputScaling.PARAMETERS),
    "PRelu": OpSpec(Role.FLOAT, activation_ports=(), trained_ports=(1,), channels=ChannelRule.BROADCAST),
    "BatchNormalization": OpSpec(Role.FLOAT, activation_ports=(), channels=ChannelRule.NORMALIZE),
    "Sub": OpSpec(Role.FLOAT, activation_ports=(), channels=ChannelRule.BROADCAST, output_scaling=OutputScaling.SUM),
    "Mul": OpSpec(Role.FLOAT, activation_ports=(), channels=ChannelRule.BROADCAST,
                  output_scaling=OutputScaling.PRODUCT),
    **{op: OpSpec(Role.FLOAT, activation_ports=(), channels=ChannelRule.BROADCAST) for op in ("Div", "Max", "Min")},
    **{op: _FLOAT_ELEMENTWISE for op in ("Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "LeakyRelu", "Elu", "Selu",
                                         "Celu", "Softplus", "Softsign", "Mish", "Gelu", "Erf", "Neg", "Abs",
                                         "Dropout", "GlobalMaxPool")},
    "Split": OpSpec(Role.FLOAT, activation_ports=(), channels=ChannelRule.SPLIT),
    # An embedding table [rows, features] read by index: compressed with one scale per row (block) of features.
    "Gather": OpSpec(Role.FLOAT, activation_ports=(), compress_weight=WeightLayout(
        0, channel_axis=0, block_axis=1, required_attrs=(("axis", 0, 0),), activation_features=False)),
}

#: Ops whose output is never negative.
NON_NEGATIVE_OUTPUT_OPS = frozenset({"Relu", "Sigmoid", "Softmax"})

#: Ops whose result depends on their input's shape: Shape, and Resize/Upsample, whose output size OpenVINO computes
#: from it when H and W are dynamic. OpenVINO moves that ShapeOf back through elementwise ops (`SHAPE_KEEPING_OPS`)
#: onto the convolution that made the tensor; the convolution then has two readers, its output quantizer stays a
#: separate FakeQuantize, and with dynamic shapes OpenVINO 2026.4 drops the convolution's bias (YOLOv8 neck;
#: bench/detector.py, docs/benchmarks.md).
SHAPE_READING_OPS = frozenset({"Shape", "Resize", "Upsample"})
SHAPE_KEEPING_OPS = frozenset({"Identity", "Relu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "LeakyRelu",
                               "Elu", "Softplus", "Mish", "Mul", "Add", "Sub", "Div"})

#: Ops whose inputs must stay float in transformer models: OpenVINO cannot run them on quantized inputs without
#: an extra dequantization, and their inputs are outlier-heavy.
TRANSFORMER_FLOAT_OPS = frozenset({"LayerNormalization", "Softmax", "ReduceMean", "Pow", "Sqrt", "Div", "Erf"})


def spec(node: gs.Node) -> OpSpec:
    """The table entry for `node`, `Role.FLOAT` for ops we know nothing about (custom domains included)."""
    if node.domain not in (None, "", "ai.onnx"):
        return OpSpec(Role.FLOAT, activation_ports=())
    return OP_TABLE.get(node.op, OpSpec(Role.FLOAT, activation_ports=()))


def weight_channel_axis(node: gs.Node) -> int | None:
    """Output-channel axis of `node`'s weight, resolving attributes that move it (Gemm's transB)."""
    entry = spec(node)
    if entry.weight_transpose_attr and node.attrs.get(entry.weight_transpose_attr, 0):
        return 1 - entry.weight_channel_axis
    return entry.weight_channel_axis


def compressed_weight_layout(node: gs.Node) -> WeightLayout | None:
    """Weight-only compression's layout for `node`, with its attributes resolved (Gemm's transB swaps the axes);
    None when the op has none, its attributes rule it out, or the table is not a 2-D constant."""
    layout = spec(node).compress_weight
    if layout is None or any(node.attrs.get(name, default) != value for name, default, value in layout.required_attrs):
        return None
    if layout.port >= len(node.inputs) or not isinstance(node.inputs[layout.port], gs.Constant) or \
            len(node.inputs[layout.port].shape) != 2:
        return None
    if layout.transpose_attr and node.attrs.get(layout.transpose_attr, 0):
        return WeightLayout(layout.port, layout.block_axis, layout.channel_axis,
                            activation_features=layout.activation_features)
    return layout


def weight_input_axis(node: gs.Node) -> int | None:
    """Input-channel axis of `node`'s weight, resolving attributes that move it (Gemm's transB)."""
    entry = spec(node)
    if entry.weight_transpose_attr and node.attrs.get(entry.weight_transpose_attr, 0):
        return 1 - entry.weight_input_axis
    return entry.weight_input_axis


def is_depthwise(node: gs.Node) -> bool:
    """A convolution with one input and one output channel per group."""
    weight = constant_weight(node)
    return (node.op == "Conv" and groups(node) > 1 and weight is not None and weight.values.shape[1] == 1
            and weight.values.shape[0] == groups(node))


def input_layout_known(node: gs.Node) -> bool:
    """Whether `node` reads its activation with channels on `channel_axis` (not through Gemm's transA)."""
    entry = spec(node)
    return entry.channel_axis is not None and not (entry.input_transpose_attr and
                                                   node.attrs.get(entry.input_transpose_attr, 0))


def groups(node: gs.Node) -> int:
    """The number of groups a convolution splits its channels into (1 for other ops)."""
    return int(node.attrs.get("group", 1))


def filters(node: gs.Node, weight: np.ndarray) -> np.ndarray | None:
    """`weight` (shaped like `node`'s weight) as filters [output channels, input channels per group, taps]; None
    when the layout is not one of these (a MatMul weight with batch axes)."""
    channel = weight_channel_axis(node)
    if channel is None or (weight.ndim != 2 and node.op in ("Gemm", "MatMul")):
        return None
    if weight.ndim == 2:
        return np.moveaxis(weight, channel, 0)[:, :, None]
    if channel == 0:
        return weight.reshape(weight.shape[0], weight.shape[1], -1)
    # ConvTranspose [in, out / g, taps]: group k's filters read input channels k·in/g ... (k + 1)·in/g.
    g = groups(node)
    inputs, outputs = weight.shape[0] // g, weight.shape[1]
    return weight.reshape(g, inputs, outputs, -1).transpose(0, 2, 1, 3).reshape(g * outputs, inputs, -1)


def output_channels(node: gs.Node) -> int | None:
    """How many output channels `node` computes, read from its constant weight (None without one)."""
    weight = constant_weight(node)
    if weight is None or weight_channel_axis(node) is None:
        return None
    channels = weight.values.shape[weight_channel_axis(node)]
    return channels * groups(node) if node.op == "ConvTranspose" else channels


def input_channels(node: gs.Node) -> int | None:
    """How many channels `node`'s activation input has, read from its constant weight (None without one)."""
    weight = constant_weight(node)
    if weight is None or weight.values.ndim < 2:
        return None
    layout = filters(node, weight.values)
    if layout is None:
        return None
    return layout.shape[1] * groups(node)


def channel_bias(node: gs.Node) -> np.ndarray | None:
    """The bias `node` adds per output channel, as float64 and scaled as the op scales it (Gemm's beta); zeros
    when it has none, None when it is not a constant."""
    entry, channels = spec(node), output_channels(node)
    if entry.bias_port is None or channels is None:
        return None
    if len(node.inputs) <= entry.bias_port:
        return np.zeros(channels)
    bias = node.inputs[entry.bias_port]
    if not isinstance(bias, gs.Constant) or bias.values.size not in (1, channels):
        return None
    scale = node.attrs.get(entry.bias_scale_attr, 1.0) if entry.bias_scale_attr else 1.0
    return np.broadcast_to(bias.values.astype(np.float64).reshape(-1) * scale, (channels,))


def absorbs_channel_affine(node: gs.Node) -> bool:
    """Whether a per-output-channel scale and shift after `node` folds into its constant weight and bias: the op
    allows it (`OpSpec.fold_channel_affine`), the bias is constant or missing, and each output channel's weights lie
    on one slice of the weight's channel axis (not a grouped ConvTranspose)."""
    weight = constant_weight(node)
    if not spec(node).fold_channel_affine or weight is None or channel_bias(node) is None:
        return False
    return weight.values.shape[weight_channel_axis(node)] == output_channels(node)


def int16_pair_accumulation(node: gs.Node, weight_shape: tuple[int, ...] | None = None) -> bool:
    """Whether ONNX Runtime's integer kernel for `node` can saturate on CPUs without VNNI (see `OpSpec.int16_pairs`).

    A depthwise convolution (one input channel per group, one output channel per group) runs a kernel that widens
    to int16 before multiplying, so it is exact. `weight_shape` is the constant weight's shape when the node
    itself no longer holds it (an already quantized file).
    """
    if not spec(node).int16_pairs:
        return False
    if node.op == "Conv":
        group = node.attrs.get("group", 1)
        if weight_shape is None:
            weight = constant_weight(node)
            weight_shape = tuple(weight.shape) if weight is not None else None
        if group > 1 and weight_shape is not None and weight_shape[1] == 1 and weight_shape[0] == group:
            return False
    return True


def int16_pair_order(node: gs.Node, weight_ndim: int) -> tuple[int, ...] | None:
    """The axes of `node`'s weight other than its output-channel axis, in the order the integer kernel adds up the
    products (see `PairOrder`); None when the layout is not known (a constant MatMul weight with batch axes), and
    any two weights of a channel must then be taken as a possible pair."""
    order = spec(node).int16_pairs
    channel = weight_channel_axis(node) % weight_ndim
    if order is PairOrder.TAPS_THEN_INPUT_CHANNELS:
        return (*range(2, weight_ndim), 1)
    if order is PairOrder.INPUT_FEATURES and weight_ndim == 2:
        return (1 - channel,)
    return None


def constant_weight(node: gs.Node) -> gs.Constant | None:
    """The constant weight input of a compute op, or None when the op multiplies two activations."""
    entry = spec(node)
    if entry.weight_port is None or len(node.inputs) <= entry.weight_port:
        return None
    weight = node.inputs[entry.weight_port]
    return weight if isinstance(weight, gs.Constant) else None
