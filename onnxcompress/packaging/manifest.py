"""The package manifest (`manifest.json`): its schema, and verification of a package folder against it.

A package is trusted only after `verify_package`: the manifest parses, its format version is known, every file it
lists is a regular file inside the folder (no `..`, no absolute path, no symlink) with the recorded SHA-256, and
the folder holds no file the manifest does not list. Nothing outside the folder is ever opened.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from onnxcompress.errors import PackageError
from onnxcompress.runtime.checksum import sha256_file

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
#: Key of the model metadata entry where `quantize` and `finetune` record their settings (a JSON list).
COMPRESSION_METADATA = "onnxcompress.compression"
#: A manifest larger than this is not one we wrote (a real one is a few kB).
_MAX_MANIFEST_BYTES = 4 << 20


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorSpec(_Frozen):
    name: str = Field(description="Tensor name in the model.")
    dtype: str = Field(description="NumPy dtype name, e.g. float32.")
    shape: tuple[int | str, ...] = Field(description="Dimensions; a string names a dynamic one.")


class RuntimeReport(_Frozen):
    """What one runtime executes for the packaged model, measured when the package was made."""

    compiled: bool = Field(description="Whether the model compiled in this runtime.")
    int8_layers: int = Field(0, description="Heavy layers (Conv, FullyConnected/Gemm, MatMul) running INT8.")
    heavy_layers: int = Field(0, description="All heavy layers.")
    detail: str = Field("", description="Heavy layers by kind, INT8 and not.")
    not_int8: tuple[str, ...] = Field((), description="Names of the heavy layers that do not run INT8 (OpenVINO).")


class Serving(_Frozen):
    """Where each serving tool finds the model, relative to the package folder."""

    openvino_model_server: str = Field(description="OVMS --model_path: a folder of numbered versions.")
    triton_model_repository: str = Field(description="Triton --model-repository: <name>/config.pbtxt and versions.")


class Manifest(_Frozen):
    format_version: Literal[1] = Field(description="Version of this manifest format.")
    name: str = Field(description="Model name used by the serving layouts.")
    created: str = Field(description="UTC time the package was made (ISO 8601).")
    source_sha256: str = Field(description="SHA-256 of the model file that was packaged.")
    versions: dict[str, str] = Field(description="onnxcompress and runtime versions that made the package.")
    inputs: tuple[TensorSpec, ...] = Field(description="Model inputs.")
    outputs: tuple[TensorSpec, ...] = Field(description="Model outputs.")
    compression: tuple[dict, ...] = Field(description="The compression settings recorded in the model (empty: FP32).")
    onnx_model: str = Field(description="The ONNX model, relative path.")
    openvino_ir: str | None = Field(description="The OpenVINO IR .xml (its .bin beside it), or none.")
    runtimes: dict[str, RuntimeReport] = Field(description="onnxruntime / openvino: what each runs INT8.")
    safe_without_vnni: bool = Field(description="Exact on x86 CPUs without VNNI in ONNX Runtime's integer kernels.")
    portability: str = Field(description="Why the file is or is not safe without VNNI.")
    serving: Serving
    files: dict[str, str] = Field(description="SHA-256 of every other file of the package, by relative path.")


def read_manifest(folder: Path) -> Manifest:
    """The parsed manifest of `folder`; PackageError when it is missing, malformed or of an unknown version."""
    path = folder / MANIFEST
    if not folder.is_dir():
        raise PackageError(f"{folder} is not a package folder")
    if path.is_symlink() or not path.is_file():
        raise PackageError(f"{folder} is not a package: it has no {MANIFEST}")
    if path.stat().st_size > _MAX_MANIFEST_BYTES:
        raise PackageError(f"{path} is too large to be a manifest")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise PackageError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise PackageError(f"{path} is not a manifest (not a JSON object)")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise PackageError(f"{path} has manifest format version {version!r}; this onnxcompress reads version "
                           f"{FORMAT_VERSION}")
    try:
        return Manifest.model_validate(data)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors()[:5])
        raise PackageError(f"{path} is malformed: {problems}") from None


def verify_package(folder: str | Path) -> Manifest:
    """The manifest of a package whose files are exactly the listed ones, unchanged; PackageError naming the
    first file that is not."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    listed = {}
    for name in manifest.files:
        listed[name] = _inside(folder, name)
    for name, path in listed.items():
        if path.is_symlink() or not path.is_file():
            raise PackageError(f"package file {name} is missing from {folder}")
    present = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() or p.is_symlink()}
    extra = sorted(present - set(listed) - {MANIFEST})
    if extra:
        raise PackageError(f"{folder} holds a file the manifest does not list: {extra[0]}")
    for name, path in listed.items():
        if sha256_file(path) != manifest.files[name]:
            raise PackageError(f"package file {name} was changed: its SHA-256 differs from the manifest's")
    for name in (manifest.onnx_model, *([manifest.openvino_ir] if manifest.openvino_ir else [])):
        if name not in listed:
            raise PackageError(f"the manifest names {name} as a model but does not list its checksum")
    return manifest


def _inside(folder: Path, name: str) -> Path:
    """`folder / name` for a relative POSIX path that stays inside `folder` without symlinks; never opened here."""
    relative = PurePosixPath(name)
    if not name or relative.is_absolute() or ".." in relative.parts or "\\" in name or any(ord(c) < 32 for c in name):
        raise PackageError(f"the manifest lists a file outside the package: {name!r}")
    path = folder
    for part in relative.parts:
        path = path / part
        if path.is_symlink():
            raise PackageError(f"package file {name} goes through a symlink")
    return path


def describe(manifest: Manifest, folder: Path) -> str:
    """A few lines for `inspect PACKAGE`."""
    def signature(specs: tuple[TensorSpec, ...]) -> str:
        return ", ".join(f"{s.name} {s.dtype}[{', '.join(map(str, s.shape))}]" for s in specs)

    lines = [f"{folder}: package of {manifest.name!r} (format {manifest.format_version}, made {manifest.created}); "
             f"all {len(manifest.files)} files verified",
             f"inputs: {signature(manifest.inputs)}", f"outputs: {signature(manifest.outputs)}",
             f"compression: {', '.join(c.get('algorithm', '?') for c in manifest.compression) or 'none (FP32)'}",
             f"ONNX: {manifest.onnx_model}; OpenVINO IR: {manifest.openvino_ir or 'not packaged'}"]
    lines += [f"{runtime}: {r.int8_layers}/{r.heavy_layers} heavy layers INT8" for runtime, r in manifest.runtimes.items()]
    lines.append(f"CPUs without VNNI: {manifest.portability}")
    lines.append(f"serve: OpenVINO Model Server --model_path {folder / manifest.serving.openvino_model_server}; "
                 f"Triton --model-repository {folder / manifest.serving.triton_model_repository}")
    return "\n".join(lines)
