"""Rewrite two-input Sum as Add.

Older exporters write residual connections as Sum; runtimes fuse and quantize Add (QLinearAdd in ONNX Runtime,
quantized eltwise in OpenVINO) but treat Sum as a generic float op. The results are identical.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs


def sum_to_add(graph: gs.Graph) -> bool:
    """Turn every Sum of exactly two inputs into Add; return whether any node changed."""
    changed = False
    for node in graph.nodes:
        if node.op == "Sum" and len(node.inputs) == 2:
            node.op = "Add"
            changed = True
    return changed
