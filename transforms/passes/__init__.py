"""Preprocessing passes, each one small module that states its transformation and returns whether it changed
anything. `preprocess` runs the standard pipeline before quantization."""

from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs

from onnxcompress.transforms.passes.fold_batchnorm import fold_batchnorm
from onnxcompress.transforms.passes.fold_constants import fold_constants
from onnxcompress.transforms.passes.infer_shapes import infer_shapes
from onnxcompress.transforms.passes.name_nodes import name_nodes
from onnxcompress.transforms.passes.remove_identity import remove_identity
from onnxcompress.transforms.passes.sum_to_add import sum_to_add

GRAPH_PASSES = (remove_identity, fold_constants, fold_batchnorm, sum_to_add, name_nodes)

__all__ = ["fold_batchnorm", "fold_constants", "infer_shapes", "name_nodes", "remove_identity", "sum_to_add", "preprocess", "GRAPH_PASSES"]


def preprocess(model: onnx.ModelProto) -> gs.Graph:
    """Shape inference, then the graph passes, returning the cleaned graph sorted topologically."""
    graph = gs.import_onnx(infer_shapes(model))
    for graph_pass in GRAPH_PASSES:
        graph_pass(graph)
    return graph.toposort()
