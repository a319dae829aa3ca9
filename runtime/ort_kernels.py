"""Which kernels ONNX Runtime really runs: the graph after its optimizer, integer versus float heavy ops.

A QDQ model only gains speed in ONNX Runtime when its optimizer fuses DequantizeLinear → Conv → QuantizeLinear
into QLinearConv (and Gemm/MatMul into QGemm, MatMulIntegerToFloat...). This module saves the optimized graph
(at the EXTENDED level, which holds the QDQ fusions but no layout-specific ops) and counts what is left.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import onnxruntime as ort

from onnxcompress.runtime.model_io import RuntimeSource, runtime_source

INTEGER_KERNELS = frozenset({"QLinearConv", "QGemm", "QLinearMatMul", "MatMulIntegerToFloat", "MatMulInteger",
                             "ConvInteger", "DynamicQuantizeMatMul", "QLinearConvTranspose"})
FLOAT_HEAVY = frozenset({"Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul", "ConvTranspose"})
#: Kernels that read compressed weights (weight-only INT4/INT8 blocks) with float activations.
WEIGHT_ONLY_KERNELS = frozenset({"MatMulNBits", "GatherBlockQuantized"})


@dataclass(frozen=True)
class OrtKernelSummary:
    integer: Counter
    float: Counter
    weight_only: Counter = field(default_factory=Counter)

    @property
    def all_integer(self) -> bool:
        return sum(self.integer.values()) > 0 and not self.float

    def describe(self) -> str:
        integer = ", ".join(f"{op}×{n}" for op, n in sorted(self.integer.items())) or "none"
        floating = ", ".join(f"{op}×{n}" for op, n in sorted(self.float.items())) or "none"
        weight_only = "".join(f"; compressed-weight kernels: {op}×{n}" for op, n in sorted(self.weight_only.items()))
        return f"integer kernels: {integer}; float heavy ops: {floating}{weight_only}"


def ort_kernel_summary(model: str | os.PathLike | RuntimeSource) -> OrtKernelSummary:
    """Optimize `model` with ONNX Runtime (CPU) and count integer versus float heavy ops."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.log_severity_level = 3
    with tempfile.TemporaryDirectory(prefix="onnxcompress-ort-") as folder:
        optimized = Path(folder) / "optimized.onnx"
        options.optimized_model_filepath = str(optimized)
        with runtime_source(model) as source:
            ort.InferenceSession(source.readable, options, providers=["CPUExecutionProvider"])
        ops = Counter(node.op_type for node in onnx.load(str(optimized), load_external_data=False).graph.node)
    return OrtKernelSummary(
        integer=Counter({op: n for op, n in ops.items() if op in INTEGER_KERNELS}),
        float=Counter({op: n for op, n in ops.items() if op in FLOAT_HEAVY}),
        weight_only=Counter({op: n for op, n in ops.items() if op in WEIGHT_ONLY_KERNELS}),
    )
