"""Physical channel removal: the analysis's edits, for the channels each space keeps, as applier commands.

Every constant that holds a slice per channel (filters, biases, BatchNorm parameters, the input slices of the
next layers' weights, per-channel constants of Mul/Add) keeps only the kept channels' slices (SliceChannels, also
through a weight's DequantizeLinear); counts that equal a channel count (a depthwise convolution's group, a
Reshape's target size, a Split's sizes) become the kept count. Edits of one constant compose: a convolution
between two pruned groups loses filters and input slices.
The tensors' inferred shapes are stale afterwards: the exported file leaves them out.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.algorithms.pruning.channels import ChannelAnalysis, SliceEdit, kept_indices, zero_pruned
from onnxcompress.transforms.commands import Command, SetAttribute, SetConstantInput, SliceChannels


def surgery_commands(graph: gs.Graph, analysis: ChannelAnalysis, keep: dict[int, np.ndarray]) -> list[Command]:
    """The commands that remove every channel not in `keep` (kept channels per space; spaces absent keep all),
    from a float graph or one whose weights are dequantized (SliceChannels slices what DequantizeLinear reads)."""
    nodes = {n.name: n for n in graph.nodes}
    counts: dict[tuple[str, int], np.ndarray] = {}
    commands: list[Command] = []
    for edit in analysis.edits:
        if not edit.layout.spaces & keep.keys():
            continue
        kept = kept_indices(edit.layout, keep)
        if isinstance(edit, SliceEdit):
            commands.append(SliceChannels(edit.node, edit.port, edit.axis, kept, edit.groups))
        elif edit.attribute is not None:
            commands.append(SetAttribute(edit.node, edit.attribute, len(kept) // edit.layout.block))
        else:
            key = (edit.node, edit.port)
            values = counts.get(key, np.asarray(nodes[edit.node].inputs[edit.port].values)).copy()
            values[edit.index] = len(kept) // edit.divisor
            counts[key] = values
    return commands + [SetConstantInput(node, port, values) for (node, port), values in counts.items()]


def masking_commands(graph: gs.Graph, analysis: ChannelAnalysis, keep: dict[int, np.ndarray]) -> list[Command]:
    """The commands that zero every channel not in `keep` instead of removing it: the slices that make a channel
    (filters, biases, BatchNorm parameters, per-channel constants) are zeroed, the next layers' weights kept."""
    nodes = {n.name: n for n in graph.nodes}
    constants: dict[tuple[str, int], np.ndarray] = {}
    for edit in analysis.edits:
        if not isinstance(edit, SliceEdit) or edit.reads or not edit.layout.spaces & keep.keys():
            continue
        key = (edit.node, edit.port)
        values = constants.get(key)
        if values is None:
            values = np.array(nodes[edit.node].inputs[edit.port].values)
        zero_pruned(values, edit.axis, edit.layout, keep)
        constants[key] = values
    return [SetConstantInput(node, port, values) for (node, port), values in constants.items()]

