"""Labelled training and validation data: validated once, then batched (shuffled with a seed) for every epoch.

Accepted sources:
- an .npz with one array per model input plus the label array (axis 0 enumerates samples);
- a folder with `<input name>.npy` per model input plus `<labels>.npy` (memory-mapped, so data sets larger than
  memory work);
- a Python iterable of `(feeds, labels)` pairs, already batched (it is read in order, not shuffled);
- a `(feeds, labels)` pair of in-memory arrays.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from onnxcompress.config import Loss
from onnxcompress.data import ARCHIVE_ERRORS, InputSpec, check_npz
from onnxcompress.errors import DatasetError

Batch = tuple[dict[str, np.ndarray], np.ndarray]
#: Slice size of the finiteness check, so memory-mapped data larger than memory is never read at once.
_FINITE_CHECK_BYTES = 64 << 20


@dataclass(frozen=True)
class LabelSpec:
    """What the labels must look like: class indices below `classes` (cross-entropy) or arrays shaped like one
    sample's logits (MSE)."""

    loss: Loss
    output_shape: tuple[int | None, ...]

    @property
    def classes(self) -> int | None:
        return self.output_shape[-1] if len(self.output_shape) == 2 else None


class LabelledData:
    """A validated data set; `batches(batch_size, seed)` yields `(feeds, labels)` in a seeded random order."""

    def __init__(self, source: Any, inputs: list[InputSpec], labels: LabelSpec, *, label_name: str = "labels",
                 what: str = "training data") -> None:
        self.what, self.inputs, self.label_spec = what, inputs, labels
        if label_name in {spec.name for spec in inputs}:
            raise DatasetError(f"{what}: the model has an input named {label_name!r}, which is also the name of the "
                               "label array; set training.labels to another name in the config")
        self._arrays: dict[str, np.ndarray] | None = None
        self._labels: np.ndarray | None = None
        self._iterable: Iterable[Batch] | None = None
        self._iterable_steps: int | None = None
        if isinstance(source, (str, Path)):
            arrays = _read_arrays(Path(source), [i.name for i in inputs] + [label_name], what)
            labels_array = arrays.pop(label_name)
            self._set_arrays(arrays, labels_array)
        elif isinstance(source, tuple) and len(source) == 2 and isinstance(source[0], Mapping):
            self._set_arrays(dict(source[0]), np.asarray(source[1]))
        elif isinstance(source, Iterable):
            if iter(source) is source:
                raise DatasetError(f"{what}: a one-shot iterator cannot be read once per epoch (and once for "
                                   "calibration); pass a list or another re-iterable collection of batches")
            self._iterable = source
        else:
            raise DatasetError(f"{what}: unsupported source of type {type(source).__name__} (an .npz, a folder "
                               "of .npy files, a (feeds, labels) pair or an iterable of them)")

    def __len__(self) -> int:
        if self._labels is None:
            raise TypeError("the length of an iterable data set is unknown")
        return len(self._labels)

    @property
    def shuffled(self) -> bool:
        return self._labels is not None

    def batches(self, batch_size: int, seed: int | None = None) -> Iterator[Batch]:
        """Batches in the order `seed` gives (in file order without one); iterables are passed through."""
        if self._iterable is not None:
            for index, (feeds, labels) in enumerate(self._iterable):
                feeds, labels = dict(feeds), np.asarray(labels)
                self._check(feeds, labels, f"batch {index}")
                yield feeds, labels
            return
        assert self._arrays is not None and self._labels is not None
        count = len(self._labels)
        order = np.random.default_rng(seed).permutation(count) if seed is not None else np.arange(count)
        for start in range(0, count, batch_size):
            rows = order[start:start + batch_size]
            yield {name: np.ascontiguousarray(array[rows]) for name, array in self._arrays.items()}, \
                np.ascontiguousarray(self._labels[rows])

    def steps(self, batch_size: int) -> int:
        """Batches per epoch; an iterable's own count (it is re-iterable, so one counting pass, once, if unsized)."""
        if self._labels is not None:
            return -(-len(self._labels) // batch_size)
        if isinstance(self._iterable, Sized):
            return len(self._iterable)
        if self._iterable_steps is None:
            self._iterable_steps = sum(1 for _ in self._iterable)
        return self._iterable_steps

    # -- validation

    def _set_arrays(self, arrays: dict[str, np.ndarray], labels: np.ndarray) -> None:
        self._check(arrays, labels, "arrays")
        self._arrays, self._labels = arrays, labels

    def _check(self, feeds: dict[str, np.ndarray], labels: np.ndarray, where: str) -> None:
        expected = {spec.name for spec in self.inputs}
        if set(feeds) != expected:
            raise DatasetError(f"{self.what} ({where}): arrays {sorted(feeds)} do not match the model inputs "
                               f"{sorted(expected)}")
        count = len(labels)
        for spec in self.inputs:
            array = feeds[spec.name]
            if array.dtype != spec.dtype:
                raise DatasetError(f"{self.what} ({where}): input '{spec.name}' is {array.dtype}, the model "
                                   f"expects {spec.dtype}")
            if array.ndim != len(spec.shape) or any(
                    d is not None and d != a for d, a in zip(spec.shape[1:], array.shape[1:])):
                raise DatasetError(f"{self.what} ({where}): input '{spec.name}' has shape {list(array.shape)}, the "
                                   f"model expects {spec.describe_shape()} (axis 0 enumerates samples)")
            if len(array) != count:
                raise DatasetError(f"{self.what} ({where}): {len(array)} samples of '{spec.name}' but {count} labels")
            self._check_finite(array, f"input '{spec.name}'", where)
        self._check_labels(labels, where)
        self._check_finite(labels, "labels", where)

    def _check_finite(self, array: np.ndarray, what: str, where: str) -> None:
        """NaN or infinity in the data would make every loss, gradient and weight after it NaN."""
        if not np.issubdtype(array.dtype, np.floating) or array.size == 0:
            return
        samples = np.atleast_1d(array)
        rows = max(1, _FINITE_CHECK_BYTES // max(1, samples[0].nbytes))  # memory-mapped data is read in slices
        for start in range(0, len(samples), rows):
            chunk = np.asarray(samples[start:start + rows])
            bad = np.flatnonzero(~np.isfinite(chunk.reshape(len(chunk), -1)).all(axis=1))
            if bad.size:
                raise DatasetError(f"{self.what} ({where}): {what} of sample {start + int(bad[0])} holds NaN or "
                                   "infinite values")

    def _check_labels(self, labels: np.ndarray, where: str) -> None:
        spec = self.label_spec
        if spec.loss is Loss.CROSS_ENTROPY:
            if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
                raise DatasetError(f"{self.what} ({where}): cross-entropy labels must be a 1-D integer array of "
                                   f"class indices, got {labels.dtype}{list(labels.shape)}")
            if spec.classes is not None and len(labels) and (labels.min() < 0 or labels.max() >= spec.classes):
                raise DatasetError(f"{self.what} ({where}): labels range over [{labels.min()}, {labels.max()}] but "
                                   f"the model's logits have {spec.classes} classes")
            return
        sample_shape = tuple(spec.output_shape[1:])
        if labels.dtype != np.float32 or labels.ndim != len(spec.output_shape) or any(
                d is not None and d != a for d, a in zip(sample_shape, labels.shape[1:])):
            raise DatasetError(f"{self.what} ({where}): MSE targets must be float32 shaped like the model output "
                               f"{list(spec.output_shape)}, got {labels.dtype}{list(labels.shape)}")


def _read_arrays(path: Path, names: list[str], what: str) -> dict[str, np.ndarray]:
    if path.is_dir():
        missing = [name for name in names if not (path / f"{name}.npy").is_file()]
        if missing:
            raise DatasetError(f"{what}: folder {path} has no {', '.join(n + '.npy' for n in missing)}")
        try:
            return {name: np.load(path / f"{name}.npy", mmap_mode="r", allow_pickle=False) for name in names}
        except ValueError as error:
            raise DatasetError(f"{what}: cannot read {path}: {error}") from None
    if not path.exists():
        raise DatasetError(f"{what} not found: {path}")
    if path.suffix != ".npz":
        raise DatasetError(f"{what} must be an .npz file or a folder of .npy files, got {path}")
    try:
        check_npz(path)  # before np.load allocates what a header declares
        with np.load(path, allow_pickle=False) as archive:
            missing = [name for name in names if name not in archive.files]
            if missing:
                raise DatasetError(f"{what}: {path} has arrays {archive.files}, missing {missing} (it needs one "
                                   f"array per model input plus the labels, axis 0 enumerating samples)")
            return {name: archive[name] for name in names}
    except ARCHIVE_ERRORS as error:
        raise DatasetError(f"{what}: cannot read {path}: {error}") from None
