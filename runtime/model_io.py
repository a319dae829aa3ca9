"""Safe ONNX model input and output.

Guarantees:

* `load_model` never writes to the model file or its external data. It returns a model whose
  tensors are all in memory, that passed the ONNX checker, whose default-domain opset lies in
  the requested range, and whose IR version is at most 10 when its opsets allow it. Every
  failure is a `ModelLoadError` (missing, unreadable, corrupt, checker failure),
  `UnsafeModelError` (external data that is absolute, escapes the model folder or goes through
  a symlink) or `UnsupportedModelError` (opset outside the range that cannot be converted).
* `save_model` never leaves a half-written file: everything is written to temporary files in
  the destination folder, synced, then renamed over the final names. It never mutates the
  caller's model. Models over ~1.9 GB go to external data automatically, streamed tensor by
  tensor, so beyond the model itself only one tensor's bytes are held in memory (a single-file
  save holds one serialized copy, as protobuf requires). Every failure is an `OutputError`, and
  no temporary file is left behind.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import tempfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import BinaryIO

import numpy as np
import onnx
import onnx.checker
import onnx.defs
import onnx.external_data_helper
import onnx.shape_inference
import onnx.version_converter
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, EncodeError, Message

from onnxcompress.errors import ModelLoadError, OutputError, UnsafeModelError, UnsupportedModelError
from onnxcompress.runtime.outputs import new_file_mode

PathLike = str | os.PathLike[str]

# Protobuf cannot encode a message over 2 GiB; keep a margin for the graph structure.
_SINGLE_FILE_LIMIT = 1_900_000_000
# Smaller tensors stay inline, as with onnx.save_model's default size_threshold.
_MIN_EXTERNAL_TENSOR_BYTES = 1024
# Page-aligned offsets let runtimes memory-map each tensor.
_EXTERNAL_DATA_ALIGNMENT = 4096
# Writes of one tensor go out in pieces of this size, so a mapped source is never resident all at once.
_STREAM_CHUNK_BYTES = 64 << 20

# onnxruntime-training needs IR <= 10.
_IR_VERSION_CAP = 10


def _max_opsets_for_ir(ir_version: int) -> dict[str, int]:
    """Highest opset of each standard domain that a model of `ir_version` may import."""
    # VERSION_TABLE rows are (release, ir, ai.onnx, ai.onnx.ml[, ai.onnx.training]).
    highest: dict[str, int] = {}
    for _release, ir, *opsets in onnx.helper.VERSION_TABLE:
        if ir <= ir_version:
            for domain, version in zip(("ai.onnx", "ai.onnx.ml", "ai.onnx.training"), opsets, strict=False):
                highest[domain] = max(version, highest.get(domain, 0))
    highest[""] = highest["ai.onnx"]
    return highest


_IR_CAP_MAX_OPSETS = _max_opsets_for_ir(_IR_VERSION_CAP)

# Message types that can (transitively) hold tensors; every other message is copied whole.
# Sparse tensors stay inline: the ONNX checker cannot validate them from external data.
_TENSOR_HOLDERS = frozenset(
    message.DESCRIPTOR.full_name
    for message in (
        onnx.ModelProto,
        onnx.GraphProto,
        onnx.NodeProto,
        onnx.AttributeProto,
        onnx.FunctionProto,
        onnx.TrainingInfoProto,
    )
)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def load_model(path: PathLike, *, target_opset_min: int = 13, target_opset_max: int = 21,
               lazy_external_data: bool = False) -> onnx.ModelProto:
    """Load, validate and normalise an ONNX model; see the module docstring for the guarantees.

    With `lazy_external_data`, tensors in external data stay references (each checked to lie inside the model's
    folder): read one with `external_array(tensor, path)`, and save a model that still refers to them with
    `save_model(..., external_source=path)`, which streams them; a model of any size then never has its weights
    in memory all at once.
    """
    if target_opset_min > target_opset_max:
        raise ValueError(f"target_opset_min {target_opset_min} > target_opset_max {target_opset_max}")
    model_path = Path(path)
    serialized = _read(model_path)
    model = _parse(serialized, model_path)
    # Refuses unsafe or missing locations before anything reads them.
    external_files = _external_data_files(model, model_path)
    _run_checker(model_path, None if external_files else serialized)
    del serialized
    # Converting before the external data is loaded keeps the converter's protobuf copies small.
    model = _convert_opset(model, target_opset_min, target_opset_max)
    _lower_ir_version(model)
    _require_tensor_signature(model.graph)
    if not lazy_external_data:
        _load_external_data(model, model_path)
    return model


def has_external_data(model: onnx.ModelProto) -> bool:
    """Whether some tensor of `model` is still a reference into an external data file."""
    return any(_is_external(tensor) for tensor in _tensors(model))


def external_array(tensor: onnx.TensorProto, model_path: PathLike) -> np.ndarray:
    """The values of external `tensor` of the model file at `model_path`, memory-mapped read-only (pages are
    read when used), after the same checks as loading: inside the folder, no symlinks, within the file."""
    model_path = Path(model_path)
    data_file = _safe_data_file(tensor, model_path)
    entries = {entry.key: entry.value for entry in tensor.external_data}
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    if tensor.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4) or dtype == np.dtype(object):
        raise ModelLoadError(f"external tensor {tensor.name!r} has an element type that cannot be mapped")
    count = int(np.prod(tensor.dims, dtype=np.int64))
    try:
        offset, length = int(entries.get("offset", 0)), int(entries.get("length", count * dtype.itemsize))
    except ValueError as exc:
        raise ModelLoadError(f"external data of tensor {tensor.name!r} has a malformed offset or length") from exc
    size = data_file.stat().st_size
    if length != count * dtype.itemsize or offset < 0 or offset + length > size:
        raise ModelLoadError(f"external data of tensor {tensor.name!r} does not fit: {length} bytes at offset "
                             f"{offset} of {data_file} ({size} bytes) for {count} values of {dtype}")
    if count == 0:
        return np.zeros(tuple(tensor.dims), dtype)
    return np.memmap(data_file, dtype=dtype, mode="r", offset=offset, shape=tuple(tensor.dims))


@dataclass(frozen=True)
class RuntimeSource:
    """A checked model as a runtime reads it: `readable` is its serialized bytes, or the path (as a string) of a
    copy in a private temporary folder when it is too big for one protobuf."""

    readable: bytes | str


@contextlib.contextmanager
def runtime_source(model: PathLike | onnx.ModelProto | RuntimeSource) -> Iterator[RuntimeSource]:
    """The model in the form to hand a runtime that reads it itself (ONNX Runtime, OpenVINO).

    A path is loaded (and checked) by `load_model` first, so a runtime never reopens the user's files: external
    data swapped between the check and the runtime's read cannot redirect it. A private copy lives until the
    block ends; a RuntimeSource passes through as it is.
    """
    if isinstance(model, RuntimeSource):
        yield model
        return
    proto = model if isinstance(model, onnx.ModelProto) else load_model(model)
    if not needs_external_data(proto):
        yield RuntimeSource(proto.SerializeToString())
        return
    with tempfile.TemporaryDirectory(prefix="onnxcompress-verified-") as folder:
        yield RuntimeSource(str(save_model(proto, Path(folder) / "model.onnx", external_data=True)))


def model_file_size(path: PathLike) -> int:
    """Bytes on disk of the model file plus every external data file it references."""
    model_path = Path(path)
    size = model_path.stat().st_size if model_path.is_file() else 0
    if size and not _may_reference_external_data(model_path):
        return size  # a third of the time of parsing a 100 MB model
    files = _external_data_files(_parse(_read(model_path), model_path), model_path)
    return size + sum(file.stat().st_size for file in files)


#: zlib level of `compressed_model_size`: the default of zip and gzip, so the size a shipped archive has.
ZIP_LEVEL = 6


def compressed_model_size(path: PathLike) -> int:
    """Bytes of the model file and every external data file it references once each is compressed with DEFLATE
    at zip's default level: the download size of the model, where exact zeros (sparsity) pay off."""
    model_path = Path(path)
    files = [model_path]
    # A missing or empty file goes to _read, which names the problem.
    if not model_path.is_file() or not model_path.stat().st_size or _may_reference_external_data(model_path):
        files += sorted(_external_data_files(_parse(_read(model_path), model_path), model_path))
    return sum(_deflated_size(file) for file in files)


def _deflated_size(path: Path) -> int:
    compressor = zlib.compressobj(ZIP_LEVEL)
    size = 0
    try:
        with open(path, "rb") as file:
            while chunk := file.read(1 << 24):  # streamed: external data can be many GB
                size += len(compressor.compress(chunk))
    except OSError as exc:
        raise ModelLoadError(f"cannot read {path}: {exc.strerror or exc}") from exc
    return size + len(compressor.flush())


def _may_reference_external_data(path: Path) -> bool:
    """False when the file's bytes never spell the key every external data reference carries."""
    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as view:
        return view.find(b"location") >= 0


def _read(path: Path) -> bytes:
    """The bytes of the model file (without its external data)."""
    if not path.is_file():
        folder_note = " (it is a folder)" if path.is_dir() else ""
        raise ModelLoadError(f"cannot load model, no such file: {path}{folder_note}")
    try:
        serialized = path.read_bytes()
    except OSError as exc:
        raise ModelLoadError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if not serialized:
        raise ModelLoadError(f"{path} is not a valid ONNX model: the file is empty")
    return serialized


def _parse(serialized: bytes, path: Path) -> onnx.ModelProto:
    """Parse the bytes of model file `path` as a binary protobuf, whatever its suffix."""
    try:
        model = onnx.ModelProto.FromString(serialized)
    except DecodeError as exc:
        raise ModelLoadError(f"{path} is not a valid ONNX model: truncated or corrupt ({exc})") from exc
    # Arbitrary bytes can decode as a protobuf made only of unknown fields.
    if model.ir_version < 1 or not model.HasField("graph"):
        raise ModelLoadError(f"{path} is not a valid ONNX model: no IR version or no graph")
    return model


def _require_tensor_signature(graph: onnx.GraphProto) -> None:
    """Refuse graphs every command would fail on: no outputs, no inputs, or inputs that are not typed tensors."""
    if not graph.output:
        raise UnsupportedModelError("the model has no outputs: there is nothing to compute")
    constants = {tensor.name for tensor in graph.initializer}
    inputs = [value for value in graph.input if value.name not in constants]
    if not inputs:
        raise UnsupportedModelError("the model has no inputs: its outputs are constants, so there is nothing to "
                                    "calibrate, compress or time")
    for value in inputs:
        kind = value.type.WhichOneof("value")
        if kind != "tensor_type":
            what = {"sequence_type": "a sequence", "map_type": "a map", "optional_type": "an optional",
                    "sparse_tensor_type": "a sparse tensor"}.get(kind, "untyped")
            raise UnsupportedModelError(f"input {value.name!r} is {what}; onnxcompress handles models whose inputs "
                                        "are dense tensors")
        if value.type.tensor_type.elem_type == onnx.TensorProto.UNDEFINED:
            raise UnsupportedModelError(f"input {value.name!r} declares no element type")


def _external_data_files(model: onnx.ModelProto, model_path: Path) -> set[Path]:
    """Validate every external data reference of the model file at `model_path` and return the files they name."""
    return {_safe_data_file(tensor, model_path) for tensor in _tensors(model) if _is_external(tensor)}


def _safe_data_file(tensor: onnx.TensorProto, model_path: Path) -> Path:
    """The existing regular file holding `tensor`'s data: inside the model's folder, reached without symlinks,
    and not the model file itself."""
    model_dir = model_path.parent
    location = next((entry.value for entry in tensor.external_data if entry.key == "location"), "")
    what = f"external data of tensor {tensor.name!r}"
    if not location:
        raise ModelLoadError(f"{what} has no location")
    if any(ord(char) < 32 for char in location):
        raise UnsafeModelError(f"{what} has a control character in its location: {location!r}")
    if PurePosixPath(location).is_absolute() or PureWindowsPath(location).anchor:
        raise UnsafeModelError(f"{what} uses an absolute path: {location}")
    candidate = model_dir
    for part in PurePosixPath(location).parts:
        candidate = candidate / part
        if candidate.is_symlink():
            raise UnsafeModelError(f"{what} goes through a symlink: {candidate}")
    if not candidate.resolve().is_relative_to(model_dir.resolve()):
        raise UnsafeModelError(f"{what} points outside the model folder: {location}")
    if not candidate.is_file():
        raise ModelLoadError(f"{what} is missing: no such file: {candidate}")
    if os.path.samefile(candidate, model_path):
        raise UnsafeModelError(f"{what} points into the model file itself: {location}")
    return candidate


def _run_checker(path: Path, serialized: bytes | None) -> None:
    """Run the ONNX checker on the model file at `path`, read from `serialized` when it has no external data.

    Given the file's bytes the checker parses them directly (0.1 s less for ResNet-50 than reading the file
    again); given its path it also finds external data beside it. A proto would be serialized first, and its
    external data looked for relative to the current directory.
    """
    try:
        onnx.checker.check_model(serialized if serialized is not None else os.fspath(path))
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ModelLoadError(f"model fails the ONNX checker: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ModelLoadError(f"{path} is not a valid ONNX model: a name or string is not UTF-8 ({exc})") from exc


def _convert_opset(model: onnx.ModelProto, lowest: int, highest: int) -> onnx.ModelProto:
    """Return the model converted into the opset range, or the model itself when already inside."""
    opset = _default_opset(model)
    if opset is None or lowest <= opset.version <= highest:
        return model
    if opset.version < lowest:
        target, problem = lowest, f"opset {opset.version} is too old to upgrade to {lowest}"
    else:
        target, problem = highest, f"opset {opset.version} is too new to convert down to {highest}"
    with _large_tables_set_aside(model) as restore:
        try:
            converted = onnx.version_converter.convert_version(model, target)
        # The converter is C++ whose failures surface as assorted, undocumented exception types.
        except Exception as exc:
            raise UnsupportedModelError(f"{problem}: {exc}") from exc
        restore(converted)
    _require_ops_exist(converted, target, problem)
    return converted


#: Initializers at least this large leave the model while the version converter copies it (its adapters read
#: small constants only, such as shapes and axes).
_SET_ASIDE_BYTES = 1 << 20
#: The location their stubs name: no file can have it.
_SET_ASIDE = "\0set-aside"


@contextlib.contextmanager
def _large_tables_set_aside(model: onnx.ModelProto) -> Iterator[Callable[[onnx.ModelProto], None]]:
    """Move the main graph's large in-memory initializers out of `model` (leaving external-data stubs, as a model
    loaded without its external data has), so that the converter's serialized copies of the model hold no weights;
    yield a function that puts them into the converted model. `model` gets them back on exit, whatever happens."""
    aside: dict[str, bytes] = {}

    def restore(target: onnx.ModelProto) -> None:
        for tensor in target.graph.initializer:
            if tensor.name in aside and _is_external(tensor):
                _put_back(tensor, aside[tensor.name])
        if any(_is_external(t) and _SET_ASIDE in {e.value for e in t.external_data} for t in _tensors(target)):
            raise UnsupportedModelError("the version converter moved or renamed initializers; the converted model "
                                        "would lose their values")

    try:
        for tensor in model.graph.initializer:
            if not _is_external(tensor) and len(tensor.raw_data) >= _SET_ASIDE_BYTES:
                aside[tensor.name] = tensor.raw_data
                onnx.external_data_helper.set_external_data(tensor, location=_SET_ASIDE)
                tensor.ClearField("raw_data")
        yield restore
    finally:
        restore(model)


def _put_back(tensor: onnx.TensorProto, data: bytes) -> None:
    del tensor.external_data[:]
    tensor.ClearField("data_location")
    tensor.raw_data = data


def upgrade_opset(model: onnx.ModelProto, lowest: int) -> onnx.ModelProto:
    """`model` converted to default-domain opset `lowest` when it imports an older one (with the IR version that
    opset needs), else `model` itself; UnsupportedModelError when the converter cannot."""
    opset = _default_opset(model)
    if opset is None or opset.version >= lowest:
        return model
    converted = _convert_opset(model, lowest, lowest)
    needed = min(ir for _release, ir, ai_onnx, *_ in onnx.helper.VERSION_TABLE if ai_onnx >= lowest)
    converted.ir_version = max(converted.ir_version, needed)
    return converted


def _require_ops_exist(model: onnx.ModelProto, version: int, problem: str) -> None:
    """Fail if the converter left ops that have no (or only a deprecated) schema at `version`."""
    # The converter passes through ops it has no adapter for, e.g. experimental ones.
    for graph in _graphs(model):
        for node in graph.node:
            if node.domain not in ("", "ai.onnx"):
                continue
            if not onnx.defs.has(node.op_type, version) or onnx.defs.get_schema(node.op_type, version).deprecated:
                raise UnsupportedModelError(f"{problem}: op {node.op_type} does not exist in opset {version}")


def _lower_ir_version(model: onnx.ModelProto) -> None:
    """Cap the IR version at 10 when every standard opset the model imports exists in IR 10."""
    if model.ir_version > _IR_VERSION_CAP and all(
        opset.version <= _IR_CAP_MAX_OPSETS.get(opset.domain, math.inf) for opset in model.opset_import
    ):
        model.ir_version = _IR_VERSION_CAP


def _load_external_data(model: onnx.ModelProto, model_path: Path) -> None:
    """Read every external tensor into memory (sparse and attribute tensors included)."""
    for tensor in _tensors(model):
        if not _is_external(tensor):
            continue
        data_file = _safe_data_file(tensor, model_path)
        try:
            onnx.external_data_helper.load_external_data_for_tensor(tensor, os.fspath(model_path.parent))
        except (OSError, ValueError, onnx.checker.ValidationError) as exc:
            message = f"cannot read external data of tensor {tensor.name!r} from {data_file}: {exc}"
            raise ModelLoadError(message) from exc
        # onnx sets data_location=DEFAULT explicitly; unset it so a save/load round trip is exact.
        tensor.ClearField("data_location")


# ---------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------


def save_model(model: onnx.ModelProto, path: PathLike, *, external_data: bool | None = None,
               external_source: PathLike | None = None) -> Path:
    """Atomically write `model` to `path` and return its absolute path.

    `external_data=None` stores tensors in `<name>.data` next to the model only when the model is
    too big for one protobuf file. Tensors still in external data (`load_model(lazy_external_data=True)`) are
    read from the files of the model at `external_source`, checked again, and streamed in chunks into the new data
    file (or inlined when the result fits in one file). The caller's model is never modified.
    """
    target = Path(os.path.abspath(path))
    _require_writable_folder(target)
    if has_external_data(model):
        if external_source is None:
            raise OutputError(f"cannot write {target}: the model still references external data; load it first")
        if any(same_file(target, file) or same_file(target.with_name(target.name + ".data"), file)
               for file in external_data_files(external_source)):
            raise OutputError(f"cannot write {target}: it would overwrite the external data it reads")
    if external_data is None:
        external_data = needs_external_data(model)
    if external_source is not None and not external_data and has_external_data(model):
        inlined = onnx.ModelProto()
        inlined.CopyFrom(model)
        _load_external_data(inlined, Path(external_source))
        model = inlined
    temporaries: list[Path] = []
    try:
        try:
            _write_atomically(model, target, external_data, temporaries,
                              None if external_source is None else Path(external_source))
        finally:
            for temporary in temporaries:  # after a successful rename the name no longer exists
                with contextlib.suppress(OSError):
                    temporary.unlink()
    except (OSError, ValueError, EncodeError) as exc:
        raise OutputError(f"cannot write {target}: {exc}") from exc
    return target


def check_output_path(input_path: PathLike, output_path: PathLike, *,
                      reads: Iterable[PathLike | None] = ()) -> Path:
    """Return the resolved output path after refusing a folder name, an unwritable folder, or an output (the
    model file or its `.data` file) that is a file the command reads: the input model, its external data, or one
    of `reads` (data, config)."""
    if os.fspath(output_path).endswith(("/", os.sep)):
        raise OutputError(f"output {output_path} names a folder; give the path of the .onnx file to write")
    output = Path(output_path).resolve()
    source = Path(input_path).resolve()
    written = (output, output.with_name(output.name + ".data"))
    if any(same_file(path, source) for path in written):
        raise OutputError(f"output path is the input model: {output_path}")
    refuse_overwriting_reads(written, [*source_files(source), *(Path(r) for r in reads if r is not None)])
    _require_writable_folder(output)
    return output


def refuse_overwriting_reads(written: Iterable[Path], reads: Iterable[Path]) -> None:
    """OutputError when a file about to be written is one that is read."""
    written = list(written)
    for path in reads:
        clash = next((w for w in written if same_file(w, path)), None)
        if clash is not None:
            raise OutputError(f"output {clash} would overwrite {path}, which this command reads")


def same_file(a: PathLike, b: PathLike) -> bool:
    a, b = Path(a).resolve(), Path(b).resolve()
    return a == b or (a.exists() and b.exists() and os.path.samefile(a, b))


def external_data_files(path: PathLike) -> set[Path]:
    """The external data files of the model file at `path`, after the checks `load_model` makes on them (inside
    the model's folder, no symlinks, present): for files handed to a runtime that reads them itself."""
    path = Path(path)
    return _external_data_files(_parse(_read(path), path), path)


def source_files(source: PathLike) -> set[Path]:
    """The model file and its external data files; only the file when its references cannot be read (loading
    it reports why)."""
    source = Path(source)
    files = {source}
    try:
        if source.is_file() and _may_reference_external_data(source):
            files |= _external_data_files(_parse(_read(source), source), source)
    except (ModelLoadError, OSError, ValueError):
        pass
    return files


def _require_writable_folder(target: Path) -> None:
    folder = target.parent
    if target.is_dir():
        problem = "it is a folder"
    elif not folder.exists():
        problem = f"folder {folder} does not exist"
    elif not folder.is_dir():
        problem = f"{folder} is not a folder"
    elif not os.access(folder, os.W_OK | os.X_OK):
        problem = f"folder {folder} is not writable"
    else:
        return
    raise OutputError(f"cannot write {target}: {problem}")


def needs_external_data(model: onnx.ModelProto) -> bool:
    """Whether the model is too big to be encoded as a single protobuf."""
    # upb computes ByteSize by encoding the whole message (0.1 s for a ResNet-50, a multi-GB copy for a model too
    # big to encode): tensor payloads dominate any real model, so the exact size is only computed near the limit.
    payload = sum(_payload_bytes(tensor) for tensor in _tensors(model))
    if payload > _SINGLE_FILE_LIMIT:
        return True
    nodes = sum(len(graph.node) for graph in _graphs(model)) + sum(len(f.node) for f in model.functions)
    if payload < _SINGLE_FILE_LIMIT // 2 and nodes < 100_000:
        return False
    try:
        return bool(model.ByteSize() > _SINGLE_FILE_LIMIT)
    except EncodeError:  # upb refuses to encode anything beyond 2 GiB
        return True


def _payload_bytes(tensor: onnx.TensorProto) -> int:
    if _is_external(tensor):
        length = next((entry.value for entry in tensor.external_data if entry.key == "length"), "")
        return int(length) if length.isdigit() else 0
    wide = len(tensor.int64_data) + len(tensor.double_data) + len(tensor.uint64_data)
    return (len(tensor.raw_data) + 4 * (len(tensor.float_data) + len(tensor.int32_data)) + 8 * wide
            + sum(len(s) for s in tensor.string_data))


def _write_atomically(model: onnx.ModelProto, target: Path, external_data: bool, temporaries: list[Path],
                      source: Path | None) -> None:
    """Write temporaries for the data file and the model, then rename them: data first, model last."""
    data_target = target.with_name(target.name + ".data")
    data_written = False
    if external_data:
        with _temporary_file(target.parent, data_target.name, temporaries) as data_file:
            writer = _ExternalDataWriter(data_file, data_target.name, source)
            skeleton = onnx.ModelProto()
            _copy_externalized(model, skeleton, writer)
        # When no tensor was big enough, the empty temporary is simply discarded.
        data_written = writer.size > 0
        model = skeleton
    payload = model.SerializeToString()
    with _temporary_file(target.parent, target.name, temporaries) as model_file:
        model_file.write(payload)
    del payload
    if data_written:
        os.replace(temporaries[0], data_target)
    os.replace(temporaries[-1], target)
    _fsync_folder(target.parent)


@contextlib.contextmanager
def _temporary_file(folder: Path, final_name: str, temporaries: list[Path]) -> Iterator[BinaryIO]:
    """A new file in `folder`, recorded in `temporaries`, synced to disk when the block ends."""
    fd, name = tempfile.mkstemp(dir=folder, prefix=f".{final_name}.", suffix=".tmp")
    temporaries.append(Path(name))
    with os.fdopen(fd, "wb") as file:
        yield file
        file.flush()
        os.fsync(file.fileno())
    os.chmod(name, new_file_mode())


def _fsync_folder(folder: Path) -> None:
    """Make the renames durable; folders cannot be opened for syncing on Windows."""
    if os.name == "nt":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _ExternalDataWriter:
    """Appends tensor payloads to the external data file and records where each one went."""

    def __init__(self, file: BinaryIO, location: str, source: Path | None = None) -> None:
        self.file = file
        self.location = location
        #: The model file whose external data files the tensors still referring to them are read from.
        self.source = source
        self.size = 0

    def append(self, data: bytes | np.ndarray) -> int:
        """Write `data` at the next aligned offset and return that offset."""
        offset = -(-self.size // _EXTERNAL_DATA_ALIGNMENT) * _EXTERNAL_DATA_ALIGNMENT
        self.file.write(b"\0" * (offset - self.size))
        view = memoryview(data).cast("B")
        for start in range(0, len(view), _STREAM_CHUNK_BYTES):
            self.file.write(view[start:start + _STREAM_CHUNK_BYTES])
        self.size = offset + len(view)
        return offset


def _copy_externalized(source: Message, destination: Message, writer: _ExternalDataWriter) -> None:
    """Copy `source` into `destination`, sending large raw tensor payloads to `writer` instead."""
    if isinstance(source, onnx.TensorProto):
        _copy_tensor(source, destination, writer)
    elif source.DESCRIPTOR.full_name in _TENSOR_HOLDERS:
        _copy_fields(source, destination, writer)
    else:
        destination.CopyFrom(source)


def _copy_tensor(source: onnx.TensorProto, destination: onnx.TensorProto, writer: _ExternalDataWriter) -> None:
    if _is_external(source):
        if writer.source is None:
            raise ValueError(f"tensor {source.name!r} still refers to external data")
        values = external_array(source, writer.source)
        _copy_fields(source, destination, writer, skip="external_data")
        offset = writer.append(np.ascontiguousarray(values))  # a mapped file is paged through, not held
        del destination.external_data[:]
        for key, value in (("location", writer.location), ("offset", offset), ("length", values.nbytes)):
            destination.external_data.add(key=key, value=str(value))
        return
    # Reading raw_data copies it (upb), but only one tensor at a time.
    data = source.raw_data
    if len(data) < _MIN_EXTERNAL_TENSOR_BYTES:
        destination.CopyFrom(source)
        return
    _copy_fields(source, destination, writer, skip="raw_data")
    offset = writer.append(data)
    destination.data_location = onnx.TensorProto.EXTERNAL
    del destination.external_data[:]
    for key, value in (("location", writer.location), ("offset", offset), ("length", len(data))):
        destination.external_data.add(key=key, value=str(value))


def _copy_fields(source: Message, destination: Message, writer: _ExternalDataWriter, skip: str = "") -> None:
    # Not ListFields(): it would read (and so copy) the skipped raw_data as well.
    for field in source.DESCRIPTOR.fields:
        if field.name == skip or not _has_field(source, field):
            continue
        value = getattr(source, field.name)
        if field.message_type is None:
            if field.is_repeated:
                getattr(destination, field.name).extend(value)
            else:
                setattr(destination, field.name, value)
        elif field.is_repeated:
            for item in value:
                _copy_externalized(item, getattr(destination, field.name).add(), writer)
        else:
            child = getattr(destination, field.name)
            child.SetInParent()  # an empty sub-message is still a set field (e.g. a scalar's shape)
            _copy_externalized(value, child, writer)


def _has_field(message: Message, field: FieldDescriptor) -> bool:
    return len(getattr(message, field.name)) > 0 if field.is_repeated else message.HasField(field.name)


# ---------------------------------------------------------------------------------------------
# Model traversal
# ---------------------------------------------------------------------------------------------


def _default_opset(model: onnx.ModelProto) -> onnx.OperatorSetIdProto | None:
    return next((opset for opset in model.opset_import if opset.domain in ("", "ai.onnx")), None)


def _is_external(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL


def _subgraphs(nodes: Iterable[onnx.NodeProto]) -> Iterator[onnx.GraphProto]:
    """Graphs held directly by the nodes' attributes (If/Loop/Scan bodies)."""
    for node in nodes:
        for attribute in node.attribute:
            if attribute.HasField("g"):
                yield attribute.g
            yield from attribute.graphs


def _graphs(model: onnx.ModelProto) -> Iterator[onnx.GraphProto]:
    """The main graph, training graphs, and every graph nested in them or in functions."""
    pending = [model.graph]
    for info in model.training_info:
        pending += [info.initialization, info.algorithm]
    for function in model.functions:
        pending += _subgraphs(function.node)
    while pending:
        graph = pending.pop()
        yield graph
        pending += _subgraphs(graph.node)


def _tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor of the model: initializers, sparse tensors' parts, and attribute tensors."""
    node_lists = [function.node for function in model.functions]
    for graph in _graphs(model):
        yield from graph.initializer
        for sparse in graph.sparse_initializer:
            yield from (sparse.values, sparse.indices)
        node_lists.append(graph.node)
    for nodes in node_lists:
        for node in nodes:
            for attribute in node.attribute:
                if attribute.HasField("t"):
                    yield attribute.t
                yield from attribute.tensors
                sparse_tensors = [*attribute.sparse_tensors]
                if attribute.HasField("sparse_tensor"):
                    sparse_tensors.append(attribute.sparse_tensor)
                for sparse in sparse_tensors:
                    yield from (sparse.values, sparse.indices)


def stored_bytes(tensor: onnx.TensorProto) -> int:
    """Bytes a tensor's values take as stored, from its shape (4-bit values packed two per byte)."""
    count = int(np.prod(tensor.dims, dtype=np.int64))
    if tensor.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        return (count + 1) // 2
    return count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def static_dim(dim: onnx.TensorShapeProto.Dimension) -> int | None:
    """A dimension's size, or None when it is unknown: symbolic, absent, or zero/negative (exporters such as
    Paddle2ONNX write -1 for a dynamic batch; ONNX Runtime and OpenVINO read it as dynamic)."""
    return dim.dim_value if dim.HasField("dim_value") and dim.dim_value > 0 else None
