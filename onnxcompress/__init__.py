"""onnxcompress: compress ONNX models (post-training INT8 quantization first) and deploy them with OpenVINO and ONNX Runtime."""

__version__ = "0.1.0"
