"""Labelled data sources, seeded batching, and the learning-rate schedule (no training runtime needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from onnxcompress.config import Loss, TrainingConfig
from onnxcompress.data import InputSpec
from onnxcompress.errors import DatasetError
from onnxcompress.training.data import LabelledData, LabelSpec
from onnxcompress.training.trainer import learning_rate_at

INPUTS = [InputSpec("x", np.dtype(np.float32), (None, 2))]
CLASSES = LabelSpec(Loss.CROSS_ENTROPY, (None, 3))
X = np.arange(20, dtype=np.float32).reshape(10, 2)
Y = np.arange(10, dtype=np.int64) % 3


def rows(data: LabelledData, batch_size: int, seed: int | None) -> list[list[int]]:
    """Sample indices per batch (x[:, 0] / 2 is the sample's index) after checking labels travel with them."""
    batches = []
    for feeds, labels in data.batches(batch_size, seed):
        index = (feeds["x"][:, 0] // 2).astype(int)
        np.testing.assert_array_equal(labels, Y[index])
        batches.append(index.tolist())
    return batches


@pytest.mark.parametrize("kind", ["npz", "npy-folder", "pair"])
def test_sources_give_the_same_samples(tmp_path: Path, kind: str) -> None:
    if kind == "npz":
        np.savez(tmp_path / "d.npz", x=X, labels=Y)
        source: object = tmp_path / "d.npz"
    elif kind == "npy-folder":
        np.save(tmp_path / "x.npy", X)
        np.save(tmp_path / "labels.npy", Y)
        source = tmp_path
    else:
        source = ({"x": X}, Y)
    data = LabelledData(source, INPUTS, CLASSES)
    assert len(data) == 10 and data.steps(4) == 3
    assert rows(data, 4, None) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    shuffled = rows(data, 4, seed=7)
    assert sorted(sum(shuffled, [])) == list(range(10)) and shuffled != rows(data, 4, None)
    assert shuffled == rows(data, 4, seed=7) != rows(data, 4, seed=8)


def test_an_iterable_of_batches_is_read_in_order() -> None:
    data = LabelledData([({"x": X[:6]}, Y[:6]), ({"x": X[6:]}, Y[6:])], INPUTS, CLASSES)
    assert not data.shuffled and data.steps(99) == 2  # the learning-rate schedule needs the epoch length
    assert rows(data, 99, seed=1) == [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9]]


def test_an_unsized_iterable_is_counted_once() -> None:
    class Batches:
        passes = 0

        def __iter__(self):
            Batches.passes += 1
            yield {"x": X[:6]}, Y[:6]
            yield {"x": X[6:]}, Y[6:]

    data = LabelledData(Batches(), INPUTS, CLASSES)
    assert [data.steps(4) for _ in range(3)] == [2, 2, 2] and Batches.passes == 1


@pytest.mark.parametrize(("source", "spec", "message"), [
    (({"x": X.astype(np.float64)}, Y), CLASSES, "input 'x' is float64, the model expects float32"),
    (({"x": X.reshape(10, 2, 1)}, Y), CLASSES, r"has shape \[10, 2, 1\], the model expects \[\?, 2\]"),
    (({"x": X}, Y[:9]), CLASSES, "10 samples of 'x' but 9 labels"),
    (({"x": X}, Y + 3), CLASSES, r"labels range over \[3, 5\] but the model's logits have 3 classes"),
    (({"x": X}, Y.astype(np.float32)), CLASSES, "1-D integer array of class indices"),
    (({"x": X}, np.zeros((10, 4), np.float32)), LabelSpec(Loss.MSE, (None, 3)),
     r"MSE targets must be float32 shaped like the model output \[None, 3\], got float32\[10, 4\]"),
])
def test_bad_arrays_are_refused(source: tuple, spec: LabelSpec, message: str) -> None:
    with pytest.raises(DatasetError, match=message):
        LabelledData(source, INPUTS, spec)


def test_a_bad_batch_of_an_iterable_is_named() -> None:
    data = LabelledData([({"x": X}, Y), ({"y": X}, Y)], INPUTS, CLASSES)
    with pytest.raises(DatasetError, match=r"batch 1\): arrays \['y'\] do not match the model inputs \['x'\]"):
        list(data.batches(4))


def test_a_one_shot_iterator_is_refused() -> None:
    with pytest.raises(DatasetError, match="one-shot iterator cannot be read once per epoch"):
        LabelledData(iter([({"x": X}, Y)]), INPUTS, CLASSES)


def test_npy_folder_without_labels(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", X)
    with pytest.raises(DatasetError, match="has no labels.npy"):
        LabelledData(tmp_path, INPUTS, CLASSES)


def test_warmup_then_cosine_to_zero() -> None:
    config = TrainingConfig(epochs=2, learning_rate=0.1, warmup_steps=4)
    rates = [learning_rate_at(step, 10, config) for step in range(20)]
    assert rates[:4] == pytest.approx([0.025, 0.05, 0.075, 0.1])
    assert rates[4] == pytest.approx(0.1) and rates[12] == pytest.approx(0.05)
    assert all(a >= b for a, b in zip(rates[4:], rates[5:])) and rates[-1] < 0.001


def test_step_schedule_decays_every_step_epochs() -> None:
    config = TrainingConfig(epochs=6, learning_rate=1.0, schedule="step", step_epochs=2, gamma=0.5)
    assert [learning_rate_at(epoch * 10 + 3, 10, config) for epoch in range(6)] == [1, 1, 0.5, 0.5, 0.25, 0.25]


def test_the_api_functions_survive_importing_every_subpackage() -> None:
    """A subpackage named like an API function would replace `onnxcompress.<name>` once anything imports it."""
    import importlib
    import pkgutil

    import onnxcompress

    for module in pkgutil.walk_packages(onnxcompress.__path__, "onnxcompress."):
        if not module.name.endswith("__main__"):
            importlib.import_module(module.name)
    for name in onnxcompress.__all__:
        assert callable(getattr(onnxcompress, name)), name
