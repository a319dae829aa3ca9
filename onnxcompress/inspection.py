"""`onnxcompress inspect`: what a model contains and what actually runs in INT8.

Reports op counts, quantizers (QuantizeLinear/DequantizeLinear), weight storage (integer versus float bytes),
file size raw and after zlib (what exact zeros save once a file is compressed for shipping), the fraction of zero
weights per layer, for a float model the channel groups filter pruning can shrink (and why the others are kept),
and, compiled in both runtimes, which heavy ops execute as integer kernels.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper

from onnxcompress.algorithms.pruning.channels import ChannelGroup, analyse_channels
from onnxcompress.portability import Portability, check_portability
from onnxcompress.runtime.model_io import (
    compressed_model_size,
    load_model,
    model_file_size,
    runtime_source,
    stored_bytes,
)
from onnxcompress.runtime.openvino import Int8Summary, compile_model, int8_summary, runtime_precisions
from onnxcompress.runtime.ort_kernels import OrtKernelSummary, ort_kernel_summary
from onnxcompress.transforms.op_table import spec
from onnxcompress.transforms.passes import preprocess


@dataclass(frozen=True)
class Inspection:
    path: Path
    file_bytes: int
    opset: int
    ops: Counter
    activation_quantizers: int
    weight_bytes_by_type: dict[str, int]
    #: The model file and its external data compressed as zip does (`compressed_model_size`).
    compressed_bytes: int
    #: (zeros, weights) of each layer sparsity can mask, by node name (float weights, or the integer levels behind
    #: DequantizeLinear).
    layer_zeros: dict[str, tuple[int, int]]
    openvino: Int8Summary | None
    onnxruntime: OrtKernelSummary | None
    portability: Portability
    #: Filter pruning's channel groups of a float model (None for a quantized one).
    channel_groups: tuple[ChannelGroup, ...] | None = None


def inspect_model(path: str | Path, *, runtimes: bool = True) -> Inspection:
    path = Path(path)
    model = load_model(path)
    weight_bytes: Counter = Counter()
    for tensor in model.graph.initializer:
        weight_bytes[np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).name] += stored_bytes(tensor)
    ops = Counter(node.op_type for node in model.graph.node)
    openvino = onnxruntime = None
    if runtimes:
        with runtime_source(model) as source:  # the checked model, not the path read again
            openvino = int8_summary(runtime_precisions(compile_model(source)))
            onnxruntime = ort_kernel_summary(source)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    groups = None if ops.get("DequantizeLinear") else tuple(analyse_channels(preprocess(_copy(model))).groups)
    return Inspection(path, model_file_size(path), opset, ops, ops.get("QuantizeLinear", 0), dict(weight_bytes),
                      compressed_model_size(path), layer_zeros(model), openvino, onnxruntime, check_portability(model),
                      groups)


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def layer_zeros(model: onnx.ModelProto) -> dict[str, tuple[int, int]]:
    """(zeros, weights) of the weight of every op the op table marks `sparsify_weight`, by node name."""
    result = {}
    for node in gs.import_onnx(model).nodes:
        entry = spec(node)
        if not entry.sparsify_weight or entry.weight_port is None or len(node.inputs) <= entry.weight_port:
            continue
        weight = node.inputs[entry.weight_port]
        producer = weight.inputs[0] if weight.inputs else None
        if producer is not None and producer.op == "DequantizeLinear":
            weight = producer.inputs[0]  # the stored integer levels: a zero level is an exact zero
        if isinstance(weight, gs.Constant) and weight.values.ndim >= 2:
            result[node.name] = (int(np.count_nonzero(weight.values == 0)), int(weight.values.size))
    return result


def format_inspection(report: Inspection) -> str:
    lines = [f"{report.path}  ({report.file_bytes / 1e6:.2f} MB on disk, {report.compressed_bytes / 1e6:.2f} MB "
             f"zlib-compressed, opset {report.opset})",
             "ops: " + ", ".join(f"{op}×{n}" for op, n in report.ops.most_common()),
             f"activation quantizers: {report.activation_quantizers}",
             "initializers: " + ", ".join(f"{t} {b / 1e6:.2f} MB" for t, b in sorted(report.weight_bytes_by_type.items()))]
    lines += _sparsity_lines(report.layer_zeros)
    lines += _pruning_lines(report.channel_groups)
    if report.openvino is not None:
        ov = report.openvino
        detail = ", ".join(f"{kind} {i8}/{total}" for kind, (i8, total) in ov.by_type.items())
        lines.append(f"OpenVINO INT8 heavy layers: {ov.int8_count}/{ov.heavy_total} ({detail})")
        lines += [f"  not INT8: {name} ({precision})" for name, precision in zip(ov.not_int8, ov.not_int8_precisions)]
    if report.onnxruntime is not None:
        lines.append(f"ONNX Runtime: {report.onnxruntime.describe()}")
    lines.append(f"CPU portability: {report.portability.describe()}")
    return "\n".join(lines)


def _pruning_lines(groups: tuple[ChannelGroup, ...] | None) -> list[str]:
    """How many channel groups filter pruning can shrink, and why the others are kept (by reason)."""
    if not groups:
        return []
    kept = Counter(g.reason for g in groups if not g.prunable)
    lines = [f"filter pruning: {sum(g.prunable for g in groups)} of {len(groups)} channel groups can lose channels"]
    return lines + [f"  kept ({count}): {reason}" for reason, count in kept.most_common()]


def _sparsity_lines(layers: dict[str, tuple[int, int]]) -> list[str]:
    """The zero fraction of all those weights, and each layer's when any layer is sparse."""
    if not layers:
        return []
    zeros, total = (sum(values) for values in zip(*layers.values()))
    lines = [f"weight sparsity: {zeros / total:.1%} of {total} weights in {len(layers)} layers"]
    if any(z / n >= 0.01 for z, n in layers.values()):
        lines += [f"  {name}: {z / n:.1%} of {n}" for name, (z, n) in layers.items()]
    return lines
