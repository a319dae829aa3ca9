"""One-shot magnitude sparsity, for users without a training set (`onnxcompress sparsify`).

    preprocess (BN folded, as quantization does)  →  targets and masks at `level` (masks.py)  →  with data: the
    per-channel output mean shift each sparse layer adds, measured against a float copy of the layer on the same
    input, subtracted from its bias (the bias-correction pass quantization uses)  →  weights × masks

The result is a float model whose zeros are exact, ready for `quantize` (which keeps them: round(0) = 0).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx

from onnxcompress.algorithms.quantization.bias_correction import measured_bias_shifts
from onnxcompress.algorithms.quantization.placement import bias_target
from onnxcompress.algorithms.quantization.ptq import export_graph, resolve_ignored_scope
from onnxcompress.algorithms.sparsity.masks import compute_masks, sparsity, sparsity_targets
from onnxcompress.config import SparsifyConfig
from onnxcompress.transforms.applier import apply_commands
from onnxcompress.transforms.commands import Command, SetConstantInput
from onnxcompress.transforms.op_table import channel_bias
from onnxcompress.transforms.passes import preprocess

Batches = Iterable[Mapping[str, np.ndarray]]


@dataclass(frozen=True)
class SparsifyResult:
    model: onnx.ModelProto
    #: Fraction of zeros per sparsified layer (by node name), and over all of them.
    layers: dict[str, float]
    sparsity: float
    #: Layers whose bias was corrected (empty without data).
    corrected: tuple[str, ...]


def sparsify_model(model: onnx.ModelProto, config: SparsifyConfig, batches: Batches | None = None, *,
                   total: int | None = None, progress: bool = True) -> SparsifyResult:
    """Zero the `config.level` least important weights of `model`; with `batches`, correct the biases."""
    graph = preprocess(model)
    targets = sparsity_targets(graph, resolve_ignored_scope(graph, config.ignored_scope, original=model))
    nodes = {node.name: node for node in graph.nodes}
    weights = {t.weight: nodes[t.node].inputs[t.port].values for t in targets}
    masks = compute_masks(targets, weights, config.level, config.importance, config.threshold)
    commands: list[Command] = [SetConstantInput(t.node, t.port, weights[t.weight] * masks[t.mask]) for t in targets]
    corrected: list[SetConstantInput] = []
    if batches is not None:
        bias_targets = [b for b in (bias_target(nodes[t.node]) for t in targets) if b is not None]
        shifts = measured_bias_shifts(export_graph(graph, model), nodes, bias_targets, commands, batches, total,
                                      progress)
        corrected = [SetConstantInput(b.node, b.bias_port,
                                      (channel_bias(nodes[b.node]) - shifts[b.node]).astype(np.float32))
                     for b in bias_targets]
    apply_commands(graph, [*commands, *corrected])
    layers = {t.node: sparsity({t.mask: masks[t.mask]}) for t in targets}
    return SparsifyResult(export_graph(graph, model, shapes=False), layers, sparsity(masks),
                          tuple(c.node for c in corrected))
