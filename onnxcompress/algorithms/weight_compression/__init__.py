"""Weight-only compression (`onnxcompress compress-weights`): matrix products' and embeddings' constant tables
stored as INT8 per channel or as blockwise INT4 in the opset-21 `DequantizeLinear(block_size)` form, which ONNX
Runtime fuses into MatMulNBits and OpenVINO into its compressed-weight FullyConnected; activations stay float.

`scheme.py` is the arithmetic, `plan.py` chooses each table's precision and makes the commands, `oneshot.py` runs
it on a model (with data: the activation statistics that weigh the error).
"""
