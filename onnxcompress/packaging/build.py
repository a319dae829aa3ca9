"""Write a deployment package: the ONNX model, its OpenVINO IR, the facts a deployment needs, and a model card.

    <package>/manifest.json                      format, signature, settings, runtime reports, SHA-256 of each file
    <package>/README.md                          model card (before/after table and plot with --reference/--data)
    <package>/openvino/<name>/1/model.xml|.bin   OpenVINO Model Server: --model_path <package>/openvino/<name>
    <package>/triton/<name>/config.pbtxt         Triton: --model-repository <package>/triton (onnxruntime backend)
    <package>/triton/<name>/1/model.onnx         the ONNX model itself (its .data beside it when over 2 GB)

Everything is written into a hidden staging folder beside the destination, the manifest last, and renamed into
place: a package that is interrupted never looks complete. An existing package at the destination is replaced; any
other existing folder or file is refused.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import onnx

from onnxcompress.errors import PackageError, first_line
from onnxcompress.packaging.card import measure_card
from onnxcompress.packaging.manifest import (COMPRESSION_METADATA, FORMAT_VERSION, MANIFEST, Manifest,
                                             RuntimeReport, Serving, TensorSpec, read_manifest)
from onnxcompress.portability import check_portability
from onnxcompress.runtime.checksum import sha256_file
from onnxcompress.runtime.model_io import RuntimeSource, load_model, runtime_source, save_model, static_dim
from onnxcompress.runtime.outputs import new_folder_mode, remove_tree, write_text_atomic

RUNTIMES = ("onnxruntime", "openvino")
_TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "float64": "TYPE_FP64", "int8": "TYPE_INT8",
                 "uint8": "TYPE_UINT8", "int16": "TYPE_INT16", "int32": "TYPE_INT32", "int64": "TYPE_INT64",
                 "bool": "TYPE_BOOL", "uint16": "TYPE_UINT16", "uint32": "TYPE_UINT32", "uint64": "TYPE_UINT64"}


def build_package(model_path: str | os.PathLike, output: str | os.PathLike, *, name: str | None = None,
                  runtimes: Sequence[str] = RUNTIMES, reference: str | os.PathLike | None = None,
                  data: str | os.PathLike | None = None, reads: Sequence[str | os.PathLike | None] = ()) -> Path:
    """Package the model at `model_path` into the folder `output` and return it; see the module docstring.
    `output` may not hold the model, `reference`, `data` or `reads`: replacing the folder would delete them."""
    source, out = Path(model_path), Path(os.path.abspath(output))
    for path in (source, reference, data, *reads):
        if path is not None and Path(path).resolve().is_relative_to(out.resolve()):
            raise PackageError(f"{path} is inside the package folder {out}, which packaging replaces")
    unknown = sorted(set(runtimes) - set(RUNTIMES))
    if unknown or not runtimes:
        raise PackageError(f"--runtimes takes {', '.join(RUNTIMES)}; got {', '.join(runtimes) or 'none'}")
    name = _model_name(name or source.stem)
    _require_replaceable(out)
    model = load_model(source)
    staging = _staging_folder(out)
    try:
        manifest = _write_contents(staging, model, source, name, tuple(runtimes), reference, data)
        write_text_atomic(staging / MANIFEST, manifest.model_dump_json(indent=2))
        _install(staging, out)
    except BaseException:
        remove_tree(staging)
        raise
    return out


def _write_contents(staging: Path, model: onnx.ModelProto, source: Path, name: str, runtimes: tuple[str, ...],
                    reference: str | os.PathLike | None, data: str | os.PathLike | None) -> Manifest:
    (staging / "triton" / name / "1").mkdir(parents=True)
    onnx_path = save_model(model, staging / "triton" / name / "1" / "model.onnx")
    (staging / "triton" / name / "config.pbtxt").write_text(triton_config(model, name))
    with runtime_source(model) as checked:  # serialized once for both runtimes
        reports = {runtime: _report(runtime, checked) for runtime in runtimes}
    ir = None
    if "openvino" in runtimes:
        from onnxcompress.runtime.openvino import export_openvino

        ir = export_openvino(onnx_path, staging / "openvino" / name / "1", name="model")
    portability = check_portability(model)
    card = measure_card(model, onnx_path, runtimes, reference=reference, data=data, folder=staging)
    (staging / "README.md").write_text(card.render(name, reports, portability.describe()))
    files = {str(p.relative_to(staging)): sha256_file(p) for p in sorted(staging.rglob("*"))
             if p.is_file() and p.name != MANIFEST}
    return Manifest(
        format_version=FORMAT_VERSION, name=name, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        source_sha256=sha256_file(source), versions=_versions(), inputs=_specs(model, inputs=True),
        outputs=_specs(model, inputs=False), compression=_compression(model),
        onnx_model=str(onnx_path.relative_to(staging)),
        openvino_ir=str(ir.relative_to(staging)) if ir is not None else None, runtimes=reports,
        safe_without_vnni=portability.safe_without_vnni, portability=portability.describe(),
        serving=Serving(openvino_model_server=f"openvino/{name}", triton_model_repository="triton"), files=files)


def _report(runtime: str, checked: RuntimeSource) -> RuntimeReport:
    """Compile the model in `runtime` and count its INT8 heavy layers; PackageError naming the runtime if it fails."""
    try:
        if runtime == "onnxruntime":
            from onnxcompress.runtime.ort_kernels import ort_kernel_summary

            summary = ort_kernel_summary(checked)
            integer = sum(summary.integer.values())
            return RuntimeReport(compiled=True, int8_layers=integer,
                                 heavy_layers=integer + sum(summary.float.values()), detail=summary.describe())
        from onnxcompress.runtime.openvino import compile_model, int8_summary, runtime_precisions

        layers = int8_summary(runtime_precisions(compile_model(checked)))
        detail = ", ".join(f"{kind} {i8}/{total}" for kind, (i8, total) in layers.by_type.items())
        return RuntimeReport(compiled=True, int8_layers=layers.int8_count, heavy_layers=layers.heavy_total,
                             detail=detail, not_int8=layers.not_int8)
    except Exception as error:  # runtimes raise assorted types for models they refuse
        others = ",".join(r for r in RUNTIMES if r != runtime)
        raise PackageError(f"the model does not compile in {runtime}: {first_line(error)}; leave that runtime out "
                           f"with --runtimes {others}") from error


def triton_config(model: onnx.ModelProto, name: str) -> str:
    """Triton's config.pbtxt for the onnxruntime backend: max_batch_size 0, so `dims` are the model's own
    (dynamic ones -1), and one CPU instance."""
    def block(kind: str, specs: tuple[TensorSpec, ...]) -> str:
        entries = []
        for spec in specs:
            if spec.dtype not in _TRITON_TYPES:
                raise PackageError(f"{kind} {spec.name!r} has dtype {spec.dtype}, which Triton cannot serve")
            dims = ", ".join(str(d) if isinstance(d, int) else "-1" for d in spec.shape)
            entries.append(f'  {{\n    name: "{spec.name}"\n    data_type: {_TRITON_TYPES[spec.dtype]}\n'
                           f"    dims: [ {dims} ]\n  }}")
        return f"{kind} [\n" + ",\n".join(entries) + "\n]\n"

    return (f'name: "{name}"\nbackend: "onnxruntime"\nmax_batch_size: 0\n'
            + block("input", _specs(model, inputs=True)) + block("output", _specs(model, inputs=False))
            + "instance_group [\n  {\n    count: 1\n    kind: KIND_CPU\n  }\n]\n")


def _specs(model: onnx.ModelProto, *, inputs: bool) -> tuple[TensorSpec, ...]:
    weights = {t.name for t in model.graph.initializer}
    values = [v for v in model.graph.input if v.name not in weights] if inputs else list(model.graph.output)
    specs = []
    for value in values:
        tensor = value.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
        shape = tuple(static_dim(d) or (d.dim_param or f"{value.name}:{axis}")
                      for axis, d in enumerate(tensor.shape.dim))
        specs.append(TensorSpec(name=value.name, dtype=dtype, shape=shape))
    return tuple(specs)


def _compression(model: onnx.ModelProto) -> tuple[dict, ...]:
    entry = next((p.value for p in model.metadata_props if p.key == COMPRESSION_METADATA), None)
    if entry is None:
        return ()
    try:
        settings = json.loads(entry)
    except json.JSONDecodeError:
        return ({"unreadable": entry[:200]},)
    return tuple(settings) if isinstance(settings, list) else ({"recorded": settings},)


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {package: version(package) for package in ("onnxcompress", "onnx", "onnxruntime", "openvino")}


def _model_name(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}", name) or name in {".", ".."}:
        raise PackageError(f"invalid model name {name!r}: use letters, digits, '_', '-' and '.' (the serving "
                           "tools use it as a folder name)")
    return name


def _require_replaceable(out: Path) -> None:
    """The destination is absent, an empty folder, or a package: anything else holds files we must not touch."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise PackageError(f"{out} exists and is not a package folder")
    if out.is_dir() and any(out.iterdir()):
        try:
            read_manifest(out)
        except PackageError:
            raise PackageError(f"{out} exists and is not a package; refusing to replace its files") from None
    if not out.parent.is_dir():
        raise PackageError(f"cannot write {out}: folder {out.parent} does not exist")


def _staging_folder(out: Path) -> Path:
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    except OSError as error:
        raise PackageError(f"cannot write into {out.parent}: {error.strerror or error}") from None
    staging.chmod(new_folder_mode())  # mkdtemp makes it private; the package is the user's like any result
    return staging


def _install(staging: Path, out: Path) -> None:
    """Rename the finished staging folder to `out`; a package already there is moved aside first, then removed."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / "package")
    try:
        os.replace(staging, out)
    except BaseException as error:  # Ctrl-C too: the previous package goes back in place
        if old is not None:
            os.replace(old / "package", out)
            remove_tree(old)
        if isinstance(error, OSError):
            raise PackageError(f"cannot move the package into {out}: {error.strerror or error}") from None
        raise
    if old is not None:
        remove_tree(old)


