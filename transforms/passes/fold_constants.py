"""Evaluate subgraphs whose inputs are all constant (shape arithmetic, weight transposes) into initializers.

Uses onnx-graphsurgeon's folder, which runs the constant subgraph with ONNX Runtime. Weight-side computations
become plain initializers, so the quantizer sees constant weights.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs
import onnxruntime as ort

_ORT_DEFAULT_SEVERITY = 2  # warning


def fold_constants(graph: gs.Graph) -> bool:
    """Fold constant subgraphs in place; return whether the graph changed."""
    before = len(graph.nodes)
    # The folder's ONNX Runtime sessions warn about optimizations they skip on partial graphs: noise for users.
    ort.set_default_logger_severity(3)
    try:
        graph.fold_constants(error_ok=True).cleanup()
    finally:
        ort.set_default_logger_severity(_ORT_DEFAULT_SEVERITY)
    return len(graph.nodes) != before
