"""Remove Identity nodes and inference-mode Dropout: their consumers read the input tensor directly.

When the removed node's output is a graph output, the node is kept, so graph output names never change.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

_NO_OPS = frozenset({"Identity", "Dropout"})


def remove_identity(graph: gs.Graph) -> bool:
    """Bypass every removable Identity/Dropout; return whether the graph changed."""
    graph_outputs = {id(t) for t in graph.outputs}
    changed = False
    for node in [n for n in graph.nodes if n.op in _NO_OPS]:
        # Dropout's optional mask output has to stay unused, and its ratio/training_mode inputs constant-false.
        if node.op == "Dropout" and (len(node.outputs) > 1 and node.outputs[1].outputs or _training_mode(node)):
            continue
        source, result = node.inputs[0], node.outputs[0]
        if id(result) in graph_outputs:
            continue
        for consumer in list(result.outputs):
            for index, tensor in enumerate(consumer.inputs):
                if tensor is result:
                    consumer.inputs[index] = source
        node.outputs.clear()
        changed = True
    if changed:
        graph.cleanup()
    return changed


def _training_mode(node: gs.Node) -> bool:
    if len(node.inputs) < 3:
        return False
    flag = node.inputs[2]
    return not (isinstance(flag, gs.Constant) and not bool(flag.values))
