"""Per-layer error, two ways.

* `layer_errors`: SQNR of every compute layer's output, quantized model against float model. Both models run on
  the same feeds with the outputs of their heavy layers (Conv, Gemm, MatMul) exposed; the quantized model keeps
  the float model's tensor names, so the layers pair up by name. The worst layers are where to look first
  (candidates for the ignored scope).
* `runtime_divergence`: one file in two runtimes. OpenVINO against ONNX Runtime evaluating the QDQ graph in float
  (ORT_DISABLE_ALL: the ONNX semantics, the same on every CPU), at every dequantized activation and heavy layer
  output. The first tensors that diverge show which quantizers a runtime executes differently. Its last entry is
  the model output as deployed (nothing exposed): exposing tensors changes what OpenVINO fuses, so a problem
  that only the fused graph has shows there alone.
* `isolate_runtime_divergence`: for that case, each activation quantizer alone (the others removed, weights kept
  quantized), the deployed outputs of OpenVINO against the ONNX semantics; the quantizers far below the rest are
  the ones OpenVINO executes differently.

`plot_layer_error` draws either profile.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort

from onnxcompress.errors import EvaluationError, first_line
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
    _require_same_inputs(float_model, quantized_model)
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
        for name, ref, quant in zip(names, _run(reference, names, feed), _run(measured, names, feed)):
            ref = ref.astype(np.float64)
            signal[name] += float(np.sum(ref**2))
            noise[name] += float(np.sum((ref - quant) ** 2))
    op_of = dict(layers)
    return [LayerError(name, op_of[name], _db(signal[name], noise[name])) for name in names]


def _require_same_inputs(first: onnx.ModelProto, second: onnx.ModelProto) -> None:
    """Two versions of one model take the same inputs; anything else cannot be fed the same data."""
    signatures = []
    for model in (first, second):
        weights = {i.name for i in model.graph.initializer}
        signatures.append({v.name: onnx.helper.tensor_dtype_to_string(v.type.tensor_type.elem_type)
                           for v in model.graph.input if v.name not in weights})
    if signatures[0] != signatures[1]:
        def describe(signature: dict[str, str]) -> str:
            return ", ".join(f"{name} ({dtype.removeprefix('TensorProto.').lower()})"
                             for name, dtype in signature.items())

        raise EvaluationError(f"the models take different inputs: {describe(signatures[0])} against "
                              f"{describe(signatures[1])}; compare needs two versions of one model")


def runtime_divergence(model: onnx.ModelProto, feeds: Iterable[Mapping[str, np.ndarray]]) -> list[LayerError]:
    """SQNR (dB) of OpenVINO against the ONNX semantics at each dequantized activation, heavy layer output and
    model output of `model`, in graph order. Exposing a tensor keeps it computed as in the file in both
    runtimes (OpenVINO's quantizers stay FakeQuantize), so the profile shows where the runtimes part."""
    from onnxcompress.runtime.openvino import compile_model

    feeds = [dict(feed) for feed in feeds]  # read twice: instrumented, then as deployed
    producers = {o: n for n in model.graph.node for o in n.output}
    weights = {i.name for i in model.graph.initializer}
    layers = [(n.output[0], "quantizer" if n.op_type == "DequantizeLinear" else n.op_type)
              for n in model.graph.node
              if n.op_type in _HEAVY or n.op_type == "DequantizeLinear" and n.input[0] in producers
              and n.input[0] not in weights]
    layers += [(o.name, "output") for o in model.graph.output]
    names = list(dict.fromkeys(name for name, _ in layers))
    exposed = _exposed(model, names)
    reference = _session(exposed, names, level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    compiled = compile_model(exposed, precision_hint="f32")
    signal = dict.fromkeys(names, 0.0)
    noise = dict.fromkeys(names, 0.0)
    for feed in feeds:
        results = compiled(dict(feed))
        measured = {name: results[port] for port in compiled.outputs for name in port.get_names() if name in signal}
        for name, ref in zip(names, _run(reference, names, feed)):
            ref = ref.astype(np.float64)
            signal[name] += float(np.sum(ref**2))
            noise[name] += float(np.sum((ref - measured[name].astype(np.float64)) ** 2))
    op_of = dict(layers)
    profile = [LayerError(name, op_of[name], _db(signal[name], noise[name])) for name in names]
    return profile + [LayerError(o.name, "deployed", sqnr) for o, sqnr in zip(model.graph.output,
                                                                               _deployed_agreement(model, feeds))]


def isolate_runtime_divergence(model: onnx.ModelProto, feeds: Iterable[Mapping[str, np.ndarray]], *,
                               progress: bool = True) -> list[LayerError]:
    """For each activation quantizer of `model` alone, the SQNR (dB) of OpenVINO's deployed outputs (all outputs
    together) against the ONNX semantics, lowest first; the first entry, "none", has no activation quantizer."""
    from tqdm.auto import tqdm

    feeds = [dict(feed) for feed in feeds]
    weights = {i.name for i in model.graph.initializer}
    quantizers = [n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in weights]
    results = [LayerError("none", "weights only", min(_deployed_agreement(_keeping(model, None), feeds)))]
    for tensor in tqdm(quantizers, desc="isolating quantizers", unit="quantizer", disable=not progress, leave=False):
        sqnr = min(_deployed_agreement(_keeping(model, tensor), feeds))
        results.append(LayerError(tensor, "quantizer", sqnr))
    return sorted(results, key=lambda e: e.sqnr_db)


def _keeping(model: onnx.ModelProto, tensor: str | None) -> onnx.ModelProto:
    """A copy of `model` whose activation QuantizeLinear → DequantizeLinear pairs are all removed but the one
    on `tensor`: readers of a removed pair read the float tensor again."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph, weights = copy.graph, {i.name for i in copy.graph.initializer}
    quantizers = {n.output[0]: n for n in graph.node
                  if n.op_type == "QuantizeLinear" and n.input[0] not in weights and n.input[0] != tensor}
    dropped = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in quantizers]
    source = {n.output[0]: quantizers[n.input[0]].input[0] for n in dropped}
    kept = [n for n in graph.node if n.output[0] not in quantizers and n.output[0] not in source]
    for node in kept:
        node.input[:] = [source.get(name, name) for name in node.input]
    for output in graph.output:
        output.name = source.get(output.name, output.name)
    del graph.node[:]
    graph.node.extend(kept)
    return copy


def _deployed_agreement(model: onnx.ModelProto, feeds: Iterable[Mapping[str, np.ndarray]]) -> list[float]:
    """Per model output, SQNR (dB) of OpenVINO (model compiled as it is, f32) against the ONNX semantics."""
    from onnxcompress.runtime.openvino import compile_model

    names = [o.name for o in model.graph.output]
    reference = _session(model, names, level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    compiled = compile_model(model, precision_hint="f32")
    signal, noise = [0.0] * len(names), [0.0] * len(names)
    for feed in feeds:
        results = compiled(dict(feed))
        for index, ref in enumerate(_run(reference, names, feed)):
            ref = ref.astype(np.float64)
            signal[index] += float(np.sum(ref**2))
            noise[index] += float(np.sum((ref - results[compiled.outputs[index]].astype(np.float64)) ** 2))
    return [_db(s, n) for s, n in zip(signal, noise)]


def _db(signal: float, noise: float) -> float:
    return float("inf") if noise == 0 else 10 * np.log10(max(signal, 1e-30) / noise)


def _exposed(model: onnx.ModelProto, outputs: list[str]) -> onnx.ModelProto:
    """A copy of `model` whose graph outputs include `outputs`."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    known = {o.name for o in exposed.graph.output}
    exposed.graph.output.extend(onnx.ValueInfoProto(name=name) for name in outputs if name not in known)
    return exposed


def _session(model: onnx.ModelProto, outputs: list[str], *,
             level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = level
    try:
        return ort.InferenceSession(_exposed(model, outputs).SerializeToString(), options,
                                    providers=["CPUExecutionProvider"])
    except Exception as error:  # ORT raises several unrelated types for models it cannot run
        raise EvaluationError(f"ONNX Runtime cannot run {model.graph.name or 'the model'}: "
                              f"{first_line(error)}") from error


def _run(session: ort.InferenceSession, names: list[str], feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    try:
        return session.run(names, dict(feed))
    except Exception as error:  # ORT raises several unrelated types for failing runs
        raise EvaluationError(f"ONNX Runtime failed to run the model: {first_line(error)}") from error


def format_layer_errors(errors: list[LayerError], worst: int = 10) -> str:
    ranked = sorted((e for e in errors if e.op_type not in ("output", "deployed")), key=lambda e: e.sqnr_db)[:worst]
    lines = [f"{'layer output':48} {'op':9} {'SQNR dB':>8}"]
    lines += [f"{e.tensor[:48]:48} {e.op_type:9} {e.sqnr_db:8.1f}" for e in ranked]
    lines += [f"model output {e.tensor}: {e.sqnr_db:.1f} dB" for e in errors if e.op_type == "output"]
    lines += [f"model output {e.tensor} as deployed (nothing exposed): {e.sqnr_db:.1f} dB"
              for e in errors if e.op_type == "deployed"]
    return "\n".join(lines)


def format_isolation(results: list[LayerError], worst: int = 10) -> str:
    baseline = next(e.sqnr_db for e in results if e.tensor == "none")
    lines = [f"weights only (no activation quantizer): {baseline:.1f} dB",
             f"{'quantizer alone':60} {'deployed SQNR dB':>16}"]
    lines += [f"{e.tensor[:60]:60} {e.sqnr_db:16.1f}" for e in results if e.tensor != "none"][:worst]
    return "\n".join(lines)


def plot_layer_error(errors: list[LayerError], path: str | os.PathLike, *,
                     title: str = "Per-layer quantization error", ylabel: str = "SQNR vs float (dB, higher is better)"
                     ) -> None:
    """Bar chart of SQNR per layer in graph order (PNG, written atomically)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(max(6.0, 0.12 * len(errors) + 2), 4), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    values = [min(e.sqnr_db, 100.0) for e in errors]
    colors = ["tab:red" if e.op_type in ("output", "deployed") else "tab:blue" for e in errors]
    axes.bar(range(len(errors)), values, color=colors)
    axes.set_xlabel("layer (graph order; red = model output)")
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    write_bytes_atomic(path, buffer.getvalue())
