"""Training-time augmentation of image inputs: per-sample random shifts (zero fill) and left-right flips.

The random numbers of a batch come from (seed, epoch, step) alone, so a resumed run trains on the same images as
an uninterrupted one.
"""

from __future__ import annotations

import numpy as np

from onnxcompress.config import Augmentation
from onnxcompress.data import InputSpec
from onnxcompress.errors import ConfigError


def check_image_inputs(augmentation: Augmentation, inputs: list[InputSpec]) -> None:
    """Augmentation changes every model input, so each must be a 4-D float image batch."""
    if not augmentation.enabled:
        return
    for spec in inputs:
        if len(spec.shape) != 4 or not np.issubdtype(spec.dtype, np.floating):
            raise ConfigError(f"training.augmentation needs 4-D float image inputs [N, C, H, W]; input "
                              f"'{spec.name}' is {spec.dtype} {spec.describe_shape()}")


def augment(feeds: dict[str, np.ndarray], augmentation: Augmentation, seed: int, epoch: int,
            step: int) -> dict[str, np.ndarray]:
    """`feeds` with every image shifted and flipped as (seed, epoch, step) draws; all inputs alike per sample."""
    if not augmentation.enabled:
        return feeds
    rng = np.random.default_rng([seed, epoch, step])
    count = len(next(iter(feeds.values())))
    limit = augmentation.shift
    shifts = rng.integers(-limit, limit + 1, size=(count, 2))
    flips = rng.random(count) < 0.5 if augmentation.horizontal_flip else np.zeros(count, bool)
    return {name: _transform(images, shifts, flips) for name, images in feeds.items()}


def _transform(images: np.ndarray, shifts: np.ndarray, flips: np.ndarray) -> np.ndarray:
    out = np.zeros_like(images)
    height, width = images.shape[2:]
    for index, ((dy, dx), flip) in enumerate(zip(shifts, flips)):
        source = images[index, :, :, ::-1] if flip else images[index]
        rows, columns = _window(int(dy), height), _window(int(dx), width)
        out[index, :, rows[0], columns[0]] = source[:, rows[1], columns[1]]
    return out


def _window(shift: int, size: int) -> tuple[slice, slice]:
    """(target, source) slices of an axis of `size` moved by `shift` (positive: towards higher indices)."""
    shift = max(-size, min(size, shift))
    if shift >= 0:
        return slice(shift, size), slice(0, size - shift)
    return slice(0, size + shift), slice(-shift, size)
