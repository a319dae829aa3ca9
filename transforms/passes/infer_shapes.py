"""Annotate every intermediate tensor with its inferred type and shape (ONNX shape inference).

Later stages need ranks and dtypes of activations (per-channel statistics, data validation). Models that cannot
be serialised in one piece (> 2 GB) are returned unchanged: shape inference then only runs on demand per tensor.
"""

from __future__ import annotations

import onnx

_PROTOBUF_LIMIT = 2**31 - 1


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return a copy of `model` with value_info filled in; the input proto is left untouched."""
    try:
        if model.ByteSize() >= _PROTOBUF_LIMIT:
            return model
    except ValueError:  # protobuf refuses to size messages over 2 GB
        return model
    return onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
