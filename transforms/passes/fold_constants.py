"""Evaluate subgraphs whose inputs are all constant (shape arithmetic, weight transposes) into initializers.

Uses onnx-graphsurgeon's folder, which runs the constant subgraph with ONNX Runtime. Weight-side computations
become plain initializers, so the quantizer sees constant weights.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs


def fold_constants(graph: gs.Graph) -> bool:
    """Fold constant subgraphs in place; return whether the graph changed."""
    before = len(graph.nodes)
    graph.fold_constants(error_ok=True).cleanup()
    return len(graph.nodes) != before
