"""OpenVINO deployment: export ONNX to IR, compile for the CPU, and prove which layers really run in INT8.

Three jobs, kept separate so each can be tested on its own:

* `export_openvino` converts an ONNX model (path or ModelProto) to OpenVINO IR (`<name>.xml` + `<name>.bin`).
  Everything is written into a staging folder next to the destination and only then renamed into place, so a
  failure never leaves half-written or mismatched files behind.
* `compile_model` compiles an ONNX model or IR for the CPU with explicit performance / precision hints.
  On CPUs with AVX512-BF16 or AMX the plugin silently runs "FP32" models in bf16 unless
  `INFERENCE_PRECISION_HINT=f32` is set, so callers must choose and label the precision they measure.
* `runtime_precisions` / `int8_summary` read the *executed* graph (`CompiledModel.get_runtime_model()`): after
  low-precision transformations and fusions, each node's rt_info says which kernel precision it runs in.
  This is the only reliable proof that a QDQ model's Convolutions / MatMuls actually execute in INT8
  (a DequantizeLinear that cannot be fused makes OpenVINO fall back to float kernels without any warning).

What OpenVINO 2026.4 CPU reports here (runtime model rt_info, all values strings):
  layerType         "Convolution" (also depthwise/grouped), "Deconvolution", "FullyConnected"
                    (MatMul/Gemm with constant weights), "MatMul" (both operands activations), plus
                    "Reorder", "FakeQuantize", "Eltwise", "Reduce", "Const", "Input", "Output", ...
  runtimePrecision  "u8" / "i8" for INT8 kernels, "bf16", "f32", "i32", ...
  primitiveType     kernel name, e.g. "brgconv_avx512_I8", "brgconv_avx512_bf16", "undef_I8"
  originalLayersNames  comma-separated names of the ONNX-side nodes fused into this one ("" for inserted Reorders)

Sparse weights (`CPU_SPARSE_WEIGHTS_DECOMPRESSION_RATE`, a float in [0, 1], 1 = off): at compilation the CPU
plugin stores the non-zero weights of a FullyConnected layer packed, and unpacks them in the kernel, when the CPU
has AMX, the layer's input is u8/i8 and its weights are a 2-D i8 constant (fed by no other node, such as the
Transpose OpenVINO adds for [in, out] weights) whose both dimensions are multiples of 64, with at least that fraction
of zeros. Nothing else (Convolution, float layers, other CPUs) changes.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import onnx
import openvino as ov

from onnxcompress.errors import BenchmarkError, ExportError, OutputError
from onnxcompress.runtime.cpu import CpuFeatures
from onnxcompress.runtime.model_io import RuntimeSource, refuse_overwriting_reads, runtime_source, source_files
from onnxcompress.runtime.outputs import remove_tree

__all__ = [
    "HEAVY_LAYER_TYPES",
    "INT8_PRECISIONS",
    "Int8Summary",
    "LayerPrecision",
    "SPARSE_WEIGHTS_PROPERTY",
    "compile_model",
    "export_openvino",
    "int8_summary",
    "FullyConnectedWeights",
    "describe_sparse_weight_layers",
    "runtime_precisions",
    "sparse_weight_layers",
    "sparse_weights_note",
]

# Layer types (CPU plugin `layerType`) that carry nearly all the FLOPs. Depthwise/grouped convolutions are
# reported as "Convolution" by the 2026 CPU plugin; "GroupConvolution" is kept for other plugin versions.
HEAVY_LAYER_TYPES: frozenset[str] = frozenset(
    {"Convolution", "GroupConvolution", "Deconvolution", "FullyConnected", "MatMul"}
)
# `runtimePrecision` values of INT8 kernels (u8 activations are the norm; i8 appears for signed inputs).
INT8_PRECISIONS: frozenset[str] = frozenset({"u8", "i8"})

SPARSE_WEIGHTS_PROPERTY = "CPU_SPARSE_WEIGHTS_DECOMPRESSION_RATE"
#: Both dimensions of a weight matrix the sparse weights kernels take are multiples of this.
_SPARSE_BLOCK = 64

# ONNX protobufs cannot be serialized past 2 GiB; leave headroom for the graph itself.
_EXTERNAL_DATA_THRESHOLD = int(1.9 * 1024**3)

@lru_cache(maxsize=1)
def _core() -> ov.Core:
    """One shared `openvino.Core`: creating it loads plugins, which is slow, and it is thread-safe."""
    return ov.Core()


# --------------------------------------------------------------------------------------------------- export


def _validate_name(name: str) -> str:
    if not name or name in {".", ".."} or "/" in name or "\\" in name or any(ord(c) < 32 for c in name):
        raise OutputError(f"invalid IR name {name!r}: it must be a plain file stem without path separators")
    return name


def _default_name(model: onnx.ModelProto | str | os.PathLike[str]) -> str:
    if isinstance(model, onnx.ModelProto):
        return model.graph.name or "model"
    return Path(model).stem or "model"


def _write_onnx(model: onnx.ModelProto, folder: Path, stem: str = "model") -> Path:
    """Serialize a ModelProto for tools that only accept paths; big models go to external data (2 GiB limit)."""
    path = folder / f"{stem}.onnx"
    try:
        size = model.ByteSize()
    except Exception:  # noqa: BLE001 - protobuf may refuse to size huge messages; then it is certainly too big
        size = _EXTERNAL_DATA_THRESHOLD + 1
    if size <= _EXTERNAL_DATA_THRESHOLD:
        path.write_bytes(model.SerializeToString())
        return path
    # save_model(save_as_external_data=True) rewrites the proto in place; work on a copy so the caller's
    # model keeps its inline tensors.
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    onnx.save_model(
        copy, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
        location=f"{stem}.onnx.data", size_threshold=1024,
    )
    return path


def _make_dirs(path: Path) -> list[Path]:
    """mkdir -p that returns the folders it created (deepest last), so a failure can remove exactly those."""
    missing: list[Path] = []
    probe = path
    while not probe.exists():
        missing.append(probe)
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise OutputError(f"cannot create {path}: {probe} exists and is not a directory")
    created: list[Path] = []
    try:
        for folder in reversed(missing):
            folder.mkdir()
            created.append(folder)
    except OSError as exc:
        _remove_dirs(created)
        raise OutputError(f"cannot create output folder {path}: {exc}") from exc
    return created


def _remove_dirs(created: Sequence[Path]) -> None:
    for folder in reversed(created):
        try:
            folder.rmdir()
        except OSError:
            pass  # not empty (someone else wrote there) or already gone: never delete foreign files


def _install(files: Mapping[Path, Path], backup_dir: Path) -> None:
    """Rename staged files to their targets; on any failure restore whatever was there before.

    Renames within one filesystem are atomic per file; backing up existing targets first makes the
    .xml/.bin *pair* all-or-nothing too (a new .xml must never sit next to an old .bin).
    """
    backups: dict[Path, Path] = {}
    installed: list[Path] = []
    try:
        for target in files.values():
            if target.exists() or target.is_symlink():
                backup = backup_dir / f"previous.{target.name}"
                os.replace(target, backup)
                backups[target] = backup
        for staged, target in files.items():
            os.replace(staged, target)
            installed.append(target)
    except BaseException as exc:  # an interrupt too: the backups live in the staging folder the caller removes
        for target in installed:
            target.unlink(missing_ok=True)
        for target, backup in backups.items():
            os.replace(backup, target)
        if isinstance(exc, OSError):
            raise OutputError(f"cannot move the IR into {next(iter(files.values())).parent}: {exc}") from exc
        raise


def _convert(source: Path, xml_path: Path) -> None:
    with runtime_source(source) as checked:
        readable = checked.readable
        try:
            ov_model = ov.convert_model(io.BytesIO(readable) if isinstance(readable, bytes) else readable)
        except Exception as exc:  # noqa: BLE001 - OpenVINO raises many unrelated types (OpConversionFailure, ...)
            raise ExportError(f"OpenVINO could not convert {source.name}: {str(exc).strip()}") from exc
    try:
        # compress_to_fp16=False: FP16 weight compression would change the numbers we validated in ONNX.
        ov.save_model(ov_model, str(xml_path), compress_to_fp16=False)
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"OpenVINO could not save the IR to {xml_path.parent}: {str(exc).strip()}") from exc


def export_openvino(
    model: onnx.ModelProto | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    name: str | None = None,
) -> Path:
    """Convert an ONNX model to OpenVINO IR `<out_dir>/<name>.xml` + `.bin` (FP32 weights kept) and return the .xml.

    `name` defaults to the ONNX file stem (or the graph name for a ModelProto). Existing files of the same name
    are replaced only once the new pair is complete. Raises ExportError when conversion fails and OutputError
    when the destination cannot be written; in both cases nothing new is left on disk.
    """
    stem = _validate_name(name if name is not None else _default_name(model))
    if not isinstance(model, onnx.ModelProto):
        source = Path(model)
        if not source.is_file():
            raise ExportError(f"ONNX model not found: {source}")
    out = Path(out_dir).absolute()
    if out.exists() and not out.is_dir():
        raise OutputError(f"output folder {out} exists and is not a directory")
    if not isinstance(model, onnx.ModelProto):
        refuse_overwriting_reads((out / f"{stem}.xml", out / f"{stem}.bin"), source_files(source))

    # Stage next to out_dir (not in /tmp) so the final rename stays on one filesystem and is atomic.
    created = _make_dirs(out.parent)
    staging: Path | None = None
    try:
        try:
            staging = Path(tempfile.mkdtemp(prefix=f".{stem}.", suffix=".ov-export", dir=out.parent))
        except OSError as exc:
            raise OutputError(f"cannot write to {out.parent}: {exc}") from exc
        if isinstance(model, onnx.ModelProto):
            try:
                source = _write_onnx(model, staging, stem="source")
            except (OSError, ValueError) as exc:
                raise OutputError(f"cannot write the temporary ONNX copy in {staging}: {exc}") from exc
        _convert(source, staging / f"{stem}.xml")
        created += _make_dirs(out)
        _install({staging / f"{stem}.bin": out / f"{stem}.bin", staging / f"{stem}.xml": out / f"{stem}.xml"}, staging)
    except BaseException:
        if staging is not None:
            remove_tree(staging)
        _remove_dirs(created)
        raise
    remove_tree(staging)
    return out / f"{stem}.xml"


# -------------------------------------------------------------------------------------------------- compile


@contextmanager
def _readable(model: onnx.ModelProto | str | os.PathLike[str] | RuntimeSource) -> Iterator[bytes | str]:
    """What `Core.read_model` takes for `model`: an IR .xml path as it is, an ONNX model as checked bytes (or a
    private copy when it is too big for one protobuf; see `runtime_source`)."""
    if isinstance(model, str | os.PathLike):
        path = Path(model)
        if not path.is_file():
            raise BenchmarkError(f"model not found: {path}")
        if path.suffix == ".xml":
            yield str(path)
            return
    with runtime_source(model) as source:
        yield source.readable


def _compile_config(
    precision_hint: str | None, performance_hint: str, num_streams: int | str | None,
    sparse_weights_rate: float | None,
) -> dict[str, str]:
    config = {"PERFORMANCE_HINT": performance_hint.upper()}
    if precision_hint is not None:
        config["INFERENCE_PRECISION_HINT"] = precision_hint
    if num_streams is not None:
        config["NUM_STREAMS"] = str(num_streams)
    if sparse_weights_rate is not None:
        config[SPARSE_WEIGHTS_PROPERTY] = str(sparse_weights_rate)
    return config


def _compile(
    ov_model: ov.Model, shapes: Mapping[str, Sequence[int]] | None, device: str, config: Mapping[str, str]
) -> ov.CompiledModel:
    if shapes:
        ov_model.reshape({name: list(shape) for name, shape in shapes.items()})
    return _core().compile_model(ov_model, device, dict(config))


def compile_model(
    model: onnx.ModelProto | str | os.PathLike[str] | ov.Model | RuntimeSource,
    *,
    precision_hint: str | None = None,
    performance_hint: str = "LATENCY",
    num_streams: int | str | None = None,
    shapes: Mapping[str, Sequence[int]] | None = None,
    device: str = "CPU",
    sparse_weights_rate: float | None = None,
) -> ov.CompiledModel:
    """Compile an ONNX model (path, ModelProto or RuntimeSource), an IR .xml or an `openvino.Model` for `device`.

    precision_hint: None keeps the plugin default (bf16 on CPUs with AVX512-BF16/AMX, f32 otherwise);
        "f32" forces FP32 kernels for float layers. INT8 layers of a QDQ model stay INT8 either way: the hint
        only changes the precision of the layers that remain in float.
    performance_hint: "LATENCY" (one stream) or "THROUGHPUT" (several streams for parallel requests).
    num_streams: overrides the stream count chosen by the hint (int or "AUTO").
    shapes: static input shapes by input name; benchmarks should pass them because dynamic-shape kernels are
        slower and would not measure what a deployed static model does.
    sparse_weights_rate: sets CPU_SPARSE_WEIGHTS_DECOMPRESSION_RATE (see the module docstring); None leaves it off.
    Raises BenchmarkError with OpenVINO's reason when reading or compiling fails.
    """
    config = _compile_config(precision_hint, performance_hint, num_streams, sparse_weights_rate)
    try:
        if isinstance(model, ov.Model):
            # reshape() mutates: never change the caller's model.
            return _compile(model.clone() if shapes else model, shapes, device, config)
        # Compile while a private copy still exists: OpenVINO may memory-map (external) weights instead of copying.
        with _readable(model) as source:
            return _compile(_core().read_model(source), shapes, device, config)
    except BenchmarkError:
        raise
    except Exception as exc:  # noqa: BLE001 - OpenVINO exceptions are plain RuntimeErrors with the reason inside
        raise BenchmarkError(f"OpenVINO could not compile the model ({config}): {str(exc).strip()}") from exc


# ----------------------------------------------------------------------------------------- runtime precisions


@dataclass(frozen=True)
class LayerPrecision:
    """One node of the executed (runtime) graph and the precision its kernel runs in."""

    name: str
    layer_type: str
    runtime_precision: str
    original_names: tuple[str, ...] = ()
    primitive_type: str = ""

    @property
    def is_int8(self) -> bool:
        return self.runtime_precision in INT8_PRECISIONS


@dataclass(frozen=True)
class Int8Summary:
    """How many heavy layers (Convolution, FullyConnected, MatMul, ...) run in INT8 kernels.

    `by_type` maps layer type -> (int8 count, total count); `not_int8` lists runtime names of heavy layers
    running in another precision, with that precision, so a report can say exactly what fell back.
    """

    heavy_total: int
    int8_count: int
    not_int8: tuple[str, ...]
    not_int8_precisions: tuple[str, ...]
    by_type: Mapping[str, tuple[int, int]]

    @property
    def other_count(self) -> int:
        return self.heavy_total - self.int8_count

    @property
    def all_int8(self) -> bool:
        """True when there is at least one heavy layer and every one of them runs in u8/i8."""
        return self.heavy_total > 0 and self.int8_count == self.heavy_total


def _rt_string(rt_info, key: str) -> str:
    try:
        return str(rt_info[key].astype(str))
    except (KeyError, RuntimeError, TypeError):
        return ""


def runtime_precisions(compiled: ov.CompiledModel) -> list[LayerPrecision]:
    """Read each executed node's layer type and kernel precision from `compiled.get_runtime_model()`."""
    layers: list[LayerPrecision] = []
    for op in compiled.get_runtime_model().get_ordered_ops():
        rt_info = op.get_rt_info()
        originals = _rt_string(rt_info, "originalLayersNames")
        layers.append(
            LayerPrecision(
                name=op.get_friendly_name(),
                layer_type=_rt_string(rt_info, "layerType") or op.get_type_name(),
                runtime_precision=_rt_string(rt_info, "runtimePrecision"),
                original_names=tuple(part for part in originals.split(",") if part),
                primitive_type=_rt_string(rt_info, "primitiveType"),
            )
        )
    return layers


def int8_summary(
    layers: Iterable[LayerPrecision], heavy_types: Iterable[str] = HEAVY_LAYER_TYPES
) -> Int8Summary:
    """Count heavy layers running in u8/i8 versus any other precision (see `runtime_precisions`)."""
    heavy = frozenset(heavy_types)
    totals: Counter[str] = Counter()
    int8: Counter[str] = Counter()
    not_int8: list[LayerPrecision] = []
    for layer in layers:
        if layer.layer_type not in heavy:
            continue
        totals[layer.layer_type] += 1
        if layer.is_int8:
            int8[layer.layer_type] += 1
        else:
            not_int8.append(layer)
    return Int8Summary(
        heavy_total=sum(totals.values()),
        int8_count=sum(int8.values()),
        not_int8=tuple(layer.name for layer in not_int8),
        not_int8_precisions=tuple(layer.runtime_precision for layer in not_int8),
        by_type={kind: (int8[kind], totals[kind]) for kind in sorted(totals)},
    )


def heavy_layer_precisions(layers: Iterable[LayerPrecision], heavy_types: Iterable[str] = HEAVY_LAYER_TYPES
                           ) -> Counter[str]:
    """How many heavy layers run in each kernel precision, as "<layer type> <precision>": a FullyConnected in i4
    or u4 reads compressed 4-bit weights (its activations stay float), one in i8 or u8 reads INT8 weights, or
    INT8 activations too when its input is quantized."""
    heavy = frozenset(heavy_types)
    return Counter(f"{layer.layer_type} {layer.runtime_precision}" for layer in layers if layer.layer_type in heavy)


# ------------------------------------------------------------------------------------------------ sparse weights


@dataclass(frozen=True)
class FullyConnectedWeights:
    """The weights of an INT8 FullyConnected layer as the CPU plugin holds them after its graph optimizations."""

    shape: tuple[int, ...]
    #: Layer type of the node that feeds them: "Const" for stored weights; "Transpose" where OpenVINO turns
    #: [in, out] weights (MatMul, Gemm without transB) into the [out, in] a FullyConnected takes.
    producer: str

    @property
    def not_packable(self) -> str:
        """Why sparse weights cannot take this layer whatever its zeros, or "" when they can."""
        if self.producer != "Const":
            return f"its weights come from a {self.producer} node rather than a stored constant"
        if len(self.shape) != 2 or any(dim % _SPARSE_BLOCK for dim in self.shape):
            return f"dimensions not multiples of {_SPARSE_BLOCK}"
        return ""


def sparse_weight_layers(compiled: ov.CompiledModel) -> dict[str, FullyConnectedWeights]:
    """The INT8 FullyConnected layers of the executed graph (u8/i8 input, i8 weights: the only kind sparse weights
    apply to), by name."""
    layers = {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        if _rt_string(op.get_rt_info(), "layerType") != "FullyConnected" or op.get_input_size() < 2:
            continue
        data, weights = op.input(0), op.input(1)
        if (data.get_element_type() in (ov.Type.u8, ov.Type.i8) and weights.get_element_type() == ov.Type.i8
                and weights.get_partial_shape().is_static):
            producer = _rt_string(weights.get_source_output().get_node().get_rt_info(), "layerType")
            layers[op.get_friendly_name()] = FullyConnectedWeights(tuple(weights.get_shape()), producer)
    return layers


def _describe_layers(layers: Mapping[str, FullyConnectedWeights]) -> str:
    if not layers:
        return "no INT8 FullyConnected layer"
    return ", ".join(f"{name} {'x'.join(map(str, weights.shape))}"
                     + (f" (not packable: {weights.not_packable})" if weights.not_packable else "")
                     for name, weights in layers.items())


def describe_sparse_weight_layers(layers_by_model: Mapping[str, Mapping[str, FullyConnectedWeights]]) -> str:
    """Each model's INT8 FullyConnected layers (see `sparse_weight_layers`), each one sparse weights cannot take
    with the reason."""
    return "; ".join(f"{model}: {_describe_layers(layers)}" for model, layers in layers_by_model.items())


def sparse_weights_note(rate: float, cpu: CpuFeatures) -> str:
    """What CPU_SPARSE_WEIGHTS_DECOMPRESSION_RATE=`rate` does on `cpu`."""
    rule = (f"INT8 FullyConnected layers only (MatMul/Gemm with stored 2-D i8 weights, both dimensions multiples "
            f"of {_SPARSE_BLOCK}, a zero fraction of at least {rate:g}); Convolutions and float layers stay dense")
    if not cpu.amx:
        return (f"CPU {cpu.name} has no AMX, so OpenVINO does not use sparse weights on it: every -sparse row is "
                f"expected to equal its dense twin. On an AMX CPU they would apply to {rule}.")
    return f"CPU {cpu.name} has AMX: OpenVINO applies sparse weights to {rule}."
