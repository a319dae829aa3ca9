"""Channel dependency analysis: which output channels of which layers filter pruning must remove together, and
every constant that loses a slice with them.

Each compute op with a constant weight (`ChannelRule.PRODUCE` in the op table) makes a *space* of channels: its
filters. The analysis follows every tensor in graph order and records its `Layout`: along which axis its channels
lie, and which runs of which spaces they are (a Concat's output holds the runs of its inputs; a flattened
[N, C·H·W] tensor holds each channel as a block of H·W features). Ops pass layouts by their op-table rule:

    elementwise / BatchNorm     the same layout (BatchNorm's parameters lose the pruned channels)
    depthwise convolution       the same layout (its filters, bias and group count follow the channels)
    Add, Mul... of activations  the inputs' spaces merge into one group (a residual sum, an SE block's scaling);
                                per-channel constants lose the pruned channels
    Concat, Split               runs of channels per input / output (Split's sizes rewritten)
    Transpose, Reshape/Flatten  the channel axis moves, or channels become blocks of features (Reshape's shape
                                constant rewritten)
    compute op                  reads the layout through its weight's input axis (those weight slices go)

A grouped convolution that makes or reads a space splits it into equal runs that must lose equally many
channels; through a channel shuffle (Reshape splitting the channel axis, Transpose swapping the two, Reshape
merging them) the runs it reads are shuffled blocks. A space whose channels reach a graph output, an op the table does not know, or a tensor of unknown
channels cannot be pruned; its group records why. Groups are the merged spaces: pruning keeps the same
channels of every space in a group, and `ChannelAnalysis.edits` lists each constant slice and attribute that
changes with them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.transforms.op_table import (
    ChannelRule,
    constant_weight,
    groups,
    input_layout_known,
    is_depthwise,
    output_channels,
    spec,
    weight_channel_axis,
    weight_input_axis,
)


@dataclass(frozen=True)
class Segment:
    """Channels start … start + length - 1 of space `space` (None: channels that cannot be pruned)."""

    space: int | None
    start: int
    length: int


@dataclass(frozen=True)
class Layout:
    """Where a tensor's channels lie: along `axis` (negative, counted from the last), as `segments` in order,
    each channel `block` consecutive elements long (H·W features of a flattened channel)."""

    axis: int
    segments: tuple[Segment, ...]
    block: int = 1
    #: A channel shuffle in progress: the channel axis is split over two neighbouring axes starting at `axis`,
    #: channel c = u · (channels / split) + v at (u, v), or at (v, u) when `transposed`. 0: not split.
    split: int = 0
    transposed: bool = False

    @property
    def channels(self) -> int:
        return sum(s.length for s in self.segments)

    @property
    def spaces(self) -> set[int]:
        return {s.space for s in self.segments if s.space is not None}


@dataclass(frozen=True)
class SliceEdit:
    """Constant input `port` of `node` holds one slice along `axis` per element of `layout`'s channel axis; the
    pruned channels' slices go. `reads`: the slices are a weight's inputs (the next layer's); otherwise they make
    the channels (filters, biases, BatchNorm parameters, per-channel constants), and zeroing them zeroes the
    channels, which is how training masks them."""

    node: str
    port: int
    axis: int
    layout: Layout
    reads: bool = False
    #: A grouped convolution's input slices: the constant's rows (axis 0) form `groups` equal blocks, block j
    #: reading the j-th `groups`-th of the layout's channels.
    groups: int = 1


@dataclass(frozen=True)
class CountEdit:
    """A count that equals the channels of `layout` (times its block): attribute `attribute` of `node` (a depthwise
    convolution's group), or element `index` of constant input `port` (a Reshape's target shape, a Split's
    sizes)."""

    node: str
    layout: Layout
    attribute: str | None = None
    port: int | None = None
    index: int | None = None
    #: The count is the kept channels divided by this (the inner axis of a split channel axis).
    divisor: int = 1


Edit = SliceEdit | CountEdit


@dataclass
class Space:
    """The filters of one compute op. A grouped convolution that makes or reads them splits them into `partitions`
    equal runs, each of which must lose as many channels as the others."""

    producer: str
    channels: int
    reasons: list[str] = field(default_factory=list)
    partitions: int = 1
    #: Partitions from grouped convolutions that read the channels shuffled: each channel's block.
    shuffled: list[np.ndarray] = field(default_factory=list)
    #: After a channel shuffle, the channels that stay in order only if they go together: each channel's orbit
    #: (the same index in every run of the split).
    orbits: list[np.ndarray] = field(default_factory=list)


@dataclass(frozen=True)
class ChannelGroup:
    """Spaces pruned together (same channels kept in each); `reason` says why the group cannot be pruned."""

    spaces: tuple[int, ...]
    producers: tuple[str, ...]
    channels: int
    reason: str | None
    #: Equal runs of channels that must each lose as many (grouped convolutions).
    partitions: int = 1
    #: Each channel's block in a partition into equal blocks that must each lose as many, from a grouped
    #: convolution reading the channels after a shuffle.
    shuffled: np.ndarray | None = None
    #: Each channel's orbit: channels pruned only together (a channel shuffle keeps its order only then).
    orbits: np.ndarray | None = None

    @property
    def prunable(self) -> bool:
        return self.reason is None


@dataclass
class ChannelAnalysis:
    """The result: spaces by id, groups of merged spaces, the edits, and each tensor's layout."""

    spaces: list[Space]
    groups: list[ChannelGroup]
    group_of_space: dict[int, int]
    edits: list[Edit]
    layouts: dict[str, Layout]

    @property
    def prunable(self) -> list[ChannelGroup]:
        return [g for g in self.groups if g.prunable]


def analyse_channels(graph: gs.Graph) -> ChannelAnalysis:
    """Analyse `graph` (preprocessed: BatchNorms after convolutions folded, shapes inferred)."""
    return _Analysis(graph).run()


def _dims(tensor: gs.Tensor) -> list[int | str | None] | None:
    if isinstance(tensor, gs.Constant):
        return list(tensor.values.shape)
    return list(tensor.shape) if tensor.shape is not None else None


class _Analysis:
    def __init__(self, graph: gs.Graph) -> None:
        self.graph = graph
        self.spaces: list[Space] = []
        self.parent: list[int] = []
        self.layouts: dict[str, Layout] = {}
        self.edits: list[Edit] = []

    def run(self) -> ChannelAnalysis:
        for node in self.graph.nodes:
            rule = spec(node).channels
            handler = _HANDLERS.get(rule) if rule is not None else None
            if rule not in (ChannelRule.RESHAPE, ChannelRule.TRANSPOSE) and \
                    any(layout.split for layout in map(self.layout, node.inputs) if layout is not None):
                self.block_inputs(node, f"read split over two axes by {node.op} node {node.name!r}")
            elif handler is None:
                self.block_inputs(node, f"read by {node.op} node {node.name!r}, which the analysis does not know")
            else:
                handler(self, node)
        for output in self.graph.outputs:
            if output.name in self.layouts:
                self.block(self.layouts[output.name], f"reaches the graph output {output.name!r}")
        return self._result()

    # -- bookkeeping ----------------------------------------------------------------------------------------

    def new_space(self, producer: gs.Node, channels: int) -> int:
        self.spaces.append(Space(producer.name, channels))
        self.parent.append(len(self.parent))
        return len(self.spaces) - 1

    def root(self, space: int) -> int:
        while self.parent[space] != space:
            self.parent[space] = self.parent[self.parent[space]]
            space = self.parent[space]
        return space

    def layout(self, tensor: gs.Tensor) -> Layout | None:
        return self.layouts.get(tensor.name) if isinstance(tensor, gs.Variable) else None

    def block(self, layout: Layout | None, reason: str) -> None:
        for space in layout.spaces if layout is not None else ():
            self.spaces[space].reasons.append(reason)

    def block_inputs(self, node: gs.Node, reason: str) -> None:
        for tensor in node.inputs:
            self.block(self.layout(tensor), reason)

    def merge(self, layouts: list[Layout], node: gs.Node) -> Layout | None:
        """One layout for tensors that share channels elementwise; None (all blocked) when their runs differ."""
        first = layouts[0]
        for other in layouts[1:]:
            if not self._mergeable(first, other):
                for layout in layouts:
                    self.block(layout, f"combined with other channels by {node.op} node {node.name!r}")
                return None
        for other in layouts[1:]:
            for a, b in zip(first.segments, other.segments):
                if a.space is None or b.space is None:
                    self.block(Layout(first.axis, (a, b)), f"added to fixed channels by {node.op} {node.name!r}")
                else:
                    self.parent[self.root(b.space)] = self.root(a.space)
        return first

    def _mergeable(self, a: Layout, b: Layout) -> bool:
        if a.axis != b.axis or a.block != b.block or len(a.segments) != len(b.segments):
            return False
        for x, y in zip(a.segments, b.segments):
            if x.length != y.length or x.start != y.start:
                return False
            if x.space is not None and y.space is not None and \
                    self.spaces[x.space].channels != self.spaces[y.space].channels:
                return False
        return True

    def _result(self) -> ChannelAnalysis:
        members: dict[int, list[int]] = {}
        for space in range(len(self.spaces)):
            members.setdefault(self.root(space), []).append(space)
        groups, group_of = [], {}
        for spaces in members.values():
            reasons = [r for s in spaces for r in self.spaces[s].reasons]
            channels = self.spaces[spaces[0]].channels
            partitions = math.lcm(*(self.spaces[s].partitions for s in spaces))
            if channels % partitions:
                reasons.append(f"grouped convolutions split its {channels} channels into {partitions} runs")
            shuffled = _distinct([b for s in spaces for b in self.spaces[s].shuffled])
            orbits = _distinct([o for s in spaces for o in self.spaces[s].orbits])
            if not _selectable(channels, partitions, shuffled, orbits):
                reasons.append("grouped convolutions and channel shuffles constrain its channels in ways no "
                               "selection meets together")
            groups.append(ChannelGroup(tuple(spaces), tuple(self.spaces[s].producer for s in spaces), channels,
                                       reasons[0] if reasons else None, partitions,
                                       shuffled[0] if shuffled else None, orbits[0] if orbits else None))
            group_of.update({s: len(groups) - 1 for s in spaces})
        return ChannelAnalysis(self.spaces, groups, group_of, self.edits, self.layouts)


def _selectable(channels: int, runs: int, shuffled: list[np.ndarray], orbits: list[np.ndarray]) -> bool:
    """Whether select.py can keep channels meeting the runs, the shuffled blocks and the orbits together: orbits
    with one channel per run, each within one shuffled block; or shuffled blocks alone, without runs."""
    if len(shuffled) > 1 or len(orbits) > 1:
        return False
    if not orbits:
        return not shuffled or runs == 1
    per_orbit = channels // (int(orbits[0].max()) + 1)
    if runs != per_orbit:
        return False
    return not shuffled or all(len(np.unique(shuffled[0][orbits[0] == o])) == 1 for o in np.unique(orbits[0]))


def _distinct(arrays: list[np.ndarray]) -> list[np.ndarray]:
    unique: list[np.ndarray] = []
    for array in arrays:
        if not any(np.array_equal(array, u) for u in unique):
            unique.append(array)
    return unique


# ------------------------------------------------------------------------------------------------- rules


def _rank(tensor: gs.Tensor) -> int | None:
    dims = _dims(tensor)
    return len(dims) if dims is not None else None


def _channel_first(layout: Layout, tensor: gs.Tensor) -> bool:
    """Whether `layout` lies on axis 1 of `tensor` ([N, C, ...]) one element per channel."""
    rank = _rank(tensor)
    return rank is not None and layout.axis == 1 - rank and layout.block == 1


def _produce(a: _Analysis, node: gs.Node) -> None:
    source = a.layout(node.inputs[0])
    weight = constant_weight(node)
    if weight is None or weight_channel_axis(node) is None or not input_layout_known(node):
        a.block_inputs(node, f"multiplied by {node.op} node {node.name!r} in a layout the analysis does not follow")
        return
    if is_depthwise(node):
        _depthwise(a, node, source)
        return
    if source is not None:
        _read(a, node, source)
    channels = output_channels(node)
    space = a.new_space(node, channels)
    rank = _rank(node.outputs[0])
    axis = -1 if spec(node).channel_axis == -1 else (1 - rank if rank else None)
    if axis is None:
        a.spaces[space].reasons.append(f"{node.name!r}'s output rank is unknown")
        return
    layout = Layout(axis, (Segment(space, 0, channels),))
    a.spaces[space].partitions = groups(node)
    if node.op == "ConvTranspose" and groups(node) > 1:
        a.spaces[space].reasons.append(f"{node.name!r} is a grouped ConvTranspose")
    if weight.values.ndim != 2 and node.op == "MatMul":
        a.spaces[space].reasons.append(f"{node.name!r} multiplies by a batch of matrices")
    a.edits.append(SliceEdit(node.name, spec(node).weight_port, weight_channel_axis(node), layout))
    bias_port = spec(node).bias_port
    if bias_port is not None and len(node.inputs) > bias_port:
        bias = node.inputs[bias_port]
        if not isinstance(bias, gs.Constant) or bias.values.size not in (1, channels):
            a.spaces[space].reasons.append(f"{node.name!r}'s bias is not a constant per channel")
        elif bias.values.size == channels:
            a.edits.append(SliceEdit(node.name, bias_port, -1, layout))
    a.layouts[node.outputs[0].name] = layout


def _read(a: _Analysis, node: gs.Node, source: Layout) -> None:
    """`node` reads channels of `source` through its weight's input axis."""
    expected = -1 if spec(node).channel_axis == -1 else 1 - (_rank(node.inputs[0]) or 0)
    if source.axis != expected or (source.block > 1 and spec(node).channel_axis != -1):
        a.block(source, f"read along another layout by {node.op} node {node.name!r}")
        return
    count = groups(node)
    if count > 1:
        order = _permutation(a, source) if node.op == "Conv" else None
        if order is None:
            a.block(source, f"read in groups by {node.name!r} through a layout the analysis does not split")
            return
        space = a.spaces[source.segments[0].space]
        if np.array_equal(order, np.arange(space.channels)):
            space.partitions = math.lcm(space.partitions, count)
        else:
            blocks = np.empty(space.channels, np.int64)
            blocks[order] = np.arange(space.channels) // (space.channels // count)
            space.shuffled.append(blocks)
    a.edits.append(SliceEdit(node.name, spec(node).weight_port, weight_input_axis(node), source, reads=True,
                             groups=count))


def _permutation(a: _Analysis, layout: Layout) -> np.ndarray | None:
    """The channel of one space at each position of `layout`, when the layout holds all of that space's channels
    once each (in any order); else None."""
    spaces = {s.space for s in layout.segments}
    if len(spaces) != 1 or None in spaces or layout.block != 1:
        return None
    order = np.concatenate([np.arange(s.start, s.start + s.length) for s in layout.segments])
    space = a.spaces[layout.segments[0].space]
    return order if len(order) == space.channels and len(np.unique(order)) == len(order) else None


def _depthwise(a: _Analysis, node: gs.Node, source: Layout | None) -> None:
    if source is None:
        return
    if not _channel_first(source, node.inputs[0]):
        a.block(source, f"read along another axis by depthwise convolution {node.name!r}")
        return
    a.edits.append(SliceEdit(node.name, 1, 0, source))
    if len(node.inputs) > 2:
        a.edits.append(SliceEdit(node.name, 2, -1, source))
    a.edits.append(CountEdit(node.name, source, attribute="group"))
    a.layouts[node.outputs[0].name] = source


def _elementwise(a: _Analysis, node: gs.Node) -> None:
    source = a.layout(node.inputs[0]) if node.inputs else None
    if source is None:
        return
    if node.op in ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool") and \
            not _channel_first(source, node.inputs[0]):
        a.block(source, f"pooled along another layout by {node.op} node {node.name!r}")
        return
    a.layouts[node.outputs[0].name] = source


def _normalize(a: _Analysis, node: gs.Node) -> None:
    source = a.layout(node.inputs[0])
    if source is None:
        return
    if not _channel_first(source, node.inputs[0]) or not all(isinstance(t, gs.Constant) for t in node.inputs[1:5]):
        a.block(source, f"normalized by {node.name!r} along another layout or with computed parameters")
        return
    a.edits.extend(SliceEdit(node.name, port, 0, source) for port in range(1, 5))
    a.layouts[node.outputs[0].name] = source


def _broadcast(a: _Analysis, node: gs.Node) -> None:
    variables = [t for t in node.inputs if isinstance(t, gs.Variable)]
    layouts = [a.layout(t) for t in variables]
    known = [layout for layout in layouts if layout is not None]
    if not known:
        return
    for tensor, layout in zip(variables, layouts):
        if layout is None and not _broadcasts_over(tensor, known[0]):
            a.block_inputs(node, f"combined with a tensor of unknown channels by {node.op} node {node.name!r}")
            return
    merged = a.merge(known, node)
    if merged is None:
        return
    for port, tensor in enumerate(node.inputs):
        if isinstance(tensor, gs.Constant) and not _broadcasts_over(tensor, merged):
            if tensor.values.ndim >= -merged.axis and \
                    tensor.values.shape[merged.axis] == merged.channels * merged.block:
                a.edits.append(SliceEdit(node.name, port, merged.axis, merged))
            else:
                a.block(merged, f"combined with a constant of another shape by {node.op} node {node.name!r}")
                return
    a.layouts[node.outputs[0].name] = merged


def _broadcasts_over(tensor: gs.Tensor, layout: Layout) -> bool:
    """Whether `tensor` is the same for every channel of `layout` (size 1 or no axis there)."""
    dims = _dims(tensor)
    if dims is None:
        return False
    return len(dims) < -layout.axis or dims[layout.axis] == 1


def _concat(a: _Analysis, node: gs.Node) -> None:
    rank = _rank(node.outputs[0])
    layouts = [a.layout(t) for t in node.inputs]
    if not any(layouts) or rank is None:
        a.block_inputs(node, f"concatenated by {node.name!r} with unknown shapes")
        return
    axis = node.attrs.get("axis", 0)
    axis = axis - rank if axis >= 0 else axis
    if any(layout is not None and layout.axis != axis for layout in layouts):
        known = [layout for layout in layouts if layout is not None]
        merged = a.merge(known, node) if len(known) == len(layouts) else None
        if merged is None:
            a.block_inputs(node, f"concatenated by {node.name!r} along another axis with unknown channels")
        else:
            a.layouts[node.outputs[0].name] = merged
        return
    segments: list[Segment] = []
    for tensor, layout in zip(node.inputs, layouts):
        if layout is not None and layout.block == 1:
            segments.extend(layout.segments)
            continue
        dims = _dims(tensor)
        if layout is not None or dims is None or not isinstance(dims[axis], int):
            a.block_inputs(node, f"concatenated by {node.name!r} with channels of unknown count")
            return
        segments.append(Segment(None, 0, dims[axis]))
    a.layouts[node.outputs[0].name] = Layout(axis, tuple(segments))


def _cut(layout: Layout, start: int, length: int) -> tuple[Segment, ...]:
    """The runs of `layout`'s channels start … start + length - 1."""
    runs, offset = [], 0
    for segment in layout.segments:
        low, high = max(start, offset), min(start + length, offset + segment.length)
        if low < high:
            runs.append(Segment(segment.space, segment.start + low - offset, high - low))
        offset += segment.length
    return tuple(runs)


def _split(a: _Analysis, node: gs.Node) -> None:
    source = a.layout(node.inputs[0])
    if source is None:
        return
    rank = _rank(node.inputs[0])
    axis = node.attrs.get("axis", 0)
    axis = axis - rank if rank is not None and axis >= 0 else axis
    if axis != source.axis:
        for output in node.outputs:
            a.layouts[output.name] = source
        return
    sizes = node.inputs[1] if len(node.inputs) > 1 else None
    if not isinstance(sizes, gs.Constant) or source.block != 1:
        a.block(source, f"split by {node.name!r} into parts the analysis cannot rewrite")
        return
    offset = 0
    for index, (output, size) in enumerate(zip(node.outputs, sizes.values.tolist())):
        layout = Layout(axis, _cut(source, offset, int(size)))
        a.layouts[output.name] = layout
        a.edits.append(CountEdit(node.name, layout, port=1, index=index))
        offset += int(size)


def _transpose(a: _Analysis, node: gs.Node) -> None:
    source, rank = a.layout(node.inputs[0]), _rank(node.inputs[0])
    if source is None:
        return
    perm = list(node.attrs.get("perm", range(rank - 1, -1, -1))) if rank is not None else None
    if perm is None or source.block != 1:
        a.block(source, f"transposed by {node.name!r} in a way the analysis does not follow")
        return
    first = perm.index(rank + source.axis)
    if not source.split:
        a.layouts[node.outputs[0].name] = Layout(first - rank, source.segments)
        return
    second = perm.index(rank + source.axis + 1)
    if abs(first - second) != 1:
        a.block(source, f"transposed by {node.name!r} apart from its split channel axes")
        return
    a.layouts[node.outputs[0].name] = Layout(min(first, second) - rank, source.segments, split=source.split,
                                             transposed=source.transposed != (second < first))


def _reshape(a: _Analysis, node: gs.Node) -> None:
    source = a.layout(node.inputs[0])
    if source is None:
        return
    mapped = _reshaped(source, _dims(node.inputs[0]), _dims(node.outputs[0]))
    if mapped is None:
        a.block(source, f"reshaped by {node.op} node {node.name!r} in a way that splits channels")
        return
    layout, index = mapped
    if layout.split:
        # Each of the `split` rows must keep as many channels: equal runs of the one space split.
        order = _permutation(a, source)
        if order is None or not np.array_equal(order, np.arange(len(order))):
            a.block(source, f"split over two axes by {node.name!r} from a layout the analysis does not follow")
            return
        space = a.spaces[source.segments[0].space]
        space.partitions = math.lcm(space.partitions, layout.split)
    if source.split and source.transposed:
        # A shuffle merged: the channels of one orbit (index v in every run) must be pruned together.
        space = a.spaces[source.segments[0].space]
        space.orbits.append(np.arange(space.channels) % (space.channels // source.split))
    if node.op == "Reshape":
        shape = node.inputs[1]
        if not isinstance(shape, gs.Constant):
            a.block(source, f"reshaped by {node.name!r} to a computed shape")
            return
        # A split axis: the inner of the two holds channels / split.
        index, divisor = (index + 1, layout.split) if layout.split else (index, 1)
        if int(shape.values[index]) not in (0, -1):
            a.edits.append(CountEdit(node.name, layout, port=1, index=index, divisor=divisor))
    a.layouts[node.outputs[0].name] = layout


def _reshaped(source: Layout, before: list | None, after: list | None) -> tuple[Layout, int] | None:
    """Where `source`'s channels lie after a reshape from `before` to `after`, and the output axis; None when a
    channel's elements do not stay consecutive on one axis, or the shapes are not known past the batch axis."""
    if before is None or after is None or not before or not after:
        return None
    if not all(isinstance(d, int) for d in before[1:] + after[1:]):
        return None
    # The batch axis stays: the same size, or symbolic on both sides with the same elements per sample.
    if before[0] != after[0] and (isinstance(before[0], int) and isinstance(after[0], int)
                                  or np.prod(before[1:]) != np.prod(after[1:])):
        return None
    position = len(before) + source.axis
    if position < 1:
        return None
    if source.split:
        return _merged(source, before, after, position)
    leading = int(np.prod(before[1:position]))
    trailing = source.block * int(np.prod(before[position + 1:]))
    for k in range(1, len(after) - 1):
        if source.block == 1 and int(np.prod(after[1:k])) == leading and after[k] > 1 and \
                after[k] * after[k + 1] == source.channels and int(np.prod(after[k + 2:])) == trailing:
            return Layout(k - len(after), source.segments, split=after[k]), k
    for k in range(1, len(after)):
        if int(np.prod(after[1:k])) != leading:
            continue
        inner = int(np.prod(after[k + 1:]))
        if trailing % inner or after[k] != source.channels * trailing // inner:
            return None
        return Layout(k - len(after), source.segments, trailing // inner), k
    return None


def _merged(source: Layout, before: list, after: list, position: int) -> tuple[Layout, int] | None:
    """A split channel axis merged back into one: the shuffled order of channels when the two axes were swapped."""
    leading, trailing = int(np.prod(before[1:position])), int(np.prod(before[position + 2:]))
    for k in range(1, len(after)):
        if int(np.prod(after[1:k])) == leading and after[k] == source.channels and \
                int(np.prod(after[k + 1:])) == trailing:
            segments = source.segments
            if source.transposed:
                flat = [(s.space, s.start + i) for s in source.segments for i in range(s.length)]
                inner = source.channels // source.split
                # Position q = v · split + u holds channel u · inner + v.
                segments = _runs([flat[(q % source.split) * inner + q // source.split]
                                  for q in range(source.channels)])
            return Layout(k - len(after), segments), k
    return None


def _runs(channels: list[tuple[int | None, int]]) -> tuple[Segment, ...]:
    """Segments for a list of (space, channel), consecutive channels of one space joined."""
    runs: list[Segment] = []
    for space, channel in channels:
        last = runs[-1] if runs else None
        if last is not None and last.space == space and last.start + last.length == channel:
            runs[-1] = Segment(space, last.start, last.length + 1)
        else:
            runs.append(Segment(space, channel, 1))
    return tuple(runs)


_HANDLERS = {
    ChannelRule.PRODUCE: _produce,
    ChannelRule.ELEMENTWISE: _elementwise,
    ChannelRule.NORMALIZE: _normalize,
    ChannelRule.BROADCAST: _broadcast,
    ChannelRule.CONCAT: _concat,
    ChannelRule.SPLIT: _split,
    ChannelRule.TRANSPOSE: _transpose,
    ChannelRule.RESHAPE: _reshape,
}


def zero_pruned(values: np.ndarray, axis: int, layout: Layout, keep: dict[int, np.ndarray]) -> None:
    """Zero, in place, the slices of `values` along `axis` at the positions of `layout` that `keep` drops."""
    index: list = [slice(None)] * values.ndim
    index[axis] = np.setdiff1d(np.arange(values.shape[axis]), kept_indices(layout, keep))
    values[tuple(index)] = 0


def kept_indices(layout: Layout, keep: dict[int, np.ndarray]) -> np.ndarray:
    """Positions along `layout`'s axis that stay when each space keeps the channels `keep[space]` (sorted; a
    space not in `keep` keeps all), a channel's `block` elements together."""
    positions, offset = [], 0
    for segment in layout.segments:
        channels = np.arange(segment.start, segment.start + segment.length)
        if segment.space is not None and segment.space in keep:
            channels = channels[np.isin(channels, keep[segment.space])]
        positions.append(offset + channels - segment.start)
        offset += segment.length
    channels = np.concatenate(positions) if positions else np.zeros(0, np.int64)
    return (channels[:, None] * layout.block + np.arange(layout.block)[None, :]).reshape(-1)

