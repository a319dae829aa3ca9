"""Move a ReLU that reads a Concat onto the Concat's inputs: Relu(Concat(a, b)) = Concat(Relu(a), Relu(b)).

After the move each ReLU ends the pattern of the op producing its input (Conv + ReLU runs as one kernel) and the
Concat output is what the next layer reads, so quantizers can sit right after the Concat and both runtimes run
it on INT8 data (ShuffleNet's stride-2 units: Concat(branch Conv, AveragePool) → ReLU). Only a Concat whose
output the ReLU alone reads is rewritten; graph outputs keep their names.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs


def relu_before_concat(graph: gs.Graph) -> bool:
    """Rewrite every Concat → Relu pair; return whether the graph changed."""
    graph_outputs = {id(t) for t in graph.outputs}
    changed = False
    for concat in [n for n in graph.nodes if n.op == "Concat"]:
        joined = concat.outputs[0]
        if len(joined.outputs) != 1 or joined.outputs[0].op != "Relu" or id(joined) in graph_outputs:
            continue
        relu = joined.outputs[0]
        rectified = []
        for index, part in enumerate(concat.inputs):
            output = gs.Variable(f"{part.name}_relu", dtype=part.dtype, shape=part.shape)
            graph.nodes.append(gs.Node("Relu", f"{relu.name}_in{index}", inputs=[part], outputs=[output]))
            rectified.append(output)
        concat.inputs = rectified
        concat.outputs = [relu.outputs[0]]
        relu.outputs.clear()
        relu.inputs.clear()
        changed = True
    if changed:
        graph.cleanup().toposort()
    return changed
