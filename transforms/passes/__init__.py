"""Preprocessing passes, each one small module that states its transformation and returns whether it changed
anything. `preprocess` runs the standard pipeline before quantization."""

from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs

from onnxcompress.transforms.passes.differentiable_forms import differentiable_forms
from onnxcompress.transforms.passes.fold_batchnorm import fold_batchnorm
from onnxcompress.transforms.passes.fold_channel_affine import fold_channel_affine
from onnxcompress.transforms.passes.fold_constants import fold_constants
from onnxcompress.transforms.passes.infer_shapes import infer_shapes
from onnxcompress.transforms.passes.name_nodes import name_nodes
from onnxcompress.transforms.passes.relu_before_concat import relu_before_concat
from onnxcompress.transforms.passes.remove_identity import remove_identity
from onnxcompress.transforms.passes.sum_to_add import sum_to_add
from onnxcompress.transforms.passes.unknown_dims import name_unknown_dims

GRAPH_PASSES = (remove_identity, fold_constants, fold_batchnorm, fold_channel_affine, sum_to_add, relu_before_concat,
                name_nodes)

__all__ = ["differentiable_forms", "fold_batchnorm", "fold_channel_affine", "fold_constants", "infer_shapes", "name_nodes", "relu_before_concat",
           "remove_identity", "sum_to_add", "name_unknown_dims", "preprocess", "GRAPH_PASSES"]


def preprocess(model: onnx.ModelProto) -> gs.Graph:
    """Unknown input dims named and shape inference (both edit `model`), then the graph passes; returns the
    cleaned, sorted graph.

    The graph reads `model`'s weights lazily, so `model` must stay alive and unchanged while the graph is used.
    """
    name_unknown_dims(model)
    infer_shapes(model)
    graph = gs.import_onnx(model)
    for graph_pass in GRAPH_PASSES:
        graph_pass(graph)
    return graph.toposort()
