"""Give graph inputs' zero or negative dimensions a symbolic name, in place.

Exporters write dynamic sizes as dim_value -1 (Paddle2ONNX) or 0; ONNX Runtime and OpenVINO read both as dynamic,
but ONNX shape inference takes them literally and would propagate a size of 0 or -1 into every tensor. A named
dimension (`<input>_dim<axis>`) means the same to the runtimes and keeps inference sound.
"""

from __future__ import annotations

import onnx


def name_unknown_dims(model: onnx.ModelProto) -> bool:
    """Replace every dim_value <= 0 of `model`'s graph inputs by a dim_param; return whether any changed."""
    changed = False
    for value in model.graph.input:
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if dim.HasField("dim_value") and dim.dim_value <= 0:
                dim.dim_param = f"{value.name}_dim{axis}"
                changed = True
    return changed
