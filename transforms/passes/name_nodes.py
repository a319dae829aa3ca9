"""Give every node a unique name (`<op>_<index>` for unnamed or duplicated ones).

Commands address nodes by name, and many exported models leave names empty or repeat them.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs


def name_nodes(graph: gs.Graph) -> bool:
    """Rename unnamed and duplicate nodes; return whether any name changed."""
    seen: set[str] = set()
    changed = False
    for index, node in enumerate(graph.nodes):
        if not node.name or node.name in seen:
            node.name = f"{node.op}_{index}"
            while node.name in seen:
                node.name += "_"
            changed = True
        seen.add(node.name)
    return changed
