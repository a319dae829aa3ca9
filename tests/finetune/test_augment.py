"""Training-time augmentation: shifts move pixels with zero fill, flips mirror, the draws depend only on (seed,
epoch, step), and inputs that are not image batches are refused."""

from __future__ import annotations

import numpy as np
import pytest

from onnxcompress.config import Augmentation
from onnxcompress.data import InputSpec
from onnxcompress.errors import ConfigError
from onnxcompress.training.augment import augment, check_image_inputs


def images(count: int = 16) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(3).random((count, 2, 6, 7), dtype=np.float32) + 1.0}


def test_shift_moves_pixels_and_fills_zeros() -> None:
    feeds = images()
    out = augment(feeds, Augmentation(shift=2), seed=0, epoch=0, step=0)["x"]
    moved = 0
    for source, result in zip(feeds["x"], out):
        # Find the shift: the zero border's extent, then compare the overlap exactly.
        matches = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                   if np.array_equal(np.roll(source, (dy, dx), axis=(1, 2))[_overlap(dy, dx, 6, 7)],
                                     result[_overlap(dy, dx, 6, 7)])
                   and np.count_nonzero(result) == 2 * (6 - abs(dy)) * (7 - abs(dx))]
        assert len(matches) == 1
        moved += matches[0] != (0, 0)
    assert moved > 8  # most of 16 samples move (each stays with probability 1/25)


def _overlap(dy: int, dx: int, height: int, width: int) -> tuple[slice, slice, slice]:
    rows = slice(max(dy, 0), height + min(dy, 0))
    columns = slice(max(dx, 0), width + min(dx, 0))
    return slice(None), rows, columns


def test_flip_mirrors_about_half_the_images() -> None:
    feeds = images(64)
    out = augment(feeds, Augmentation(horizontal_flip=True), seed=1, epoch=2, step=3)["x"]
    flipped = [np.array_equal(o, s[:, :, ::-1]) for o, s in zip(out, feeds["x"])]
    kept = [np.array_equal(o, s) for o, s in zip(out, feeds["x"])]
    assert all(f != k for f, k in zip(flipped, kept))
    assert 16 < sum(flipped) < 48


def test_draws_depend_on_seed_epoch_and_step_only() -> None:
    feeds, settings = images(), Augmentation(shift=3, horizontal_flip=True)
    first = augment(feeds, settings, seed=5, epoch=1, step=4)["x"]
    np.testing.assert_array_equal(first, augment(images(), settings, seed=5, epoch=1, step=4)["x"])
    for other in ({"seed": 6, "epoch": 1, "step": 4}, {"seed": 5, "epoch": 2, "step": 4},
                  {"seed": 5, "epoch": 1, "step": 5}):
        assert not np.array_equal(first, augment(feeds, settings, **other)["x"])
    np.testing.assert_array_equal(feeds["x"], images()["x"])  # the input batch is not modified


def test_disabled_augmentation_passes_feeds_through() -> None:
    feeds = images()
    assert augment(feeds, Augmentation(), seed=0, epoch=0, step=0) is feeds


def test_non_image_inputs_are_refused() -> None:
    tokens = InputSpec("ids", np.dtype(np.int64), (None, 128))
    with pytest.raises(ConfigError, match=r"4-D float image inputs.*'ids' is int64 \[\?, 128\]"):
        check_image_inputs(Augmentation(shift=1), [tokens])
    check_image_inputs(Augmentation(), [tokens])  # nothing asked, nothing checked
