"""Per-layer quantization error: SQNR of every compute layer's output, quantized model against float model.

Both models are run on the same feeds with the outputs of their heavy layers (Conv, Gemm, MatMul) exposed. The
quantized model keeps the float model's tensor names, so the layers pair up by name. The worst layers are
where to look first (candidates for the ignored scope); `plot_layer_error` draws the whole profile.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort

from onnxcompress.runtime.outputs import write_bytes_atomic

_HEAVY = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


@dataclass(frozen=True)
class LayerError:
    tensor: str
    op_type: str
    sqnr_db: float


def layer_errors(float_model: onnx.ModelProto, quantized_model: onnx.ModelProto,
                 feeds: Iterable[Mapping[str, np.ndarray]]) -> list[LayerError]:
    """SQNR (dB) of each heavy layer output present in both models, in graph order, plus the model outputs."""
    # Folded BatchNorms leave the quantized Conv writing the BatchNorm's output name, which the float model has.
    float_tensors = {o for n in float_model.graph.node for o in n.output}
    quantized_tensors = {o for n in quantized_model.graph.node for o in n.output}
    layers = [(n.output[0], n.op_type) for n in quantized_model.graph.node
              if n.op_type in _HEAVY and n.output[0] in float_tensors]
    layers += [(o.name, "output") for o in float_model.graph.output if o.name in quantized_tensors]
    names = list(dict.fromkeys(name for name, _ in layers))
    reference, measured = _session(float_model, names), _session(quantized_model, names)
    signal = dict.fromkeys(names, 0.0)
    noise = dict.fromkeys(names, 0.0)
    for feed in feeds:
        for name, ref, quant in zip(names, reference.run(names, dict(feed)), measured.run(names, dict(feed))):
            ref = ref.astype(np.float64)
            signal[name] += float(np.sum(ref**2))
            noise[name] += float(np.sum((ref - quant) ** 2))
    op_of = dict(layers)
    return [LayerError(name, op_of[name], _db(signal[name], noise[name])) for name in names]


def _db(signal: float, noise: float) -> float:
    return float("inf") if noise == 0 else 10 * np.log10(max(signal, 1e-30) / noise)


def _session(model: onnx.ModelProto, outputs: list[str]) -> ort.InferenceSession:
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    known = {o.name for o in exposed.graph.output}
    exposed.graph.output.extend(onnx.ValueInfoProto(name=name) for name in outputs if name not in known)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(exposed.SerializeToString(), options, providers=["CPUExecutionProvider"])


def format_layer_errors(errors: list[LayerError], worst: int = 10) -> str:
    ranked = sorted((e for e in errors if e.op_type != "output"), key=lambda e: e.sqnr_db)[:worst]
    lines = [f"{'layer output':48} {'op':8} {'SQNR dB':>8}"]
    lines += [f"{e.tensor[:48]:48} {e.op_type:8} {e.sqnr_db:8.1f}" for e in ranked]
    lines += [f"model output {e.tensor}: {e.sqnr_db:.1f} dB" for e in errors if e.op_type == "output"]
    return "\n".join(lines)


def plot_layer_error(errors: list[LayerError], path: str | os.PathLike) -> None:
    """Bar chart of SQNR per layer in graph order (PNG, written atomically)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(max(6.0, 0.12 * len(errors) + 2), 4), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    values = [min(e.sqnr_db, 100.0) for e in errors]
    colors = ["tab:red" if e.op_type == "output" else "tab:blue" for e in errors]
    axes.bar(range(len(errors)), values, color=colors)
    axes.set_xlabel("layer (graph order; red = model output)")
    axes.set_ylabel("SQNR vs float (dB, higher is better)")
    axes.set_title("Per-layer quantization error")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    write_bytes_atomic(path, buffer.getvalue())
