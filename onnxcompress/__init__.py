"""onnxcompress: compress ONNX models (post-training quantization, sparsity, fine-tuning with both) and deploy them
with OpenVINO and ONNX Runtime.

`onnxcompress.quantize`, `onnxcompress.sparsify` and `onnxcompress.finetune` are the Python API (`onnxcompress.api`); they are imported on
first use so that `import onnxcompress` (and the CLI's start) stays cheap.
"""

from typing import Any

from onnxcompress.privacy import limit_footprint

limit_footprint()  # before anything imports ONNX Runtime or OpenVINO

__version__ = "0.1.0"
__all__ = ["compress_weights", "finetune", "load_package", "package", "prune", "quantize", "sparsify"]


def __getattr__(name: str) -> Any:
    if name == "load_package":
        from onnxcompress.packaging.predictor import load_package

        return load_package
    if name == "package":
        from onnxcompress.packaging.build import build_package

        return build_package
    if name in __all__:
        from onnxcompress import api

        return getattr(api, name)
    raise AttributeError(f"module 'onnxcompress' has no attribute {name!r}")
