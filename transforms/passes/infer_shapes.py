"""Annotate every intermediate tensor with its inferred type and shape (ONNX shape inference), in place.

Shape inference needs the weights' shapes, not their values, so it runs on a skeleton of the model in which large
initializers are replaced by graph inputs of the same type and shape: no copy of the weights is made, which
keeps models of several GB (external data) cheap to annotate. Small initializers (shape constants) stay, so
data propagation through Reshape and friends still works.
"""

from __future__ import annotations

import onnx
from onnx import helper

_SMALL_INITIALIZER = 1024  # elements


def infer_shapes(model: onnx.ModelProto) -> bool:
    """Add inferred value_info to `model`; return whether any tensor got a type it did not have."""
    graph = model.graph
    skeleton_graph = onnx.GraphProto(name=graph.name, node=graph.node, input=graph.input, output=graph.output,
                                     value_info=graph.value_info)
    for tensor in graph.initializer:
        if _elements(tensor) <= _SMALL_INITIALIZER:
            skeleton_graph.initializer.append(tensor)
        elif tensor.name not in {i.name for i in graph.input}:
            skeleton_graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims))
    skeleton = onnx.ModelProto(ir_version=model.ir_version, opset_import=model.opset_import, graph=skeleton_graph,
                               functions=model.functions)
    inferred = onnx.shape_inference.infer_shapes(skeleton, check_type=False, strict_mode=False, data_prop=True)
    known = {v.name for v in graph.value_info} | {v.name for v in graph.input} | {v.name for v in graph.output}
    new = [v for v in inferred.graph.value_info if v.name not in known]
    graph.value_info.extend(new)
    return bool(new)


def _elements(tensor: onnx.TensorProto) -> int:
    count = 1
    for dim in tensor.dims:
        count *= dim
    return count
