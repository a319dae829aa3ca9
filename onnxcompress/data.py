"""Calibration data: every accepted source becomes a stream of validated feeds (dicts of input name → array).

Accepted sources:
- a folder of .npy files: each file one complete, already batched feed of a single-input model;
- an .npz file of arrays named after the model inputs: axis 0 enumerates samples, each fed as a batch of one;
- any iterable of input dicts (like `nncf.Dataset`'s items);
- an ONNX Runtime `CalibrationDataReader` (anything with `get_next()` returning a dict or None).

Feeds are checked against the model's inputs (names, dtypes, ranks, static dimensions) before they reach ONNX
Runtime, so a wrong data set fails with a message about the data rather than an engine error.
"""

from __future__ import annotations

import math
import os
import tokenize
import zipfile
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import onnx
from onnx import helper

from onnxcompress.errors import DatasetError
from onnxcompress.runtime.model_io import static_dim

Feed = dict[str, np.ndarray]


@dataclass(frozen=True)
class InputSpec:
    """One model input: name, NumPy dtype and shape (None for symbolic dimensions)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...]

    @property
    def dynamic_batch(self) -> bool:
        return bool(self.shape) and self.shape[0] is None

    def describe_shape(self) -> str:
        return "[" + ", ".join("?" if d is None else str(d) for d in self.shape) + "]"


def model_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    """The real inputs of `model` (graph inputs that are not initializers)."""
    initializers = {i.name for i in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        dims = tuple(static_dim(d) for d in tensor_type.shape.dim)
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        specs.append(InputSpec(value.name, dtype, dims))
    return specs


def feeds_from(source: Any, inputs: list[InputSpec]) -> Iterator[Feed]:
    """Yield raw feeds from any accepted source (not yet validated)."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir():
            return _npy_folder(path, inputs)
        if path.suffix == ".npz" and path.is_file():
            return _npz_samples(path)
        if not path.exists():
            raise DatasetError(f"calibration data not found: {path}")
        raise DatasetError(f"calibration data must be a folder of .npy files or an .npz file, got {path}")
    if hasattr(source, "get_next"):
        return iter(source.get_next, None)
    if isinstance(source, Mapping):
        raise DatasetError("calibration data is a single dict; pass a list of input dicts or an .npz file")
    if isinstance(source, Iterable):
        return iter(source)
    raise DatasetError(f"unsupported calibration data of type {type(source).__name__}")


def _npy_folder(folder: Path, inputs: list[InputSpec]) -> Iterator[Feed]:
    files = sorted(folder.glob("*.npy"))
    if not files:
        raise DatasetError(f"no .npy files in calibration folder {folder}")
    if len(inputs) != 1:
        names = ", ".join(i.name for i in inputs)
        raise DatasetError(f"a folder of .npy files feeds single-input models; this model has inputs {names}: "
                           "use an .npz with one array per input")
    for file in files:
        try:
            with open(file, "rb") as stream:  # checked and read through one open file
                _check_npy_header(stream)
                stream.seek(0)
                array = np.load(stream, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise DatasetError(f"cannot read {file}: {error}") from None
        yield {inputs[0].name: array}


def _check_npy_header(stream: BinaryIO) -> None:
    """Refuse a .npy whose header declares more data than the file holds (before allocating it) or no sample."""
    shape, _, dtype = read_npy_header(stream)
    available = os.fstat(stream.fileno()).st_size - stream.tell()
    if not shape or shape[0] == 0:
        raise ValueError(f"it holds no sample (shape {list(shape)}); axis 0 counts samples")
    needed = math.prod(shape) * dtype.itemsize
    if dtype.hasobject or needed > available:
        raise ValueError(f"its header declares {list(shape)} {dtype} ({needed} bytes), the file holds {available}")


def _npz_samples(path: Path) -> Iterator[Feed]:
    try:
        arrays = _open_npz(path)
    except ARCHIVE_ERRORS as error:
        raise DatasetError(f"cannot read {path}: {error}") from None
    counts = {name: len(a) if a.ndim else 0 for name, a in arrays.items()}
    if len(set(counts.values())) > 1:
        raise DatasetError(f"arrays in {path.name} disagree on the number of samples (axis 0): {counts}")
    for index in range(next(iter(counts.values()), 0)):
        yield {name: array[index:index + 1] for name, array in arrays.items()}


# What zipfile and zlib raise for archives that are corrupt, encrypted or use a compression method they lack.
ARCHIVE_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError, RuntimeError)
_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
# NumPy parses the header dict with tokenize and ast.literal_eval, which raise these on malformed text.
_HEADER_ERRORS = (ValueError, SyntaxError, TypeError, tokenize.TokenError, RecursionError, MemoryError)


def read_npy_header(stream: BinaryIO) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran order, dtype) from a .npy header at the stream's position; ValueError when there is none
    or it is malformed. The stream is left at the start of the data."""
    try:
        version = np.lib.format.read_magic(stream)
    except _HEADER_ERRORS:
        raise ValueError("it is not a .npy file (no NumPy header)") from None
    reader = _HEADER_READERS.get(version, np.lib.format.read_array_header_2_0)
    try:
        return reader(stream)
    except _HEADER_ERRORS as error:
        raise ValueError(f"its NumPy header is malformed ({type(error).__name__})") from None


@dataclass(frozen=True)
class _StoredArray:
    """A C-ordered array stored uncompressed in an .npz, read one slice of samples at a time.

    Plain reads rather than a memory map: the pages a map touches stay in the process's resident memory, so
    calibration memory would grow with every sample fed (300 ImageNet samples: 180 MB).
    """

    path: Path
    offset: int
    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, _ = rows.indices(len(self))
        result = np.empty((max(stop - start, 0), *self.shape[1:]), self.dtype)
        row_bytes = self.dtype.itemsize * int(np.prod(self.shape[1:]))
        with open(self.path, "rb") as file:
            file.seek(self.offset + start * row_bytes)
            if file.readinto(memoryview(result).cast("B")) != result.nbytes:
                raise DatasetError(f"{self.path} is truncated")
        return result


def _open_npz(path: Path) -> dict[str, np.ndarray | _StoredArray]:
    """The arrays of an .npz; uncompressed C-ordered members are read lazily, sample by sample.

    Every member's header is checked against the bytes the archive declares for it before anything is allocated.
    """
    arrays: dict[str, np.ndarray | _StoredArray] = {}
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            name = info.filename.removesuffix(".npy")
            shape, fortran, dtype, header_size = _member_header(archive, info)
            if info.compress_type != zipfile.ZIP_STORED or fortran or not shape:
                with archive.open(info) as member:
                    arrays[name] = np.lib.format.read_array(member, allow_pickle=False)
                continue
            # The member's data starts after the zip local header (its own name and extra field lengths).
            with open(path, "rb") as raw:
                raw.seek(info.header_offset + 26)
                name_length, extra_length = np.frombuffer(raw.read(4), "<u2")
            offset = info.header_offset + 30 + int(name_length) + int(extra_length) + header_size
            arrays[name] = _StoredArray(path, offset, dtype, tuple(shape))
    return arrays


def check_npz(path: Path) -> None:
    """ValueError (or zipfile.BadZipFile) unless every member of the .npz at `path` has a NumPy header whose
    declared size the archive holds: for readers that then load it whole."""
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            _member_header(archive, info)


def _member_header(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran order, dtype, header bytes) of one member, after `_check_member_size`."""
    with archive.open(info) as member:
        try:
            shape, fortran, dtype = read_npy_header(member)
        except ValueError as error:
            raise ValueError(f"member {info.filename!r}: {error}") from None
        header_size = member.tell()
    _check_member_size(info.filename.removesuffix(".npy"), shape, dtype, info, header_size)
    return shape, fortran, dtype, header_size


def read_npz(path: str | os.PathLike, *, limit: int | None = None) -> dict[str, np.ndarray]:
    """Every array of an .npz, whole (the first `limit` samples of each), after `check_npz`; DatasetError on a
    missing, corrupt or forged file."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"data file not found: {path}")
    try:
        check_npz(path)
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name][:limit] for name in archive.files}
    except ARCHIVE_ERRORS as error:
        raise DatasetError(f"cannot read {path}: {error}") from None


def _check_member_size(name: str, shape: tuple[int, ...], dtype: np.dtype, info: zipfile.ZipInfo,
                       header_size: int) -> None:
    """Refuse a member whose header declares more data than the archive holds for it, objects, or (when it must
    be read whole) more than fits in memory."""
    if dtype.hasobject:
        raise ValueError(f"array '{name}' holds Python objects")
    needed = math.prod(shape) * dtype.itemsize
    if needed > info.file_size - header_size:
        raise ValueError(f"array '{name}' declares {list(shape)} {dtype} ({needed} bytes), the archive holds "
                         f"{info.file_size - header_size}")
    whole = info.compress_type != zipfile.ZIP_STORED
    if whole and needed > _physical_memory() // 2:
        raise ValueError(f"compressed array '{name}' needs {needed / 2**30:.1f} GiB in memory, over half of this "
                         "machine's; store it uncompressed (numpy.savez), which is read sample by sample")


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not POSIX: no limit beyond the archive's own sizes
        return 1 << 62


def validate_feed(feed: Any, inputs: list[InputSpec], index: int) -> Feed:
    """Check one feed against the model inputs; returns it as a plain dict of arrays."""
    if not isinstance(feed, Mapping):
        raise DatasetError(f"sample {index} is a {type(feed).__name__}, expected a dict of input name → array")
    expected = {i.name for i in inputs}
    unknown = sorted(set(feed) - expected)
    missing = sorted(expected - set(feed))
    if unknown or missing:
        parts = [f"unknown input(s) {', '.join(map(repr, unknown))}" if unknown else "",
                 f"missing input(s) {', '.join(map(repr, missing))}" if missing else ""]
        raise DatasetError(f"sample {index}: {'; '.join(p for p in parts if p)} "
                           f"(model inputs: {', '.join(sorted(expected))})")
    result = {}
    for spec in inputs:
        array = np.asarray(feed[spec.name])
        if array.dtype != spec.dtype:
            raise DatasetError(f"sample {index}: input '{spec.name}' has dtype {array.dtype}, "
                               f"the model expects {spec.dtype}")
        if array.ndim != len(spec.shape) or any(d is not None and d != a for d, a in zip(spec.shape, array.shape)):
            raise DatasetError(f"sample {index}: input '{spec.name}' has shape {list(array.shape)}, "
                               f"the model expects {spec.describe_shape()}")
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            bad = "NaN" if np.isnan(array).any() else "infinite"
            raise DatasetError(f"sample {index}: input '{spec.name}' holds {bad} values; statistics of it would "
                               "make every scale meaningless")
        result[spec.name] = array
    return result


def calibration_batches(source: Any, inputs: list[InputSpec], *, subset_size: int,
                        batch_size: int) -> Iterator[Feed]:
    """Validated feeds, limited to `subset_size` samples and merged into batches of up to `batch_size` samples
    when the model has a dynamic batch dimension and consecutive samples have equal shapes."""
    can_batch = batch_size > 1 and all(i.dynamic_batch for i in inputs)
    pending: list[Feed] = []
    seen = 0
    for index, raw in enumerate(feeds_from(source, inputs)):
        feed = validate_feed(raw, inputs, index)
        samples = _samples_in(feed)
        if seen + samples > subset_size and seen > 0:
            break
        seen += samples
        if pending and (not can_batch or not _stackable(pending[0], feed) or
                        sum(map(_samples_in, pending)) + samples > batch_size):
            yield _concat(pending)
            pending = []
        pending.append(feed)
        if seen >= subset_size:
            break
    if pending:
        yield _concat(pending)
    elif seen == 0:
        raise DatasetError("the calibration dataset is empty")


def count_samples(source: Any, inputs: list[InputSpec], subset_size: int) -> int | None:
    """How many samples calibration will see, when that is known without reading the data (for progress bars).

    Unreadable sources return None: reading them for calibration raises the proper DatasetError.
    """
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.suffix != ".npz" or not path.is_file():
            return None
        shape = _first_array_shape(path)
        return min(shape[0], subset_size) if shape else None
    if isinstance(source, (list, tuple)) and all(isinstance(f, Mapping) and f for f in source):
        total = sum(_samples_in({k: np.asarray(v) for k, v in f.items()}) for f in source)
        return min(total, subset_size)
    return None


def _first_array_shape(path: Path) -> tuple[int, ...] | None:
    """Shape of the first array of an .npz from its header alone: loading it would read the whole data set."""
    try:
        with zipfile.ZipFile(path) as archive, archive.open(archive.infolist()[0]) as member:
            return tuple(read_npy_header(member)[0])
    except (*ARCHIVE_ERRORS, IndexError):
        return None


def _samples_in(feed: Feed) -> int:
    first = next(iter(feed.values()))
    return int(first.shape[0]) if first.ndim else 1


def _stackable(a: Feed, b: Feed) -> bool:
    return all(a[name].shape[1:] == b[name].shape[1:] for name in a)


def _concat(feeds: list[Feed]) -> Feed:
    if len(feeds) == 1:
        return feeds[0]
    return {name: np.concatenate([f[name] for f in feeds]) for name in feeds[0]}
