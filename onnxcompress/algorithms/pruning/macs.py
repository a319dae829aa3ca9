"""Multiply-accumulates and weights of each compute op, before and after pruning, for one sample.

A layer's MACs are (output positions) × (output channels) × (input channels per group) × (kernel taps). Pruning
changes the two channel counts: the output channels its group keeps, and the input channels the layout of its
input keeps (a depthwise convolution keeps one per group). The positions and taps come from the inferred shapes,
so the count needs the spatial size; a batch axis counts as one sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.algorithms.pruning.channels import ChannelAnalysis, Layout, kept_indices
from onnxcompress.errors import PruningError
from onnxcompress.transforms.op_table import (
    Role,
    constant_weight,
    groups,
    input_channels,
    is_depthwise,
    output_channels,
    spec,
)


@dataclass(frozen=True)
class LayerCost:
    """What one compute op costs: `positions` × `taps` MACs per (output, input) channel pair of a group."""

    node: str
    op: str
    positions: int
    taps: int
    outputs: int
    #: Input channels (features, for a Gemm after a flatten).
    inputs: int
    groups: int
    output_layout: Layout | None
    input_layout: Layout | None
    depthwise: bool

    def channels(self, keep: dict[int, np.ndarray] | None = None) -> tuple[int, int]:
        """Output and input channels when each space keeps `keep[space]` (None: before pruning)."""
        outputs, inputs = self.outputs, self.inputs
        if keep is not None and self.output_layout is not None:
            outputs = len(kept_indices(self.output_layout, keep)) // self.output_layout.block
        if keep is not None and self.input_layout is not None:
            inputs = len(kept_indices(self.input_layout, keep))
        return outputs, inputs

    def macs(self, keep: dict[int, np.ndarray] | None = None) -> int:
        return self.positions * self.weights(keep)

    def weights(self, keep: dict[int, np.ndarray] | None = None) -> int:
        """Weight count (biases aside)."""
        outputs, inputs = self.channels(keep)
        groups = inputs if self.depthwise else self.groups
        return self.taps * outputs * inputs // max(groups, 1)


def layer_costs(graph: gs.Graph, analysis: ChannelAnalysis) -> list[LayerCost]:
    """The cost of every compute op with a constant weight; PruningError when a spatial size is unknown."""
    costs = []
    for node in graph.nodes:
        weight = constant_weight(node)
        if spec(node).role is not Role.COMPUTE or weight is None or output_channels(node) is None:
            continue
        taps = int(np.prod(weight.values.shape[2:])) if node.op in ("Conv", "ConvTranspose") else 1
        source = node.inputs[0] if node.op == "ConvTranspose" else node.outputs[0]
        costs.append(LayerCost(node.name, node.op, _positions(node, source.shape), taps, output_channels(node),
                               input_channels(node) or 0, groups(node), analysis.layouts.get(node.outputs[0].name),
                               analysis.layouts.get(node.inputs[0].name), is_depthwise(node)))
    return costs


def _positions(node: gs.Node, shape: list | None) -> int:
    """Positions of one sample at which the op applies its filters: the output's elements per channel (for
    ConvTranspose, the input's), the batch axis aside."""
    if not shape:
        raise PruningError(f"the output shape of {node.name!r} is unknown, so its MACs cannot be counted")
    axis = spec(node).channel_axis % len(shape)
    dims = [d for i, d in enumerate(shape) if i not in (0, axis)]
    if not all(isinstance(d, int) for d in dims):
        raise PruningError(f"{node.name!r} has a dynamic spatial size {list(shape)}: give calibration data "
                           "(--data) so that MACs are counted at its shape")
    return int(np.prod(dims)) if dims else 1
