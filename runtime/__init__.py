"""Execution on ONNX Runtime and OpenVINO: safe model I/O, calibration, export, benchmarking."""
