"""`onnxcompress inspect`: what a model contains and what actually runs in INT8.

Reports op counts, quantizers (QuantizeLinear/DequantizeLinear), weight storage (integer versus float bytes),
file size, and, compiled in both runtimes, which heavy ops execute as integer kernels.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from onnx import helper

from onnxcompress.portability import Portability, check_portability
from onnxcompress.runtime.model_io import load_model, model_file_size, runtime_source
from onnxcompress.runtime.openvino import Int8Summary, compile_model, int8_summary, runtime_precisions
from onnxcompress.runtime.ort_kernels import OrtKernelSummary, ort_kernel_summary


@dataclass(frozen=True)
class Inspection:
    path: Path
    file_bytes: int
    opset: int
    ops: Counter
    activation_quantizers: int
    weight_bytes_by_type: dict[str, int]
    openvino: Int8Summary | None
    onnxruntime: OrtKernelSummary | None
    portability: Portability


def inspect_model(path: str | Path, *, runtimes: bool = True) -> Inspection:
    path = Path(path)
    model = load_model(path)
    weight_bytes: Counter = Counter()
    for tensor in model.graph.initializer:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))
        weight_bytes[dtype.name] += int(np.prod(tensor.dims, dtype=np.int64)) * dtype.itemsize
    ops = Counter(node.op_type for node in model.graph.node)
    openvino = onnxruntime = None
    if runtimes:
        with runtime_source(model) as source:  # the checked model, not the path read again
            openvino = int8_summary(runtime_precisions(compile_model(source)))
            onnxruntime = ort_kernel_summary(source)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    return Inspection(path, model_file_size(path), opset, ops, ops.get("QuantizeLinear", 0), dict(weight_bytes),
                      openvino, onnxruntime, check_portability(model))


def format_inspection(report: Inspection) -> str:
    lines = [f"{report.path}  ({report.file_bytes / 1e6:.2f} MB on disk, opset {report.opset})",
             "ops: " + ", ".join(f"{op}×{n}" for op, n in report.ops.most_common()),
             f"activation quantizers: {report.activation_quantizers}",
             "initializers: " + ", ".join(f"{t} {b / 1e6:.2f} MB" for t, b in sorted(report.weight_bytes_by_type.items()))]
    if report.openvino is not None:
        ov = report.openvino
        detail = ", ".join(f"{kind} {i8}/{total}" for kind, (i8, total) in ov.by_type.items())
        lines.append(f"OpenVINO INT8 heavy layers: {ov.int8_count}/{ov.heavy_total} ({detail})")
        lines += [f"  not INT8: {name} ({precision})" for name, precision in zip(ov.not_int8, ov.not_int8_precisions)]
    if report.onnxruntime is not None:
        lines.append(f"ONNX Runtime: {report.onnxruntime.describe()}")
    lines.append(f"CPU portability: {report.portability.describe()}")
    return "\n".join(lines)
